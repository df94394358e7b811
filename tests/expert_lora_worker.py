"""Expert LoRA on the megatron model against PEFT on the HF model, under `torchrun --nproc_per_node 2` (gloo).

    torchrun --nproc_per_node 2 tests/expert_lora_worker.py --model DIR --adapter DIR --out OUT --layouts dp2,ep2,tp2etp

Per layout, lora_worker's checks on a Qwen3-MoE model with a PEFT adapter on attention (`target_modules`) and the
experts (`target_parameters`): logits against `PeftModel.from_pretrained(hf, adapter)`, the PEFT export
(bit-identical tensors, same logits in PEFT), the merged model; then `expert_checks`. `make_model` /
`make_adapter` build the inputs (no tests here).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_helpers import LAYOUTS  # noqa: E402
from lora_worker import main as lora_worker_main  # noqa: E402

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


def make_adapter(model_dir: str, path: str, seed: int) -> str:
    """A PEFT adapter (r=4, alpha=8) on attention and the fused expert parameters, B random (`make_lora_adapter`)."""
    from lf_runs import make_lora_adapter

    return make_lora_adapter(model_dir, path, seed, target_modules=ATTENTION, target_parameters=EXPERTS)


def peft_logits(model_dir: str, adapter_dir: str, input_ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return PeftModel.from_pretrained(base, adapter_dir).eval()(input_ids=input_ids).logits


def expert_checks(model_dir: str, layout: str, res: dict, ctx) -> None:
    """After lora_worker's checks: the expert adapters' layout; the EP=2 layout writes a checkpoint that the
    others load (bit-exactly), and `llamafactory-mca merge` turns it into the PEFT adapter / merged model (dp2)."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from llamafactory_mca import checkpoint
    from llamafactory_mca.models import lora

    state = ctx.state
    res["target_parameters"] = state.target_parameters
    res["ep_etp"] = [state.experts[0].adapter.ep_size, state.experts[0].adapter.etp_size]
    if layout == "ep2":
        checkpoint.save_checkpoint(os.path.join(ctx.work, "ckpt"), 1, ctx.models, hf_config=ctx.hf_config,
                                   extra_info=lora.checkpoint_marker(state))
    else:
        res.update(load_ep2_checkpoint(ctx.bridge, ctx.hf_config, model_dir, layout, ctx.work))
    if dist.get_rank() != 0:
        return
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():  # the adapter PEFT loaded is not a no-op: the base model alone is far away
        res["adapter_effect"] = float((base(input_ids=ctx.input_ids).logits - ctx.ref).abs().max())
    if layout == "dp2":  # `llamafactory-mca merge` of the EP=2 checkpoint: the PEFT adapter, the merged model
        from safetensors.torch import load_file

        from llamafactory_mca.export.lora_merge import merge_lora_checkpoint

        ckpt = os.path.join(ctx.work, "ckpt", "checkpoint-1")
        orig = load_file(os.path.join(ctx.work, "adapter-ep2", "adapter_model.safetensors"))
        cli_adapter = merge_lora_checkpoint(ckpt, os.path.join(ctx.work, "cli-adapter"), save_tokenizer=False)
        again = load_file(os.path.join(cli_adapter, "adapter_model.safetensors"))
        res["cli_adapter_equal"] = sorted(again) == sorted(orig) and all(torch.equal(again[k], orig[k]) for k in orig)
        cli_logits = peft_logits(model_dir, cli_adapter, ctx.input_ids)
        res["cli_adapter_logits_diff"] = float((cli_logits - ctx.ref).abs().max())
        cli_merged = merge_lora_checkpoint(ckpt, os.path.join(ctx.work, "cli-merged"), merge_lora=True,
                                           save_tokenizer=False)
        m = AutoModelForCausalLM.from_pretrained(cli_merged, dtype=torch.float32).eval()
        with torch.no_grad():
            res["cli_merged_logits_diff"] = float((m(input_ids=ctx.input_ids).logits - ctx.ref).abs().max())


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
    def extra(model_dir: str, layout: str):
        return lambda res, ctx: expert_checks(model_dir, layout, res, ctx)

    return lora_worker_main(argv, LAYOUTS, extra)


if __name__ == "__main__":
    sys.exit(main())
