"""Grouped GEMM for MoE experts without Transformer Engine or the `grouped_gemm` package.

    y = grouped_mm(x, w, offs)      x [T, K], w [E, K, N], offs [E] int32 (cumulative token counts)
    y[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] @ w[e]

Backends, chosen per call (`backend_for(x, w)`):
- "torch": `torch._grouped_mm` (one CUTLASS kernel for all experts; the public name
  `torch.nn.functional.grouped_mm` is used where it exists, torch >= 2.10). CUDA only, bf16, compute
  capability >= 9.0 (torch 2.9 on sm_80 works too, but we only enable what we measured: Hopper), K and N
  multiples of 8 (16-byte aligned rows).
- "loop": a Python loop over experts with plain matmuls. Correct everywhere (CPU, fp32, other GPUs);
  slow with many experts. It reads the group sizes on the host (one device->host sync).

Both backends run inside one autograd.Function whose backward is explicit:
    dx = grouped_mm(dy, w^T, offs)            dw[e] = x_e^T @ dy_e
so the backward never depends on how a given torch version derives `_grouped_mm` (torch 2.9 on CPU
rejects expanded/zero-stride gradients, for instance), and experts that received no token get an exact
zero gradient.

`LLAMAFACTORY_MCA_GROUPED_GEMM=loop|torch` forces a backend (testing).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .grad_accum import accumulate_

_F_GROUPED_MM = getattr(torch.nn.functional, "grouped_mm", None)
_T_GROUPED_MM = getattr(torch, "_grouped_mm", None)


def _raw_grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if _F_GROUPED_MM is not None:
        return _F_GROUPED_MM(a, b, offs=offs)
    return _T_GROUPED_MM(a, b, offs=offs)


def torch_grouped_mm_available() -> bool:
    return _F_GROUPED_MM is not None or _T_GROUPED_MM is not None


def backend_for(x: torch.Tensor, w: torch.Tensor) -> str:
    forced = os.environ.get("LLAMAFACTORY_MCA_GROUPED_GEMM")
    if forced in ("loop", "torch"):
        return forced
    if (
        torch_grouped_mm_available()
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and w.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device)[0] >= 9
        and x.shape[-1] % 8 == 0
        and w.shape[-1] % 8 == 0
    ):
        return "torch"
    return "loop"


def offsets_from_counts(tokens_per_expert: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Cumulative int32 offsets on `device` from per-expert token counts (CPU or device tensor)."""
    counts = tokens_per_expert.to(device=device, non_blocking=True)
    return torch.cumsum(counts, dim=0, dtype=torch.int32)


def _loop_fwd(x: torch.Tensor, w: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    out = x.new_empty(x.shape[0], w.shape[-1])
    start = 0
    for e, end in enumerate(bounds):
        if end > start:
            torch.matmul(x[start:end], w[e], out=out[start:end])
        start = end
    if start < x.shape[0]:  # rows past the last offset: defined as zero (as torch._grouped_mm leaves them)
        out[start:].zero_()
    return out


def _loop_dw(x: torch.Tensor, dy: torch.Tensor, bounds: list[int], num_experts: int) -> torch.Tensor:
    dw = x.new_zeros(num_experts, x.shape[-1], dy.shape[-1])
    start = 0
    for e, end in enumerate(bounds):
        if end > start:
            torch.matmul(x[start:end].t(), dy[start:end], out=dw[e])
        start = end
    return dw


_EMPTY_GROUPS_ZEROED: dict = {}


def _kernel_zeroes_empty_groups(device: torch.device) -> bool:
    """Does the 2d x 2d grouped kernel write zeros for a group of size 0? Probed once per device, with
    the caching allocator primed with NaN so that an unwritten output shows."""
    key = (device.type, device.index)
    if key not in _EMPTY_GROUPS_ZEROED:
        ok = True
        for _ in range(3):
            junk = torch.full((4, 64, 64), float("nan"), dtype=torch.bfloat16, device=device)
            del junk
            a = torch.randn(64, 32, dtype=torch.bfloat16, device=device)
            b = torch.randn(32, 64, dtype=torch.bfloat16, device=device)
            offs = torch.tensor([0, 16, 16, 32], dtype=torch.int32, device=device)
            out = _raw_grouped_mm(a.t(), b, offs)  # [4, 64, 64]; groups 0 and 2 are empty
            ok = ok and bool((out[0] == 0).all()) and bool((out[2] == 0).all())
        _EMPTY_GROUPS_ZEROED[key] = ok
    return _EMPTY_GROUPS_ZEROED[key]


def _accumulates_into_main_grad(param: Optional[torch.nn.Parameter]) -> bool:
    """The weight gradient goes straight into `param.main_grad` when megatron's DDP gave the parameter one
    (kernels/grad_accum.py: the Triton addition on GPUs, torch's `add_` elsewhere: the same numbers)."""
    return (param is not None and getattr(param, "main_grad", None) is not None
            and hasattr(param, "grad_added_to_main_grad") and not getattr(param, "zero_out_wgrad", False))


class _GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, backend: str,
                empty_groups: Optional[bool], main_grad_param: Optional[torch.nn.Parameter]):
        ctx.backend = backend
        ctx.empty_groups = empty_groups
        ctx.main_grad_param = main_grad_param
        if backend == "torch":
            y = _raw_grouped_mm(x, w, offs)
            ctx.bounds = None
        else:
            bounds = offs.tolist()
            ctx.bounds = bounds
            y = _loop_fwd(x, w, bounds)
        ctx.save_for_backward(x, w, offs)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w, offs = ctx.saved_tensors
        dy = dy.contiguous()
        dx = dw = None
        if ctx.backend == "torch":
            if ctx.needs_input_grad[0]:
                dx = _raw_grouped_mm(dy, w.transpose(-2, -1), offs)
            if ctx.needs_input_grad[1]:
                # 2d x 2d with offsets along K: one [K, N] product per group -> [E, K, N]. Experts that got
                # no token need an exact zero; the kernel's behaviour for empty groups is probed once; when
                # the caller knows there is no empty group, nothing to do.
                dw = grouped_weight_grad(x, dy, offs, w.shape[0], "torch", ctx.empty_groups)
        else:
            if ctx.needs_input_grad[0]:
                dx = _loop_fwd(dy, w.transpose(-2, -1), ctx.bounds)
            if ctx.needs_input_grad[1]:
                dw = _loop_dw(x, dy, ctx.bounds, w.shape[0])
        param = ctx.main_grad_param
        if dw is not None and _accumulates_into_main_grad(param):
            # main_grad += dw here, at memory speed; dw still flows to the parameter (its value is right), but
            # the DDP hook sees grad_added_to_main_grad and does not add it again (megatron's fused linears
            # return a dummy weight gradient the same way)
            accumulate_(param.main_grad, dw)
            param.grad_added_to_main_grad = True
        return dx, dw, None, None, None, None


def grouped_weight_grad(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor, num_experts: int,
                        backend: str, empty_groups: Optional[bool] = None) -> torch.Tensor:
    """dw[e] = x_e^T @ dy_e ([E, K, N]) for the row groups of `offs`: the weight gradient of `grouped_mm`
    (experts without rows get an exact zero)."""
    if backend == "torch":
        dw = _raw_grouped_mm(x.t(), dy, offs)
        if empty_groups is not False and not _kernel_zeroes_empty_groups(dw.device):
            counts = torch.diff(offs, prepend=offs.new_zeros(1))
            dw = dw.masked_fill((counts == 0).view(-1, 1, 1), 0)
        return dw
    return _loop_dw(x, dy, offs.tolist(), num_experts)


def grouped_mm(
    x: torch.Tensor,
    w: torch.Tensor,
    offs: torch.Tensor,
    backend: Optional[str] = None,
    empty_groups: Optional[bool] = None,
    main_grad_param: Optional[torch.nn.Parameter] = None,
) -> torch.Tensor:
    """x [T, K] @ w[e] [K, N] per contiguous row group; offs [E] int32 cumulative counts on x.device.

    `empty_groups`: False when the caller knows (from host-side counts) that every group has rows; None =
    unknown (then empty groups are handled, at the cost of one pass over dw where the kernel needs it).
    `main_grad_param`: the parameter `w` is a view of (same elements, same order); where it has a megatron
    DDP `main_grad`, the backward adds dw into it itself (kernels/grad_accum.py) instead of leaving that to
    the DDP hook's slower mixed-dtype `add_`."""
    if x.dim() != 2 or w.dim() != 3 or offs.dim() != 1 or offs.shape[0] != w.shape[0]:
        raise ValueError(f"grouped_mm: bad shapes x{tuple(x.shape)} w{tuple(w.shape)} offs{tuple(offs.shape)}")
    if x.shape[1] != w.shape[1]:
        raise ValueError(f"grouped_mm: x has K={x.shape[1]} but w has K={w.shape[1]}")
    if main_grad_param is not None and main_grad_param.numel() != w.numel():
        raise ValueError(f"grouped_mm: main_grad_param has {main_grad_param.numel()} elements, w {w.numel()}")
    return _GroupedMM.apply(x, w, offs, backend or backend_for(x, w), empty_groups, main_grad_param)


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """float64 reference for tests."""
    outs, start = [], 0
    for e, c in enumerate(counts):
        outs.append(x[start:start + c].double() @ w[e].double())
        start += c
    return torch.cat(outs) if outs else x.new_zeros(0, w.shape[-1], dtype=torch.float64)
