"""The two halves of every multi-process CPU check: the pytest side launches one torchrun with 2 gloo ranks,
the worker side runs many cases inside it (one parallel layout at a time) and writes each rank's results.

    pytest side:  per_rank = launch_worker("dist_helpers.py", ["--models", d], out_dir, key=("layout", "kind"))
    worker side:  run_cases(out, [(layout, case), ...], check)      # check(case, layout, shared_dir) -> dict
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Iterable, Sequence

from conftest import REPO

NPROC = 2


def launch_worker(script: str, args: Sequence[str], out_dir: Any, key: Sequence[str], timeout: int = 900) -> list:
    """Run tests/<script> under torchrun; return per rank {tuple(result[k] for k in key): result}."""
    out = os.path.join(str(out_dir), "res")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(NPROC),
           os.path.join(REPO, "tests", script), "--out", out, *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    per_rank = []
    for rank in range(NPROC):
        with open(f"{out}.rank{rank}.json") as f:
            per_rank.append({tuple(r[k] for k in key) if len(key) > 1 else r[key[0]]: r for r in json.load(f)})
    return per_rank


def run_cases(out: str, cases: Iterable[tuple[str, Any]], check: Callable[[Any, str, str], dict],
              layouts: dict[str, dict], describe: Callable[[Any, str], dict]) -> int:
    """Worker side: for each layout (in first-seen order) set up megatron's parallel state, run
    `check(case, layout, shared_dir)` for its cases (an exception becomes an `error` entry, so the pytest side
    reports it per case), and write this rank's results to `{out}.rank{R}.json`. `describe(case, layout)` gives
    the keys that identify a result. `shared_dir` is one temporary folder, the same on every rank."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.platform import destroy_parallel, init_parallel

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    cases = list(cases)
    results = []
    shared = [tempfile.mkdtemp(prefix="mca-test-") if rank == 0 else None]
    for layout in dict.fromkeys(layout for layout, _ in cases):
        init_parallel(MegatronArguments(**layouts[layout]), seed=1)
        dist.broadcast_object_list(shared, src=0)
        for case_layout, case in cases:
            if case_layout != layout:
                continue
            t0 = time.time()
            try:
                r = check(case, layout, shared[0])
            except Exception:  # noqa: BLE001 - reported per case by the pytest side
                r = {**describe(case, layout), "error": traceback.format_exc()}
            r["seconds"] = round(time.time() - t0, 2)
            results.append(r)
        ps.destroy_model_parallel()
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(results, f, indent=1)
    destroy_parallel()
    return 0


def compare_with_hf_checkpoint(model_dir: str, exported: dict) -> dict:
    """Names missing from / extra in an exported HF state dict against `model_dir/model.safetensors`, and the
    names whose tensors differ in dtype or value (the export must be bit-exact)."""
    import torch
    from safetensors import safe_open

    with safe_open(os.path.join(model_dir, "model.safetensors"), "pt") as f:
        orig = {k: f.get_tensor(k) for k in f.keys()}
    return dict(
        missing=sorted(set(orig) - set(exported)),
        extra=sorted(set(exported) - set(orig)),
        not_equal=sorted(k for k in orig if k in exported and not (
            exported[k].dtype == orig[k].dtype and torch.equal(exported[k], orig[k]))),
    )
