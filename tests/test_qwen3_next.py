"""Qwen3-Next (issue 15): the gated delta rule against transformers' torch reference, the two split kinds of the
family (gated attention q_proj, conv1d over q|k|v) round-tripping bit-exactly over TP=1 and 2, the config mapping
and refusals, and sft through `USE_MCA=1 llamafactory-cli train` against LLaMA-Factory's HF path
with the merged checkpoint loaded by Qwen3NextForCausalLM (extended).

The bridge on 2 processes (logits vs Hugging Face <= 1e-5 fp32 and bit-exact round trips for one process per model,
TP=2 with and without SP, PP=2 with a linear- and a full-attention layer on each stage, 2 virtual pipeline chunks,
EP=2, TP=2 x EP=2) runs in tests/test_family_qwen2_moe_glm4.py's torchrun launch (`BRIDGE_KINDS`): a launch of its
own would cost the default tier ~2 minutes of start-up on 2 shared CPU cores, a case inside that one 1-3 s."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_bridge_unit import DictSource

from tests.tiny_models import assert_table_covers_checkpoint, make_tiny_model, tiny_config

KIND = "qwen3_next"


def test_gated_delta_rule_matches_hf_torch_reference():
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    from llamafactory_mca.kernels.linear_attention import gated_delta_rule, kernel_name

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 70, 4, 16), torch.randn(2, 70, 4, 16), torch.randn(2, 70, 4, 8)  # 70: two chunks
    g, beta = -torch.rand(2, 70, 4), torch.rand(2, 70, 4)
    ref, _ = torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
    assert kernel_name(q.device) == "torch"
    torch.testing.assert_close(gated_delta_rule(q, k, v, g, beta), ref, rtol=0, atol=1e-6)


def test_gated_delta_rule_gradients_match_hf_torch_reference():
    """Ours organises the chunked arithmetic differently (one triangular solve, a state-only loop): its input
    gradients equal the reference's to fp32 rounding, for a length that is not a multiple of the chunk."""
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    from llamafactory_mca.kernels.linear_attention import torch_gated_delta_rule

    torch.manual_seed(1)
    inputs = [torch.randn(1, 150, 2, 16), torch.randn(1, 150, 2, 16), torch.randn(1, 150, 2, 8),
              -2 * torch.rand(1, 150, 2), torch.rand(1, 150, 2)]
    weight = torch.randn(1, 150, 2, 8)
    grads = []
    for fn in (lambda q, k, v, g, b: torch_chunk_gated_delta_rule(q, k, v, g=g, beta=b,
                                                                   use_qk_l2norm_in_kernel=True)[0],
               torch_gated_delta_rule):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        (fn(*leaves) * weight).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, ours, ref in zip(("q", "k", "v", "g", "beta"), *grads):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("tp", [1, 2])
def test_gated_qkv_and_conv_sections_round_trip(tp):
    from llamafactory_mca.models.param_mapping import ConvSections, GatedFusedQKV, QkvLayout, ShardContext

    cfg = SimpleNamespace(linear_num_key_heads=2, linear_key_head_dim=16, linear_num_value_heads=4,
                          linear_value_head_dim=8)
    layout = QkvLayout(head_dim=16, num_heads=4, num_groups=2)
    src = DictSource({"q": torch.randn(128, 64), "k": torch.randn(32, 64), "v": torch.randn(32, 64),
                      "conv": torch.randn(96, 1, 4)})
    for mapping, names in ((GatedFusedQKV(), ("q", "k", "v")), (ConvSections(), ("conv",))):
        shards = [mapping.local_shard(src, names, ShardContext(r, tp, cfg, layout)) for r in range(tp)]
        back = dict(mapping.to_hf(names, torch.cat(shards), ShardContext(0, tp, cfg, layout)))
        for name in names:
            assert torch.equal(back[name], src.tensors[name]), (type(mapping).__name__, name)
    # megatron's gated layout per query group: [q heads, gate heads, k, v]; HF q_proj per head [q_h; gate_h]
    one = GatedFusedQKV().local_shard(src, ("q", "k", "v"), ShardContext(0, 1, cfg, layout))
    assert torch.equal(one[16:32], src.tensors["q"][32:48])  # group 0: q of head 1 follows q of head 0
    assert torch.equal(one[32:48], src.tensors["q"][16:32])  # then the gate of head 0


# ------------------------------------------------------------------------------------ config, table, refusals


def test_transformer_config_and_hybrid_spec():
    """Gated attention, the delta-net shapes, Qwen2-MoE's MLP; the block spec puts GatedDeltaNet on the
    linear-attention layers of each pipeline chunk and the zero-centred norm everywhere."""
    from megatron.core.transformer.attention import SelfAttention

    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models.gated_delta_net import GatedDeltaNet, ZeroCenteredRMSNorm
    from llamafactory_mca.models.qwen3_next import hybrid_block_spec
    from llamafactory_mca.models.registry import bridge_for
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    from llamafactory_mca.models.spec import FusedRMSNorm, layer_spec

    hf = tiny_config(KIND)
    bridge = bridge_for(KIND)
    cfg = bridge.transformer_config(hf, MegatronArguments())
    assert cfg.attention_output_gate and cfg.qk_layernorm and not cfg.add_qkv_bias
    assert (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
            cfg.linear_value_head_dim, cfg.linear_conv_kernel_dim) == (2, 4, 16, 8, 4)
    assert cfg.moe_layer_freq == [0, 1, 1, 1] and cfg.moe_shared_expert_gate
    assert cfg.moe_shared_expert_intermediate_size == 40 and not cfg.moe_router_pre_softmax  # norm_topk_prob
    assert bridge.rotary_percent(hf) == 0.5
    moe, dense = layer_spec(cfg, MegatronArguments(), True), layer_spec(cfg, MegatronArguments(), True, None)
    block = TransformerBlockSubmodules(layer_specs=[moe, dense], layer_norm=FusedRMSNorm)  # layers 1, 2 (a stage)
    spec = hybrid_block_spec(block, hf.layer_types, offset=1)
    mixers = [s.submodules.self_attention.module for s in spec.layer_specs]
    assert mixers == [SelfAttention, GatedDeltaNet]
    assert spec.layer_norm is ZeroCenteredRMSNorm
    for s in spec.layer_specs:
        assert s.submodules.input_layernorm is ZeroCenteredRMSNorm
        assert s.submodules.pre_mlp_layernorm is ZeroCenteredRMSNorm
    assert spec.layer_specs[0].submodules.self_attention.submodules.q_layernorm is ZeroCenteredRMSNorm
    assert spec.layer_specs[0].submodules.self_attention.submodules.k_layernorm is ZeroCenteredRMSNorm
    assert moe.submodules.input_layernorm is FusedRMSNorm  # the shared specs are copied, not changed


def test_table_covers_checkpoint(tmp_path):
    from llamafactory_mca.models.registry import bridge_for

    assert_table_covers_checkpoint(bridge_for(KIND), make_tiny_model(KIND, str(tmp_path / KIND)))


@pytest.mark.parametrize("layout,key", [
    (dict(tensor_model_parallel_size=4), "tensor_model_parallel_size"),  # 2 linear-attention key heads
    (dict(context_parallel_size=4), "context_parallel_size"),  # tp x cp must divide the 2 key heads
    (dict(transformer_impl="transformer_engine"), "transformer_impl"),
])
def test_layout_refused_before_launch(layout, key):
    """The recipe check (config.json against the layout, before torchrun) names the key and the fix."""
    from llamafactory_mca.args import MegatronArguments, McaArgumentError, check_layout_against_model

    config = tiny_config(KIND).to_dict()
    config["num_attention_heads"] = config["num_key_value_heads"] = 8  # only the linear-attention heads refuse
    with pytest.raises(McaArgumentError, match=f"`{key}`.*Fix:"):
        check_layout_against_model(MegatronArguments(**layout), config)


@pytest.mark.parametrize("keys", [dict(finetuning_type="lora"),  # LLaMA-Factory's default lora_target: all
                                  dict(finetuning_type="lora", lora_target="q_proj,o_proj"),
                                  dict(finetuning_type="full", neat_packing=True), dict(packing=True)])
def test_recipe_options_pass_the_checks(tmp_path, keys):
    """LoRA on the gated q/k/v and packed sequences, refused in the first version, pass the recipe check."""
    import json

    from llamafactory_mca.recipe_checks import check_llamafactory_keys

    (tmp_path / "config.json").write_text(json.dumps(tiny_config(KIND).to_dict()))
    check_llamafactory_keys(dict(model_name_or_path=str(tmp_path), stage="sft", **keys))


def test_attention_bias_refused():
    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models.registry import bridge_for

    hf = tiny_config(KIND)
    hf.attention_bias = True
    with pytest.raises(ValueError, match="attention_bias.*Fix:"):
        bridge_for(KIND).transformer_config(hf, MegatronArguments())


def test_lora_on_hybrid_layers_matches_peft(tmp_path):
    """LoRA on every linear of the hybrid layers against PEFT: the gated q_proj (q and gate rows per head, fused
    per query group as megatron keeps them: param_mapping.GatedFusedQKV.fuse_outputs), k/v/o, the delta-net's
    in_proj_qkvz / in_proj_ba / out_proj, the dense and shared-expert MLPs and the routed experts (PEFT
    target_parameters). tests/lora_worker.py at TP=2 + SP, PP=2 and EP=2: logits vs PEFT, the merged model and the
    exported PEFT adapter (bit-identical tensors) within 1e-5."""
    from lf_runs import make_lora_adapter
    from lora_worker import assert_results

    from tests.tiny_models import make_tiny_model
    from tests.workers import launch_worker

    model = make_tiny_model(KIND, str(tmp_path / "model"))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkvz", "in_proj_ba", "out_proj", "gate_proj",
               "up_proj", "down_proj"]
    adapter = make_lora_adapter(model, str(tmp_path / "adapter"), seed=3, target_modules=targets,
                                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    launch_worker("lora_worker.py", ["--model", model, "--adapter", adapter, "--layouts", "tp2sp,pp2,ep2"],
                  tmp_path, key=("layout",))
    assert assert_results(str(tmp_path / "res")) == {"logits_vs_peft", "merged_logits_vs_peft",
                                                    "exported_adapter_logits_diff", "merged_hf_logits_diff"}


# ------------------------------------------------------------------------------------ training through the CLI


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.timeout(3600)
def test_training_parity_and_merge(tmp_path):
    """`USE_MCA=1 llamafactory-cli train` against LLaMA-Factory's HF path (fp32, CPU, 5 steps, global batch 4): 1
    process, TP=2 + SP and CP=2, losses per step within 1e-4 relative. The TP=2 run's distributed checkpoint merges at
    TP=1 with `llamafactory-mca merge` into a model that Qwen3NextForCausalLM loads with no missing or unexpected
    keys, equal to the run's own Hugging Face export (the convolution's q/k/v sections are saved TP-independently,
    gated_delta_net.split_sections_factory), and close to the HF-trained weights: within 1e-3, as Adam turns the
    fp32 rounding of the delta-net gate path's near-zero gradients (in_proj_ba's `a` rows, dt_bias, A_log) into
    steps of up to the learning rate (1e-3); every other tensor agrees to 1e-5."""
    import os

    from lf_runs import assert_parity, make_recipe, merge, train
    from transformers import Qwen3NextForCausalLM

    from tests.tiny_models import make_tiny_family_model

    model = make_tiny_family_model(KIND, str(tmp_path / "model"))
    hf = train(tmp_path, "hf", make_recipe(model, str(tmp_path / "hf")), mca=False)
    assert_parity(hf, train(tmp_path, "mca_one", make_recipe(model, str(tmp_path / "one"), save_hf_model=False)))
    tp2 = make_recipe(model, str(tmp_path / "tp2"), tensor_model_parallel_size=2, sequence_parallel=True,
                      save_strategy="steps", save_steps=5)
    exported = train(tmp_path, "mca_tp2", tp2, nproc=2)
    assert_parity(hf, exported)
    assert_parity(hf, train(tmp_path, "mca_cp2", make_recipe(model, str(tmp_path / "cp2"), save_hf_model=False,
                                                             context_parallel_size=2), nproc=2))
    merged = merge(os.path.join(tp2["output_dir"], "checkpoint-5"), str(tmp_path / "merged"), "--fp32")
    loaded, info = Qwen3NextForCausalLM.from_pretrained(merged, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours = loaded.state_dict()
    export = Qwen3NextForCausalLM.from_pretrained(exported).state_dict()
    theirs = Qwen3NextForCausalLM.from_pretrained(hf).state_dict()
    assert ours.keys() == theirs.keys() == export.keys()
    gate_path = ("in_proj_ba", "dt_bias", "A_log")
    for k in theirs:
        assert torch.equal(ours[k], export[k]), k
        atol = 1e-3 if any(g in k for g in gate_path) else 1e-5
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-4, atol=atol, msg=k)
