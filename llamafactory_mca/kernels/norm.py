"""RMSNorm on torch's fused kernel (`torch.nn.functional.rms_norm`, one CUDA kernel forward and backward,
fp32 statistics), a drop-in for models/spec.py's eager `RMSNorm` (same constructor, same parameter).

Measured on an H200 (benchmarks/micro.py --kernels), fwd+bwd of [4096, 2048] bf16: eager HF formula 648 us,
torch.compile of it 513 us, torch.nn.functional.rms_norm 158 us. A dense 1.1B Qwen3 step has 33 hidden norms
and 32 q/k norms (4096 x 16 x 128 elements), so the eager form costs ~25 ms a step more.

Arithmetic: statistics in fp32 as in HF; HF rounds x * rstd to bf16 before multiplying by the weight, the
fused kernel rounds once at the end (so it is within one bf16 rounding of HF, never further).
CPU / other dtypes: the eager HF formula (bit-identical to HF).

Backward on CUDA (issue 22): torch's rms_norm backward reduces the weight gradient with `GammaBetaBackward`,
40.5 ms in 520 calls of the s1 profiled step (the q/k norms: 65536 rows of 128). `rms_norm_backward` is one
Triton kernel: each program walks a run of rows, writes dx and keeps its fp32 partial weight gradient in
registers; the partials ([programs, hidden]) are then summed once, and added straight into the weight's fp32
`main_grad` where megatron's DDP gave it one (kernels/grad_accum.py). The forward stays torch's kernel (same
numbers as before); rstd is recomputed in the backward from the saved input. Checked once per device against
torch's backward (`fast_rms_norm_available`); torch's kernels are kept where the check fails.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .grad_accum import accumulate_, accumulates_into_main_grad

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - CPU images without triton
    triton = None

_STATE: dict = {}

if triton is not None:

    @triton.jit
    def _rms_norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, dx_ptr, dw_ptr, M, N, eps, TILES: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < N
        w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        start = pid * TILES * BLOCK_M
        for t in range(TILES):  # TILES tiles of BLOCK_M rows a program (a constant: a few values per model)
            rows = start + t * BLOCK_M + tl.arange(0, BLOCK_M)
            rmask = rows < M
            mask = rmask[:, None] & cmask[None, :]
            offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
            xhat = x * rstd[:, None]
            wdy = dy * w[None, :]
            c = tl.sum(xhat * wdy, axis=1) / N
            dx = (wdy - xhat * c[:, None]) * rstd[:, None]
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw += tl.sum(dy * xhat, axis=0)
        tl.store(dw_ptr + pid.to(tl.int64) * N + cols, dw, mask=cmask)


def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple:
    """(dx, dw fp32) of y = x * rsqrt(mean(x^2, -1) + eps) * weight, by the Triton kernel (also under
    TRITON_INTERPRET=1 on CPU tensors); x and dy [..., hidden], dx in x's dtype."""
    n = weight.numel()
    x2 = x.reshape(-1, n).contiguous()
    dy2 = dy.reshape(-1, n).contiguous()
    m = x2.shape[0]
    dx = torch.empty_like(x2)
    if m == 0:
        return dx.view(x.shape), torch.zeros(n, dtype=torch.float32, device=x.device)
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(64, 4096 // block_n))
    slots = 2 * _multiprocessors(x.device)
    row_blocks = triton.cdiv(m, block_m)
    # tiles a program, a power of two (a compile-time constant of the kernel: few distinct values)
    tiles_per_program = triton.next_power_of_2(triton.cdiv(row_blocks, min(slots, row_blocks)))
    programs = triton.cdiv(row_blocks, tiles_per_program)
    partial = torch.empty(programs, n, dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(programs,)](dy2, x2, weight, dx, partial, m, n, eps, TILES=tiles_per_program,
                                      BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8 if block_n >= 2048 else 4)
    return dx.view(x.shape), partial.sum(0)


def _multiprocessors(device: torch.device) -> int:
    key = ("sms", device.type, device.index)
    if key not in _STATE:
        _STATE[key] = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    return _STATE[key]


def fast_rms_norm_available(device: torch.device) -> bool:
    """Triton runs here and `rms_norm_backward` agrees with torch's rms_norm backward (checked once per device,
    bf16, on a row count that is not a multiple of the tile)."""
    key = (device.type, device.index)
    if key not in _STATE:
        ok = False
        if triton is not None and device.type == "cuda":
            try:
                g = torch.Generator(device=device).manual_seed(0)
                for rows, n in ((1037, 2048), (4099, 128)):
                    x = torch.randn(rows, n, device=device, generator=g).bfloat16().requires_grad_()
                    w = (1 + 0.1 * torch.randn(n, device=device, generator=g)).bfloat16().requires_grad_()
                    dy = torch.randn(rows, n, device=device, generator=g).bfloat16()
                    ref_dx, ref_dw = torch.autograd.grad(F.rms_norm(x.float(), (n,), w.float(), 1e-6), (x, w), dy)
                    dx, dw = rms_norm_backward(dy, x.detach(), w.detach(), 1e-6)
                    ok_dx = torch.allclose(dx.float(), ref_dx.float(), rtol=2e-2, atol=2e-2)
                    ok_dw = torch.allclose(dw, ref_dw.float(), rtol=1e-3, atol=1e-2)
                    if not (ok_dx and ok_dw):
                        break
                else:
                    ok = True
            except Exception:  # a triton that cannot compile for this GPU: keep torch's backward
                ok = False
        _STATE[key] = ok
    return _STATE[key]


class RMSNormFunction(torch.autograd.Function):
    """torch's fused rms_norm forward, `rms_norm_backward` backward (weight gradient into `main_grad`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return F.rms_norm(x, (weight.numel(),), weight, eps)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        dx, dw = rms_norm_backward(dy, x, weight, ctx.eps)
        if not ctx.needs_input_grad[1]:
            return dx, None, None
        if accumulates_into_main_grad(weight):
            accumulate_(weight.main_grad, dw)  # fp32 += fp32; the DDP hook skips its own addition
            weight.grad_added_to_main_grad = True
        return dx, dw.to(weight.dtype), None


class FusedRMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **kwargs):
        super().__init__()
        self.config = config
        self.eps = eps
        self.hidden_size = hidden_size
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and x.dtype == self.weight.dtype:
            if torch.is_grad_enabled() and fast_rms_norm_available(x.device):
                return RMSNormFunction.apply(x, self.weight, self.eps)
            return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)
