"""GGUF models are converted once into a cached safetensors directory keyed by the file's sha256.

Writing a GGUF that transformers' ``gguf_file=`` loader accepts (llama.cpp tensor
names, q/k permutation, a tokenizer embedded as GGUF metadata) is beyond a unit
test here, so the one step that reads the GGUF (``models._read_gguf``) is replaced
by a stand-in that returns a tiny model chosen by the file's bytes; everything
else (hashing, conversion, the atomic write, loading the cache) is the real code.
The real GGUF goes through the same path in the ``real`` tier.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from refusal_core import models
from refusal_core.errors import InvalidArgumentError
from refusal_core.models import gguf_cache_root, gguf_cached_dir, load_model
from refusal_core.testing.tiny import tiny_model, tiny_tokenizer


class FakeReader:
    """Stands in for ``_read_gguf``: a tiny Llama whose seed is the file's first byte; counts calls."""

    def __init__(self) -> None:
        self.calls: list[Path] = []

    def __call__(self, path: Path) -> tuple[Any, Any]:
        self.calls.append(path)
        return tiny_model("llama", seed=path.read_bytes()[0]), tiny_tokenizer()


@pytest.fixture
def reader(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeReader:
    monkeypatch.setenv("REFUSAL_CORE_CACHE", str(tmp_path / "cache"))
    fake = FakeReader()
    monkeypatch.setattr(models, "_read_gguf", fake)
    return fake


def _gguf(tmp_path: Path, name: str, first: int) -> Path:
    path = tmp_path / name
    path.write_bytes(bytes([first]) + b"GGUF stand-in")
    return path


def test_gguf_is_converted_once_and_loads_bit_identical(tmp_path: Path, reader: FakeReader) -> None:
    import hashlib

    gguf = _gguf(tmp_path, "m.gguf", 3)
    model, tok = load_model(str(gguf))
    assert len(reader.calls) == 1, f"first load read the GGUF {len(reader.calls)} times, expected once"
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    cached = tmp_path / "cache" / "gguf" / sha
    assert gguf_cache_root() == tmp_path / "cache" / "gguf", "REFUSAL_CORE_CACHE is not the cache root"
    assert (cached / "model.safetensors").is_file(), f"no safetensors weights in {cached}"
    record = json.loads((cached / "refusal_core_gguf.json").read_text())
    assert record["sha256"] == sha, f"cache record {record} does not name the file's sha256"
    leftovers = [p.name for p in cached.parent.iterdir() if p.name != sha]
    assert not leftovers, f"conversion left temporary entries {leftovers} in the cache"

    reference = tiny_model("llama", seed=3).state_dict()
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference[name]), f"cached weight {name} differs from the GGUF's"
    assert model.config._name_or_path == str(gguf.resolve()), "the model's recorded name is not the GGUF"
    text = "Tell me a story about the sea."
    assert tok(text)["input_ids"] == tiny_tokenizer()(text)["input_ids"], (
        "the cached tokenizer encodes differently"
    )

    again, _ = load_model(str(gguf), dtype=torch.bfloat16)
    assert len(reader.calls) == 1, "the second load converted the GGUF again instead of using the cache"
    for name, value in again.state_dict().items():
        assert torch.equal(value, reference[name].to(torch.bfloat16)), f"bf16 weight {name} differs"

    renamed = gguf.rename(tmp_path / "other-name.gguf")
    load_model(str(renamed))
    assert len(reader.calls) == 1, "a renamed but identical file was converted again"

    changed = _gguf(tmp_path, "m.gguf", 4)
    other, _ = load_model(str(changed))
    assert len(reader.calls) == 2, "a GGUF with new content was served from the old file's cache"
    w = other.model.layers[0].mlp.down_proj.weight
    assert torch.equal(w, tiny_model("llama", seed=4).model.layers[0].mlp.down_proj.weight), (
        "the changed file's cache holds the old weights"
    )


def test_failed_conversion_leaves_no_cache_entry(
    tmp_path: Path, reader: FakeReader, monkeypatch: pytest.MonkeyPatch
) -> None:
    gguf = _gguf(tmp_path, "m.gguf", 5)

    def broken_save(self: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(type(tiny_tokenizer()), "save_pretrained", broken_save)
    with pytest.raises(InvalidArgumentError, match="disk full"):
        load_model(str(gguf))
    root = tmp_path / "cache" / "gguf"
    assert not list(root.iterdir()), (
        f"a failed conversion left {[p.name for p in root.iterdir()]} in the cache"
    )
    monkeypatch.undo()


def test_gguf_cached_dir_rejects_what_is_not_a_gguf_file(tmp_path: Path, reader: FakeReader) -> None:
    text = tmp_path / "weights.bin"
    text.write_bytes(b"x")
    with pytest.raises(InvalidArgumentError, match="gguf"):
        gguf_cached_dir(text)
    with pytest.raises(InvalidArgumentError, match="gguf"):
        gguf_cached_dir(tmp_path / "missing.gguf")
    assert not reader.calls, "a rejected path reached the GGUF reader"
