"""Bad input: every protocol function rejects it, names the argument, and modifies nothing.

This is the project's bad-input *policy*, kept apart from the math: every test here carries
the ``bad_input`` marker. The reference (and any module declaring
``RAISES_REFUSAL_CORE_ERRORS = True``) is always held to it: the error must be a
``refusal_core.errors.RefusalCoreError`` whose message names the offending argument. Any other
outside module is held to it only when the run selects the marker (``-m bad_input``), and then
may raise any ``Exception``, since it cannot know this project's types; returning a value is a
failure either way. Near-zero (rather than exactly zero) directions are a policy of the
reference (norm ≤ 1e-8) and are checked only under the strict rule. Inputs must be
bit-identical after the call in every case (checked by the oracle's call wrapper).

The policy cases: empty sets, width mismatches, NaN/inf anywhere; integer and boolean tensors
where floats are meant (never truncated); scalars that are not real numbers (``bool``,
``None``, ``"0.1"``, lists, tensors with a dimension); refusal ids that are not integers;
directions whose float64 norm overflows; results that overflow (AIRD with a huge alpha).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from refusal_core.errors import RefusalCoreError
from refusal_core.testing import strategies as rs

from ._checks import describe

Args = tuple[tuple[Any, ...], dict[str, Any]]

pytestmark = pytest.mark.bad_input


@dataclass(frozen=True)
class BadCase:
    """One kind of bad input for one protocol function."""

    function: str
    problem: str
    build: Callable[[st.DataObject], Args]
    names: tuple[str, ...]  # the message must name at least one of these arguments
    strict_only: bool = False

    @property
    def id(self) -> str:
        return f"{self.function}-{self.problem}"


# ----------------------------------------------------------------------------
# building blocks (every draw labelled)
# ----------------------------------------------------------------------------


def _dtype(data: st.DataObject) -> torch.dtype:
    return data.draw(rs.float_dtypes(), label="dtype")


def _t(data: st.DataObject, shape: tuple[int, ...], label: str, dtype: torch.dtype) -> torch.Tensor:
    return data.draw(rs.tensors(shape, dtype), label=label)


def _dir(data: st.DataObject, d: int, label: str, dtype: torch.dtype) -> torch.Tensor:
    return data.draw(rs.directions(d, dtype), label=label)


def _poison(data: st.DataObject, t: torch.Tensor, label: str) -> torch.Tensor:
    """``t`` with one drawn entry replaced by NaN, +inf or −inf."""
    bad = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]), label=f"non-finite value in {label}")
    where = data.draw(st.integers(0, t.numel() - 1), label=f"flat position in {label}")
    out = t.clone()
    out.reshape(-1)[where] = bad
    return out


def _d(data: st.DataObject) -> int:
    return data.draw(rs.widths(2, 8), label="d")


def _bad_scalar(data: st.DataObject, label: str) -> float:
    return data.draw(st.sampled_from([math.nan, math.inf, -math.inf]), label=label)


def _bad_sparsity(data: st.DataObject) -> float:
    return data.draw(
        st.one_of(
            st.sampled_from([1.0, -1e-9, math.nan, math.inf]),
            st.floats(-10.0, 0.0, exclude_max=True),
            st.floats(1.0, 10.0),
        ),
        label="sparsity (outside [0, 1))",
    )


def _integral(data: st.DataObject, t: torch.Tensor, label: str) -> torch.Tensor:
    """``t`` rounded into a drawn integer or boolean dtype: a value tensor that is not floating point."""
    dtype = data.draw(
        st.sampled_from([torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool]),
        label=f"non-float dtype of {label}",
    )
    if dtype == torch.bool:
        return t != 0
    # +1 keeps a rounded direction away from zero, so only the dtype is wrong
    return (t.to(torch.float64).round().abs() + 1).to(dtype)


#: things passed where a real number is meant: none is one (a 0-d float tensor would be)
_LOOSE_SCALARS: tuple[object, ...] = (
    True,
    False,
    None,
    "0.1",
    "1",
    [0.1],
    (0.5,),
    1j,
)


def _loose_scalar(data: st.DataObject, label: str) -> object:
    value = data.draw(
        st.one_of(
            st.sampled_from(_LOOSE_SCALARS),
            st.integers(1, 4).map(lambda n: torch.full((n,), 0.25)),  # a tensor with a dimension
        ),
        label=f"{label} (not a real number)",
    )
    return value


def _overflowing(data: st.DataObject, d: int) -> torch.Tensor:
    """A finite float64 direction whose float64 norm overflows: entries ±1.5e308, at least two."""
    signs = data.draw(st.lists(st.sampled_from([1.0, -1.0]), min_size=d, max_size=d), label="signs of r")
    return torch.tensor(signs, dtype=torch.float64) * 1.5e308


def _aird_overflow(data: st.DataObject) -> Args:
    """AIRD with alpha = 1e308 on ``w = 1`` and ``r = 2·e₀``: the update 4e308 overflows every dtype."""
    dt, d = _dtype(data), _d(data)
    k = data.draw(rs.widths(1, 6), label="k")
    r = torch.zeros(d, dtype=dt)
    r[0] = 2.0
    return (torch.ones(d, k, dtype=dt), r, 1e308), {}


def _non_integer_ids(data: st.DataObject) -> Args:
    (logits, _), _ = _logits(data)
    ids = data.draw(
        st.sampled_from(
            [[1.7], [0.0], [True], [0, 1.5], ["1"], torch.tensor([1.0]), torch.tensor([True]), "01", None]
        ),
        label="refusal_token_ids (not integers)",
    )
    return (logits, ids), {}


# ----------------------------------------------------------------------------
# the cases
# ----------------------------------------------------------------------------


def _dim_sets(data, *, n1=None, n2=None, extra=0):
    dt, d = _dtype(data), _d(data)
    n1 = data.draw(st.integers(1, 4), label="n1") if n1 is None else n1
    n2 = data.draw(st.integers(1, 4), label="n2") if n2 is None else n2
    return _t(data, (n1, d), "harmful", dt), _t(data, (n2, d + extra), "harmless", dt)


def _dim_poison(data, which):
    a, b = _dim_sets(data)
    return ((_poison(data, a, "harmful"), b) if which == 0 else (a, _poison(data, b, "harmless"))), {}


def _x_r(data, *, extra=0):
    dt, d = _dtype(data), _d(data)
    lead = data.draw(rs.leading_shapes(), label="leading shape of x")
    return _t(data, (*lead, d), "x", dt), _dir(data, d + extra, "r", dt)


def _w_r(data, *, extra=0, transpose=False):
    dt, d = _dtype(data), _d(data)
    k = data.draw(rs.widths(1, 6), label="k")
    shape = (k, d) if transpose else (d, k)
    return _t(data, shape, "e" if transpose else "w", dt), _dir(data, d + extra, "r", dt)


def _zeroed(r: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(r)


def _tiny(r: torch.Tensor) -> torch.Tensor:
    return (r.to(torch.float64) / r.to(torch.float64).norm() * 1e-12).to(r.dtype)


def _ab(data, *, same=True):
    dt = _dtype(data)
    n = data.draw(rs.widths(1, 8), label="n")
    a = _dir(data, n, "a", dt)
    b = _dir(data, n if same else n + 1, "b", dt)
    return a, b


def _wanda(data, *, cols=None):
    dt = _dtype(data)
    rows = data.draw(rs.widths(1, 4), label="rows")
    cols = data.draw(rs.widths(1, 8), label="cols") if cols is None else cols
    return _t(data, (rows, cols), "w", dt), _t(data, (cols,), "input_norms", dt).abs()


def _wanda_bad_n_m(data):
    n, m = data.draw(rs.n_m_patterns(), label="n_m")
    cols = data.draw(rs.widths(1, 12).filter(lambda c: c % m), label="cols (not a multiple of m)")
    w, norms = _wanda(data, cols=cols)
    return (w, norms, 0.5), {"n_m": (n, m)}


def _wanda_short_norms(data):
    w, norms = _wanda(data)
    cut = data.draw(st.integers(0, norms.shape[0] - 1), label="input_norms length")
    return (w, norms[:cut].clone(), 0.5), {}


def _int8_w(data):
    dt = _dtype(data)
    return _t(
        data, (data.draw(rs.widths(1, 4), label="rows"), data.draw(rs.widths(1, 8), label="cols")), "w", dt
    )


def _dequant(data, *, poison=False, short=False):
    rows = data.draw(rs.widths(1, 4), label="rows")
    cols = data.draw(rs.widths(1, 8), label="cols")
    q = data.draw(rs.tensors((rows, cols), torch.float64, bound=127.0).map(torch.round), label="q").to(
        torch.int8
    )
    scale = _t(data, (rows + (1 if short else 0),), "scale", _dtype(data)).abs()
    return (q, _poison(data, scale, "scale") if poison else scale), {}


def _llm(data, *, extra=0, poison=None):
    dt = _dtype(data)
    tokens, cols = data.draw(rs.widths(1, 3), label="tokens"), data.draw(rs.widths(1, 6), label="in")
    x = _t(data, (tokens, cols + extra), "x", dt)
    w = _t(data, (data.draw(rs.widths(1, 4), label="out"), cols), "w", dt)
    if poison == "x":
        x = _poison(data, x, "x")
    if poison == "w":
        w = _poison(data, w, "w")
    return (x, w), {"threshold": 6.0}


def _groups(data, *, divisible=True):
    group_size = data.draw(st.sampled_from([2, 3, 4, 8]), label="group_size")
    n = data.draw(st.integers(1, 3), label="groups")
    cols = (
        group_size * n
        if divisible
        else group_size * n + data.draw(st.integers(1, group_size - 1), label="rest")
    )
    return group_size, cols


def _pq(data, *, divisible=True, poison=False):
    group_size, cols = _groups(data, divisible=divisible)
    w = _t(data, (data.draw(rs.widths(1, 3), label="rows"), cols), "w", _dtype(data))
    return (_poison(data, w, "w") if poison else w, 4, group_size), {}


def _awq(data, *, divisible=True, tokens=None, extra=0, poison=None):
    group_size, cols = _groups(data, divisible=divisible)
    dt = _dtype(data)
    w = _t(data, (data.draw(rs.widths(1, 3), label="rows"), cols), "w", dt)
    n_tok = data.draw(st.integers(1, 4), label="tokens") if tokens is None else tokens
    x = _t(data, (n_tok, cols + extra), "x", dt)
    if poison == "x":
        x = _poison(data, x, "x")
    if poison == "w":
        w = _poison(data, w, "w")
    return (w, x, 4, group_size), {"grid": 4}


def _logits(data, *, ids=None, poison=False):
    vocab = data.draw(st.integers(2, 8), label="vocab")
    logits = _t(data, (data.draw(st.integers(1, 3), label="batch"), vocab), "logits", _dtype(data))
    if ids is None:
        ids = data.draw(rs.refusal_ids(vocab), label="refusal_token_ids")
    elif ids == "out_of_range":
        ids = [data.draw(st.sampled_from([-1, vocab, vocab + 5]), label="out-of-range id")]
    return (_poison(data, logits, "logits") if poison else logits, ids), {}


CASES: tuple[BadCase, ...] = (
    # difference_in_means
    BadCase("difference_in_means", "empty_harmful", lambda D: (_dim_sets(D, n1=0), {}), ("harmful",)),
    BadCase("difference_in_means", "empty_harmless", lambda D: (_dim_sets(D, n2=0), {}), ("harmless",)),
    BadCase(
        "difference_in_means",
        "width_mismatch",
        lambda D: (_dim_sets(D, extra=1), {}),
        ("harmful", "harmless"),
    ),
    BadCase("difference_in_means", "nonfinite_harmful", lambda D: _dim_poison(D, 0), ("harmful",)),
    BadCase("difference_in_means", "nonfinite_harmless", lambda D: _dim_poison(D, 1), ("harmless",)),
    # ablate
    BadCase("ablate", "zero_direction", lambda D: (lambda x, r: ((x, _zeroed(r)), {}))(*_x_r(D)), ("r",)),
    BadCase(
        "ablate", "near_zero_direction", lambda D: (lambda x, r: ((x, _tiny(r)), {}))(*_x_r(D)), ("r",), True
    ),
    BadCase("ablate", "width_mismatch", lambda D: (_x_r(D, extra=1), {}), ("r", "x")),
    BadCase(
        "ablate", "nonfinite_x", lambda D: (lambda x, r: ((_poison(D, x, "x"), r), {}))(*_x_r(D)), ("x",)
    ),
    BadCase(
        "ablate", "nonfinite_r", lambda D: (lambda x, r: ((x, _poison(D, r, "r")), {}))(*_x_r(D)), ("r",)
    ),
    # add_direction
    BadCase("add_direction", "width_mismatch", lambda D: ((*_x_r(D, extra=1), 1.0), {}), ("r", "x")),
    BadCase(
        "add_direction",
        "nonfinite_x",
        lambda D: (lambda x, r: ((_poison(D, x, "x"), r, 1.0), {}))(*_x_r(D)),
        ("x",),
    ),
    BadCase(
        "add_direction",
        "nonfinite_r",
        lambda D: (lambda x, r: ((x, _poison(D, r, "r"), 1.0), {}))(*_x_r(D)),
        ("r",),
    ),
    BadCase(
        "add_direction", "nonfinite_coeff", lambda D: ((*_x_r(D), _bad_scalar(D, "coeff")), {}), ("coeff",)
    ),
    # orthogonalize_weight
    BadCase(
        "orthogonalize_weight",
        "zero_direction",
        lambda D: (lambda w, r: ((w, _zeroed(r)), {}))(*_w_r(D)),
        ("r",),
    ),
    BadCase(
        "orthogonalize_weight",
        "near_zero_direction",
        lambda D: (lambda w, r: ((w, _tiny(r)), {}))(*_w_r(D)),
        ("r",),
        True,
    ),
    BadCase("orthogonalize_weight", "width_mismatch", lambda D: (_w_r(D, extra=1), {}), ("r", "w")),
    BadCase(
        "orthogonalize_weight",
        "nonfinite_w",
        lambda D: (lambda w, r: ((_poison(D, w, "w"), r), {}))(*_w_r(D)),
        ("w",),
    ),
    # orthogonalize_embedding
    BadCase(
        "orthogonalize_embedding",
        "zero_direction",
        lambda D: (lambda e, r: ((e, _zeroed(r)), {}))(*_w_r(D, transpose=True)),
        ("r",),
    ),
    BadCase(
        "orthogonalize_embedding",
        "width_mismatch",
        lambda D: (_w_r(D, extra=1, transpose=True), {}),
        ("r", "e"),
    ),
    BadCase(
        "orthogonalize_embedding",
        "nonfinite_e",
        lambda D: (lambda e, r: ((_poison(D, e, "e"), r), {}))(*_w_r(D, transpose=True)),
        ("e",),
    ),
    # aird_update
    BadCase(
        "aird_update", "zero_direction", lambda D: (lambda w, r: ((w, _zeroed(r), 0.1), {}))(*_w_r(D)), ("r",)
    ),
    BadCase("aird_update", "width_mismatch", lambda D: ((*_w_r(D, extra=1), 0.1), {}), ("r", "w")),
    BadCase(
        "aird_update",
        "nonfinite_w",
        lambda D: (lambda w, r: ((_poison(D, w, "w"), r, 0.1), {}))(*_w_r(D)),
        ("w",),
    ),
    BadCase(
        "aird_update", "nonfinite_alpha", lambda D: ((*_w_r(D), _bad_scalar(D, "alpha")), {}), ("alpha",)
    ),
    # cosine_similarity
    BadCase("cosine_similarity", "zero_a", lambda D: (lambda a, b: ((_zeroed(a), b), {}))(*_ab(D)), ("a",)),
    BadCase("cosine_similarity", "zero_b", lambda D: (lambda a, b: ((a, _zeroed(b)), {}))(*_ab(D)), ("b",)),
    BadCase("cosine_similarity", "shape_mismatch", lambda D: (_ab(D, same=False), {}), ("a", "b")),
    BadCase(
        "cosine_similarity",
        "nonfinite_a",
        lambda D: (lambda a, b: ((_poison(D, a, "a"), b), {}))(*_ab(D)),
        ("a",),
    ),
    # magnitude_mask
    BadCase(
        "magnitude_mask",
        "sparsity_out_of_range",
        lambda D: ((_int8_w(D), _bad_sparsity(D)), {}),
        ("sparsity",),
    ),
    BadCase("magnitude_mask", "nonfinite_w", lambda D: ((_poison(D, _int8_w(D), "w"), 0.5), {}), ("w",)),
    # wanda_mask
    BadCase(
        "wanda_mask", "sparsity_out_of_range", lambda D: ((*_wanda(D), _bad_sparsity(D)), {}), ("sparsity",)
    ),
    BadCase("wanda_mask", "input_norms_width_mismatch", _wanda_short_norms, ("input_norms",)),
    BadCase("wanda_mask", "n_m_does_not_divide_width", _wanda_bad_n_m, ("n_m",)),
    BadCase(
        "wanda_mask",
        "nonfinite_w",
        lambda D: (lambda w, n: ((_poison(D, w, "w"), n, 0.5), {}))(*_wanda(D)),
        ("w",),
    ),
    BadCase(
        "wanda_mask",
        "nonfinite_input_norms",
        lambda D: (lambda w, n: ((w, _poison(D, n, "input_norms"), 0.5), {}))(*_wanda(D)),
        ("input_norms",),
    ),
    # int8
    BadCase("int8_quantize", "nonfinite_w", lambda D: ((_poison(D, _int8_w(D), "w"),), {}), ("w",)),
    BadCase("int8_dequantize", "scale_length_mismatch", lambda D: _dequant(D, short=True), ("scale", "q")),
    BadCase("int8_dequantize", "nonfinite_scale", lambda D: _dequant(D, poison=True), ("scale",)),
    BadCase("llm_int8_linear", "width_mismatch", lambda D: _llm(D, extra=1), ("x", "w")),
    BadCase("llm_int8_linear", "nonfinite_x", lambda D: _llm(D, poison="x"), ("x",)),
    BadCase("llm_int8_linear", "nonfinite_w", lambda D: _llm(D, poison="w"), ("w",)),
    # group quantization
    BadCase(
        "pseudo_quantize",
        "group_size_does_not_divide_width",
        lambda D: _pq(D, divisible=False),
        ("group_size",),
    ),
    BadCase("pseudo_quantize", "nonfinite_w", lambda D: _pq(D, poison=True), ("w",)),
    BadCase(
        "awq_scales", "group_size_does_not_divide_width", lambda D: _awq(D, divisible=False), ("group_size",)
    ),
    BadCase("awq_scales", "empty_x", lambda D: _awq(D, tokens=0), ("x",)),
    BadCase("awq_scales", "width_mismatch", lambda D: _awq(D, extra=1), ("x", "w")),
    BadCase("awq_scales", "nonfinite_x", lambda D: _awq(D, poison="x"), ("x",)),
    BadCase("awq_scales", "nonfinite_w", lambda D: _awq(D, poison="w"), ("w",)),
    # refusal score
    BadCase("refusal_score", "empty_ids", lambda D: _logits(D, ids=[]), ("refusal_token_ids",)),
    BadCase(
        "refusal_score", "id_out_of_range", lambda D: _logits(D, ids="out_of_range"), ("refusal_token_ids",)
    ),
    BadCase("refusal_score", "nonfinite_logits", lambda D: _logits(D, poison=True), ("logits",)),
    # --- integer and boolean tensors where floats are meant (issue 10, item 6) ---
    BadCase(
        "difference_in_means",
        "integer_harmful",
        lambda D: (lambda a, b: ((_integral(D, a, "harmful"), b), {}))(*_dim_sets(D)),
        ("harmful",),
    ),
    BadCase(
        "ablate", "integer_x", lambda D: (lambda x, r: ((_integral(D, x, "x"), r), {}))(*_x_r(D)), ("x",)
    ),
    BadCase(
        "ablate", "integer_r", lambda D: (lambda x, r: ((x, _integral(D, r, "r")), {}))(*_x_r(D)), ("r",)
    ),
    BadCase(
        "add_direction",
        "integer_x",
        lambda D: (lambda x, r: ((_integral(D, x, "x"), r, 1.0), {}))(*_x_r(D)),
        ("x",),
    ),
    BadCase(
        "add_direction",
        "integer_r",
        lambda D: (lambda x, r: ((x, _integral(D, r, "r"), 1.0), {}))(*_x_r(D)),
        ("r",),
    ),
    BadCase(
        "orthogonalize_weight",
        "integer_w",
        lambda D: (lambda w, r: ((_integral(D, w, "w"), r), {}))(*_w_r(D)),
        ("w",),
    ),
    BadCase(
        "orthogonalize_embedding",
        "integer_e",
        lambda D: (lambda e, r: ((_integral(D, e, "e"), r), {}))(*_w_r(D, transpose=True)),
        ("e",),
    ),
    BadCase(
        "aird_update",
        "integer_w",
        lambda D: (lambda w, r: ((_integral(D, w, "w"), r, 0.1), {}))(*_w_r(D)),
        ("w",),
    ),
    BadCase(
        "cosine_similarity",
        "integer_a",
        lambda D: (lambda a, b: ((_integral(D, a, "a"), b), {}))(*_ab(D)),
        ("a",),
    ),
    BadCase("magnitude_mask", "integer_w", lambda D: ((_integral(D, _int8_w(D), "w"), 0.5), {}), ("w",)),
    BadCase(
        "wanda_mask",
        "integer_input_norms",
        lambda D: (lambda w, n: ((w, _integral(D, n, "input_norms"), 0.5), {}))(*_wanda(D)),
        ("input_norms",),
    ),
    BadCase("int8_quantize", "integer_w", lambda D: ((_integral(D, _int8_w(D), "w"),), {}), ("w",)),
    BadCase(
        "llm_int8_linear",
        "integer_x",
        lambda D: (lambda a, k: ((_integral(D, a[0], "x"), a[1]), k))(*_llm(D)),
        ("x",),
    ),
    BadCase(
        "pseudo_quantize",
        "integer_w",
        lambda D: (lambda a, k: ((_integral(D, a[0], "w"), *a[1:]), k))(*_pq(D)),
        ("w",),
    ),
    BadCase(
        "awq_scales",
        "integer_x",
        lambda D: (lambda a, k: ((a[0], _integral(D, a[1], "x"), *a[2:]), k))(*_awq(D)),
        ("x",),
    ),
    BadCase(
        "refusal_score",
        "integer_logits",
        lambda D: (lambda a, k: ((_integral(D, a[0], "logits"), a[1]), k))(*_logits(D)),
        ("logits",),
    ),
    # --- scalars that are not real numbers ---
    BadCase(
        "add_direction", "loose_coeff", lambda D: ((*_x_r(D), _loose_scalar(D, "coeff")), {}), ("coeff",)
    ),
    BadCase("aird_update", "loose_alpha", lambda D: ((*_w_r(D), _loose_scalar(D, "alpha")), {}), ("alpha",)),
    BadCase(
        "llm_int8_linear",
        "loose_threshold",
        lambda D: (lambda a, k: (a, {"threshold": _loose_scalar(D, "threshold")}))(*_llm(D)),
        ("threshold",),
    ),
    BadCase(
        "magnitude_mask",
        "loose_sparsity",
        lambda D: ((_int8_w(D), _loose_scalar(D, "sparsity")), {}),
        ("sparsity",),
    ),
    BadCase(
        "wanda_mask",
        "loose_sparsity",
        lambda D: ((*_wanda(D), _loose_scalar(D, "sparsity")), {}),
        ("sparsity",),
    ),
    # --- refusal ids that are not integers ---
    BadCase("refusal_score", "non_integer_ids", _non_integer_ids, ("refusal_token_ids",)),
    # --- directions whose float64 norm overflows (ablate used to be a silent no-op) ---
    BadCase(
        "ablate",
        "overflowing_norm_r",
        lambda D: (lambda x, r: ((x, _overflowing(D, r.shape[0])), {}))(*_x_r(D)),
        ("r",),
    ),
    BadCase(
        "orthogonalize_weight",
        "overflowing_norm_r",
        lambda D: (lambda w, r: ((w, _overflowing(D, r.shape[0])), {}))(*_w_r(D)),
        ("r",),
    ),
    BadCase(
        "orthogonalize_embedding",
        "overflowing_norm_r",
        lambda D: (lambda e, r: ((e, _overflowing(D, r.shape[0])), {}))(*_w_r(D, transpose=True)),
        ("r",),
    ),
    BadCase(
        "aird_update",
        "overflowing_norm_r",
        lambda D: (lambda w, r: ((w, _overflowing(D, r.shape[0]), 0.1), {}))(*_w_r(D)),
        ("r",),
    ),
    BadCase(
        "cosine_similarity",
        "overflowing_norm_a",
        lambda D: (lambda b: ((_overflowing(D, b.shape[0]), b), {}))(_dir(D, _d(D), "b", _dtype(D))),
        ("a",),
    ),
    # --- a result that overflows is not handed back ---
    BadCase("aird_update", "result_overflows", _aird_overflow, ("alpha",)),
)


def _names_argument(message: str, names: tuple[str, ...]) -> bool:
    return any(re.search(rf"(?<![\w]){re.escape(n)}(?![\w])", message) for n in names)


#: bad input is simple to build and fails (or not) at once: a third of the profile's examples
_EXAMPLES = max(5, settings().max_examples // 3)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
@settings(max_examples=_EXAMPLES)
@given(data=st.data())
def test_rejects_bad_input(impl, case: BadCase, data):
    if case.strict_only and not impl.strict_errors:
        pytest.skip(f"{case.problem} is the reference's policy; {impl.label} is held to the lenient rule")
    fn = getattr(impl, case.function)  # skips, naming the function, when the module lacks it
    args, kwargs = case.build(data)
    inputs = {f"arg{i}": a for i, a in enumerate(args)} | kwargs
    op = f"{case.function} on bad input ({case.problem})"
    try:
        result = fn(*args, **kwargs)
    except Exception as exc:  # which exceptions count is decided below, outside the handler
        error: Exception = exc
    else:
        raise AssertionError(
            f"{op}: returned {type(result).__name__} instead of raising; inputs: {describe(inputs)}"
        )
    if impl.strict_errors:
        assert isinstance(error, RefusalCoreError), (
            f"{op}: raised {type(error).__name__}: {error}; expected a refusal_core.errors.RefusalCoreError "
            f"subclass; inputs: {describe(inputs)}"
        )
        assert _names_argument(str(error), case.names), (
            f"{op}: the message {str(error)!r} names none of the arguments {case.names}; "
            f"inputs: {describe(inputs)}"
        )


def test_every_protocol_function_has_bad_input_cases() -> None:
    from refusal_core.testing.oracle import PROTOCOL

    covered = {c.function for c in CASES}
    missing = [f for f in PROTOCOL if f not in covered]
    assert not missing, f"protocol functions without a bad-input case: {missing}"
