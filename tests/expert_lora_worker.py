"""Expert LoRA on the megatron model against PEFT on the HF model, under `torchrun --nproc_per_node 2` (gloo).

    torchrun --nproc_per_node 2 tests/expert_lora_worker.py --model DIR --adapter DIR --out OUT --layouts dp2,ep2,tp2etp

Per layout: build the megatron Qwen3-MoE model, load the HF weights, resume the PEFT adapter (attention
`target_modules` + expert `target_parameters`), compare logits with `PeftModel.from_pretrained(hf, adapter)`;
export the adapter (PEFT format: bit-identical tensors, same logits in PEFT); merge it into the base weights and
export a HF model whose logits match as well. `make_model` / `make_adapter` build the inputs (no tests here).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_helpers import LAYOUTS, pipeline_forward  # noqa: E402

from tests.workers import run_cases  # noqa: E402

LAYOUTS = {**LAYOUTS, "tp2etp": dict(tensor_model_parallel_size=2, sequence_parallel=True,
                                     expert_tensor_parallel_size=2)}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def make_model(path: str) -> str:
    """A tiny Qwen3-MoE whose expert sizes are all different (H 64, 2F 48), so that a transposed factor shows."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(0)
    config = Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=24, num_experts=4,
                            num_experts_per_tok=2, norm_topk_prob=True, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, vocab_size=1001, max_position_embeddings=256,
                            rms_norm_eps=1e-6, tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return path


def make_adapter(model_dir: str, path: str, seed: int, target_parameters=EXPERTS, target_modules=ATTENTION) -> str:
    """A PEFT adapter (r=4, alpha=8) on attention and the fused expert parameters with random A *and* B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(target_modules),
                                            target_parameters=list(target_parameters), task_type="CAUSAL_LM"))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.05)
            elif "lora_A" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return path


def peft_logits(model_dir: str, adapter_dir: str, input_ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return PeftModel.from_pretrained(base, adapter_dir).eval()(input_ids=input_ids).logits


def check(model_dir: str, adapter_dir: str, layout: str, work: str) -> dict:
    from types import SimpleNamespace

    import torch.distributed as dist
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from llamafactory_mca import checkpoint
    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models import lora
    from llamafactory_mca.models.registry import bridge_for

    res: dict = {"layout": layout}
    hf_config = AutoConfig.from_pretrained(model_dir)
    bridge = bridge_for(hf_config.model_type)
    models = bridge.build_model(hf_config, MegatronArguments(**LAYOUTS[layout]), torch.float32, init_weights=False)
    bridge.load_hf_weights(models, model_dir)
    state = lora.apply_lora(bridge, models, SimpleNamespace(), SimpleNamespace(adapter_name_or_path=[adapter_dir],
                                                                             model_name_or_path=model_dir))
    res["target_parameters"] = state.target_parameters
    res["expert_adapters"] = len(state.experts)
    res["ep_etp"] = [state.experts[0].adapter.ep_size, state.experts[0].adapter.etp_size]
    res["non_adapter_trainable"] = [n for m in models for n, p in m.named_parameters()
                                    if p.requires_grad and ".lora_" not in n]
    for m in models:
        m.eval()
    torch.manual_seed(123)
    input_ids = torch.randint(0, hf_config.vocab_size, (2, 16))
    with torch.no_grad():
        ours = pipeline_forward(models, input_ids)
    out = os.path.join(work, f"adapter-{layout}")
    lora.save_peft_adapter(models, state, out, base_model_name_or_path=model_dir)
    if layout == "ep2":  # a checkpoint of the expert adapters the other layouts load
        checkpoint.save_checkpoint(os.path.join(work, "ckpt"), 1, models, hf_config=hf_config,
                                   extra_info=lora.checkpoint_marker(state))
    else:
        res.update(load_ep2_checkpoint(bridge, hf_config, model_dir, layout, work))
    merged = os.path.join(work, f"merged-{layout}")
    lora.save_merged_hf(bridge, models, state, merged)
    with torch.no_grad():
        ours_merged = pipeline_forward(models, input_ids)
    ref = peft_logits(model_dir, adapter_dir, input_ids)
    if ours is not None:
        vocab = hf_config.vocab_size
        res["logits_vs_peft"] = float((ours[..., :vocab] - ref).abs().max())
        res["merged_logits_vs_peft"] = float((ours_merged[..., :vocab] - ref).abs().max())
    if dist.get_rank() == 0:
        orig, saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors")), load_file(
            os.path.join(out, "adapter_model.safetensors"))
        res["export_keys_equal"] = sorted(orig) == sorted(saved)
        res["export_not_equal"] = sorted(k for k in orig if k in saved and not torch.equal(orig[k], saved[k]))
        res["exported_adapter_logits_diff"] = float((peft_logits(model_dir, out, input_ids) - ref).abs().max())
        m = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
        with torch.no_grad():
            res["merged_hf_logits_diff"] = float((m(input_ids=input_ids).logits - ref).abs().max())
        if layout == "dp2":  # `llamafactory-mca merge` of the EP=2 checkpoint: the PEFT adapter, the merged model
            from llamafactory_mca.export.lora_merge import merge_lora_checkpoint

            ckpt = os.path.join(work, "ckpt", "checkpoint-1")
            cli_adapter = merge_lora_checkpoint(ckpt, os.path.join(work, "cli-adapter"), save_tokenizer=False)
            again = load_file(os.path.join(cli_adapter, "adapter_model.safetensors"))
            res["cli_adapter_equal"] = sorted(again) == sorted(orig) and all(torch.equal(again[k], orig[k])
                                                                             for k in orig)
            res["cli_adapter_logits_diff"] = float((peft_logits(model_dir, cli_adapter, input_ids) - ref).abs().max())
            cli_merged = merge_lora_checkpoint(ckpt, os.path.join(work, "cli-merged"), merge_lora=True,
                                               save_tokenizer=False)
            m = AutoModelForCausalLM.from_pretrained(cli_merged, dtype=torch.float32).eval()
            with torch.no_grad():
                res["cli_merged_logits_diff"] = float((m(input_ids=input_ids).logits - ref).abs().max())
        # the adapter PEFT loaded is not a no-op: the base model alone is far away
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            res["adapter_effect"] = float((base(input_ids=input_ids).logits - ref).abs().max())
    return res


def load_ep2_checkpoint(bridge, hf_config, model_dir: str, layout: str, work: str) -> dict:
    """Fresh adapters (PEFT's initialisation) in this layout, then the EP=2 layout's checkpoint: every expert and
    attention factor equals, bit for bit, the adapter the EP=2 model exported."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from safetensors.torch import load_file

    from llamafactory_mca import checkpoint
    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models import lora

    models = bridge.build_model(hf_config, MegatronArguments(**LAYOUTS[layout]), torch.float32, init_weights=False)
    bridge.load_hf_weights(models, model_dir)
    ft = SimpleNamespace(lora_rank=4, lora_alpha=8, lora_dropout=0.0, use_rslora=False, lora_target=["all"])
    state = lora.apply_lora(bridge, models, ft, SimpleNamespace(model_name_or_path=model_dir,
                                                                adapter_name_or_path=None), seed=3)
    saved = load_file(os.path.join(work, "adapter-ep2", "adapter_model.safetensors"))
    before = lora.adapter_state_dict(state)
    checkpoint.load_checkpoint(os.path.join(work, "ckpt", "checkpoint-1"), models)
    after = lora.adapter_state_dict(state)
    res: dict = {}
    if dist.get_rank() == 0:
        res["ckpt_differs_before"] = sorted(before) == sorted(saved) and any(
            not torch.equal(before[k], saved[k]) for k in saved)
        res["ckpt_loaded_equal"] = sorted(after) == sorted(saved) and all(torch.equal(after[k], saved[k])
                                                                          for k in saved)
    return res  # (rank 0 holds the gathered adapter)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--layouts", required=True)
    a = p.parse_args(argv)

    cases = [(layout, None) for layout in a.layouts.split(",")]
    return run_cases(a.out, cases, lambda _case, layout, work: check(a.model, a.adapter, layout, work), LAYOUTS,
                     lambda _case, layout: {"layout": layout})


if __name__ == "__main__":
    sys.exit(main())
