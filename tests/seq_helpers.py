"""Multi-process CPU checks of context parallelism and sequence packing, run under torchrun (2 gloo ranks).

    torchrun --nproc_per_node 2 tests/seq_helpers.py --models DIR --out OUT --cases cp2:llama:sbhd,dp2:qwen3:thd

A case is layout:kind:mode. Layouts: dp2 (TP=1), tp2, tp2sp, cp2 (context_parallel_size=2). Modes:
  sbhd   unpacked batch [2, 16] (under cp2: split with `cp_split`), logits vs HF, and (cp2) parameter
         gradients of the summed token loss vs HF's, after summing them over the CP group
  mask   packed rows (neat_packing segment ids) with `block_causal_attention_mask`, per-token logits vs HF
         run on every sample alone
  thd    the same rows through `pack_thd` + `PackedSeqParams` (under cp2 also `cp_split`), logits, loss and
         (cp2) gradients vs HF per sample
Each rank writes OUT.rank<R>.json; parallel_state is re-initialised per layout.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from tests.workers import run_cases

LAYOUTS = {
    "dp2": dict(),
    "tp2": dict(tensor_model_parallel_size=2),
    "tp2sp": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "cp2": dict(context_parallel_size=2),
}

# packed rows: segment ids per row (0 = padding), neat_packing style
PACKED_SEGMENTS = [
    [1] * 5 + [2] * 9 + [3] * 3 + [0] * 3,
    [1] * 11 + [2] * 7 + [0] * 2,
]


def _tp_gather(logits: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return logits
    parts = [torch.empty_like(logits) for _ in range(tp)]
    dist.all_gather(parts, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _cp_gather(local: torch.Tensor, lens: list, dim: int = 1) -> torch.Tensor:
    """Per-rank local tokens (dim `dim`) -> full sequence order."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from llamafactory_mca.models.packing import cp_indices

    cp = ps.get_context_parallel_world_size()
    if cp == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(cp)]
    dist.all_gather(parts, local.contiguous(), group=ps.get_context_parallel_group())
    shape = list(local.shape)
    shape[dim] = sum(lens)
    full = local.new_zeros(shape)
    for r in range(cp):
        idx = cp_indices(lens, cp, r)
        full.index_copy_(dim, idx, parts[r])
    return full


def _grads_hf_named(bridge, models) -> dict:
    """Megatron parameter gradients (summed over CP ranks) exported under Hugging Face names (rank 0)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    saved = []
    for m in models:
        for p in m.parameters():
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            if ps.get_context_parallel_world_size() > 1:
                dist.all_reduce(g, group=ps.get_context_parallel_group())
            saved.append((p, p.data))
            p.data = g
    try:
        return dict(bridge.export_hf_state_dict(models))
    finally:
        for p, d in saved:
            p.data = d


def _fuse_experts(ours: dict, name: str, num: int):
    """transformers 5 keeps MoE experts fused: gate_up_proj [E, 2I, H] = [gate; up], down_proj [E, H, I]."""
    prefix = name.rsplit(".", 1)[0]
    if name.endswith("gate_up_proj"):
        return torch.stack([torch.cat([ours[f"{prefix}.{e}.gate_proj.weight"], ours[f"{prefix}.{e}.up_proj.weight"]])
                            for e in range(num)])
    return torch.stack([ours[f"{prefix}.{e}.down_proj.weight"] for e in range(num)])


def _compare_grads(ours: dict, hf_model) -> dict:
    ref = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in hf_model.named_parameters()}
    for n, g in ref.items():
        if n not in ours and n.endswith(("experts.gate_up_proj", "experts.down_proj")):
            ours[n] = _fuse_experts(ours, n, g.shape[0])
    worst, worst_rel, name, rel_name = 0.0, 0.0, None, None
    for n, g in ref.items():
        if n not in ours:
            return {"grad_error": f"missing {n}"}
        d = float((ours[n] - g).abs().max())
        scale = float(g.abs().max()) + 1e-12
        if d > worst:
            worst, name = d, n
        if d / scale > worst_rel:
            worst_rel, rel_name = d / scale, n
    return {"grad_max_abs_diff": worst, "grad_max_rel_diff": worst_rel, "grad_worst": name,
            "grad_worst_rel": rel_name, "grad_scale": max(float(g.abs().max()) for g in ref.values())}


def check(kind: str, model_dir: str, layout: str, mode: str) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig, AutoModelForCausalLM

    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models import packing
    from llamafactory_mca.models.registry import bridge_for

    res: dict = {"kind": kind, "layout": layout, "mode": mode}
    hf_config = AutoConfig.from_pretrained(model_dir)
    bridge = bridge_for(hf_config.model_type)
    mca_args = MegatronArguments(**LAYOUTS[layout])
    models = bridge.build_model(hf_config, mca_args, torch.float32, init_weights=False)
    bridge.load_hf_weights(models, model_dir)
    model = models[0]
    model.eval()  # no dropout, no MoE aux loss (HF computes none either)
    cp = ps.get_context_parallel_world_size()
    cp_rank = ps.get_context_parallel_rank()
    tp = ps.get_tensor_model_parallel_world_size()
    sp = mca_args.sequence_parallel
    backward = cp > 1
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf.eval()
    V = hf_config.vocab_size
    ce = torch.nn.functional.cross_entropy

    torch.manual_seed(123)
    if mode == "sbhd":
        b, s = 2, 16
        input_ids = torch.randint(0, V, (b, s))
        labels = torch.cat([input_ids[:, 1:], torch.full((b, 1), -100)], 1)
        batch = {"input_ids": input_ids, "labels": labels,
                 "position_ids": torch.arange(s).unsqueeze(0).expand(b, -1)}
        local = packing.cp_split(batch, cp, cp_rank)
        with torch.set_grad_enabled(backward):
            logits = _tp_gather(model(input_ids=local["input_ids"], position_ids=local["position_ids"],
                                      attention_mask=None))[..., :V]
            if backward:
                ce(logits.reshape(-1, V), local["labels"].reshape(-1), reduction="sum").backward()
        full = _cp_gather(logits.detach(), [s])
        with torch.set_grad_enabled(backward):
            ref = hf(input_ids=input_ids).logits
            if backward:
                ce(ref.reshape(-1, V), labels.reshape(-1), reduction="sum").backward()
        res["logits_max_abs_diff"] = float((full - ref.detach()).abs().max())
        res["local_tokens"] = int(local["input_ids"].shape[1])
    else:
        seg = torch.tensor(PACKED_SEGMENTS)
        b, s = seg.shape
        input_ids = torch.randint(0, V, (b, s))
        position_ids = torch.zeros(b, s, dtype=torch.long)
        for row in range(b):  # restart per sample, 0 on padding (LLaMA-Factory packing)
            for sid in seg[row].unique().tolist():
                if sid:
                    where = (seg[row] == sid).nonzero().flatten()
                    position_ids[row, where] = torch.arange(len(where))
        assert torch.equal(packing.segment_ids_from_position_ids(position_ids, seg), seg)
        # next-token labels inside each sample
        labels = torch.cat([input_ids[:, 1:], torch.full((b, 1), -100)], 1)
        loss_mask = packing.mask_segment_ends((seg != 0).float(), seg)
        labels = labels.masked_fill(loss_mask == 0, -100)
        # reference: every sample alone through HF
        ref = torch.zeros(b, s, V)
        ref_loss = torch.zeros(())
        with torch.set_grad_enabled(backward):
            for row in range(b):
                for sid in seg[row].unique().tolist():
                    if not sid:
                        continue
                    where = (seg[row] == sid).nonzero().flatten()
                    out = hf(input_ids=input_ids[row, where].unsqueeze(0)).logits[0]
                    ref[row, where] = out.detach()
                    ref_loss = ref_loss + ce(out, labels[row, where], reduction="sum")
            if backward:
                ref_loss.backward()
        real = seg != 0
        if mode == "mask":
            if cp > 1:
                raise ValueError("mode mask is not run under cp")
            mask = packing.block_causal_attention_mask(packing.segment_ids_from_attention_mask(seg))
            with torch.no_grad():
                logits = _tp_gather(model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask))
            logits = logits[..., :V]
        elif mode == "thd":
            seg_mult, total_mult = packing.thd_multiples(tp, cp, sp)
            res["thd_multiples"] = [seg_mult, total_mult]
            batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                     "attention_mask": seg}
            packed, params, index = packing.pack_thd(batch, seg, seg_mult, total_mult)
            lens = (params.cu_seqlens_q_padded[1:] - params.cu_seqlens_q_padded[:-1]).tolist()
            local = packing.cp_split(packed, cp, cp_rank, params)
            with torch.set_grad_enabled(backward):
                out = _tp_gather(model(input_ids=local["input_ids"], position_ids=local["position_ids"],
                                       attention_mask=None, packed_seq_params=params))[..., :V]
                loss = ce(out.reshape(-1, V), local["labels"].reshape(-1), reduction="sum")
                if backward:
                    loss.backward()
            loss = loss.detach()
            if cp > 1:
                dist.all_reduce(loss, group=ps.get_context_parallel_group())
            res["loss_abs_diff"] = float((loss - ref_loss.detach()).abs())
            res["loss"] = float(loss)
            full = _cp_gather(out.detach(), lens)
            logits = packing.unpack_thd(full, index, b, s)
            res["packed_tokens"] = int(index.numel())
        else:
            raise ValueError(mode)
        res["logits_max_abs_diff"] = float((logits - ref)[real].abs().max())
    if backward:
        grads = _grads_hf_named(bridge, models)
        if dist.get_rank() == 0:
            res.update(_compare_grads(grads, hf))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--models", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--cases", required=True)
    a = p.parse_args(argv)
    cases = [(layout, (kind, mode)) for layout, kind, mode in (c.split(":") for c in a.cases.split(","))]
    return run_cases(
        a.out, cases,
        lambda case, layout, _shared: check(case[0], os.path.join(a.models, case[0]), layout, case[1]),
        LAYOUTS, lambda case, layout: {"kind": case[0], "layout": layout, "mode": case[1]},
    )


if __name__ == "__main__":
    sys.exit(main())


def launch(cases: list, tmp_path_factory, kinds: tuple) -> list:
    """Run `cases` ((layout, kind, mode) triples) in one torchrun launch; per-rank {(layout, kind, mode): result}."""
    from tests.tiny_models import make_tiny_model
    from tests.workers import launch_worker

    models = tmp_path_factory.mktemp("tiny_models")
    for kind in kinds:
        make_tiny_model(kind, str(models / kind))
    return launch_worker("seq_helpers.py", ["--models", str(models), "--cases", ",".join(":".join(c) for c in cases)],
                         tmp_path_factory.mktemp("results"), key=("layout", "kind", "mode"))


def assert_logits_match(results: list, case: tuple, tol: float) -> list[dict]:
    """pytest side: on every rank the case ran, its logits are within `tol` of Hugging Face's and, for packed
    (thd) rows, so is the summed loss (relative). Returns the rank results for further checks."""
    per_rank = []
    for rank_results in results:
        r = rank_results[case]
        assert "error" not in r, r["error"]
        assert r["logits_max_abs_diff"] <= tol, r
        if case[-1] == "thd":
            assert r["loss_abs_diff"] <= tol * abs(r["loss"]), r
        per_rank.append(r)
    return per_rank
