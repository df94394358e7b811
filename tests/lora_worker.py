"""LoRA on the megatron model against PEFT on the HF model, under `torchrun --nproc_per_node 2` (gloo).

    torchrun --nproc_per_node 2 tests/lora_worker.py --model DIR --adapter DIR --out OUT.json --layouts tp2sp,pp2

Per layout: build the megatron model, load the HF weights, resume the PEFT adapter, compare logits with
`PeftModel.from_pretrained(hf, adapter)`; export the adapter (PEFT format) and check PEFT loads it with the same
logits and bit-identical tensors; check that only adapter tensors require grad; merge into the base weights and
export a HF model whose logits match as well.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dist_helpers import LAYOUTS, pipeline_forward  # noqa: E402

from tests.workers import run_cases  # noqa: E402

LAYOUTS = {**LAYOUTS, "tp2sp": dict(tensor_model_parallel_size=2, sequence_parallel=True)}


def check(model_dir: str, adapter_dir: str, layout: str, work: str, layouts: dict = LAYOUTS,
          extra=None) -> dict:
    """The checks of the module docstring for one layout; `extra(res, ctx)` adds more (ctx: bridge, hf_config,
    models, state, input_ids, ref (PEFT's logits, rank 0), work) after them."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models import lora
    from llamafactory_mca.models.registry import bridge_for

    res: dict = {"layout": layout}
    hf_config = AutoConfig.from_pretrained(model_dir)
    bridge = bridge_for(hf_config.model_type)
    models = bridge.build_model(hf_config, MegatronArguments(**layouts[layout]), torch.float32, init_weights=False)
    bridge.load_hf_weights(models, model_dir)
    state = lora.apply_lora(bridge, models, SimpleNamespace(), SimpleNamespace(adapter_name_or_path=[adapter_dir],
                                                                             model_name_or_path=model_dir))
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
    merged = os.path.join(work, f"merged-{layout}")
    lora.save_merged_hf(bridge, models, state, merged)
    with torch.no_grad():
        ours_merged = pipeline_forward(models, input_ids)
    if ours is not None:
        vocab = hf_config.vocab_size
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = PeftModel.from_pretrained(base, adapter_dir).eval()(input_ids=input_ids).logits
            res["logits_vs_peft"] = float((ours[..., :vocab] - ref).abs().max())
            res["merged_logits_vs_peft"] = float((ours_merged[..., :vocab] - ref).abs().max())
    if dist.get_rank() == 0:
        orig, saved = load_file(os.path.join(adapter_dir, "adapter_model.safetensors")), load_file(
            os.path.join(out, "adapter_model.safetensors"))
        res["export_keys_equal"] = sorted(orig) == sorted(saved)
        res["export_not_equal"] = sorted(k for k in orig if k in saved and not torch.equal(orig[k], saved[k]))
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = PeftModel.from_pretrained(base, adapter_dir).eval()(input_ids=input_ids).logits
            again = PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), out).eval()(input_ids=input_ids).logits
            res["exported_adapter_logits_diff"] = float((again - ref).abs().max())
            m = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
            res["merged_hf_logits_diff"] = float((m(input_ids=input_ids).logits - ref).abs().max())
    if extra is not None:
        extra(res, SimpleNamespace(bridge=bridge, hf_config=hf_config, models=models, state=state,
                                   input_ids=input_ids, ref=ref if dist.get_rank() == 0 else None, work=work))
    return res


def assert_results(out: str, tol: float = 1e-5) -> set:
    """pytest side: every layout's logits (against PEFT, merged, exported adapter, merged HF model) within `tol`,
    only adapter tensors trainable, the exported adapter bit-identical; returns the logit checks seen."""
    import json

    seen = set()
    for rank in (0, 1):
        with open(f"{out}.rank{rank}.json") as f:
            for r in json.load(f):
                assert "error" not in r, r["error"]
                assert r["non_adapter_trainable"] == [], r
                for key in ("logits_vs_peft", "merged_logits_vs_peft", "exported_adapter_logits_diff",
                            "merged_hf_logits_diff"):
                    if key in r:
                        seen.add(key)
                        assert r[key] <= tol, (key, r)
                if rank == 0:
                    assert r["export_keys_equal"] and r["export_not_equal"] == [], r
    return seen


def main(argv=None, layouts: dict = LAYOUTS, extra=None) -> int:
    """Run `check` for every --layouts entry; `extra(model_dir, layout)` gives check's extra callback (or None)."""
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--adapter", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--layouts", required=True)
    a = p.parse_args(argv)

    def run(_case, layout: str, work: str) -> dict:
        return check(a.model, a.adapter, layout, work, layouts, extra(a.model, layout) if extra else None)

    cases = [(layout, None) for layout in a.layouts.split(",")]
    return run_cases(a.out, cases, run, layouts, lambda _case, layout: {"layout": layout})


if __name__ == "__main__":
    sys.exit(main())
