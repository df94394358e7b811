"""Scenario model shapes (real architectures, realistic sizes, random weights) and FLOP counts.

s1   dense, Qwen3 architecture with Qwen3-1.7B's widths and 16 layers (~1.1B parameters, tied embeddings,
     vocab 151936), 1 GPU
s2   dense, Llama-3-8B (32 layers, vocab 128256), 4 GPUs
s3   MoE, Qwen3-30B-A3B widths (128 experts, top-8, vocab 151936) with 4 layers, 1 GPU
s3x4 the same MoE with 8 layers, 4 GPUs
r_moe examples/megatron/qwen3_moe_full.yaml's Qwen3-30B-A3B with 24 of its 48 layers (half the GPUs: each
     pipeline stage keeps the 12 layers it has in the 8-GPU recipe)
r_vl examples/megatron/qwen2_vl_full.yaml's Qwen2-VL-7B at full size
s3x2 the MoE with 8 layers, 2 GPUs
s2x2 Llama-3-8B on 2 GPUs; s4x2 the same model at 32k tokens per sample, 2 GPUs
r_moe2 qwen3_moe_full.yaml's model with 12 of its 48 layers on 2 GPUs (PP=2 at EP=1: a stage of 6 layers holds
     all 128 experts, the expert weights of the 12-layer stage at EP=2 of the 8-GPU recipe)
r_vl2 r_vl's model on 2 GPUs
q3next hybrid Qwen3-Next-80B-A3B widths (gated delta-net and gated attention layers, 3 : 1; experts of 512 wide,
     top-10, a gated shared expert) with 4 of its 48 layers and 128 of its 512 experts (the HF side's fp32 master
     weights and Adam state of 512 experts would not fit one GPU), 1 GPU (issue 15)
q_dense / q_moe  small models of the FP8 quality runs (benchmarks/fp8_quality.py, issue 18): Qwen3 at Qwen3-0.6B's
     widths with 20 of its 28 layers (~0.35B), and a Qwen3-MoE of hidden 1024, 8 layers, 32 experts top-4 (~0.5B,
     ~0.15B active); vocab 32768 (the generated tokenizer's 32004 words: the output layer stays bf16 under FP8)
dsv3 DeepSeek-V3 architecture (multi-latent attention, a dense first layer, then MoE layers with shared experts
     and sigmoid routing) at Moonlight-16B-A3B's widths (hidden 2048, 16 heads, kv_lora_rank 512, no q LoRA,
     64 routed experts top-6 + 2 shared, vocab 163840) with 6 of its 27 layers, 1 GPU (issue 14)
"""

from __future__ import annotations

# Qwen3-30B-A3B's widths (48 layers in the real model); the MoE scenarios differ only in the layer count
QWEN3_30B_A3B = dict(
    family="qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
    head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
    vocab_size=151936, tie_word_embeddings=False, rope_theta=1000000.0,
)

SCENARIO_SHAPES = {
    "s1": dict(
        family="qwen3", hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=8,
        head_dim=128, intermediate_size=6144, vocab_size=151936, tie_word_embeddings=True, rope_theta=1000000.0,
    ),
    "s2": dict(
        family="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
    ),
    "s3": dict(QWEN3_30B_A3B, num_hidden_layers=4),
    "s3x4": dict(QWEN3_30B_A3B, num_hidden_layers=8),
    "s3x2": dict(QWEN3_30B_A3B, num_hidden_layers=8),
    "r_moe": dict(QWEN3_30B_A3B, num_hidden_layers=24),
    "r_moe2": dict(QWEN3_30B_A3B, num_hidden_layers=12),
    "r_vl": dict(
        family="qwen2_vl", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False, rope_theta=1000000.0,
        vision=dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                    temporal_patch_size=2, in_channels=3),
    ),
}

# moonshotai/Moonlight-16B-A3B's config.json (a DeepseekV3ForCausalLM: 27 layers in the real model)
MOONLIGHT_16B_A3B = dict(
    family="deepseek_v3", hidden_size=2048, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
    q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    intermediate_size=11264, moe_intermediate_size=1408, n_routed_experts=64, n_shared_experts=2,
    num_experts_per_tok=6, n_group=1, topk_group=1, routed_scaling_factor=2.446, first_k_dense_replace=1,
    norm_topk_prob=True, vocab_size=163840, tie_word_embeddings=False, rope_theta=50000.0,
)
SCENARIO_SHAPES["dsv3"] = dict(MOONLIGHT_16B_A3B, num_hidden_layers=6)

# Qwen/Qwen3-Next-80B-A3B-Instruct's config.json (48 layers, every 4th full attention)
QWEN3_NEXT_80B_A3B = dict(
    family="qwen3_next", hidden_size=2048, num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2,
    head_dim=256, intermediate_size=5120, moe_intermediate_size=512, shared_expert_intermediate_size=512,
    num_experts=512, num_experts_per_tok=10, linear_num_key_heads=16, linear_num_value_heads=32,
    linear_key_head_dim=128, linear_value_head_dim=128, linear_conv_kernel_dim=4, vocab_size=151936,
    tie_word_embeddings=False, rope_theta=10000000.0,
)
SCENARIO_SHAPES["q3next"] = dict(QWEN3_NEXT_80B_A3B, num_hidden_layers=4, num_experts=128)
TINY_LINEAR_ATTENTION = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                             linear_value_head_dim=16, shared_expert_intermediate_size=32)

# issue 18's quality runs: 300 steps of both sides of both models take minutes on one GPU
SCENARIO_SHAPES["q_dense"] = dict(
    family="qwen3", hidden_size=1024, num_hidden_layers=20, num_attention_heads=16, num_key_value_heads=8,
    head_dim=128, intermediate_size=3072, vocab_size=32768, tie_word_embeddings=True, rope_theta=1000000.0,
)
SCENARIO_SHAPES["q_moe"] = dict(QWEN3_30B_A3B, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                                moe_intermediate_size=512, num_experts=32, num_experts_per_tok=4, vocab_size=32768)

SCENARIO_SHAPES.update(s2x2=SCENARIO_SHAPES["s2"], s4x2=SCENARIO_SHAPES["s2"], r_vl2=SCENARIO_SHAPES["r_vl"])

TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=128,
            moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, vocab_size=512)
# MLA keeps one key/value head per query head (transformers' DeepSeek-V3 attention repeats none)
TINY_MLA = dict(TINY, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=16, n_routed_experts=4, n_shared_experts=1)

# bf16 dense tensor-core peak used for MFU (vendor datasheet, SXM, without sparsity): H100 and H200 alike.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}


def peak_tflops(card_name: str) -> float:
    for k, v in PEAK_BF16_TFLOPS.items():
        if k in (card_name or ""):
            return v
    return 989.0


def hf_config_for(scenario: str, tiny: bool = False, layers: int | None = None, seq: int = 4096,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None, vision_token_ids: dict | None = None):
    """The scenario's Hugging Face config; for the VL shape, `vision_token_ids` gives image_token_id,
    video_token_id, vision_start_token_id and vision_end_token_id (from the generated tokenizer)."""
    shape = dict(SCENARIO_SHAPES[scenario])
    family = shape.pop("family")
    vision = shape.pop("vision", None)
    if tiny:
        keep = {k: v for k, v in (TINY_MLA if family == "deepseek_v3" else TINY).items() if k in shape}
        shape.update(keep)
        shape["num_hidden_layers"] = 2
    if layers:
        shape["num_hidden_layers"] = layers
    common = dict(max_position_embeddings=max(seq, 4096), rms_norm_eps=1e-6, initializer_range=0.02,
                  bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if family == "qwen2_vl":
        from transformers import Qwen2VLConfig

        if tiny:
            vision = dict(vision, depth=2, embed_dim=32, num_heads=2)
        text = dict(shape, **common, max_window_layers=shape["num_hidden_layers"], use_sliding_window=False,
                    rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24] if not tiny else [2, 3, 3],
                                     "rope_theta": shape.pop("rope_theta")})
        text.pop("rope_theta", None)
        return Qwen2VLConfig(text_config=text, vision_config=dict(vision, hidden_size=shape["hidden_size"]),
                             tie_word_embeddings=shape["tie_word_embeddings"], eos_token_id=eos_token_id,
                             pad_token_id=pad_token_id, **(vision_token_ids or {}))
    if family == "deepseek_v3":
        from transformers import DeepseekV3Config

        shape["rope_parameters"] = {"rope_type": "default", "rope_theta": shape.pop("rope_theta")}
        return DeepseekV3Config(**shape, **common, rope_interleave=True, attention_bias=False)
    if family == "qwen3_next":
        return qwen3_next_config(shape, common, tiny)
    if family == "qwen3":
        from transformers import Qwen3Config as C
    elif family == "llama":
        from transformers import LlamaConfig as C

        common["attention_bias"] = False
        common["mlp_bias"] = False
    else:
        from transformers import Qwen3MoeConfig as C

        common.update(decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, router_aux_loss_coef=0.001,
                      output_router_logits=False)
    return C(**shape, **common)


def qwen3_next_config(shape: dict, common: dict, tiny: bool):
    """The Qwen3NextConfig of a scenario shape: every 4th layer full attention (the last of a tiny model's 2), rotary
    on a quarter of each head, every layer MoE."""
    from transformers import Qwen3NextConfig

    if tiny:
        shape.update(TINY_LINEAR_ATTENTION)
    layers = shape["num_hidden_layers"]
    types = ["full_attention" if (i + 1) % 4 == 0 or (tiny and i == layers - 1) else "linear_attention"
             for i in range(layers)]
    rope = {"rope_type": "default", "rope_theta": shape.pop("rope_theta"), "partial_rotary_factor": 0.25}
    return Qwen3NextConfig(**shape, **common, layer_types=types, rope_parameters=rope, partial_rotary_factor=0.25,
                           decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True, router_aux_loss_coef=0.001,
                           output_router_logits=False)


def layer_kinds(cfg) -> list[str]:
    """"full_attention" or "linear_attention" per decoder layer (all full attention but in hybrid models)."""
    return list(_g(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)


def gated_delta_net_params(cfg) -> int:
    """Matrix weights of one gated delta-net layer: in_proj_qkvz, in_proj_ba, out_proj."""
    H = cfg.hidden_size
    keys, values = cfg.linear_num_key_heads * cfg.linear_key_head_dim, cfg.linear_num_value_heads * cfg.linear_value_head_dim
    return H * (2 * keys + 2 * values) + H * 2 * cfg.linear_num_value_heads + values * H


def token_mixer_params(cfg) -> int:
    """Matrix weights of all decoder layers' token mixers: attention (gated attention's q_proj holds q and its gate)
    or, in hybrid models, the gated delta-net of a linear-attention layer."""
    kinds = layer_kinds(cfg)
    full = kinds.count("full_attention")
    linear = len(kinds) - full
    gate = cfg.hidden_size * _g(cfg, "head_dim", 0) * cfg.num_attention_heads if cfg.model_type == "qwen3_next" else 0
    return full * (attention_params(cfg) + gate) + (linear * gated_delta_net_params(cfg) if linear else 0)


def _g(cfg, name, default=None):
    v = getattr(cfg, name, None)
    return default if v is None else v


def attention_params(cfg) -> int:
    """Matrix weights of one attention block: q/k/v/o projections, or multi-latent attention's down / up
    projections (DeepSeek-V3: q_proj or q_a_proj + q_b_proj, kv_a_proj_with_mqa, kv_b_proj, o_proj)."""
    H, nh = cfg.hidden_size, cfg.num_attention_heads
    if _g(cfg, "kv_lora_rank"):
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        q = H * nh * qk if not _g(cfg, "q_lora_rank") else H * cfg.q_lora_rank + cfg.q_lora_rank * nh * qk
        kv = H * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * nh * (
            cfg.qk_nope_head_dim + cfg.v_head_dim)
        return q + kv + nh * cfg.v_head_dim * H
    d = _g(cfg, "head_dim", H // nh)
    return H * d * nh * 2 + H * d * cfg.num_key_value_heads * 2


def attention_score_dims(cfg) -> int:
    """Per head, the width of QK^T plus that of PV, summed over the heads (2 x head_dim x heads for MHA/GQA)."""
    if _g(cfg, "kv_lora_rank"):
        return cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    return 2 * _g(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads) * cfg.num_attention_heads


def mlp_params(cfg, active: bool) -> int:
    """Matrix weights of all decoder layers' MLPs: the routed experts (only the top-k a token reaches when
    `active`), shared experts and router of the MoE layers, and the dense layers (DeepSeek-V3's
    `first_k_dense_replace`)."""
    H, L = cfg.hidden_size, cfg.num_hidden_layers
    experts = _g(cfg, "num_experts") or _g(cfg, "n_routed_experts")
    if not experts:
        return L * 3 * H * cfg.intermediate_size
    dense_layers = min(_g(cfg, "first_k_dense_replace", 0), L)
    routed = cfg.num_experts_per_tok if active else experts
    moe = (routed + _g(cfg, "n_shared_experts", 0)) * 3 * H * cfg.moe_intermediate_size + H * experts
    moe += 3 * H * _g(cfg, "shared_expert_intermediate_size", 0)  # Qwen2-MoE / Qwen3-Next's one shared expert
    return dense_layers * 3 * H * cfg.intermediate_size + (L - dense_layers) * moe


def matmul_params_per_token(cfg) -> int:
    """Weights touched by one token in matrix products (active experts only; LM head included; the embedding
    lookup excluded)."""
    return token_mixer_params(cfg) + mlp_params(cfg, active=True) + cfg.hidden_size * cfg.vocab_size


def flops_per_token(cfg, seq: int) -> float:
    """Model FLOPs per trained token for fwd+bwd: 6 * active matmul weights + causal attention
    (QK^T and PV: 2*s*(qk + v width) per token and layer forward, halved by the causal mask, x3 for fwd+bwd) in the
    full-attention layers (a hybrid model's delta-rule recurrence is not counted)."""
    full = layer_kinds(cfg).count("full_attention")
    return 6.0 * matmul_params_per_token(cfg) + 3.0 * full * seq * attention_score_dims(cfg)


def total_params(cfg) -> int:
    emb = cfg.hidden_size * cfg.vocab_size * (1 if cfg.tie_word_embeddings else 2)
    return token_mixer_params(cfg) + mlp_params(cfg, active=False) + emb
