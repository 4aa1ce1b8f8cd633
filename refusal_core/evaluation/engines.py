"""Evaluation engines: what turns chat-formatted prompt token ids into completions.

Two engines answer the same request, ``complete(prompts, samplings, seeds,
max_new_tokens=..., stop_token_ids=...)`` with ``out[c][i]`` the new token ids
of prompt ``i`` under configuration ``c`` (stop token excluded), the shape of
:func:`~refusal_core.evaluation.generation.generate_ids_multi`:

* ``torch`` (:class:`TorchEngine`): this package's decoding loop on an
  in-memory model (hooks allowed; the default everywhere).
* ``vllm`` (:class:`VllmEngine`): vLLM's offline ``LLM`` serving a checkpoint
  DIRECTORY (everything this tool writes loads with ``from_pretrained``), for
  continuous batching, tensor parallelism and prefix caching on large models.
  ``vllm`` is imported only when such an engine is opened, so the default tier
  never needs it.

What stays the same across engines, so completions go to the same judges and
statistics: the prompts are token ids made by this package's tokenizer and
chat template (:func:`~refusal_core.model.encode_prompts`; vLLM never applies a
template or tokenizes), the token budget, the stop ids (vLLM stops on exactly
them: ``ignore_eos`` is set and the ids are passed as ``stop_token_ids``, so a
model's eos that the torch path would not stop on does not stop vLLM either),
and the sampling settings (temperature, top-p, top-k; greedy is temperature 0).
Greedy decoding is the same computation, so its tokens agree wherever the
arithmetic does (``tests/vllm_tier/test_parity.py`` measures it). Sampled draws come
from vLLM's per-request seeded generator, a different random stream from the
torch path's one generator per configuration: a sampled completion is
reproducible per engine, not equal across engines. Each request's seed is
derived from its configuration's seed and its prompt's token ids, so a draw does
not depend on batching or on which other prompts are in the call; repeated
prompts (the decoding grid's ``n_samples`` copies) become one request with
``n`` samples.

Example (the torch engine; the vLLM one needs ``tox -e vllm``):
    >>> from refusal_core.testing.tiny import tiny_model, tiny_tokenizer
    >>> from refusal_core.model import encode_prompts
    >>> model, tok = tiny_model(), tiny_tokenizer()
    >>> ids = encode_prompts(tok, ["Hi"])
    >>> out = generate_completions("torch", model, tok, ids, [None], [0], max_new_tokens=3)
    >>> len(out), len(out[0])
    (1, 1)
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from torch import nn

from refusal_core.checkpoint import save_checkpoint
from refusal_core.errors import InvalidArgumentError
from refusal_core.evaluation.generation import (
    GenerationCache,
    SamplingConfig,
    _check_positive_int,
    eos_token_ids,
    generate_ids_multi,
)
from refusal_core.model import load_model

__all__ = [
    "ENGINES",
    "Engine",
    "EngineName",
    "TorchEngine",
    "VllmEngine",
    "VllmSettings",
    "check_engine_name",
    "checkpoint_stop_ids",
    "generate_completions",
    "open_engine",
    "open_variant_engine",
    "request_seed",
]

EngineName = Literal["torch", "vllm"]
ENGINES: tuple[str, ...] = ("torch", "vllm")


def check_engine_name(name: object) -> str:
    """``name`` if it is one of :data:`ENGINES`, else InvalidArgumentError naming them."""
    if not isinstance(name, str) or name not in ENGINES:
        raise InvalidArgumentError(f"engine must be one of {list(ENGINES)}, got {name!r}")
    return name


@dataclass(frozen=True)
class VllmSettings:
    """How vLLM serves a checkpoint (read only when the engine is ``vllm``)."""

    #: GPUs one model is split over (vLLM's tensor parallelism); 1 on CPU
    tensor_parallel_size: int = 1
    #: share of each GPU's memory vLLM may take for weights and KV cache (the torch stages need the rest)
    gpu_memory_utilization: float = 0.9
    #: vLLM's dtype; None: the evaluated model's own dtype (float32 for a CPU study), so both engines
    #: compute in the same precision
    dtype: str | None = None
    #: KV cache on CPU in GiB (vLLM's VLLM_CPU_KVCACHE_SPACE; its default is 4); ignored on a GPU
    cpu_kv_cache_gib: int = 1
    #: longest prompt + completion in tokens; None: the model's own context length
    max_model_len: int | None = None
    #: skip CUDA graph capture (slower decoding, faster start, less memory)
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        tp = self.tensor_parallel_size
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise InvalidArgumentError(f"tensor_parallel_size must be an int >= 1, got {tp!r}")
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not (0.0 < u <= 1.0):
            raise InvalidArgumentError(f"gpu_memory_utilization must lie in (0, 1], got {u!r}")
        if self.dtype is not None and self.dtype not in ("float32", "bfloat16", "float16"):
            raise InvalidArgumentError(
                f"vllm dtype must be None, 'float32', 'bfloat16' or 'float16', got {self.dtype!r}"
            )
        kv = self.cpu_kv_cache_gib
        if isinstance(kv, bool) or not isinstance(kv, int) or kv < 1:
            raise InvalidArgumentError(f"cpu_kv_cache_gib must be an int >= 1, got {kv!r}")
        m = self.max_model_len
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise InvalidArgumentError(f"max_model_len must be None or an int >= 1, got {m!r}")
        if not isinstance(self.enforce_eager, bool):
            raise InvalidArgumentError(f"enforce_eager must be a bool, got {self.enforce_eager!r}")


@runtime_checkable
class Engine(Protocol):
    """An open engine; ``close`` releases its model (vLLM: its worker processes and memory)."""

    @property
    def name(self) -> str: ...

    def complete(
        self,
        prompts: Sequence[Sequence[int]],
        samplings: Sequence[SamplingConfig | None],
        seeds: Sequence[int],
        *,
        max_new_tokens: int,
        stop_token_ids: Sequence[int],
    ) -> list[list[list[int]]]: ...

    def close(self) -> None: ...


class TorchEngine:
    """This package's batched decoding loop (:func:`generate_ids_multi`) on an in-memory model."""

    name = "torch"

    def __init__(self, model: nn.Module, tokenizer: Any, *, batch_size: int = 16, progress: bool = False):
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(f"the torch engine needs an nn.Module, got {type(model).__name__}")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size = _check_positive_int(batch_size, "batch_size")
        self.progress = progress

    def complete(
        self,
        prompts: Sequence[Sequence[int]],
        samplings: Sequence[SamplingConfig | None],
        seeds: Sequence[int],
        *,
        max_new_tokens: int,
        stop_token_ids: Sequence[int],
    ) -> list[list[list[int]]]:
        return generate_ids_multi(
            self.model,
            self.tokenizer,
            prompts,
            samplings,
            seeds,
            max_new_tokens=max_new_tokens,
            batch_size=self.batch_size,
            stop_token_ids=stop_token_ids,
            progress=self.progress,
        )

    def close(self) -> None:
        """Nothing to release: the model belongs to the caller."""


def request_seed(config_seed: int, prompt: Sequence[int]) -> int:
    """The seed of one vLLM request: a hash of its configuration's seed and its prompt's token ids.

    56 bits, so it fits every integer type vLLM stores it in.
    """
    text = f"{int(config_seed)}:{','.join(str(int(t)) for t in prompt)}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")


def _vllm_sampling_params(
    sampling: SamplingConfig | None, seed: int, n: int, max_new_tokens: int, stops: list[int]
) -> Any:
    from vllm import SamplingParams

    common: dict[str, Any] = {
        "n": n,
        "max_tokens": max_new_tokens,
        # stop on exactly the torch path's ids: vLLM's own eos handling is switched off
        "stop_token_ids": stops,
        "ignore_eos": True,
        "detokenize": False,  # texts are decoded by this package's tokenizer, as on the torch path
    }
    if sampling is None:
        return SamplingParams(temperature=0.0, **common)
    return SamplingParams(
        temperature=float(sampling.temperature),
        top_p=float(sampling.top_p),
        top_k=sampling.top_k if sampling.top_k > 0 else -1,  # -1: no top-k filter in every vLLM version
        seed=seed,
        **common,
    )


def _cut_at_stop(ids: Sequence[int], stops: set[int]) -> list[int]:
    """The tokens before the first stop id (vLLM keeps the stop token; the torch path does not)."""
    out: list[int] = []
    for t in ids:
        if int(t) in stops:
            break
        out.append(int(t))
    return out


class VllmEngine:
    """vLLM's offline ``LLM`` on a checkpoint directory; opened once, asked many times, then closed.

    ``dtype`` is the dtype vLLM computes in (``"float32"``, ``"bfloat16"``,
    ``"float16"``). The tokenizer is not loaded by vLLM
    (``skip_tokenizer_init``): prompts arrive as token ids and completions leave
    as token ids. The process must be a spawn-safe script (an
    ``if __name__ == "__main__":`` guard): vLLM starts worker processes.
    """

    name = "vllm"

    def __init__(
        self, checkpoint_dir: str | Path, settings: VllmSettings, *, dtype: str, seed: int = 0
    ) -> None:
        path = Path(checkpoint_dir)
        if not (path / "config.json").is_file():
            raise InvalidArgumentError(
                f"the vllm engine serves a checkpoint directory with a config.json; {path} is not one "
                "(save the model with refusal_core.checkpoint.save_checkpoint first)"
            )
        if not isinstance(settings, VllmSettings):
            raise InvalidArgumentError(f"settings must be VllmSettings, got {type(settings).__name__}")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise InvalidArgumentError(f"dtype must be 'float32', 'bfloat16' or 'float16', got {dtype!r}")
        # vLLM's CPU build sizes its KV cache from this variable when it starts.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.cpu_kv_cache_gib))
        import torch

        if not torch.cuda.is_available():
            # CPU: vLLM's engine core runs in this process instead of a spawned one, which would import
            # vLLM and torch again (about 30 s here) and compete with this process for the cores
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        try:
            from vllm import LLM
        except ImportError as exc:  # the default tier has no vLLM: say how to get it
            raise InvalidArgumentError(
                f"engine 'vllm' needs the vllm package (GPU: pip install vllm; CPU: tox -e vllm): {exc}"
            ) from exc
        kwargs: dict[str, Any] = {
            "model": str(path),
            "skip_tokenizer_init": True,
            "dtype": dtype,
            "seed": int(seed),
            "tensor_parallel_size": settings.tensor_parallel_size,
            "gpu_memory_utilization": settings.gpu_memory_utilization,
            "enforce_eager": settings.enforce_eager,
        }
        if settings.max_model_len is not None:
            kwargs["max_model_len"] = settings.max_model_len
        if settings.tensor_parallel_size == 1:
            # one device: the worker runs in this process (no spawned worker importing vLLM again)
            kwargs["distributed_executor_backend"] = "uni"
        self.path, self.settings, self.dtype = path, settings, dtype
        #: a directory this engine owns and removes on close (a study's per-variant checkpoint)
        self.owned_dir: Path | None = None
        self.llm: Any = LLM(**kwargs)

    def complete(
        self,
        prompts: Sequence[Sequence[int]],
        samplings: Sequence[SamplingConfig | None],
        seeds: Sequence[int],
        *,
        max_new_tokens: int,
        stop_token_ids: Sequence[int],
    ) -> list[list[list[int]]]:
        from vllm.inputs import TokensPrompt

        if self.llm is None:
            raise InvalidArgumentError("this vllm engine is closed")
        max_new_tokens = _check_positive_int(max_new_tokens, "max_new_tokens")
        stops = sorted({int(s) for s in stop_token_ids})
        if not stops:
            raise InvalidArgumentError("stop_token_ids is empty: give at least one stop id")
        # Identical prompts (the n_samples copies of a decoding grid) become one request with n draws.
        unique: dict[tuple[int, ...], list[int]] = {}
        for i, p in enumerate(prompts):
            unique.setdefault(tuple(int(t) for t in p), []).append(i)
        requests: list[Any] = []
        params: list[Any] = []
        where: list[tuple[int, list[int]]] = []
        for c, (sampling, seed) in enumerate(zip(samplings, seeds)):
            for ids, positions in unique.items():
                # greedy draws are all the same: ask once, copy
                n = 1 if sampling is None else len(positions)
                requests.append(TokensPrompt(prompt_token_ids=list(ids)))
                params.append(
                    _vllm_sampling_params(sampling, request_seed(seed, ids), n, max_new_tokens, stops)
                )
                where.append((c, positions))
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        if len(outputs) != len(requests):
            raise InvalidArgumentError(f"vLLM answered {len(outputs)} of {len(requests)} requests")
        stop_set = set(stops)
        results: list[list[list[int]]] = [[[] for _ in prompts] for _ in samplings]
        for (c, positions), out in zip(where, outputs):
            draws = [_cut_at_stop(o.token_ids, stop_set) for o in sorted(out.outputs, key=lambda o: o.index)]
            for k, i in enumerate(positions):
                results[c][i] = list(draws[0 if len(draws) == 1 else k])
        return results

    def close(self) -> None:
        """Shut vLLM's engine down and free its memory (the object cannot be used afterwards)."""
        llm, self.llm = self.llm, None
        if llm is None:
            return
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        shutdown = getattr(core, "shutdown", None)
        if callable(shutdown):
            shutdown()
        del llm
        import gc

        gc.collect()
        if self.owned_dir is not None:
            import shutil

            shutil.rmtree(self.owned_dir, ignore_errors=True)

    def __enter__(self) -> VllmEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dtype_name(model: nn.Module) -> str:
    dtype = next(model.parameters()).dtype
    name = str(dtype).removeprefix("torch.")
    if name not in ("float32", "bfloat16", "float16"):
        # float64 models (property tests) are served in float32 by vLLM, which has no float64
        return "float32"
    return name


def open_engine(
    name: str,
    model: nn.Module | None,
    tokenizer: Any,
    *,
    checkpoint_dir: str | Path | None = None,
    vllm: VllmSettings | None = None,
    dtype: str | None = None,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
) -> Engine:
    """An open engine. ``torch`` runs ``model``; ``vllm`` serves ``checkpoint_dir`` in ``vllm.dtype``, else
    ``dtype``, else ``model``'s dtype (float32 when none is known)."""
    check_engine_name(name)
    if name == "torch":
        if model is None:
            if checkpoint_dir is None:
                raise InvalidArgumentError("the torch engine needs a model or a checkpoint directory")
            model, _ = load_model(str(checkpoint_dir), dtype=dtype)
        return TorchEngine(model, tokenizer, batch_size=batch_size, progress=progress)
    if checkpoint_dir is None:
        raise InvalidArgumentError(
            "the vllm engine serves a checkpoint directory: pass checkpoint_dir (an in-memory model "
            "must be saved first, refusal_core.checkpoint.save_checkpoint)"
        )
    settings = vllm if vllm is not None else VllmSettings()
    chosen = settings.dtype or dtype or (_dtype_name(model) if model is not None else "float32")
    return VllmEngine(checkpoint_dir, settings, dtype=chosen, seed=seed)


def checkpoint_stop_ids(checkpoint_dir: str | Path, tokenizer: Any) -> list[int]:
    """The stop ids the torch path would use for the model in ``checkpoint_dir`` without loading it:
    the tokenizer's eos plus the eos ids of the directory's ``generation_config.json``."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(str(checkpoint_dir))
    except OSError:
        gen = None
    return eos_token_ids(SimpleNamespace(generation_config=gen), tokenizer)  # type: ignore[arg-type]


def generate_completions(
    engine: str | Engine,
    model: nn.Module | str | Path,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    samplings: Sequence[SamplingConfig | None],
    seeds: Sequence[int],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    stop_token_ids: Sequence[int] | None = None,
    cache: GenerationCache | None = None,
    vllm: VllmSettings | None = None,
    dtype: str | None = None,
    progress: bool = False,
) -> list[list[list[int]]]:
    """``out[c][i]``: new token ids of ``prompts[i]`` under ``samplings[c]`` seeded ``seeds[c]``.

    The one entry point the study, the audit, ``evaluate`` and the frontier
    share. ``engine`` is an engine name (opened for this call and closed after)
    or an open :class:`Engine` (reused: a study opens vLLM once per variant).
    ``model`` is the in-memory model or a checkpoint directory. With the
    in-memory model and a ``cache``, the generations are memoised under the keys
    :func:`~refusal_core.evaluation.generation.generate_ids_multi` uses (the
    model's fingerprint), so ``attack.run(model, ..., cache=cache)`` finds them
    whichever engine made them. Stop ids default to the torch path's
    (:func:`~refusal_core.evaluation.generation.eos_token_ids`).
    """
    is_dir = isinstance(model, (str, Path))
    if not is_dir and not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"model must be an nn.Module or a directory, got {type(model).__name__}")
    if isinstance(engine, str):
        check_engine_name(engine)
    elif not isinstance(engine, Engine):
        raise InvalidArgumentError(
            f"engine must be an engine name or an open Engine, got {type(engine).__name__}"
        )
    if isinstance(model, nn.Module):
        if engine == "vllm":
            raise InvalidArgumentError(
                "the vllm engine serves a checkpoint directory: pass its path, or open a VllmEngine on the "
                "saved model and pass the engine with the in-memory model"
            )
        return generate_ids_multi(
            model,
            tokenizer,
            prompts,
            samplings,
            seeds,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            stop_token_ids=stop_token_ids,
            cache=cache,
            progress=progress,
            engine=None if isinstance(engine, str) else engine,
        )
    if cache is not None:
        raise InvalidArgumentError("a cache needs the in-memory model: its fingerprint keys the memo")
    max_new_tokens = _check_positive_int(max_new_tokens, "max_new_tokens")
    if isinstance(samplings, SamplingConfig) or not samplings or len(samplings) != len(seeds):
        raise InvalidArgumentError("samplings and seeds must be non-empty sequences of equal length")
    stops = (
        checkpoint_stop_ids(model, tokenizer) if stop_token_ids is None else [int(s) for s in stop_token_ids]
    )
    if not isinstance(engine, str):
        return engine.complete(prompts, samplings, seeds, max_new_tokens=max_new_tokens, stop_token_ids=stops)
    opened = open_engine(
        engine,
        None,
        tokenizer,
        checkpoint_dir=model,
        vllm=vllm,
        dtype=dtype,
        batch_size=batch_size,
        progress=progress,
    )
    try:
        return opened.complete(prompts, samplings, seeds, max_new_tokens=max_new_tokens, stop_token_ids=stops)
    finally:
        opened.close()


def open_variant_engine(
    name: str,
    settings: VllmSettings,
    model: nn.Module,
    tokenizer: Any,
    checkpoint_dir: str | Path,
    *,
    base_identity: dict[str, Any],
    variant: str,
    seed: int = 0,
) -> Engine | None:
    """For a study's evaluation stage: None for ``torch`` (the study's own loop runs the model), else
    ``model`` saved as a checkpoint in ``checkpoint_dir`` (replaced if present) and vLLM opened on it;
    closing the engine removes that directory (the stage's inputs are the study's own artifacts).

    Simulated quantizers are saved as their exact dequantized weights (what the torch path computes
    with); the checkpoint is written with the study's tokenizer and its chat template.
    """
    check_engine_name(name)
    if name == "torch":
        return None

    path = save_checkpoint(
        model,
        tokenizer,
        checkpoint_dir,
        record={"method": None if variant == "base" else variant, "operation": "evaluation"},
        base_identity=base_identity,
        overwrite=True,
    )
    try:
        engine = open_engine(name, model, tokenizer, checkpoint_dir=path, vllm=settings, seed=seed)
    except BaseException:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        raise
    if isinstance(engine, VllmEngine):
        engine.owned_dir = path
    return engine
