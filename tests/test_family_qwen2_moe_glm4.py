"""Qwen2-MoE and GLM-4-MoE (issue 14): shared experts (gated and plain), dense-first layers, sigmoid routing with
an expert-choice bias, group-limited top-k and scaled weights, partial rotary, q/k norm and q/k/v bias.

Unit tests (no process group): config mapping, table coverage, router numerics against the Hugging Face gate,
clear errors for configs megatron cannot compute as HF does. Bridge tests: one `torchrun --nproc_per_node 2`
launch (tests/dist_helpers.py) gives logits parity and bit-exact round trips for every layout, both families and
Qwen3-Next (issue 15, whose other tests are in tests/test_qwen3_next.py).
"""

from __future__ import annotations

import re

import pytest
import torch

from tests.dist_helpers import (
    LAYOUTS,
    assert_logits_parity,
    assert_round_trip,
    run_bridge_checks,
)
from tests.tiny_models import FAMILY_KINDS, tiny_config, make_tiny_model

TOL = 1e-5
RUN_LAYOUTS = ("dp2", "tp2", "tp2sp", "pp2", "vpp2", "ep2", "tp2ep2")
# qwen3_next (tests/test_qwen3_next.py) shares this launch: its start dominates, a case inside it costs 1-3 s
BRIDGE_KINDS = FAMILY_KINDS + ("qwen3_next",)


# ------------------------------------------------------------------------------------ config and table


def test_transformer_config_qwen2_moe():
    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models.registry import bridge_for

    hf = tiny_config("qwen2_moe")
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

    cfg = bridge_for("glm4_moe").transformer_config(tiny_config("glm4_moe"), MegatronArguments())
    assert cfg.num_moe_experts == 8 and cfg.moe_router_topk == 4 and cfg.moe_layer_freq == [0, 1, 1, 1]
    assert cfg.moe_shared_expert_intermediate_size == 48 and not cfg.moe_shared_expert_gate  # 2 x 24
    assert cfg.moe_router_score_function == "sigmoid" and cfg.moe_router_enable_expert_bias
    assert cfg.moe_router_bias_update_rate == 0.0  # HF never updates e_score_correction_bias
    assert (cfg.moe_router_num_groups, cfg.moe_router_group_topk) == (4, 2)
    assert cfg.moe_router_topk_scaling_factor == 2.5
    assert cfg.qk_layernorm and cfg.add_qkv_bias and cfg.kv_channels == 16
    assert bridge_for("glm4_moe").rotary_percent(tiny_config("glm4_moe")) == 0.5


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

    hf = tiny_config("glm4_moe")
    for k, v in change.items():
        setattr(hf, k, v)
    with pytest.raises(ValueError, match=message) as err:
        bridge_for("glm4_moe").transformer_config(hf, MegatronArguments())
    assert "Fix:" in str(err.value)


def test_qwen2_moe_refuses_sliding_window():
    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models.registry import bridge_for

    hf = tiny_config("qwen2_moe")
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

    hf = tiny_config("qwen2_moe")
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

    hf = tiny_config("glm4_moe")
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
    return run_bridge_checks(tmp_path_factory, BRIDGE_KINDS, RUN_LAYOUTS)


CASES = [(layout, kind) for layout in RUN_LAYOUTS for kind in BRIDGE_KINDS]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout,kind", CASES)
def test_logits_parity(dist_results, layout, kind):
    assert_logits_parity(dist_results, layout, kind, TOL)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout,kind", CASES)
def test_round_trip_bit_exact(dist_results, layout, kind):
    assert_round_trip(dist_results, layout, kind)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("kind", ["qwen2_moe"])  # glm4_moe passes too; one family keeps CI short
def test_lora_against_peft(kind, tmp_path):
    """LoRA on attention and the dense / shared-expert MLPs (PEFT's q/k/v/o/gate/up/down_proj; the experts are
    not adapted on either side): logits against PEFT, the exported adapter and the merged model, TP=2+SP, PP=2,
    EP=2 (tests/lora_worker.py)."""
    import os
    import subprocess
    import sys

    from conftest import REPO, worktree_env
    from lf_runs import make_lora_adapter
    from lora_worker import assert_results as assert_lora_results

    model = make_tiny_model(kind, str(tmp_path / kind))
    adapter = make_lora_adapter(model, str(tmp_path / "adapter"), seed=3)
    out = str(tmp_path / "res")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(REPO, "tests", "lora_worker.py"), "--model", model, "--adapter", adapter, "--out", out,
           "--layouts", "tp2sp,pp2,ep2"]
    proc = subprocess.run(cmd, cwd=REPO, env=worktree_env(), capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    assert len(assert_lora_results(out, TOL)) == 4


def test_layouts_known():
    assert set(RUN_LAYOUTS) <= set(LAYOUTS)


# ------------------------------------------------------------------------------------ training through the CLI


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    from tests.tiny_models import make_tiny_family_model

    root = tmp_path_factory.mktemp("family_train_models")
    return {kind: make_tiny_family_model(kind, str(root / kind)) for kind in FAMILY_KINDS}


def aux_keys(kind: str) -> dict:
    """qwen2_moe trains with the HF path's pooled router aux loss (gradient checkpointing off on the HF side, where
    it would drop the aux gradient); glm4_moe has none on either path."""
    return dict(moe_aux_loss_coef=0.1, disable_gradient_checkpointing=True) if kind == "qwen2_moe" else {}


@pytest.fixture(scope="module")
def family_hf_runs(family_models, tmp_path_factory):
    """Per kind, built when first asked for: LLaMA-Factory's HF run (shared by the parallel and 1-process checks)."""
    from lf_runs import make_recipe, train

    cache = {}

    def run(kind: str) -> str:
        if kind not in cache:
            tmp = tmp_path_factory.mktemp(f"hf_{kind}")
            cache[kind] = train(tmp, f"hf_{kind}", make_recipe(family_models[kind], str(tmp / "hf"), **aux_keys(kind)),
                                mca=False)
        return cache[kind]

    return run


def assert_hf_weights(model_dir: str, hf: str) -> None:
    """The model in `model_dir` loads with transformers (no missing or unexpected keys) to the HF run's weights."""
    from transformers import AutoModelForCausalLM

    loaded, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours, theirs = loaded.state_dict(), AutoModelForCausalLM.from_pretrained(hf).state_dict()
    assert ours.keys() == theirs.keys()
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("kind", [pytest.param(k, marks=pytest.mark.extended) if k == "glm4_moe" else k
                                  for k in FAMILY_KINDS])  # glm4_moe's router is also checked against HF's gate
def test_training_parity_tp2_ep2_and_merge(family_models, family_hf_runs, kind, tmp_path):
    """`USE_MCA=1 llamafactory-cli train` against LLaMA-Factory's HF path (fp32, CPU, 5 steps, global batch 4):
    qwen2_moe with `moe_aux_loss_coef` (the HF path's pooled router aux loss, trained on; micro-batches of 2 rows in
    every layout, as the aux loss depends on their grouping), glm4_moe with it set but added by neither path.
    TP=2 (+SP) and EP=2 share one HF run; the EP=2 run's checkpoint merges with `llamafactory-mca merge` into a
    model that transformers loads with no missing or unexpected keys, equal to the HF-trained weights. The
    1-process run: test_training_parity_one_process."""
    import os

    from lf_runs import assert_parity, make_recipe, merge, train

    model, hf, aux = family_models[kind], family_hf_runs(kind), aux_keys(kind)
    # glm4_moe: LLaMA-Factory's HF path adds no aux loss to this family even with moe_aux_loss_coef set, so
    # neither may ours (the HF reference run has no coefficient: the HF path computes the same either way)
    no_aux = dict(moe_aux_loss_coef=0.01) if kind == "glm4_moe" else aux
    tp2 = make_recipe(model, str(tmp_path / "tp2"), tensor_model_parallel_size=2, sequence_parallel=True,
                      save_hf_model=False, **no_aux)
    assert_parity(hf, train(tmp_path, f"mca_{kind}_tp2", tp2, nproc=2))

    ep2 = make_recipe(model, str(tmp_path / "ep2"), gradient_accumulation_steps=1, expert_model_parallel_size=2,
                      save_strategy="steps", save_steps=5, save_hf_model=False, **aux)
    assert_parity(hf, train(tmp_path, f"mca_{kind}_ep2", ep2, nproc=2))
    merged = merge(os.path.join(ep2["output_dir"], "checkpoint-5"), str(tmp_path / "merged"), "--fp32")
    assert_hf_weights(merged, hf)  # the EP=2 run trained the same updates


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.parametrize("kind", list(FAMILY_KINDS))
def test_training_parity_one_process(family_models, family_hf_runs, kind, tmp_path):
    """1 process against the same HF run (the bridge and loss of the parallel runs above); its export equals the
    HF-trained weights."""
    from lf_runs import assert_parity, make_recipe, train

    hf = family_hf_runs(kind)
    one = train(tmp_path, f"mca_{kind}", make_recipe(family_models[kind], str(tmp_path / "one"), **aux_keys(kind)))
    assert_parity(hf, one)
    assert_hf_weights(one, hf)
