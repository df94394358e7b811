"""Tiny random Hugging Face models built locally (no downloads), one per supported family and feature."""

from __future__ import annotations

import os

import torch

VOCAB = 1001  # odd on purpose: vocab padding under TP


def tiny_config(kind: str):
    """The transformers config of the tiny model of `kind` (odd shapes; see make_tiny_model)."""
    from transformers import LlamaConfig, MixtralConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    if kind in DSV3_MISTRAL_KINDS:
        return dsv3_mistral_config(kind)
    common = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-6)
    if kind == "llama":
        return LlamaConfig(intermediate_size=128, tie_word_embeddings=False, **common)
    if kind == "llama_tied":
        return LlamaConfig(intermediate_size=128, tie_word_embeddings=True, **common)
    if kind == "llama_rope3":
        return LlamaConfig(intermediate_size=128, tie_word_embeddings=False,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                           **common)
    if kind == "qwen2":
        return Qwen2Config(intermediate_size=128, tie_word_embeddings=True, **common)
    if kind == "qwen3":
        return Qwen3Config(intermediate_size=128, head_dim=32, tie_word_embeddings=False, **common)
    if kind == "qwen3_moe":
        return Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                              norm_topk_prob=True, head_dim=16, tie_word_embeddings=False, **common)
    if kind == "mixtral":
        return MixtralConfig(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                             tie_word_embeddings=False, **common)
    family = _family_config(kind, common)
    if family is not None:
        return family
    raise ValueError(kind)


def _family_config(kind: str, common: dict):
    """Configs of the issue-14 MoE families, odd shapes on purpose: a dense first layer, shared experts (qwen2_moe's
    gated), 6 or 8 experts, grouped sigmoid routing with a score-correction bias and scaled weights (glm4_moe),
    partial rotary and q/k norm."""
    from transformers import Glm4MoeConfig, Qwen2MoeConfig, Qwen3NextConfig

    if kind == "qwen2_moe":
        return Qwen2MoeConfig(intermediate_size=80, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                              num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[0],
                              decoder_sparse_step=1, tie_word_embeddings=False, **common)
    if kind == "glm4_moe":
        return Glm4MoeConfig(intermediate_size=80, moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=2,
                             num_experts_per_tok=4, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                             first_k_dense_replace=1, norm_topk_prob=True, use_qk_norm=True, attention_bias=True,
                             head_dim=16, partial_rotary_factor=0.5, tie_word_embeddings=False, **common)
    if kind == "qwen3_next":  # linear / full attention on both halves (PP=2), 2 key heads of 2 value heads each
        return Qwen3NextConfig(intermediate_size=80, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                               num_experts=6, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0],
                               head_dim=16, partial_rotary_factor=0.5, linear_num_key_heads=2,
                               linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
                               layer_types=["linear_attention", "full_attention"] * 2, tie_word_embeddings=False,
                               **common)
    return None


# Mistral and DeepSeek-V3 (issue 14), odd shapes on purpose: head_dim 24 on a hidden size of 64, a sliding window
# shorter than the test sequences, MLA with q/kv LoRA ranks, nope/rope/value head sizes all different, YaRN rope
# whose attention factor is not 1; `deepseek_v3` with a dense first layer, then MoE layers (8 experts in 2 groups, a
# shared expert, sigmoid routing with the score-correction bias, scaled weights).
DSV3_MISTRAL_KINDS = ("mistral", "deepseek_v3_dense", "deepseek_v3_noqlora", "deepseek_v3")


def dsv3_mistral_config(kind: str):
    """The tiny config of a Mistral / DeepSeek-V3 test model `kind` (one of `DSV3_MISTRAL_KINDS`)."""
    from transformers import DeepseekV3Config, MistralConfig

    common = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, vocab_size=VOCAB,
                  max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  initializer_range=0.15)  # weights large enough that attention visibly moves the logits
    if kind == "mistral":
        return MistralConfig(intermediate_size=72, num_key_value_heads=2, head_dim=24, sliding_window=5, **common)
    mla = dict(num_key_value_heads=4, kv_lora_rank=20, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10,
               intermediate_size=96, moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=1,
               num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5)
    if kind == "deepseek_v3_dense":  # every layer dense, YaRN rope (attention factor 1.0 / 0.8 mscales)
        return DeepseekV3Config(q_lora_rank=24, first_k_dense_replace=4, rope_interleave=True,
                                rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                 "original_max_position_embeddings": 64, "beta_fast": 32.0,
                                                 "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8},
                                **mla, **common)
    if kind == "deepseek_v3":
        return DeepseekV3Config(q_lora_rank=24, first_k_dense_replace=1, rope_interleave=True,
                                rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                 "original_max_position_embeddings": 64, "beta_fast": 32.0,
                                                 "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
                                **mla, **common)
    if kind == "deepseek_v3_noqlora":  # no query LoRA (q_proj), default rope
        return DeepseekV3Config(q_lora_rank=None, first_k_dense_replace=4, rope_interleave=True,
                                rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **mla, **common)
    raise ValueError(kind)


KINDS = ("llama", "llama_tied", "llama_rope3", "qwen2", "qwen3", "qwen3_moe", "mixtral")
FAMILY_KINDS = ("qwen2_moe", "glm4_moe")  # tests/test_family_qwen2_moe_glm4.py


def make_tiny_model(kind: str, path: str, seed: int = 0) -> str:
    """Save a random tiny model of `kind` to `path` (fp32 safetensors); returns path."""
    from transformers import AutoModelForCausalLM

    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(seed)
    config = tiny_config(kind)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms/biases so that mapping mistakes show up
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # the router's expert-choice bias (a buffer)
                b.copy_(torch.randn_like(b) * 0.1)
    model.save_pretrained(path)
    return path


def make_tiny_family_model(kind: str, path: str, seed: int = 0) -> str:
    """A `FAMILY_KINDS` model of `kind` with the local tokenizer of scripts/make_tiny_model.py (512-token vocab),
    for end-to-end training with LLaMA-Factory's `qwen` template; saved to `path` (fp32), returns path."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "make_tiny_model.py")
    spec = importlib.util.spec_from_file_location("make_tiny_model", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tokenizer = module.build_tokenizer(512 - 32)
    config = tiny_config(kind)
    config.vocab_size, config.max_position_embeddings = 512, 1024
    config.eos_token_id, config.pad_token_id, config.bos_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id, None
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def assert_table_covers_checkpoint(bridge, path: str) -> None:
    """Every tensor of the HF checkpoint `path/model.safetensors` is named by an entry of `bridge.table`."""
    import re

    from safetensors import safe_open

    patterns = []
    for hf, _kind in bridge.table.values():
        for name in (hf if isinstance(hf, tuple) else (hf,)):
            patterns.append(re.compile(re.escape(name).replace(r"\{L\}", r"\d+").replace(r"\{E\}", r"\d+") + "$"))
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        for key in f.keys():
            assert any(p.match(key) for p in patterns), (type(bridge).__name__, key)
