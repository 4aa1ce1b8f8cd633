"""scripts/train_toy_model.py's architectures: what each builds, and that training is deterministic.

The toy organisms (the dense toy and every toy-MoE recipe in fixtures/toy_moe/) are trained by
this script; a recipe's record is only meaningful if ``--arch``/``--dense-layers`` build the blocks
they name and the same settings give the same weights. Each test trains a few steps only.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_toy_model.py"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_train_toy_model", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the module by name
    spec.loader.exec_module(module)
    return module


def _short(script: ModuleType, **changes: object) -> object:
    # a few steps, a smaller batch: enough to build and update every parameter
    return dataclasses.replace(
        script.ToyTrainingConfig(), steps=3, batch_size=8, helpful_warmup_steps=1, **changes
    )


def _is_routed(mlp: torch.nn.Module) -> bool:
    # a routed MLP has a router (``gate`` whose weight is [n_experts, d]) and fused experts
    return hasattr(mlp, "experts") and hasattr(mlp, "gate")


def test_qwen3_moe_dense_first_blocks_are_dense_and_the_rest_routed(script: ModuleType) -> None:
    cfg = _short(script, arch="qwen3_moe", dense_layers=2, n_layers=4)
    model, _, _ = script.train(cfg, quiet=True)
    assert model.config.model_type == "qwen3_moe"
    routed = [_is_routed(block.mlp) for block in model.model.layers]
    assert routed == [False, False, True, True], routed
    for block in model.model.layers[:2]:  # a dense MLP of width d_ff
        assert block.mlp.down_proj.weight.shape == (cfg.d_model, cfg.d_ff)
    for block in model.model.layers[2:]:
        assert block.mlp.gate.weight.shape[0] == cfg.n_experts
        assert block.mlp.experts.down_proj.shape == (cfg.n_experts, cfg.d_model, cfg.d_ff)
    assert model.config.num_experts_per_tok == cfg.experts_per_token
    assert model.config.norm_topk_prob is True  # Mixtral's renormalized top-k routing


def test_qwen3_moe_training_is_deterministic_and_the_router_sees_the_aux_loss(script: ModuleType) -> None:
    cfg = _short(script, arch="qwen3_moe", dense_layers=1, n_layers=2)
    a, _, _ = script.train(cfg, quiet=True)
    b, _, _ = script.train(cfg, quiet=True)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # a different seed gives different weights (the seed reaches the initialisation)
    c, _, _ = script.train(dataclasses.replace(cfg, seed=1), quiet=True)
    expert = "model.layers.1.mlp.experts.down_proj"
    assert not torch.equal(c.state_dict()[expert], sa[expert])
    # the load-balancing loss reaches the router: without it the router trains differently
    no_aux, _, _ = script.train(dataclasses.replace(cfg, router_aux_loss_coef=0.0), quiet=True)
    router = "model.layers.1.mlp.gate.weight"
    assert not torch.equal(no_aux.state_dict()[router], sa[router])
    # and the dense block has no router at all
    assert not any(k.startswith("model.layers.0.mlp.gate.") for k in sa)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"arch": "qwen3_moe", "dense_layers": 4, "n_layers": 4}, "--dense-layers must be in"),
        ({"arch": "qwen3_moe", "dense_layers": -1}, "--dense-layers must be in"),
        ({"arch": "moe", "dense_layers": 1}, "--dense-layers needs --arch qwen3_moe"),
        ({"arch": "llama", "dense_layers": 1}, "--dense-layers needs --arch qwen3_moe"),
        ({"arch": "mamba"}, "--arch must be"),
    ],
)
def test_bad_architecture_settings_stop_before_training(
    script: ModuleType, changes: dict, match: str
) -> None:
    with pytest.raises(SystemExit, match=match):
        script.train(_short(script, **changes), quiet=True)
