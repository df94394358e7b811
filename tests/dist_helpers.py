"""Multi-process CPU checks of the model bridge, run under `torchrun --nproc_per_node N` (gloo).

    torchrun --nproc_per_node 2 tests/dist_helpers.py --models DIR --out OUT.json --layouts tp2,pp2 --kinds llama

For every layout x model kind: build the megatron model, stream the HF weights in, compare logits with the
Hugging Face model (fp32), export back to HF (round trip must be bit-exact) and save_hf_pretrained. Each rank
writes its results to OUT.rank<R>.json; one process-group launch covers all combinations (parallel_state is
re-initialised per layout).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from tests.workers import compare_with_hf_checkpoint, run_cases

LAYOUTS = {
    "dp2": dict(),
    "tp2": dict(tensor_model_parallel_size=2),
    "tp2sp": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "pp2": dict(pipeline_model_parallel_size=2),
    "vpp2": dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
    "ep2": dict(expert_model_parallel_size=2),
    "tp2ep2": dict(tensor_model_parallel_size=2, expert_model_parallel_size=2, expert_tensor_parallel_size=1),
    "tp1": dict(),
}
MOE_KINDS = ("qwen3_moe", "mixtral", "qwen2_moe", "glm4_moe", "deepseek_v3", "qwen3_next")


def run_bridge_checks(tmp_path_factory, kinds, layouts) -> list:
    """pytest side: build the tiny models of `kinds`, run every layout x kind `check` in one 2-rank torchrun
    launch, and return each rank's {(layout, kind): result}."""
    from tests.tiny_models import make_tiny_model
    from tests.workers import launch_worker

    models = tmp_path_factory.mktemp("tiny_models")
    for kind in kinds:
        make_tiny_model(kind, str(models / kind))
    return launch_worker("dist_helpers.py", ["--models", str(models), "--layouts", ",".join(layouts),
                                             "--kinds", ",".join(kinds)],
                         tmp_path_factory.mktemp("results"), key=("layout", "kind"))


def assert_logits_parity(per_rank: list, layout: str, kind: str, tol: float) -> None:
    """pytest side: the ranks with logits (the last pipeline stage) match the HF model to `tol`, loss included."""
    diffs = []
    for rank_results in per_rank:
        r = rank_results[(layout, kind)]
        assert "error" not in r, r["error"]
        if "logits_max_abs_diff" in r:
            diffs.append(r["logits_max_abs_diff"])
            assert r["loss_abs_diff"] <= tol, r  # vocab padding for TP must not change the loss
    assert diffs, "no rank produced logits"
    assert max(diffs) <= tol, diffs


def assert_round_trip(per_rank: list, layout: str, kind: str) -> None:
    """pytest side: the export reproduced every HF tensor bit-exactly, and save_hf_pretrained (sharded, index
    json) reloads with transformers to the same weights."""
    r = per_rank[0][(layout, kind)]
    assert "error" not in r, r["error"]
    assert r["missing"] == [] and r["extra"] == [], r
    assert r["not_equal"] == [], r
    assert r["saved_shards"] > 1
    assert r["reload_not_equal"] == [], r


def pipeline_forward(models, input_ids: torch.Tensor) -> torch.Tensor | None:
    """Forward through all pipeline stages / virtual chunks with plain p2p; full-vocab logits on the last stage."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    pp = ps.get_pipeline_model_parallel_world_size()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    tp = ps.get_tensor_model_parallel_world_size()
    group_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
    b, s = input_ids.shape
    position_ids = torch.arange(s).unsqueeze(0).expand(b, -1)
    config = models[0].config
    hidden_shape = (s // tp if config.sequence_parallel else s, b, config.hidden_size)
    out = None
    for v in range(len(models)):
        for stage in range(pp):
            if stage != pp_rank:
                continue
            model = models[v]
            first = v == 0 and stage == 0
            last = v == len(models) - 1 and stage == pp - 1
            if not first:
                buf = torch.empty(hidden_shape, dtype=config.params_dtype)
                dist.recv(buf, src=group_ranks[(stage - 1) % pp])
                model.set_input_tensor(buf)
            else:
                model.set_input_tensor(None)
            y = model(input_ids=input_ids if first else None, position_ids=position_ids, attention_mask=None)
            if last:
                out = y
            else:
                dist.send(y.contiguous(), dst=group_ranks[(stage + 1) % pp])
    if out is None:
        return None
    if tp > 1:  # vocab-parallel logits [b, s, V/tp]
        parts = [torch.empty_like(out) for _ in range(tp)]
        dist.all_gather(parts, out.contiguous(), group=ps.get_tensor_model_parallel_group())
        out = torch.cat(parts, dim=-1)
    return out


def check(kind: str, model_dir: str, layout: str, work: str) -> dict:
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models.registry import bridge_for

    res: dict = {"kind": kind, "layout": layout}
    hf_config = AutoConfig.from_pretrained(model_dir)
    bridge = bridge_for(hf_config.model_type)
    mca_args = MegatronArguments(**LAYOUTS[layout])
    models = bridge.build_model(hf_config, mca_args, torch.float32, init_weights=False)
    bridge.load_hf_weights(models, model_dir)
    for m in models:
        m.eval()

    torch.manual_seed(123)
    input_ids = torch.randint(0, hf_config.vocab_size, (2, 16))
    with torch.no_grad():
        logits = pipeline_forward(models, input_ids)
    if logits is not None:
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        hf.eval()
        with torch.no_grad():
            ref = hf(input_ids=input_ids).logits
        res["logits_max_abs_diff"] = float((logits[..., : hf_config.vocab_size] - ref).abs().max())
        res["padded_vocab"] = int(logits.shape[-1])
        # The loss over all (padded) megatron logits must equal HF's: padding columns must not enter softmax.
        labels = input_ids[:, 1:].reshape(-1)
        ours = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels)
        theirs = torch.nn.functional.cross_entropy(ref[:, :-1].reshape(-1, ref.shape[-1]), labels)
        res["loss_abs_diff"] = float((ours - theirs).abs())

    # round trip: export must reproduce every tensor bit-exactly
    exported = dict(bridge.export_hf_state_dict(models))
    if dist.get_rank() == 0:
        res.update(compare_with_hf_checkpoint(model_dir, exported))
    out_dir = os.path.join(work, f"{kind}-{layout}")
    bridge.save_hf_pretrained(models, out_dir, max_shard_size="100KB")
    if dist.get_rank() == 0:
        reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
        sd = reloaded.state_dict()
        ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        ref_sd = ref_model.state_dict()
        res["saved_shards"] = len([f for f in os.listdir(out_dir) if f.endswith(".safetensors")])
        res["reload_not_equal"] = sorted(k for k in ref_sd if not torch.equal(ref_sd[k], sd[k]))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--layouts", required=True)
    p.add_argument("--kinds", required=True)
    a = p.parse_args(argv)
    cases = [(layout, kind) for layout in a.layouts.split(",") for kind in a.kinds.split(",")
             if "ep2" not in layout or kind in MOE_KINDS]
    return run_cases(a.out, cases, lambda kind, layout, work: check(kind, os.path.join(a.models, kind), layout, work),
                     LAYOUTS, lambda kind, layout: {"kind": kind, "layout": layout})


if __name__ == "__main__":
    sys.exit(main())

