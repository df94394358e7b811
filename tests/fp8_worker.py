"""Worker of tests/test_fp8.py's TP / SP case: on 2 gloo ranks, a tiny model with and without FP8 (emulate kernel),
same weights; per rank the relative difference of the logits shard and of every converted weight's gradient."""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

LAYOUTS = {"tp2": dict(tensor_model_parallel_size=2), "tp2_sp": dict(tensor_model_parallel_size=2, sequence_parallel=True)}


def check(model_dir: str, layout: str, _shared: str) -> dict:
    from test_fp8 import _rel, _step

    from transformers import AutoConfig

    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models.registry import bridge_for

    os.environ["LLAMAFACTORY_MCA_FP8_KERNEL"] = "emulate"
    cfg = AutoConfig.from_pretrained(model_dir)
    bridge = bridge_for(cfg.model_type)
    out = {"layout": layout, "kind": cfg.model_type}
    runs = []
    import torch

    for fp8 in ({}, {"fp8_format": "e4m3"}):
        models = bridge.build_model(cfg, MegatronArguments(**LAYOUTS[layout], **fp8), torch.float32, init_weights=False)
        bridge.load_hf_weights(models, model_dir)
        model = models[0]
        if fp8:
            out["converted"] = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                       if getattr(m, "fp8_recipe", None) is not None})
        # ids and compared logit columns below both ranks' vocab splits and the padding columns (lowest finite)
        runs.append(_step(model, cfg.vocab_size // 2 - 16))
    (logits_ref, grads_ref), (logits, grads) = runs
    out["logits_rel"] = _rel(logits, logits_ref)
    out["grad_rel"] = {n: _rel(grads[n], grads_ref[n]) for n in grads_ref
                       if n.endswith(("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "weight1", "weight2"))}
    return out


def main() -> int:
    from workers import run_cases

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", nargs="+", required=True)
    a = ap.parse_args()
    # megatron refuses MoE with TP but without SP in training: the MoE model runs under tp2_sp only
    cases = [(layout, d) for layout in LAYOUTS for d in a.models if layout == "tp2_sp" or "moe" not in d]
    return run_cases(a.out, cases, check, LAYOUTS, lambda d, layout: {"layout": layout, "kind": os.path.basename(d)})


if __name__ == "__main__":
    sys.exit(main())
