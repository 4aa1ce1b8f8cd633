"""Properties of the refusal score (DESIGN.md, "Refusal score")."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from refusal_core.testing import strategies as rs

from ._checks import as64, assert_layout, check, check_scores, refusal_score64, refusal_score_slack


def _draw(data: st.DataObject):
    dtype = data.draw(rs.float_dtypes(), label="dtype")
    lead = data.draw(rs.leading_shapes(max_dims=2, max_side=3), label="leading shape")
    vocab = data.draw(st.integers(2, 12), label="vocab")
    ids = data.draw(rs.refusal_ids(vocab), label="refusal_token_ids")
    logits = data.draw(rs.logits(lead, vocab, ids, dtype), label="logits")
    as_tensor = data.draw(st.booleans(), label="ids passed as a tensor")
    return logits, ids, (torch.tensor(ids) if as_tensor else ids)


@pytest.mark.needs("refusal_score")
@given(data=st.data())
def test_refusal_score_matches_float64_formula(impl, data):
    logits, ids, ids_arg = _draw(data)
    inputs = {"logits": logits, "refusal_token_ids": ids}
    out = impl.refusal_score(logits, ids_arg)
    assert_layout("refusal_score(logits, ids)", inputs, out, shape=logits.shape[:-1], dtype=torch.float64)
    expected = refusal_score64(logits, ids)
    check_scores("refusal_score vs log(p + 1e-8) − log(1 − p + 1e-8)", inputs, out, expected, logits, ids)


@pytest.mark.needs("refusal_score")
@given(data=st.data())
def test_refusal_score_is_monotone_in_refusal_logits(impl, data):
    logits, ids, ids_arg = _draw(data)
    delta = data.draw(rs.positive_scalars(1e-2, 50.0), label="delta")
    which = data.draw(st.sampled_from(["all refusal ids", "one refusal id"]), label="raised")
    raised_ids = ids if which == "all refusal ids" else ids[:1]
    raised = as64(logits)
    raised[..., raised_ids] += delta
    raised = raised.to(logits.dtype)
    before = as64(impl.refusal_score(logits, ids_arg))
    after = as64(impl.refusal_score(raised, ids_arg))
    slack = refusal_score_slack(logits, ids) + refusal_score_slack(raised, ids)
    drop = before - after - slack
    check(
        bool((drop <= 0).all()),
        "refusal_score after raising refusal logits by delta",
        {"logits": logits, "refusal_token_ids": ids, "delta": delta, "raised": raised_ids},
        f"the score fell by up to {float(drop.max() + slack.max()):.6g}",
    )
