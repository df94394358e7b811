"""GPU check of kernels/grad_accum.py: fp32 main_grad += bf16 grad, torch's `add_` against the Triton kernel.

    python benchmarks/grad_accum_check.py        # prints one JSON line: sizes, ms each, GB/s each, equal

Sizes: the expert weights of one Qwen3-30B-A3B layer (fc1 = 128 x 2048 x 1536, fc2 = 128 x 768 x 2048), as the
MoE scenarios add them once per micro-batch.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llamafactory_mca.kernels.grad_accum import accumulate_, fast_accumulate_available  # noqa: E402
from llamafactory_mca.kernels.timing import cuda_time_ms  # noqa: E402


def main() -> int:
    dev = torch.device("cuda")
    out = dict(card=torch.cuda.get_device_name(0), fast_available=fast_accumulate_available(dev), sizes={})
    for name, n in (("fc1", 128 * 2048 * 1536), ("fc2", 128 * 768 * 2048)):
        acc = torch.randn(n, device=dev)
        grad = torch.randn(n, device=dev).bfloat16()
        a1, a2 = acc.clone(), acc.clone()
        a1.add_(grad)
        accumulate_(a2, grad)
        moved = n * (4 + 4 + 2) / 1e9  # GB read + written per call
        t_torch = cuda_time_ms(lambda: acc.add_(grad))
        t_fast = cuda_time_ms(lambda: accumulate_(acc, grad))
        out["sizes"][name] = dict(elements=n, equal=bool(torch.equal(a1, a2)), torch_ms=round(t_torch, 3),
                                  fast_ms=round(t_fast, 3), torch_gbs=round(moved / t_torch * 1e3),
                                  fast_gbs=round(moved / t_fast * 1e3))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
