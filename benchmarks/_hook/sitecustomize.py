"""Benchmark probe, active only when MCA_BENCH_TRACE is set (benchmarks/run.py puts this folder on
PYTHONPATH for its two `llamafactory-cli train` runs; every torchrun child inherits it).

It registers one global `torch.optim` step post-hook: after each optimizer step (the first optimizer seen in
the process, so a ChainedOptimizer's second member does not count twice) it synchronises the GPU and appends
{"t": wall clock, "peak_alloc": ..., "peak_reserved": ...} to $MCA_BENCH_TRACE.rank<RANK>.jsonl. The same
probe serves both backends: Hugging Face's Trainer and our megatron loop both end a step in torch.optim.

Two more switches, both read from the environment:
- MCA_BENCH_PROFILE_STEP=N: rank 0 runs the torch profiler over optimizer step N (from the end of step N-1 to
  the end of step N; run.py makes it one extra step after the measured ones, so it costs no measured time) and
  writes $MCA_BENCH_TRACE.profile.json: the step's wall time, the GPU time by kernel category, how much of the
  communication kernels' time no compute kernel overlapped ("exposed"), the time no kernel ran, and the top
  kernels.
- MCA_BENCH_EXIT_AFTER=N: every rank leaves the process (exit code 0) right after optimizer step N has been
  recorded, so a side whose end-of-training save is not being measured does not spend minutes writing it.

Then any other sitecustomize on the path is run, as if this one were not there.
"""

import os
import sys

# kernel name fragments -> category, first match wins (lower-case)
_CATEGORIES = (
    ("communication", ("nccl", "allreduce", "all_gather", "reduce_scatter", "alltoall", "sendrecv")),
    ("attention", ("flash", "fmha", "attention", "attn", "cudnn")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "grouped_mm", "wgmma", "sm90", "sm100")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "l2norm", "lamb")),
    ("memory", ("memcpy", "memset", "copy_kernel", "cat", "fill")),
)


def _category(name):
    n = name.lower()
    for cat, keys in _CATEGORIES:
        if any(k in n for k in keys):
            return cat
    return "elementwise/other"


def _union(intervals):
    """Total length of the union of [start, end) intervals, and the merged intervals."""
    merged = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return sum(e - s for s, e in merged), merged


def _overlap(a, b):
    """Length of the intersection of two sorted lists of disjoint intervals."""
    i = j = 0
    tot = 0.0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if e > s:
            tot += e - s
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return tot


def summarize_profile(kernels, wall_us, host_waits=None):
    """kernels: (name, start_us, end_us) of every GPU kernel of the step; host_waits: {CUDA runtime call that
    can block the host (synchronize, memcpy): (calls, total us)}. Returns the summary dict."""
    by_cat, by_name, comm, comp = {}, {}, [], []
    for name, s, e in kernels:
        cat = _category(name)
        by_cat[cat] = by_cat.get(cat, 0.0) + (e - s)
        t, n = by_name.get(name, (0.0, 0))
        by_name[name] = (t + e - s, n + 1)
        (comm if cat == "communication" else comp).append((s, e))
    comp_busy, comp_iv = _union(comp)
    comm_busy, comm_iv = _union(comm)
    any_busy, _ = _union(comp + comm)
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:25]
    ms = lambda us: round(us / 1000.0, 3)  # noqa: E731
    return {
        "step_wall_ms": ms(wall_us),
        "gpu_compute_busy_ms": ms(comp_busy),
        "communication_ms": ms(comm_busy),
        "communication_exposed_ms": ms(comm_busy - _overlap(comm_iv, comp_iv)),
        "gpu_idle_ms": ms(max(wall_us - any_busy, 0.0)),
        "by_category_ms": {k: ms(v) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:120], "ms": ms(t), "calls": c, "category": _category(n)} for n, (t, c) in top],
        # each of these stops the CPU until the GPU catches up; after it the GPU idles until new kernels arrive
        "host_waits": {k: {"calls": c, "ms": ms(t)} for k, (c, t) in sorted((host_waits or {}).items())},
    }


def _events_of(prof):
    """(GPU kernels as (name, start us, end us), {host-blocking CUDA runtime call: (calls, total us)}) of a
    finished profile, in one pass over its events."""
    from torch.autograd import DeviceType

    kernels, waits = [], {}
    for ev in prof.events():
        start, end = float(ev.time_range.start), float(ev.time_range.end)
        if ev.device_type == DeviceType.CPU:
            if ev.name.startswith("cuda") and ("Synchronize" in ev.name or "Memcpy" in ev.name):
                c, t = waits.get(ev.name, (0, 0.0))
                waits[ev.name] = (c + 1, t + end - start)
            continue
        if ev.device_type != DeviceType.CUDA or end <= start:
            continue
        # GPU-side ranges of record_function annotations ("nccl:all_to_all", "Optimizer.step#AdamW.step") span
        # kernels that are listed themselves: counting them would count those kernels twice
        if getattr(ev, "is_user_annotation", False) or ev.name.startswith("nccl:") or "#" in ev.name:
            continue
        kernels.append((ev.name, start, end))
    return kernels, waits


def _install():
    import json
    import time

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    trace = os.environ["MCA_BENCH_TRACE"]
    rank = os.environ.get("RANK", "0")
    path = "%s.rank%s.jsonl" % (trace, rank)
    profile_step = int(os.environ.get("MCA_BENCH_PROFILE_STEP", "-1"))
    exit_after = int(os.environ.get("MCA_BENCH_EXIT_AFTER", "-1"))
    state = {"first": None, "n": 0, "prof": None, "t0": None}

    def start_profile():
        from torch.profiler import ProfilerActivity, profile

        state["prof"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        state["prof"].__enter__()
        state["t0"] = time.perf_counter()

    def finish_profile():
        prof, state["prof"] = state["prof"], None
        wall_us = (time.perf_counter() - state["t0"]) * 1e6
        prof.__exit__(None, None, None)
        kernels, waits = _events_of(prof)
        summary = summarize_profile(kernels, wall_us, waits)
        summary["step"] = profile_step
        with open(trace + ".profile.json", "w") as f:
            json.dump(summary, f, indent=1)

    def hook(opt, args, kwargs):
        if state["first"] is None:
            state["first"] = id(opt)
        if id(opt) != state["first"]:
            return
        rec = {"step": state["n"]}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
            rec["peak_alloc"] = torch.cuda.max_memory_allocated()
            rec["peak_reserved"] = torch.cuda.max_memory_reserved()
        rec["t"] = time.perf_counter()
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if state["prof"] is not None and state["n"] == profile_step:
            try:
                finish_profile()
            except Exception as e:  # a failed profile must not fail the run being measured
                print("[bench probe] profile failed: %r" % (e,), file=sys.stderr)
        state["n"] += 1
        if rank == "0" and state["n"] == profile_step:
            start_profile()
        if exit_after >= 0 and state["n"] > exit_after:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)

    register_optimizer_step_post_hook(hook)


if os.environ.get("MCA_BENCH_TRACE"):
    try:
        _install()
    except Exception as e:  # never break the run being measured
        print("[bench probe] not installed: %r" % (e,), file=sys.stderr)

# chain to the next sitecustomize on the path, if any
_here = os.path.dirname(os.path.abspath(__file__))
for _d in sys.path:
    if _d and os.path.abspath(_d) != _here and os.path.isfile(os.path.join(_d, "sitecustomize.py")):
        import importlib.util

        _spec = importlib.util.spec_from_file_location("_next_sitecustomize", os.path.join(_d, "sitecustomize.py"))
        try:
            _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
        except Exception:
            pass
        break
