"""Adding a bf16 weight gradient into its fp32 `main_grad` at memory speed (the MoE experts' weight gradients).

The dense linears write their weight gradients straight into `main_grad` inside the GEMM (kernels/wgrad.py).
The experts' grouped GEMM has no accumulate-into-output epilogue, so their bf16 weight gradient is added to the
fp32 `main_grad` afterwards, once per micro-batch. megatron's DDP hook does that with `main_grad.add_(grad)`,
which torch runs as a mixed-dtype `unrolled_elementwise_kernel<add<float>>` (not vectorised). Measured
(benchmarks/RESULTS.md, issue 22 runs): 78.7 ms of a 449 ms step in s3, 229 ms of a 1.58 s step in r_moe2 =
about 2.4 TB/s, half of the H200's memory bandwidth. `accumulate_` is the same addition as one Triton kernel
with wide loads; `TorchGroupedMLP`'s backward calls it and marks the weight `grad_added_to_main_grad`, as
megatron's fused linear layers do, so the DDP hook does not add the gradient a second time.

    from llamafactory_mca.kernels.grad_accum import accumulate_, fast_accumulate_available
    accumulate_(param.main_grad, bf16_grad)     # main_grad += grad (fp32 += bf16), in place
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - CPU images without triton
    triton = None

_BLOCK = 4096
_STATE: dict = {}

if triton is not None:

    @triton.jit
    def _accumulate_kernel(acc_ptr, grad_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        acc = tl.load(acc_ptr + offs, mask=mask)
        g = tl.load(grad_ptr + offs, mask=mask)
        tl.store(acc_ptr + offs, acc + g.to(tl.float32), mask=mask)


def triton_accumulate_(acc: torch.Tensor, grad: torch.Tensor) -> None:
    """The Triton kernel alone (acc fp32 contiguous, grad contiguous, same numel); `accumulate_` is the
    entry point, this one is public for the interpreter test (TRITON_INTERPRET=1 runs it on CPU tensors)."""
    n = acc.numel()
    _accumulate_kernel[(triton.cdiv(n, _BLOCK),)](acc, grad, n, BLOCK=_BLOCK, num_warps=8)


def accumulate_(acc: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """acc (fp32) += grad (any float dtype), in place; both of the same number of elements, contiguous.
    The Triton kernel on CUDA where `fast_accumulate_available()`; torch's `add_` elsewhere."""
    if acc.numel() != grad.numel():
        raise ValueError(f"accumulate_: {acc.numel()} elements in the accumulator, {grad.numel()} in the gradient")
    if (acc.is_cuda and acc.dtype == torch.float32 and acc.is_contiguous() and grad.is_contiguous()
            and fast_accumulate_available(acc.device)):
        triton_accumulate_(acc, grad)
    else:
        acc.view(-1).add_(grad.reshape(-1))
    return acc


def fast_accumulate_available(device: torch.device) -> bool:
    """Triton runs here and the kernel matches torch's `add_` exactly (checked once per device, on a size
    that is not a multiple of the block)."""
    key = (device.type, device.index)
    if key not in _STATE:
        ok = False
        if triton is not None and device.type == "cuda":
            try:
                g = torch.Generator(device=device).manual_seed(0)
                acc = torch.randn(3 * _BLOCK + 17, device=device, generator=g)
                grad = torch.randn(3 * _BLOCK + 17, device=device, generator=g).bfloat16()
                want = acc.clone().add_(grad)
                triton_accumulate_(acc, grad)
                ok = bool(torch.equal(acc, want))
            except Exception:  # a triton that cannot compile for this GPU: keep torch's add
                ok = False
        _STATE[key] = ok
    return _STATE[key]
