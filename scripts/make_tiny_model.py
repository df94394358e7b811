"""Build a tiny, real-architecture model with random weights and a locally trained tokenizer (no downloads).

    python scripts/make_tiny_model.py                        # -> saves/tiny-qwen3 (Qwen3, 4 layers)
    python scripts/make_tiny_model.py saves/tiny-qwen3-moe --moe

The tokenizer is a byte-level BPE trained on the shipped test data (tests/data), with the ChatML special
tokens that LLaMA-Factory's `qwen` / `qwen3` templates use and a ChatML chat template, so `template: qwen`
(and `default`) work offline. Everything is seeded: the same command always writes the same weights.
"""

from __future__ import annotations

import argparse
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.path.join(ROOT, "tests", "data")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    texts: list[str] = []
    for name in sorted(os.listdir(DATA_DIR)):
        if not name.endswith(".json") or name == "dataset_info.json":
            continue
        with open(os.path.join(DATA_DIR, name), encoding="utf-8") as f:
            for row in json.load(f):
                texts.extend(str(v) for v in row.values() if isinstance(v, str))
    texts += ["system user assistant You are a helpful assistant.", "Human: Assistant:"]
    return texts


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=4096,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_config(moe: bool, vocab_size: int, layers: int, tokenizer):
    from transformers import Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
    )
    if moe:
        return Qwen3MoeConfig(
            intermediate_size=128,
            moe_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            output_router_logits=False,
            router_aux_loss_coef=0.001,
            **common,
        )
    return Qwen3Config(intermediate_size=128, **common)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default=None, help="output directory (default saves/tiny-qwen3[-moe])")
    parser.add_argument("--moe", action="store_true", help="Qwen3-MoE (4 experts, top-2) instead of dense Qwen3")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab_size", type=int, default=512, help="model vocab (>= tokenizer size)")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    out = args.out or os.path.join(ROOT, "saves", "tiny-qwen3-moe" if args.moe else "tiny-qwen3")

    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(args.vocab_size - 32)  # leave room: the model vocab is a round number
    assert len(tokenizer) <= args.vocab_size, (len(tokenizer), args.vocab_size)
    config = build_config(args.moe, args.vocab_size, args.layers, tokenizer)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(f"wrote {config.model_type} ({sum(p.numel() for p in model.parameters())} params, "
          f"{len(tokenizer)} tokens) to {out}")
    return out


if __name__ == "__main__":
    main()
