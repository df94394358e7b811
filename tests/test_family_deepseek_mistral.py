"""Mistral (sliding window) and DeepSeek-V3 (multi-latent attention) families, issue 14.

Fast checks (one process): the sliding-window mask of SDPAttention against explicit softmax attention (padded,
plainly packed and THD-packed batches), the TransformerConfig of each family, the refusals (context parallelism
with a window, DeepSeek features the bridge does not map), the tables against the HF checkpoints.
Slow checks: one `torchrun` launch (tests/dist_helpers.py) for logits parity <= 1e-5 and bit-exact HF -> Megatron
-> HF round trips over TP=2 (+SP), PP=2, VPP=2, and EP=2 / TP=2 x EP=2 for the MoE model; training through
`USE_MCA=1 llamafactory-cli train` against LLaMA-Factory's HF path per step (1 process, TP=2 and, for DeepSeek-V3,
EP=2 share one HF run per family), and `llamafactory-mca merge` of a checkpoint loading with AutoModelForCausalLM
without missing keys.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from tests.dist_helpers import assert_logits_parity, assert_round_trip
from tests.tiny_models import DSV3_MISTRAL_KINDS, assert_table_covers_checkpoint, dsv3_mistral_config, make_tiny_model

TOL = 1e-5
DIST_LAYOUTS = ("dp2", "tp2", "tp2sp", "pp2", "vpp2", "ep2", "tp2ep2")
MOE_KIND = "deepseek_v3"  # the DeepSeek-V3 model with MoE layers: the only kind of the expert-parallel layouts


# ------------------------------------------------------------------------------------ sliding window (unit)


def _sdpa(window, nh=4, ng=2, d=8):
    from megatron.core.transformer.enums import AttnMaskType

    from llamafactory_mca.models.attention import SDPAttention

    attn = SDPAttention.__new__(SDPAttention)
    torch.nn.Module.__init__(attn)
    attn.num_heads, attn.num_groups, attn.hidden_size_per_partition = nh, ng, nh * d
    attn.softmax_scale, attn.dropout_p, attn.attn_mask_type = d ** -0.5, 0.0, AttnMaskType.causal
    attn.window = window
    return attn


def _reference(q, k, v, allowed):
    """Explicit softmax attention; q [s, b, h, d], k/v [s, b, g, d], allowed [b or 1, 1, s, s] (True = attend)."""
    nh, ng, d = q.shape[2], k.shape[2], q.shape[3]
    kk, vv = k.repeat_interleave(nh // ng, 2), v.repeat_interleave(nh // ng, 2)
    s = torch.einsum("qbhd,kbhd->bhqk", q, kk) * d ** -0.5
    p = torch.nan_to_num(torch.softmax(s.masked_fill(~allowed, float("-inf")), -1))
    return torch.einsum("bhqk,kbhd->qbhd", p, vv).reshape(q.shape[0], q.shape[1], nh * d)


def _hf_window_mask(n, window):
    """Hugging Face's sliding-window causal mask: kv <= q and kv > q - window."""
    q, kv = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return (kv <= q) & (kv > q - window)


def test_sliding_window_attention_matches_reference():
    """window 3 (sliding_window: 4) on padded, plainly packed (block mask) and THD-packed (cu_seqlens) batches."""
    from megatron.core.packed_seq_params import PackedSeqParams

    torch.manual_seed(0)
    sq, b, nh, ng, d, sliding = 10, 2, 4, 2, 8, 4
    attn = _sdpa(sliding - 1)
    q, k, v = torch.randn(sq, b, nh, d), torch.randn(sq, b, ng, d), torch.randn(sq, b, ng, d)
    band = _hf_window_mask(sq, sliding)[None, None]
    assert torch.allclose(attn(q, k, v, None), _reference(q, k, v, band), atol=1e-6)
    # padding: sample 1's first two keys masked out
    pad = torch.zeros(b, 1, sq, sq, dtype=torch.bool)
    pad[1, ..., :2] = True
    out, ref = attn(q, k, v, pad), _reference(q, k, v, band & ~pad)
    assert torch.allclose(out[:, 0], ref[:, 0], atol=1e-6)
    assert torch.allclose(out[2:, 1], ref[2:, 1], atol=1e-6)  # rows 0-1 of sample 1 see no key at all
    # a window at least as long as the sequence is plain causal attention
    causal = torch.ones(sq, sq, dtype=torch.bool).tril()[None, None]
    assert torch.allclose(_sdpa(sq)(q, k, v, None), _reference(q, k, v, causal), atol=1e-6)
    # THD packing: sub-sequences of 6 and 4 tokens, the window restarts in each
    q1, k1, v1 = q[:, :1], k[:, :1], v[:, :1]
    cu = torch.tensor([0, 6, 10], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=6, max_seqlen_kv=6)
    seg = torch.tensor([0] * 6 + [1] * 4)
    pos = torch.cat([torch.arange(6), torch.arange(4)])
    allowed = (seg[:, None] == seg[None, :]) & (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - sliding)
    ref = _reference(q1, k1, v1, allowed[None, None])
    out = attn(q1.squeeze(1), k1.squeeze(1), v1.squeeze(1), None, packed_seq_params=params)
    assert torch.allclose(out, ref.squeeze(1), atol=1e-6)


def test_sliding_window_config_and_context_parallel_refusal():
    from llamafactory_mca.args import MegatronArguments, McaArgumentError, check_layout_against_model
    from llamafactory_mca.models.registry import bridge_for

    hf = dsv3_mistral_config("mistral")
    cfg = bridge_for("mistral").transformer_config(hf, MegatronArguments(tensor_model_parallel_size=2))
    assert cfg.window_size == (hf.sliding_window - 1, 0) and cfg.kv_channels == 24 and cfg.num_query_groups == 2
    from transformers import MistralConfig, MixtralConfig

    no_window = MistralConfig(sliding_window=None)
    assert bridge_for("mistral").transformer_config(no_window, MegatronArguments()).window_size is None
    mixtral = MixtralConfig(num_local_experts=4, sliding_window=7, hidden_size=64, num_attention_heads=4,
                            num_key_value_heads=2, intermediate_size=32, num_hidden_layers=2)
    assert bridge_for("mixtral").transformer_config(mixtral, MegatronArguments()).window_size == (6, 0)
    # context parallelism cannot split the window: refused with the key and the fix, before anything is built
    with pytest.raises(McaArgumentError) as err:
        check_layout_against_model(MegatronArguments(context_parallel_size=2), hf.to_dict())
    assert "context_parallel_size" in str(err.value) and "Fix: set context_parallel_size: 1" in str(err.value)
    check_layout_against_model(MegatronArguments(context_parallel_size=2), {**hf.to_dict(), "sliding_window": None})
    qwen2 = {**hf.to_dict(), "model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False}
    check_layout_against_model(MegatronArguments(context_parallel_size=2), qwen2)


# ------------------------------------------------------------------------------------ DeepSeek-V3 config (unit)


def test_deepseek_v3_mla_config_matches_hf_attention():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models.deepseek_v3 import hf_rotary
    from llamafactory_mca.models.registry import bridge_for

    for kind in ("deepseek_v3_dense", "deepseek_v3_noqlora"):
        hf = dsv3_mistral_config(kind)
        cfg = bridge_for("deepseek_v3").transformer_config(hf, MegatronArguments())
        assert type(cfg).__name__ == "MLATransformerConfig" and cfg.multi_latent_attention
        assert (cfg.q_lora_rank, cfg.kv_lora_rank) == (hf.q_lora_rank, hf.kv_lora_rank)
        assert (cfg.qk_head_dim, cfg.qk_pos_emb_head_dim, cfg.v_head_dim) == (12, 8, 10)
        assert cfg.num_query_groups == cfg.num_attention_heads and cfg.num_moe_experts is None  # every layer dense
        # megatron's softmax scale (MultiLatentAttention) equals transformers' (YaRN mscale_all_dim squared)
        from megatron.core.transformer.multi_latent_attention import _yarn_get_mscale

        mscale = _yarn_get_mscale(cfg.rotary_scaling_factor, cfg.mscale_all_dim)
        ours = mscale * mscale / (cfg.qk_head_dim + cfg.qk_pos_emb_head_dim) ** 0.5
        assert abs(ours - DeepseekV3Attention(hf, 0).scaling) < 1e-12, kind
        inv_freq, factor = hf_rotary(hf)
        assert inv_freq.numel() == hf.qk_rope_head_dim // 2
        if kind == "deepseek_v3_dense":
            assert factor != 1.0  # YaRN's cos/sin factor (mscale 1.0 / mscale_all_dim 0.8) is exercised


def test_deepseek_v3_moe_config():
    """Dense first layer, then MoE layers with a shared expert and GLM-4-MoE's routing (the moe branch's hooks)."""
    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models.registry import bridge_for

    hf = dsv3_mistral_config(MOE_KIND)
    cfg = bridge_for("deepseek_v3").transformer_config(hf, MegatronArguments(expert_model_parallel_size=2))
    assert cfg.multi_latent_attention and cfg.num_moe_experts == 8 and cfg.moe_ffn_hidden_size == 24
    assert cfg.moe_layer_freq == [0, 1, 1, 1] and cfg.ffn_hidden_size == 96
    assert cfg.moe_shared_expert_intermediate_size == 24 and not cfg.moe_shared_expert_gate
    assert cfg.moe_router_score_function == "sigmoid" and cfg.moe_router_enable_expert_bias
    assert (cfg.moe_router_num_groups, cfg.moe_router_group_topk, cfg.moe_router_topk) == (2, 1, 2)
    assert cfg.moe_router_topk_scaling_factor == 2.5


def test_deepseek_v3_tensor_parallel_must_split_the_latent_ranks():
    from llamafactory_mca.args import MegatronArguments, McaArgumentError, check_layout_against_model

    config = dsv3_mistral_config(MOE_KIND).to_dict()  # q_lora_rank 24, kv_lora_rank 20 + rope 8 = 28
    tp4 = MegatronArguments(tensor_model_parallel_size=4, sequence_parallel=True)
    check_layout_against_model(tp4, config)
    with pytest.raises(McaArgumentError) as err:
        check_layout_against_model(tp4, {**config, "kv_lora_rank": 22})
    assert "tensor_model_parallel_size" in str(err.value) and "kv_lora_rank + qk_rope_head_dim (30)" in str(err.value)
    # without sequence parallelism the rope key's gradient would miss the other ranks' heads: refused
    with pytest.raises(McaArgumentError, match="`sequence_parallel`: multi-latent attention"):
        check_layout_against_model(MegatronArguments(tensor_model_parallel_size=4), config)


@pytest.mark.parametrize("change,needle", [({"rope_interleave": False}, "rope_interleave"),
                                           ({"attention_bias": True}, "attention_bias"),
                                           ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0,
                                                                 "rope_theta": 10000.0}}, "dynamic")])
def test_deepseek_v3_refuses_unmapped_features(change, needle):
    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models.registry import bridge_for

    hf = dsv3_mistral_config("deepseek_v3_dense")
    for key, value in change.items():
        setattr(hf, key, value)
    with pytest.raises(ValueError, match=needle):
        bridge_for("deepseek_v3").transformer_config(hf, MegatronArguments())


def test_tables_cover_hf_names(tmp_path):
    """Every tensor of each tiny HF checkpoint is named by the family's table."""
    from llamafactory_mca.models.registry import bridge_for

    for kind in DSV3_MISTRAL_KINDS:
        path = make_tiny_model(kind, str(tmp_path / kind))
        assert_table_covers_checkpoint(bridge_for(dsv3_mistral_config(kind).model_type), path)


# ------------------------------------------------------------------------------------ bridge on 2 ranks (slow)


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    from tests.workers import launch_worker

    models = tmp_path_factory.mktemp("family_models")
    for kind in DSV3_MISTRAL_KINDS:
        make_tiny_model(kind, str(models / kind))
    return launch_worker("dist_helpers.py", ["--models", str(models), "--layouts", ",".join(DIST_LAYOUTS),
                                             "--kinds", ",".join(DSV3_MISTRAL_KINDS)],
                         tmp_path_factory.mktemp("family_results"), key=("layout", "kind"), timeout=1800)


DIST_CASES = [(layout, kind) for layout in DIST_LAYOUTS for kind in DSV3_MISTRAL_KINDS
              if "ep2" not in layout or kind == MOE_KIND]


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("layout,kind", DIST_CASES)
def test_logits_parity_and_round_trip(dist_results, layout, kind):
    assert_logits_parity(dist_results, layout, kind, TOL)
    assert_round_trip(dist_results, layout, kind)


# ------------------------------------------------------------------------------------ training (slow)


def make_trainable_model(kind: str, path: str) -> str:
    """A tiny `kind` model with the local ChatML tokenizer (scripts/make_tiny_model.py), for llamafactory-cli runs."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    from make_tiny_model import build_tokenizer
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(480)
    config = dsv3_mistral_config(kind)
    config.eos_token_id, config.pad_token_id, config.bos_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id, None
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


FAMILY_KINDS = {"mistral": "mistral", "deepseek_v3": MOE_KIND}


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory):
    """Per family, built when first asked for: the tiny model and LLaMA-Factory's HF run on it (shared by the
    1-process, TP=2 and EP=2 checks)."""
    from lf_runs import make_recipe, train

    cache = {}

    def run(family: str) -> tuple[str, str]:
        if family not in cache:
            tmp = tmp_path_factory.mktemp(family)
            model = make_trainable_model(FAMILY_KINDS[family], str(tmp / "model"))
            cache[family] = (model, train(tmp, f"hf_{family}", make_recipe(model, str(tmp / "hf")), mca=False))
        return cache[family]

    return run


def _assert_merge_equals_export(checkpoint: str, export: str, merged: str) -> None:
    """`llamafactory-mca merge` of `checkpoint` loads in transformers without missing or unexpected keys and equals
    the run's own Hugging Face export bit for bit."""
    from lf_runs import merge
    from transformers import AutoModelForCausalLM

    merge(checkpoint, merged, "--fp32")
    loaded, info = AutoModelForCausalLM.from_pretrained(merged, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    exported = AutoModelForCausalLM.from_pretrained(export).state_dict()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, exported[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("family", [pytest.param("mistral", marks=pytest.mark.extended), "deepseek_v3"])
def test_training_parity_and_merge(family_runs, family, tmp_path):
    """TP=2 (+SP) and (DeepSeek-V3) EP=2 against the HF run; the last parallel run's checkpoint merges into a model
    transformers loads without missing keys, equal to that run's own export. No router aux loss on either side
    (LLaMA-Factory adds none unless moe_aux_loss_coef is set). The 1-process run: test_training_parity_one_process."""
    from lf_runs import STEPS, assert_parity, make_recipe, train

    model, hf = family_runs(family)
    save = dict(save_strategy="steps", save_steps=STEPS)
    tp2 = make_recipe(model, str(tmp_path / "tp2"), tensor_model_parallel_size=2, sequence_parallel=True,
                      **(dict(save_hf_model=False) if family == "deepseek_v3" else save))
    assert_parity(hf, train(tmp_path, f"mca_{family}_tp2", tp2, nproc=2))
    last = tp2
    if family == "deepseek_v3":
        last = make_recipe(model, str(tmp_path / "ep2"), per_device_train_batch_size=1, expert_model_parallel_size=2,
                           **save)
        assert_parity(hf, train(tmp_path, f"mca_{family}_ep2", last, nproc=2))
    _assert_merge_equals_export(os.path.join(last["output_dir"], f"checkpoint-{STEPS}"), last["output_dir"],
                                str(tmp_path / "merged"))


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.parametrize("family", list(FAMILY_KINDS))
def test_training_parity_one_process(family_runs, family, tmp_path):
    """1 process against the HF run (the same bridge and training path as the parallel runs above); its
    checkpoint merges like theirs."""
    from lf_runs import STEPS, assert_parity, make_recipe, train

    model, hf = family_runs(family)
    ours = train(tmp_path, f"mca_{family}", make_recipe(model, str(tmp_path / "out"), save_strategy="steps",
                                                       save_steps=STEPS))
    assert_parity(hf, ours)
    _assert_merge_equals_export(os.path.join(ours, f"checkpoint-{STEPS}"), ours, str(tmp_path / "merged"))
