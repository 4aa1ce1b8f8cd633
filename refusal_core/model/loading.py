"""Loading a model offline: the toy model, local directories, checkpoints, GGUF files, cached hub ids.

Also where dtype and device arguments are resolved (:func:`resolve_dtype`,
:func:`check_device`) and chat templates read (:func:`read_chat_template`).
A ``.gguf`` file is converted once into a safetensors directory cached under
:func:`gguf_cache_root`, keyed by the file's sha256.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from refusal_core.errors import InvalidArgumentError, ModelNotFoundError, RefusalCoreError
from refusal_core.model.layout import get_layout
from refusal_core.model.simulated import restore_checkpoint_modules_
from refusal_core.saving import file_sha256, read_checkpoint_record, respect_umask_
from refusal_core.toy import TOY_MODELS, load_toy_model

__all__ = [
    "CACHE_ENV_VAR",
    "DTYPES",
    "check_device",
    "gguf_cache_root",
    "gguf_cached_dir",
    "hub_cache_dir",
    "load_model",
    "model_record",
    "read_chat_template",
    "resolve_dtype",
]


#: The dtype names ``load_model`` accepts (besides a floating ``torch.dtype``).
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

# "org/name": one slash, Hub-legal characters, no leading dot or dash.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype | str:
    """The dtype to load with: a name of :data:`DTYPES`, a floating ``torch.dtype``, or None.

    None means float32 on CPU and the checkpoint's own dtype (transformers'
    ``"auto"``) on CUDA or with ``device="auto"``.
    """
    if dtype is None:
        return torch.float32 if device == "cpu" else "auto"
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InvalidArgumentError(
                f"dtype must be one of {sorted(DTYPES)} or a torch.dtype, got {dtype!r}"
            )
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    raise InvalidArgumentError(
        f"dtype must be one of {sorted(DTYPES)} or a floating torch.dtype, got {dtype!r}"
    )


def check_device(device: object) -> str:
    """``device`` checked: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (N a visible GPU) or ``"auto"``.

    A CUDA device on a machine without CUDA is an
    :class:`~refusal_core.errors.InvalidArgumentError` naming it.
    """
    if not isinstance(device, str) or not re.fullmatch(r"cpu|auto|cuda(:[0-9]+)?", device):
        raise InvalidArgumentError(f"device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InvalidArgumentError(
                f"device {device!r} requested but CUDA is not available on this machine"
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise InvalidArgumentError(
                f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    return device


def read_chat_template(chat_template: str | Path) -> str:
    """The template text from a Jinja file path or a template string (one with ``{{`` or ``{%``)."""
    if isinstance(chat_template, Path) or (
        isinstance(chat_template, str) and "{{" not in chat_template and "{%" not in chat_template
    ):
        path = Path(chat_template)
        if not path.is_file():
            raise InvalidArgumentError(
                f"chat_template {str(chat_template)!r} is neither an existing file nor a Jinja template"
            )
        text = path.read_text(encoding="utf-8")
    elif isinstance(chat_template, str):
        text = chat_template
    else:
        raise InvalidArgumentError(
            f"chat_template must be a path or a template string, got {type(chat_template).__name__}"
        )
    if "{{" not in text and "{%" not in text:
        raise InvalidArgumentError(f"chat_template {str(chat_template)!r} holds no Jinja template")
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    try:  # the environment transformers renders chat templates in
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(extensions=[jinja2.ext.loopcontrols])
        env.parse(text)
    except jinja2.TemplateSyntaxError as exc:
        where = "" if len(text) > 60 else f" {text!r}"
        raise InvalidArgumentError(
            f"chat_template{where} is not valid Jinja (line {exc.lineno}: {exc.message})"
        ) from None
    return text


#: The conversation a chat template given to :func:`load_model` must render, with its text in the output.
_PROBE_MESSAGE = "refusal-core probe message"


def check_chat_template_renders(tokenizer: Any) -> None:
    """Render a one-message conversation with the tokenizer's chat template (and the generation
    prompt); raise one line when it fails or leaves the message out, so a bad template fails at
    load, not later in the first forward pass far from its cause."""
    messages = [{"role": "user", "content": _PROBE_MESSAGE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # jinja2 and transformers raise many types while rendering
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InvalidArgumentError(
            f"chat_template cannot render a one-message conversation: {type(exc).__name__}: {first}"
        ) from None
    if _PROBE_MESSAGE not in str(text):
        raise InvalidArgumentError("chat_template renders a conversation without its messages' text")


def hub_cache_dir() -> Path:
    """The local Hugging Face hub cache (``HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _resolve_hub_id(repo_id: str) -> Path:
    """The local snapshot directory of ``repo_id`` in the HF cache; never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return Path(str(snapshot_download(repo_id, local_files_only=True, cache_dir=cache)))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"model {repo_id!r} is not a local path and not in the local Hugging Face cache {str(cache)!r} "
            f"(offline: nothing is downloaded; fetch it with `hf download {repo_id}` where there is network)"
        ) from exc


#: Environment variable naming refusal_core's cache root (default ``~/.cache/refusal_core``).
CACHE_ENV_VAR = "REFUSAL_CORE_CACHE"


def gguf_cache_root() -> Path:
    """Converted GGUF models live in ``$REFUSAL_CORE_CACHE/gguf`` (else ``~/.cache/refusal_core/gguf``)."""
    env = os.environ.get(CACHE_ENV_VAR, "").strip()
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "refusal_core"
    return base / "gguf"


def _read_gguf(path: Path) -> tuple[Any, Any]:
    """``(model, tokenizer)`` dequantized from a GGUF file by transformers, in float32 (slow: minutes)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"local_files_only": True, "gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
    return model, tokenizer


def gguf_cached_dir(path: str | os.PathLike[str]) -> Path:
    """The safetensors Hugging Face directory converted from the GGUF file ``path``, made on first use.

    Keyed by the file's sha256 (``gguf_cache_root() / <sha256>``), so a changed
    file is converted anew and a renamed one is not. The weights are the
    float32 dequantization transformers computes from the GGUF, saved as is,
    so loading the directory gives bit-identical weights in seconds instead of
    re-dequantizing. Written atomically: into a temporary directory beside the
    target, renamed into place when complete; a failed conversion leaves no
    cache entry. ``refusal_core_gguf.json`` in it records the source.
    """
    src = Path(path)
    if not src.is_file() or src.suffix != ".gguf":
        raise InvalidArgumentError(f"{str(src)!r} is not a .gguf file")
    with open(src, "rb") as fh:  # every GGUF file starts with these 4 bytes; a renamed text file not
        if fh.read(4) != _GGUF_MAGIC:
            raise InvalidArgumentError(f"{str(src)!r} is not a GGUF file (it does not start with 'GGUF')")
    digest = file_sha256(src)
    root = gguf_cache_root()
    target = root / digest
    if (target / _GGUF_RECORD).is_file():
        return target
    made = [d for d in (root, *root.parents) if not d.exists()]  # to remove again if conversion fails
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest[:16]}-", dir=root))
    converted = False
    try:
        model, tokenizer = _read_gguf(src)
        _save_dequantized(model, tmp)
        tokenizer.save_pretrained(tmp)
        record = {"source": str(src.resolve()), "sha256": digest, "bytes": src.stat().st_size}
        (tmp / _GGUF_RECORD).write_text(json.dumps(record, indent=2), encoding="utf-8")
        try:
            os.rename(respect_umask_(tmp, recursive=True), target)
        except OSError:
            if not (target / _GGUF_RECORD).is_file():  # not another process's finished conversion
                raise
        converted = True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not converted:  # leave no empty cache folder this call created
            for d in made:
                with contextlib.suppress(OSError):
                    d.rmdir()
    return target


_GGUF_RECORD = "refusal_core_gguf.json"
_GGUF_MAGIC = b"GGUF"


def _save_dequantized(model: Any, directory: Path) -> None:
    """Save a GGUF-loaded model as a plain float Hugging Face directory.

    transformers refuses ``save_pretrained`` on a model loaded with
    ``gguf_file=`` (it counts as quantized), although its weights are plain
    dequantized tensors; so the weights go to ``model.safetensors`` directly
    and the config is saved without its GGUF quantization record. A tied
    ``lm_head`` is left out (transformers re-ties it on load).
    """
    from safetensors.torch import save_file

    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file(
        {k: v.detach().contiguous() for k, v in state.items()},
        str(directory / "model.safetensors"),
        metadata={"format": "pt"},
    )
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(directory)


def _load_gguf(path: Path, *, dtype: torch.dtype | str) -> tuple[nn.Module, Any]:
    """Model and tokenizer from a ``.gguf`` file, through its cached safetensors conversion.

    The first load dequantizes the file with transformers (needs ``gguf``) into
    :func:`gguf_cached_dir`; every later load reads that directory in seconds.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = str(gguf_cached_dir(path))
    kwargs: dict[str, Any] = {"local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation="eager", **kwargs)
    return model, tokenizer


def _load_directory(path: Path, *, dtype: torch.dtype | str, device: str) -> tuple[nn.Module, Any]:
    """Model and tokenizer from a local Hugging Face directory, placed on ``device`` while loading.

    A directory written by :func:`~refusal_core.checkpoint.save_checkpoint` has its
    file hashes checked first (:func:`~refusal_core.saving.read_checkpoint_record`), and
    after loading gets back what transformers does not rebuild
    (:func:`~refusal_core.model.simulated.restore_checkpoint_modules_`).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").is_file():  # the cause, before transformers' tokenizer guesswork
        raise InvalidArgumentError(
            f"model {str(path)!r} is not a Hugging Face model directory: it has no config.json"
        )
    record = read_checkpoint_record(path)
    kwargs: dict[str, Any] = {"local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    if device != "cpu":  # "auto" is accelerate's device map; "cuda:N" loads straight onto that GPU
        kwargs["device_map"] = device
    if _is_compressed_tensors(path):
        return _load_compressed_tensors(path, dtype=dtype, device=device), tokenizer
    with _held_load_report() as held:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, attn_implementation="eager", **kwargs
            )
        except RuntimeError as exc:
            if "mismatched_sizes" not in str(exc) and "size mismatch" not in str(exc):
                raise
            held.clear()  # the one line below says it; transformers' table would repeat it in 10+ lines
            raise InvalidArgumentError(
                f"model {str(path)!r} does not load: weight shapes do not match its config.json"
                f"{_first_shape_mismatch(path)}"
            ) from None
    if record is not None:
        restore_checkpoint_modules_(model, record)
    return model, tokenizer


@contextlib.contextmanager
def _held_load_report() -> Iterator[list[logging.LogRecord]]:
    """Hold transformers' load report (a multi-line table it logs before raising on mismatched
    weights) while loading; emit it afterwards unless the caller cleared the list."""
    target = logging.getLogger("transformers.modeling_utils")
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            held.append(record)
            return False
        return True

    target.addFilter(hold)
    try:
        yield held
    finally:
        target.removeFilter(hold)
        for record in held:
            target.handle(record)


def _first_shape_mismatch(path: Path) -> str:
    """``" (NAME: checkpoint [..], config [..])"`` for the first weight whose shape in the
    safetensors files differs from the model its config.json builds; ``""`` if none is found."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with torch.device("meta"):
            expected = {
                k: tuple(v.shape)
                for k, v in AutoModelForCausalLM.from_config(
                    AutoConfig.from_pretrained(str(path), local_files_only=True)
                )
                .state_dict()
                .items()
            }
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for key in sorted(f.keys()):
                    got = tuple(f.get_slice(key).get_shape())
                    if key in expected and expected[key] != got:
                        return f" ({key}: checkpoint {list(got)}, config {list(expected[key])})"
    except Exception:  # a best-effort detail: never hide the error it decorates
        return ""
    return ""


def _is_compressed_tensors(path: Path) -> bool:
    """Whether ``path/config.json`` declares a compressed-tensors checkpoint (llmcompressor's format)."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # transformers reports a missing or broken config itself
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors"


#: Parameters compressed-tensors keeps beside a decompressed weight (scales, zero points, shapes).
_CT_QUANT_PARAMS = re.compile(r"\.(weight|input|output)_(scale|zero_point|shape|g_idx|global_scale)$")


def _load_compressed_tensors(path: Path, *, dtype: torch.dtype | str, device: str) -> nn.Module:
    """A compressed-tensors checkpoint (llmcompressor's ``save_compressed``) as a plain float model.

    transformers (5.17) leaves such weights packed (``weight_packed``, no
    ``weight``) until a hook decompresses them on the first forward, and even
    decompressed the modules keep compressed-tensors' wrapped ``forward`` and
    scale parameters. So the checkpoint is loaded with
    ``CompressedTensorsConfig(dequantize=True)`` (decompressed by
    compressed-tensors at load time) and its weights are copied into a model
    built from the same config without ``quantization_config``: plain
    ``nn.Linear`` modules computing with exactly the decompressed weights,
    which every stage can hook, edit and save. Needs ``compressed-tensors``
    (installed with llmcompressor); without it transformers' ImportError
    becomes the loader's InvalidArgumentError.
    """
    import warnings

    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    with warnings.catch_warnings():
        # "the quantization_config from the model will be used; loading attributes overwritten": intended
        warnings.simplefilter("ignore", UserWarning)
        packed = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=dtype,
            attn_implementation="eager",
            local_files_only=True,
            quantization_config=CompressedTensorsConfig(dequantize=True),
        )
    config = copy.deepcopy(packed.config)
    if hasattr(config, "quantization_config"):  # transformers drops it when it dequantizes; not always
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=packed.dtype, attn_implementation="eager")
    state = packed.state_dict()
    weights = {k: v for k, v in state.items() if not _CT_QUANT_PARAMS.search(k)}
    missing = sorted(set(plain.state_dict()) - set(weights))
    unknown = sorted(set(weights) - set(plain.state_dict()))
    if missing or unknown:
        raise InvalidArgumentError(
            f"compressed-tensors checkpoint {str(path)!r} did not decompress into its architecture: "
            f"missing {missing[:4]}, unexpected {unknown[:4]}"
        )
    plain.load_state_dict(weights, strict=True)
    plain.generation_config = packed.generation_config
    del packed, state
    _move(plain, device)
    return plain


def load_model(
    spec: str,
    *,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    chat_template: str | Path | None = None,
) -> tuple[nn.Module, Any]:
    """Load ``(model, tokenizer)``, offline, in eval mode with eager attention.

    ``spec`` is ``"toy"`` (the embedded toy refusal model; ``"toy-moe"`` its Mixture-of-Experts
    sibling), a local Hugging
    Face directory (also one written by
    :func:`~refusal_core.checkpoint.save_checkpoint`), an existing ``.gguf``
    file (needs the ``gguf`` package), or a hub id ``"org/name"`` found in the
    local HF cache (:func:`hub_cache_dir`; never downloaded: a missing one
    raises :class:`~refusal_core.errors.ModelNotFoundError` naming the id and
    the cache).

    ``device``: ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (accelerate's
    device map over the visible GPUs, CPU when there is none). ``dtype``:
    ``"float32"``, ``"bfloat16"``, ``"float16"``, a floating ``torch.dtype``, or
    None: float32 on CPU, the checkpoint's own dtype on a GPU.
    ``chat_template``: a Jinja file or template string, set on the tokenizer
    (for tokenizers that have none; it replaces an existing one). A tokenizer
    without any template loads, and :func:`~refusal_core.model.inputs.format_prompt` then raises.

    The model's layout is checked; arguments are checked before anything loads.
    ``load_model("toy")`` is exactly :func:`~refusal_core.toy.load_toy_model`.

    Example:
        >>> from refusal_core.model import model_identity
        >>> model, tok = load_model("toy")
        >>> model_identity(model)["dtype"], model_identity(model)["device"]
        ('float32', 'cpu')
    """
    if not isinstance(spec, str) or not spec:
        raise InvalidArgumentError(f"model spec must be a non-empty str, got {spec!r}")
    device = check_device(device)
    load_dtype = resolve_dtype(dtype, device)
    template = None if chat_template is None else read_chat_template(chat_template)
    if spec in TOY_MODELS:
        model, tokenizer = load_toy_model(
            dtype=load_dtype if isinstance(load_dtype, torch.dtype) else torch.float32, name=spec
        )
        _move(model, device)
    else:
        path = Path(spec)
        if path.exists():
            name = str(path.resolve())
        elif _HUB_ID.match(spec):
            path, name = _resolve_hub_id(spec), spec
        else:
            raise ModelNotFoundError(
                f"model path {spec!r} does not exist (and is not 'toy' or a hub id 'org/name')"
            )
        try:
            if path.is_file():
                if path.suffix != ".gguf":
                    raise InvalidArgumentError(
                        f"model file {spec!r} is not a .gguf file or a model directory"
                    )
                model, tokenizer = _load_gguf(path, dtype=load_dtype)
                _move(model, device)
            else:
                model, tokenizer = _load_directory(path, dtype=load_dtype, device=device)
        except RefusalCoreError:
            raise
        except Exception as exc:  # transformers raises many unrelated types here
            # One line: the first line of the library's message (the rest is advice or a table).
            first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
            raise InvalidArgumentError(
                f"model {spec!r} does not load: {first} ({type(exc).__name__})"
            ) from exc
        config: Any = model.config
        config._name_or_path = name
    get_layout(model)
    model.eval()
    if template is not None:
        tokenizer.chat_template = template
        check_chat_template_renders(tokenizer)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


def model_record(spec: str) -> dict[str, Any] | None:
    """The refusal_core record (hash-checked) of the model :func:`load_model` loads for ``spec``.

    It says what made the model (the compression method and its config, a repair) and names its
    base's identity. None for a packaged toy, a GGUF file, a hub id and any directory that is not a
    checkpoint this tool wrote. Raises as :func:`~refusal_core.saving.read_checkpoint_record`
    does for a record that does not verify.
    """
    if spec in TOY_MODELS or not Path(spec).is_dir():
        return None
    return read_checkpoint_record(Path(spec))


def _move(model: nn.Module, device: str) -> None:
    """Put a model loaded on CPU onto ``device`` (``"auto"``: the first GPU if there is one)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        nn.Module.to(model, device)
