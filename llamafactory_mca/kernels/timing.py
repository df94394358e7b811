"""GPU timing of the kernel checks (`python -m llamafactory_mca.kernels.fp8`, benchmarks/*_check.py)."""

from __future__ import annotations

from typing import Callable

import torch


def cuda_time_ms(fn: Callable[[], object], reps: int = 20, warmup: int = 1) -> float:
    """Mean milliseconds of `fn()` on the current CUDA stream over `reps` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps
