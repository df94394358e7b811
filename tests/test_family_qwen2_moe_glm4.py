"""Qwen2-MoE and GLM-4-MoE (issue 14): shared experts (gated and plain), dense-first layers, sigmoid routing with
an expert-choice bias, group-limited top-k and scaled weights, partial rotary, q/k norm and q/k/v bias.

Unit tests (no process group): config mapping, table coverage, router numerics against the Hugging Face gate,
clear errors for configs megatron cannot compute as HF does. Bridge tests: one `torchrun --nproc_per_node 2`
launch (tests/dist_helpers.py) gives logits parity and bit-exact round trips for every layout, both families.
"""

from __future__ import annotations

import re

import pytest
import torch

from tests.dist_helpers import LAYOUTS
from tests.tiny_models import FAMILY_KINDS, _config, make_tiny_model
from tests.workers import launch_worker

TOL = 1e-5
RUN_LAYOUTS = ("dp2", "tp2", "tp2sp", "pp2", "vpp2", "ep2", "tp2ep2")


# ------------------------------------------------------------------------------------ config and table


def test_transformer_config_qwen2_moe():
    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models.registry import bridge_for

    hf = _config("qwen2_moe")
    cfg = bridge_for("qwen2_moe").transformer_config(hf, MegatronArguments())
    assert cfg.num_moe_experts == 6 and cfg.moe_ffn_hidden_size == 24 and cfg.ffn_hidden_size == 80
    assert cfg.moe_layer_freq == [0, 1, 1, 1]  # mlp_only_layers=[0]
    assert cfg.moe_shared_expert_intermediate_size == 40 and cfg.moe_shared_expert_gate
    assert cfg.moe_router_score_function == "softmax" and cfg.moe_router_pre_softmax  # norm_topk_prob false
    assert cfg.add_qkv_bias and not cfg.qk_layernorm and not cfg.moe_router_enable_expert_bias
    hf.mlp_only_layers, hf.decoder_sparse_step = [], 2
    assert bridge_for("qwen2_moe").transformer_config(hf, MegatronArguments()).moe_layer_freq == [0, 1, 0, 1]
    hf.decoder_sparse_step = 1
    assert bridge_for("qwen2_moe").transformer_config(hf, MegatronArguments()).moe_layer_freq == 1


def test_transformer_config_glm4_moe():
    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models.registry import bridge_for

    cfg = bridge_for("glm4_moe").transformer_config(_config("glm4_moe"), MegatronArguments())
    assert cfg.num_moe_experts == 8 and cfg.moe_router_topk == 4 and cfg.moe_layer_freq == [0, 1, 1, 1]
    assert cfg.moe_shared_expert_intermediate_size == 48 and not cfg.moe_shared_expert_gate  # 2 x 24
    assert cfg.moe_router_score_function == "sigmoid" and cfg.moe_router_enable_expert_bias
    assert cfg.moe_router_bias_update_rate == 0.0  # HF never updates e_score_correction_bias
    assert (cfg.moe_router_num_groups, cfg.moe_router_group_topk) == (4, 2)
    assert cfg.moe_router_topk_scaling_factor == 2.5
    assert cfg.qk_layernorm and cfg.add_qkv_bias and cfg.kv_channels == 16
    assert bridge_for("glm4_moe").rotary_percent(_config("glm4_moe")) == 0.5


@pytest.mark.parametrize("kind", FAMILY_KINDS)
def test_tables_cover_hf_names(kind, tmp_path):
    """Every tensor of the tiny HF checkpoint (buffers such as e_score_correction_bias too) has a table entry."""
    from safetensors import safe_open

    from llamafactory_mca.models.registry import bridge_for

    path = make_tiny_model(kind, str(tmp_path / kind))
    patterns = []
    for hf, _kind in bridge_for(kind).table.values():
        for name in (hf if isinstance(hf, tuple) else (hf,)):
            patterns.append(re.compile(re.escape(name).replace(r"\{L\}", r"\d+").replace(r"\{E\}", r"\d+") + "$"))
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert any("e_score_correction_bias" in k or "shared_expert_gate" in k for k in keys)
    for key in keys:
        assert any(p.match(key) for p in patterns), key


@pytest.mark.parametrize("change,message", [
    (dict(norm_topk_prob=False), "norm_topk_prob"),
    (dict(num_experts_per_tok=6), "topk_group"),
    (dict(first_k_dense_replace=4), "first_k_dense_replace"),
])
def test_glm4_moe_refuses_what_megatron_computes_differently(change, message):
    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models.registry import bridge_for

    hf = _config("glm4_moe")
    for k, v in change.items():
        setattr(hf, k, v)
    with pytest.raises(ValueError, match=message) as err:
        bridge_for("glm4_moe").transformer_config(hf, MegatronArguments())
    assert "Fix:" in str(err.value)


def test_qwen2_moe_refuses_sliding_window():
    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models.registry import bridge_for

    hf = _config("qwen2_moe")
    hf.use_sliding_window = True
    with pytest.raises(ValueError, match="use_sliding_window.*Fix:"):
        bridge_for("qwen2_moe").transformer_config(hf, MegatronArguments())


# ------------------------------------------------------------------------------------ router numerics


def _megatron_routing(cfg, logits: torch.Tensor, expert_bias=None) -> torch.Tensor:
    """[tokens, experts] routing weights as megatron's TopKRouter.routing computes them for `cfg`."""
    from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

    probs, routing_map = topk_routing_with_score_function(
        logits, cfg.moe_router_topk, use_pre_softmax=cfg.moe_router_pre_softmax,
        num_groups=cfg.moe_router_num_groups, group_topk=cfg.moe_router_group_topk,
        scaling_factor=cfg.moe_router_topk_scaling_factor, score_function=cfg.moe_router_score_function,
        expert_bias=expert_bias)
    assert int(routing_map.sum(-1).max()) == cfg.moe_router_topk
    return probs * routing_map


def _scatter(indices: torch.Tensor, weights: torch.Tensor, experts: int) -> torch.Tensor:
    return torch.zeros(indices.shape[0], experts, dtype=weights.dtype).scatter(1, indices, weights)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_router_matches_hf_qwen2_moe(norm_topk_prob):
    """Softmax over all experts in fp32, top-k, renormalised or not: as Qwen2MoeTopKRouter, on the same input."""
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeTopKRouter

    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models.registry import bridge_for

    hf = _config("qwen2_moe")
    hf.norm_topk_prob = norm_topk_prob
    cfg = bridge_for("qwen2_moe").transformer_config(hf, MegatronArguments())
    torch.manual_seed(0)
    gate = Qwen2MoeTopKRouter(hf)
    torch.nn.init.normal_(gate.weight, std=0.5)
    x = torch.randn(512, hf.hidden_size)
    logits, weights, indices = gate(x)
    ours = _megatron_routing(cfg, (x @ gate.weight.t()).float())
    theirs = _scatter(indices, weights, hf.num_experts)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0), (ours - theirs).abs().max()
    assert not torch.allclose(theirs.sum(-1), torch.ones(512)) or norm_topk_prob  # the two cases do differ


def test_router_matches_hf_glm4_moe():
    """Sigmoid scores in fp32, expert choice on scores + e_score_correction_bias within the best groups (a group
    scored by its 2 best experts), weights from the unbiased scores, normalised, times routed_scaling_factor: as
    Glm4MoeMoE.route_tokens_to_experts, on the same input."""
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeMoE

    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models.registry import bridge_for

    hf = _config("glm4_moe")
    cfg = bridge_for("glm4_moe").transformer_config(hf, MegatronArguments())
    torch.manual_seed(0)
    moe = Glm4MoeMoE(hf)
    torch.nn.init.normal_(moe.gate.weight, std=0.5)
    moe.gate.e_score_correction_bias.copy_(torch.randn(hf.n_routed_experts) * 0.3)
    x = torch.randn(512, hf.hidden_size)
    logits = moe.gate(x)
    indices, weights = moe.route_tokens_to_experts(logits)
    theirs = _scatter(indices, weights, hf.n_routed_experts)
    ours = _megatron_routing(cfg, logits, moe.gate.e_score_correction_bias)
    assert torch.allclose(ours, theirs, atol=1e-6, rtol=0), (ours - theirs).abs().max()
    # the bias and the groups change the choice: a router without them would not match
    plain = _megatron_routing(cfg, logits, None)
    assert not torch.allclose(plain, theirs, atol=1e-3)


# ------------------------------------------------------------------------------------ bridge on 2 processes


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    models = tmp_path_factory.mktemp("family_models")
    for kind in FAMILY_KINDS:
        make_tiny_model(kind, str(models / kind))
    return launch_worker("dist_helpers.py", ["--models", str(models), "--layouts", ",".join(RUN_LAYOUTS),
                                             "--kinds", ",".join(FAMILY_KINDS)],
                         tmp_path_factory.mktemp("family_results"), key=("layout", "kind"))


CASES = [(layout, kind) for layout in RUN_LAYOUTS for kind in FAMILY_KINDS]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout,kind", CASES)
def test_logits_parity(dist_results, layout, kind):
    diffs = []
    for rank_results in dist_results:
        r = rank_results[(layout, kind)]
        assert "error" not in r, r["error"]
        if "logits_max_abs_diff" in r:
            diffs.append(r["logits_max_abs_diff"])
            assert r["loss_abs_diff"] <= TOL, r
    assert diffs and max(diffs) <= TOL, diffs


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout,kind", CASES)
def test_round_trip_bit_exact(dist_results, layout, kind):
    r = dist_results[0][(layout, kind)]
    assert "error" not in r, r["error"]
    assert r["missing"] == [] and r["extra"] == [] and r["not_equal"] == [], r
    assert r["saved_shards"] > 1 and r["reload_not_equal"] == [], r


def test_layouts_known():
    assert set(RUN_LAYOUTS) <= set(LAYOUTS)
