"""The modules refusal_core puts into a model that transformers does not know, and how they come back.

:class:`Int8LinearSim` is the reference LLM.int8 linear: int8 weight codes and a
per-row scale, computing exactly :func:`~refusal_core.functional.llm_int8_linear`
(see :mod:`refusal_core.compression.quantization`, which makes them). A checkpoint
stores it as its dequantized float weight (``format`` ``dequantized-simulation``);
:func:`restore_checkpoint_modules_` rebuilds it when
:func:`~refusal_core.model.load_model` reads such a checkpoint.

Why here, in the model layer and not in compression: loading a model must
rebuild these modules, and compression is built on the model layer (its
layouts), so a loader that imported compression would make the two import each
other. The module type sits below both; compression re-exports it.

Example:
    >>> lin = nn.Linear(4, 2)
    >>> sim = Int8LinearSim.from_linear(lin)
    >>> back = nn.Linear(4, 2)
    >>> _ = back.weight.data.copy_(sim.dequantize())
    >>> torch.equal(Int8LinearSim.from_linear(back).q, sim.q)
    True
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from refusal_core.errors import ArtifactError, InvalidArgumentError, ShapeMismatchError
from refusal_core.functional import check_tensor, compute_dtype, int8_dequantize, int8_quantize

__all__ = ["Int8LinearSim", "check_threshold", "restore_checkpoint_modules_"]


def check_threshold(value: object, name: str = "threshold") -> float:
    """A nonnegative float or ``inf`` (no outliers), never NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise InvalidArgumentError(f"{name} must be a number >= 0 (inf disables outliers), got {value!r}")
    return float(value)


#: Input features per float32 partial product: 1024 · 127² < 2²⁴, so every
#: partial sum of int8·int8 products is an exactly representable integer.
_EXACT_FP32_CHUNK = 1024
#: Input features per int32 partial product: 133144 · 127² < 2³¹, so no int32 sum overflows.
_EXACT_INT32_CHUNK = (2**31 - 1) // (127 * 127)


def _exact_int_matmul(qx: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """``qx @ qwᵀ`` for integer-valued ``qx [T, K]`` (|v| ≤ 127) and ``qw [N, K]`` (int8 codes, as int8
    or as their float32 values), exact, float64.

    On the CPU with int8 codes the products are integer matmuls (``torch._int_mm``, int32
    accumulation, VNNI where the CPU has it; ``benchmarks/run_all.py`` entry ``int8_sim_int_mm``
    compares it with the float32 route). Elsewhere, float32 products over chunks of 1024 inputs
    are exact integers. Either way each partial sum is exact and so is its float64 total (far
    below 2⁵³): the result equals the float64 matmul of the functional core bit for bit.
    """
    integer = qw.dtype == torch.int8 and qx.device.type == "cpu" and qw.device.type == "cpu"
    if integer:
        qx = qx.to(torch.int8)  # exact: integer values in [-127, 127]
    step = _EXACT_INT32_CHUNK if integer else _EXACT_FP32_CHUNK
    acc: torch.Tensor | None = None
    for start in range(0, qx.shape[1], step):
        stop = start + step
        a, b = qx[:, start:stop], qw[:, start:stop].T
        part = torch._int_mm(a, b) if integer else a.to(torch.float32) @ b.to(torch.float32)
        part = part.to(torch.float64)
        acc = part if acc is None else acc + part
    if acc is None:
        return torch.zeros(qx.shape[0], qw.shape[0], dtype=torch.float64, device=qx.device)
    return acc


class Int8LinearSim(nn.Module):
    """An LLM.int8 linear layer simulated exactly: ``y = llm_int8_linear(x, W, threshold) + b``.

    Buffers: ``q`` int8 ``[out, in]``, ``scale`` ``[out]`` (row absmax / 127),
    ``bias`` ``[out]`` or None. The output has the dtype of ``x``. Not an
    ``nn.Linear`` and ``weight`` is None on purpose (see the module docstring);
    :meth:`dequantize` gives the float weight it computes with.

    >>> lin = nn.Linear(4, 2)
    >>> sim = Int8LinearSim.from_linear(lin)
    >>> sim(torch.ones(3, 4)).shape
    torch.Size([3, 2])
    """

    weight: None = None
    #: Multiply the codes as integers on the CPU (``torch._int_mm``); False forces the float32
    #: route every other device takes. Both are exact, so the output is the same either way.
    use_int_mm: bool = True
    q: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None, threshold: float = 6.0
    ) -> None:
        super().__init__()
        q = check_tensor(q, "q", ndim=2)
        scale = check_tensor(scale, "scale", ndim=1)
        if q.dtype != torch.int8:
            raise InvalidArgumentError(f"q must be int8, got {q.dtype}")
        if not scale.is_floating_point() or scale.shape[0] != q.shape[0]:
            raise ShapeMismatchError(
                f"scale must be float [{q.shape[0]}], got {scale.dtype} {tuple(scale.shape)}"
            )
        if bias is not None:
            bias = check_tensor(bias, "bias", ndim=1)
            if bias.shape[0] != q.shape[0]:
                raise ShapeMismatchError(f"bias has length {bias.shape[0]} but q has {q.shape[0]} rows")
        self.threshold = check_threshold(threshold)
        self.out_features, self.in_features = int(q.shape[0]), int(q.shape[1])
        self.register_buffer("q", q.detach().clone())
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        # The int8 codes as float32 (exact: |q| <= 127) for the float route (off the CPU, or
        # use_int_mm False), made at its first use and then kept, not made here: on the CPU the
        # integer route never needs them, and they cost 4 bytes per weight (6 GB on a 1.5B model).
        # A private attribute, not a buffer, so state dicts, fingerprints and `.to(dtype)` see
        # only q; `_float_q` rebuilds it when q was moved or edited.
        self._q_f32: torch.Tensor | None = None
        self._q_f32_of: tuple[int, int, torch.device] | None = None

    def _q_signature(self) -> tuple[int, int, torch.device]:
        return (self.q.data_ptr(), self.q._version, self.q.device)

    def _float_q(self) -> torch.Tensor:
        """``q`` as float32 ``[out, in]``, cached; rebuilt after ``q`` changed place or value."""
        if self._q_f32 is None or self._q_f32_of != self._q_signature():
            self._q_f32 = self.q.to(torch.float32)
            self._q_f32_of = self._q_signature()
        return self._q_f32

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = 6.0) -> Int8LinearSim:
        """Quantize ``linear`` (per-row absmax int8, :func:`~refusal_core.functional.int8_quantize`)."""
        if not isinstance(linear, nn.Linear):
            raise InvalidArgumentError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        q, scale = int8_quantize(linear.weight.detach())
        return cls(q, scale, None if linear.bias is None else linear.bias.detach(), threshold)

    def dequantize(self) -> torch.Tensor:
        """The float weight ``q · scale`` ``[out, in]`` (dtype of ``scale``), a new tensor."""
        return int8_dequantize(self.q, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ShapeMismatchError(
                f"x has width {x.shape[-1]} but this layer has {self.in_features} inputs"
            )
        # The steps below mirror functional.llm_int8_linear operation for operation
        # (same dtypes, same order) so that the result is bit-identical to it.
        f64 = torch.float64
        lead = x.shape[:-1]
        x2 = x.detach().reshape(-1, x.shape[-1]).to(compute_dtype(x))
        if x2.shape[0]:
            outlier = (x2.abs() >= self.threshold).any(dim=0)
        else:
            outlier = torch.zeros(x.shape[-1], dtype=torch.bool, device=x.device)
        xr = torch.where(outlier, torch.zeros_like(x2), x2)
        sx = xr.abs().amax(dim=1) / 127.0 if x2.shape[0] else torch.zeros(0, dtype=x2.dtype, device=x.device)
        safe = torch.where(sx > 0, sx, torch.ones_like(sx))
        qx = torch.round(xr / safe.unsqueeze(1)).clamp(-127, 127)
        int_route = self.use_int_mm and self.q.device.type == "cpu" and x.device.type == "cpu"
        codes = self.q if int_route else self._float_q()
        acc = _exact_int_matmul(qx, codes)
        out = acc * sx.to(f64).unsqueeze(1) * self.scale.to(f64).unsqueeze(0)
        if bool(outlier.any()):
            # int8 codes, or their float32 copies (exact), times the row scales: q[:, outlier] · scale.
            wdq = codes[:, outlier].to(self.scale.dtype) * self.scale.unsqueeze(1)
            out = out + x2[:, outlier].to(f64) @ wdq.to(f64).T
        y = out.to(x.dtype).reshape(*lead, self.out_features)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, threshold={self.threshold}"
        )


def restore_checkpoint_modules_(model: nn.Module, doc: Mapping[str, Any]) -> None:
    """Re-create in place what plain transformers does not rebuild from a checkpoint's files.

    - ``dequantized-simulation`` of LLM.int8: every module listed in
      ``doc["int8_simulation"]`` becomes an ``Int8LinearSim`` again (per-row
      absmax int8 quantization of ``q · scale`` gives back ``q`` and ``scale``
      exactly, so the model computes what the saved one did, bit for bit).
    - ``bitsandbytes-nf4`` saved without CPU packing: transformers' ``Linear4bit``
      would repack the weight for the AVX512-BF16 CPU kernel at its first forward
      (rounding the block scales to bfloat16); that is switched off, as it was.

    Other formats are left as transformers loaded them.
    """
    fmt = doc.get("format")
    sim = doc.get("int8_simulation")
    if fmt == "dequantized-simulation" and isinstance(sim, Mapping):
        thr = sim.get("threshold")
        threshold = math.inf if thr is None else float(thr)
        with torch.no_grad():
            for name in sim.get("modules", []):
                parent_name, _, attr = str(name).rpartition(".")
                parent = model.get_submodule(parent_name)
                linear = getattr(parent, attr)
                if not isinstance(linear, nn.Linear):
                    raise ArtifactError(
                        f"checkpoint lists {name!r} as simulated int8 but it loaded as {linear}"
                    )
                setattr(parent, attr, Int8LinearSim.from_linear(linear, threshold).to(linear.weight.device))
    elif fmt == "bitsandbytes-nf4" and not doc.get("bitsandbytes_cpu_packing", False):
        four_bit: list[Any] = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
        for module in four_bit:
            module.support_avx512bf16_for_cpu = False
