"""Benchmark probe, active only when MCA_BENCH_TRACE is set (benchmarks/run.py puts this folder on
PYTHONPATH for its two `llamafactory-cli train` runs; every torchrun child inherits it).

It registers one global `torch.optim` step post-hook: after each optimizer step (the first optimizer seen in
the process, so a ChainedOptimizer's second member does not count twice) it synchronises the GPU and appends
{"t": wall clock, "peak_alloc": ..., "peak_reserved": ...} to $MCA_BENCH_TRACE.rank<RANK>.jsonl. The same
probe serves both backends: Hugging Face's Trainer and our megatron loop both end a step in torch.optim.
Then any other sitecustomize on the path is run, as if this one were not there.
"""

import os
import sys


def _install():
    import json
    import time

    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    path = "%s.rank%s.jsonl" % (os.environ["MCA_BENCH_TRACE"], os.environ.get("RANK", "0"))
    state = {"first": None, "n": 0}

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
        state["n"] += 1
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")

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
