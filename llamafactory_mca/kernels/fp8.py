"""FP8 training GEMMs without Transformer Engine: the one place where the FP8 kernels are chosen.

`fp8: true` (or `e4m3` / `hybrid`) with `fp8_recipe: tensorwise | rowwise | blockwise` runs the GEMMs of the
tensor-parallel linears (linear_qkv, linear_proj, linear_fc1, linear_fc2, with or without sequence parallelism)
and of the grouped-GEMM experts in FP8; the weights stay what they were (bf16 params, fp32 main params in the
optimizer), so checkpoints and exports do not change. The output layer, embedding and router stay bf16.

Scaling: dynamic ("current") scaling, computed from each operand right before its GEMM, per rank. Each rank
quantizes the operands of its own GEMM (its weight shard, its all-gathered or local activation, its output
gradient): a scale only has to cover the operand it scales, so per-rank amax is exact for TP / SP / EP and needs
no collective; an all-reduced amax would add one collective per GEMM and only make the scale coarser. Under
sequence parallelism the input is all-gathered in bf16 and quantized after the gather (every TP rank then holds
the same FP8 input); the FP8 copy is what backward keeps (no second all-gather). Delayed scaling (amax history)
is not offered.

Recipes (dtypes: `e4m3` = float8_e4m3fn everywhere; `hybrid` = e4m3 forward, e5m2 for output gradients):
- tensorwise: one scale per tensor; forward, input-gradient (dgrad) and weight-gradient (wgrad) GEMMs in FP8
  (`torch._scaled_mm`); input and weight are quantized once in forward and reused, transposed, in backward.
- rowwise: one scale per row along the reduction axis (torchao's "rowwise"), all three GEMMs in FP8; e4m3 only
  (the rowwise kernel takes no e5m2).
- blockwise: 1x128 activation / 128x128 weight blocks (DeepSeek-V3 style) through `torch.nn.functional.scaled_mm`
  (torch >= 2.10) for forward and dgrad; wgrad in bf16. e4m3 only. Dimensions must be multiples of 128.
- experts (any recipe): `torch._scaled_grouped_mm` with rowwise scales for forward and dgrad, wgrad in bf16
  (one grouped GEMM, as the bf16 experts).

Kernels: "cuda" (the torch ops above) after a numerical check on this GPU (`check_fp8_supported`: compute
capability >= 9.0, each op against a dequantized fp32 reference, once per process), or "emulate": the same
quantization in fp32 arithmetic (quantize, dequantize, matmul) for CPU wiring tests
(`LLAMAFACTORY_MCA_FP8_KERNEL=emulate`). Nothing else chooses an FP8 kernel.

Casts (the quantization in front of each GEMM, `cast_backend`): "triton", one kernel per operand
(kernels/fp8_cast.py: rowwise amax + scale + cast in one pass, tensorwise amax then one cast that also writes the
transposed, padded copy wgrad needs), used after its own check against `quantize_eager` on this GPU; else
"torch": `quantize_eager`, through torch.compile where it works (`LLAMAFACTORY_MCA_FP8_CAST=torch` forces it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from llamafactory_mca.args import FP8_FORMATS, FP8_RECIPES  # noqa: F401  (the keys' values, re-exported)
from llamafactory_mca.kernels import fp8_cast

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
BLOCK = 128
_EPS = 1e-12


@dataclass(frozen=True)
class Fp8Recipe:
    """How the FP8 GEMMs scale their operands (`name`) and the dtype of output gradients (`grad_dtype`)."""

    name: str = "tensorwise"
    fp8_format: str = "e4m3"

    @property
    def grad_dtype(self) -> torch.dtype:
        return E5M2 if self.fp8_format == "hybrid" else E4M3

    def min_multiple(self) -> int:
        """Per-rank in/out features of a linear must be multiples of this to run in FP8."""
        return BLOCK if self.name == "blockwise" else 16


def recipe_from_args(fp8_format: Optional[str], fp8_recipe: Optional[str]) -> Optional[Fp8Recipe]:
    """The recipe of our `fp8_format` / `fp8_recipe` keys, or None (FP8 off)."""
    if not fp8_format:
        return None
    return Fp8Recipe(name=fp8_recipe or "tensorwise", fp8_format=fp8_format)


def kernel_backend() -> str:
    """'emulate' when forced (LLAMAFACTORY_MCA_FP8_KERNEL=emulate, CPU tests), else 'cuda'."""
    return "emulate" if os.environ.get("LLAMAFACTORY_MCA_FP8_KERNEL") == "emulate" else "cuda"


# ------------------------------------------------------------------------------------------------ quantization


def _fmax(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def quantize_eager(t: torch.Tensor, dtype: torch.dtype, axis: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(t * scale in `dtype`, 1 / scale as fp32): one scale for the tensor (axis None) or one per slice along
    `axis` (the reduction axis: kept with size 1)."""
    amax = t.abs().amax() if axis is None else t.abs().amax(dim=axis, keepdim=True)
    scale = _fmax(dtype) / amax.float().clamp(min=_EPS)
    q = (t.float() * scale).clamp(-_fmax(dtype), _fmax(dtype)).to(dtype)
    return q, scale.reciprocal()


def _compiled_quantize():
    """`quantize_eager` through torch.compile (one reduction + one pointwise kernel, no fp32 temporary; measured
    on an H200: eager quantization made FP8 training slower than bf16), or None where compile is unavailable or
    switched off (LLAMAFACTORY_MCA_FP8_COMPILE=0)."""
    if "compiled" not in _STATE:
        fn = None
        if os.environ.get("LLAMAFACTORY_MCA_FP8_COMPILE", "1") != "0" and torch.cuda.is_available():
            try:
                from torch._dynamo import config as cfg  # (`import torch._dynamo` here would make `torch` local)

                # one graph per (dtype, axis, operand rank/layout): more than dynamo's default 8 recompiles
                # (measured on the H200: the limit was hit and the rest ran eager)
                name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
                setattr(cfg, name, max(getattr(cfg, name), 64))
                fn = torch.compile(quantize_eager, dynamic=True)
            except Exception:  # noqa: BLE001 - no compiler here: eager
                fn = None
        _STATE["compiled"] = fn
    return _STATE["compiled"]


def cast_backend() -> str:
    """'triton' (kernels/fp8_cast.py, once its check against `quantize_eager` passed on this GPU) or 'torch'
    (`quantize_eager`, compiled where possible); decided once per process, the reason kept for the report."""
    if "cast" not in _STATE:
        reason = "LLAMAFACTORY_MCA_FP8_CAST=torch" if os.environ.get("LLAMAFACTORY_MCA_FP8_CAST") == "torch" else None
        if reason is None and (kernel_backend() != "cuda" or not fp8_cast.triton_available()):
            reason = "no Triton with a CUDA device"
        reason = reason or fp8_cast.self_check()
        _STATE["cast"], _STATE["cast_reason"] = ("torch" if reason else "triton"), reason
    return _STATE["cast"]


def cast_reason() -> Optional[str]:
    """Why `cast_backend` chose the torch casts (None when it chose Triton or has not been asked yet)."""
    return _STATE.get("cast_reason")


def reset_cast_choice() -> None:
    """Forget the cast choice (the next FP8 cast decides again): for tests and the report's comparison."""
    _STATE.pop("cast", None)
    _STATE.pop("cast_reason", None)


def _fast_cast(t: torch.Tensor) -> bool:
    return t.is_cuda and t.dim() == 2 and t.numel() > 0 and kernel_backend() == "cuda" and cast_backend() == "triton"


def quantize(t: torch.Tensor, dtype: torch.dtype, axis: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """`quantize_eager`'s numbers: one Triton kernel (plus an amax reduction) for 2D tensors on the GPU where
    `cast_backend` chose them, else `quantize_eager`, compiled on CUDA where possible."""
    if _fast_cast(t):
        if axis is None:
            q, _, inv = fp8_cast.cast_tensorwise(t, dtype)
            return q, inv
        if t.stride(-1) == 1:
            return fp8_cast.cast_rowwise(t, dtype)
        q, _, inv = fp8_cast.cast_scaled(t, fp8_cast.amax(t, dim=1), dtype)
        return q, inv
    fn = _compiled_quantize() if t.is_cuda else None
    return (fn or quantize_eager)(t, dtype, axis)


def quantize_with_t(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Tensorwise `quantize(t)` and, from the same pass where the Triton casts run, t^T quantized alike with its
    token axis zero-padded to 16 (wgrad's operand; None otherwise: `transpose_padded` makes it from q)."""
    if _fast_cast(t):
        q, qt, inv = fp8_cast.cast_tensorwise(t, dtype, transposed=True)
        return q, inv, qt
    return (*quantize(t, dtype, None), None)


def quantize_rowwise_t(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Rowwise quantization of t^T [K, M] for t [M, K], M zero-padded to 16, contiguous (wgrad's operands)."""
    if _fast_cast(t) and t.stride(-1) == 1:
        return fp8_cast.cast_rowwise_t(t, dtype)
    q, s = quantize(_pad_rows(t).t(), dtype, -1)
    return q.contiguous(), s


def transpose_padded(q: torch.Tensor) -> torch.Tensor:
    """q^T of an FP8 [M, N], M zero-padded to 16, contiguous."""
    return _pad_rows(q.view(torch.uint8)).view(q.dtype).t().contiguous()


def quantize_weight(w: torch.Tensor, dtype: torch.dtype, axis: Optional[int], transpose: bool = False):
    """`quantize(w)` (of w's last-two-dims transpose, made contiguous, when `transpose`), kept on the parameter
    (or the parameter `w` is a view of) until its version counter moves (every optimizer step): the micro-batches
    of one step and a layer's forward and backward share one FP8 copy per weight and layout."""
    owner = w if w._base is None else w._base
    key = (w.data_ptr(), tuple(w.shape), tuple(w.stride()), dtype, axis, transpose)
    cache = owner.__dict__.setdefault("_fp8_cache", {})
    # megatron writes updated weights through `.data` (distributed optimizer copy, parameter all-gather), which
    # does not move the version counter: the optimizer-step count is what tells a new weight
    stamp = (w._version, optimizer_steps())
    hit = cache.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    src = w.transpose(-2, -1) if transpose else w
    q, s = quantize(src.detach(), dtype, axis)
    out = (q.contiguous() if transpose else q, s)
    for old in [k for k, v in cache.items() if v[0] != stamp]:  # copies of older weights are dead weight
        del cache[old]
    cache[key] = (stamp, out)
    return out


def optimizer_steps() -> int:
    """torch optimizer steps taken in this process (a global step post-hook, installed on first use; megatron's
    optimizers step their torch optimizers, fused or not)."""
    if "steps" not in _STATE:
        _STATE["steps"] = 0

        def bump(*_):
            _STATE["steps"] += 1

        from torch.optim.optimizer import register_optimizer_step_post_hook

        register_optimizer_step_post_hook(bump)
    return _STATE["steps"]


def quantize_blocks(t: torch.Tensor, rows: int, dtype: torch.dtype = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """Block scaling of a [M, K] tensor: blocks of `rows` x 128 (rows 1: activations, 128: weights); inverse
    scales [M / rows, K / 128] fp32."""
    m, k = t.shape
    blocks = t.float().reshape(m // rows, rows, k // BLOCK, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3), keepdim=True)
    scale = _fmax(dtype) / amax.clamp(min=_EPS)
    q = (blocks * scale).clamp(-_fmax(dtype), _fmax(dtype)).to(dtype).reshape(m, k)
    return q, scale.reciprocal().reshape(m // rows, k // BLOCK)


def _pad_rows(t: torch.Tensor, multiple: int = 16) -> torch.Tensor:
    """Zero rows appended up to a multiple (the reduction axis of wgrad: zeros add nothing)."""
    extra = (-t.shape[0]) % multiple
    return t if extra == 0 else torch.cat([t, t.new_zeros(extra, *t.shape[1:])])


# ------------------------------------------------------------------------------------------------ plain GEMMs


def scaled_mm_nt(aq: torch.Tensor, a_inv: torch.Tensor, bq: torch.Tensor, b_inv: torch.Tensor,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """(aq * a_inv) @ (bq * b_inv)^T for row-major aq [M, K], bq [N, K]; a_inv / b_inv: scalar or [M, 1] /
    [N, 1] inverse scales. One kernel: `torch._scaled_mm` (cuda) or its fp32 emulation."""
    if kernel_backend() == "emulate" or not aq.is_cuda:
        a = aq.float() * a_inv
        b = bq.float() * b_inv
        return (a @ b.t()).to(out_dtype)
    sb = b_inv if b_inv.dim() == 0 else b_inv.reshape(1, -1)
    return torch._scaled_mm(aq, bq.t(), scale_a=a_inv, scale_b=sb, out_dtype=out_dtype)


def blockwise_mm_nt(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """a [M, K] @ b [N, K]^T with 1x128 blocks on a and 128x128 blocks on b (e4m3)."""
    aq, sa = quantize_blocks(a, 1)
    bq, sb = quantize_blocks(b, BLOCK)
    if kernel_backend() == "emulate" or not a.is_cuda:
        deq_a = aq.float() * sa.repeat_interleave(BLOCK, dim=1)
        deq_b = bq.float() * sb.repeat_interleave(BLOCK, dim=0).repeat_interleave(BLOCK, dim=1)
        return (deq_a @ deq_b.t()).to(out_dtype)
    F = torch.nn.functional
    layout = _STATE.get("block_layout", 0)
    scale_a = sa.t().contiguous().t() if layout in (0, 1) else sa
    scale_b = sb if layout in (0, 2) else sb.t().contiguous().t()
    return F.scaled_mm(aq, bq.t(), scale_a, F.ScalingType.BlockWise1x128, scale_b, F.ScalingType.BlockWise128x128,
                       output_dtype=out_dtype)


# ------------------------------------------------------------------------------------------------ linear GEMMs


def linear_forward(x: torch.Tensor, w: torch.Tensor, recipe: Fp8Recipe) -> tuple[torch.Tensor, tuple]:
    """(x [M, K] @ w [N, K]^T in the input dtype, what backward needs)."""
    if recipe.name == "tensorwise":
        xq, xs, xqt = quantize_with_t(x, E4M3)
        wq, ws = quantize_weight(w, E4M3, None)
        return scaled_mm_nt(xq, xs, wq, ws, x.dtype), (xq, xs, w, xqt)
    if recipe.name == "rowwise":
        xq, xs = quantize(x, E4M3, -1)
        wq, ws = quantize_weight(w, E4M3, -1)
        return scaled_mm_nt(xq, xs, wq, ws, x.dtype), (x, w)
    return blockwise_mm_nt(x, w, x.dtype), (x, w)


def linear_dgrad(dy: torch.Tensor, saved: tuple, recipe: Fp8Recipe) -> tuple[torch.Tensor, Optional[tuple]]:
    """(dx = dy [M, N] @ w [N, K], the quantized dy for wgrad where the recipe reuses it)."""
    if recipe.name == "tensorwise":
        # w^T quantized (one scale: the forward copy's), kept as the forward copy is
        wtq, ws = quantize_weight(saved[2], E4M3, None, transpose=True)
        dyq, dys, dyqt = quantize_with_t(dy, recipe.grad_dtype)
        return scaled_mm_nt(dyq, dys, wtq, ws, dy.dtype), (dyq, dys, dyqt)
    x, w = saved
    if recipe.name == "rowwise":
        dyq, dys = quantize(dy, E4M3, -1)
        wtq, wts = quantize_weight(w, E4M3, -1, transpose=True)  # per input feature, over N
        return scaled_mm_nt(dyq, dys, wtq, wts, dy.dtype), None
    return blockwise_mm_nt(dy, w.t().contiguous(), dy.dtype), None


def linear_wgrad(dy: torch.Tensor, saved: tuple, dy_q: Optional[tuple], recipe: Fp8Recipe) -> torch.Tensor:
    """dw = dy [M, N]^T @ x [M, K] in fp32 (the reduction over tokens; rows padded to 16 for the kernel)."""
    if recipe.name == "tensorwise":
        xq, xs, _, xqt = saved
        dyq, dys, dyqt = dy_q
        a = dyqt if dyqt is not None else transpose_padded(dyq)
        b = xqt if xqt is not None else transpose_padded(xq)
        return scaled_mm_nt(a, dys, b, xs, torch.float32)
    x, _ = saved
    if recipe.name == "rowwise":
        aq, as_ = quantize_rowwise_t(dy, E4M3)
        bq, bs = quantize_rowwise_t(x, E4M3)
        return scaled_mm_nt(aq, as_, bq, bs, torch.bfloat16).float()
    return (dy.t() @ x).float()


# ------------------------------------------------------------------------------------------------ grouped GEMMs


def grouped_mm_fp8(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, w_transposed: bool = False) -> torch.Tensor:
    """Rowwise-scaled e4m3 x [T, K] @ w[e] [K, N] per row group (offs [E] int32 cumulative), bf16 out; with
    `w_transposed`, w is given as [E, N, K] and w[e]^T is used (the dgrad of the experts)."""
    xq, xs = quantize(x, E4M3, -1)  # per token
    # per (expert, output column), over K; stored [E, N, K] row-major = the kernel's column-major [E, K, N]
    wtq, wts = quantize_weight(w, E4M3, -1, transpose=not w_transposed)
    if kernel_backend() == "emulate" or not x.is_cuda:
        deq_x, deq_w = xq.float() * xs, (wtq.float() * wts).transpose(-2, -1)
        out = x.new_zeros(x.shape[0], deq_w.shape[-1])
        start = 0
        for e, end in enumerate(offs.tolist()):
            out[start:end] = (deq_x[start:end] @ deq_w[e]).to(out.dtype)
            start = end
        return out
    return torch._scaled_grouped_mm(xq, wtq.transpose(-2, -1), xs.reshape(-1), wts.reshape(wts.shape[0], -1),
                                    offs=offs, out_dtype=x.dtype)


# ------------------------------------------------------------------------------------------------ GPU check


_STATE: dict = {}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=_EPS))


def numerical_check(recipe: Fp8Recipe, device: str = "cuda") -> dict[str, float]:
    """Relative errors of every FP8 op of `recipe` against fp32 (raises if an op fails to run). FP8 e4m3 has
    3 mantissa bits: a random GEMM lands near 3-4% relative error; a wrong layout or scale is ~100%."""
    g = torch.Generator(device=device).manual_seed(0)
    M, K, N, E = 200, 256, 384, 4
    x = torch.randn(M, K, device=device, generator=g).bfloat16()
    w = torch.randn(N, K, device=device, generator=g).bfloat16() * 0.02
    dy = torch.randn(M, N, device=device, generator=g).bfloat16() * 1e-3
    errs = {}
    y, saved = linear_forward(x, w, recipe)
    errs["forward"] = _rel_err(y, x.float() @ w.float().t())
    dx, dyq = linear_dgrad(dy, saved, recipe)
    errs["dgrad"] = _rel_err(dx, dy.float() @ w.float())
    dw = linear_wgrad(dy, saved, dyq, recipe)
    errs["wgrad"] = _rel_err(dw, dy.float().t() @ x.float())
    we = torch.randn(E, K, N, device=device, generator=g).bfloat16() * 0.02
    counts = [37, 0, 100, 63]  # an empty group, sizes not multiples of 16
    offs = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
    ye = grouped_mm_fp8(x, we, offs)
    ref, start = [], 0
    for e, c in enumerate(counts):
        ref.append(x[start:start + c].float() @ we[e].float())
        start += c
    errs["grouped"] = _rel_err(ye, torch.cat(ref))
    return errs


def _probe(recipe: Fp8Recipe) -> Optional[str]:
    """None when every op of `recipe` runs on this GPU within 8% of fp32, else the reason."""
    layouts = (0, 1, 2, 3) if recipe.name == "blockwise" else (0,)
    reasons = []
    for layout in layouts:
        _STATE["block_layout"] = layout
        try:
            errs = numerical_check(recipe)
        except Exception as err:  # noqa: BLE001 - an op missing in this torch or refused by cuBLAS/CUTLASS
            reasons.append(f"{type(err).__name__}: {str(err)[:200]}")
            continue
        bad = {k: round(v, 4) for k, v in errs.items() if not v < 0.08}
        if not bad:
            _STATE["errors", recipe] = errs
            return None
        reasons.append(f"wrong numbers (relative error {bad})")
    return " | ".join(dict.fromkeys(reasons))


def fp8_unsupported_reason(recipe: Fp8Recipe) -> Optional[str]:
    """Why FP8 `recipe` cannot train here (no CUDA, compute capability < 9.0, an op missing or wrong), or None."""
    if kernel_backend() == "emulate":
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (FP8 GEMMs need an NVIDIA Hopper GPU or newer)"
    major, minor = torch.cuda.get_device_capability()
    if major < 9:
        return (f"{torch.cuda.get_device_name()} has compute capability {major}.{minor}; FP8 training here needs "
                "9.0 or newer (Hopper: H100 / H200)")
    key = ("reason", recipe)
    if key not in _STATE:
        _STATE[key] = _probe(recipe)
    return _STATE[key]


def check_fp8_supported(recipe: Fp8Recipe) -> None:
    """Raise ValueError naming the key and the fix when `recipe` cannot run on this machine."""
    reason = fp8_unsupported_reason(recipe)
    if reason:
        raise ValueError(f"`fp8`: FP8 training ({recipe.fp8_format}, fp8_recipe: {recipe.name}) cannot run here: "
                         f"{reason}. Fix: remove fp8 (train in bf16)"
                         + (", or use fp8_recipe: tensorwise" if recipe.name != "tensorwise" else "") + ".")


def check_errors(recipe: Fp8Recipe) -> Optional[dict]:
    """The relative errors the GPU check measured for `recipe` (None before / without a check)."""
    return _STATE.get(("errors", recipe))


# ------------------------------------------------------------------------------------------------ autograd


def _all_gather_seq(t: torch.Tensor, group) -> torch.Tensor:
    out = t.new_empty(t.shape[0] * group.size(), *t.shape[1:])
    torch.distributed.all_gather_into_tensor(out, t.contiguous(), group=group)
    return out


class _Fp8Linear(torch.autograd.Function):
    """megatron's LinearWithGradAccumulationAndAsyncCommunication with FP8 GEMMs: the same arguments, the same
    communication (SP all-gather in forward, all-reduce or reduce-scatter of dgrad in backward), the weight
    gradient accumulated into `main_grad` under gradient_accumulation_fusion."""

    @staticmethod
    def forward(ctx, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                tp_group, recipe):
        total = _all_gather_seq(input, tp_group) if sequence_parallel else input
        shape = total.shape
        x2d = total.reshape(-1, shape[-1])
        if x2d.dtype != weight.dtype:
            x2d = x2d.to(weight.dtype)
        y, saved = linear_forward(x2d, weight, recipe)
        ctx.recipe, ctx.saved = recipe, saved
        ctx.weight = weight  # main_grad is looked up on it in backward
        ctx.in_shape, ctx.in_dtype = input.shape, input.dtype
        ctx.use_bias, ctx.fusion = bias is not None, gradient_accumulation_fusion
        ctx.allreduce_dgrad, ctx.sequence_parallel, ctx.tp_group = allreduce_dgrad, sequence_parallel, tp_group
        y = y.reshape(*shape[:-1], y.shape[-1])
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx, grad_output):
        recipe, saved, weight = ctx.recipe, ctx.saved, ctx.weight
        dy = grad_output.reshape(-1, grad_output.shape[-1]).contiguous()
        if dy.dtype != weight.dtype:
            dy = dy.to(weight.dtype)
        dx, dy_q = linear_dgrad(dy, saved, recipe)
        dx = dx.reshape(*grad_output.shape[:-1], dx.shape[-1]).to(ctx.in_dtype)
        handle = None
        if ctx.sequence_parallel:
            sub = dx.new_empty(ctx.in_shape)
            handle = torch.distributed.reduce_scatter_tensor(sub, dx.contiguous(), group=ctx.tp_group, async_op=True)
        elif ctx.allreduce_dgrad:
            handle = torch.distributed.all_reduce(dx, group=ctx.tp_group, async_op=True)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            dw = linear_wgrad(dy, saved, dy_q, recipe)
            if ctx.fusion and hasattr(weight, "main_grad"):
                weight.main_grad.add_(dw)
                # as megatron: a placeholder gradient; the DDP hook sees grad_added_to_main_grad
                grad_weight = torch.empty(weight.main_grad.shape, dtype=weight.dtype, device=dw.device)
                if getattr(weight, "zero_out_wgrad", False):
                    grad_weight.zero_()
                weight.grad_added_to_main_grad = True
            else:
                grad_weight = dw.to(weight.dtype)
        grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0) if ctx.use_bias else None
        ctx.saved = None
        if handle is not None:
            handle.wait()
        if ctx.sequence_parallel:
            dx = sub
        return dx, grad_weight, grad_bias, None, None, None, None, None


class Fp8ForwardImpl:
    """Replaces a Column/RowParallelLinear's `_forward_impl` (megatron's linear function) by the FP8 one."""

    def __init__(self, recipe: Fp8Recipe):
        self.recipe = recipe

    def __call__(self, input, weight, bias, gradient_accumulation_fusion, allreduce_dgrad, sequence_parallel,
                 grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=None, **_):
        from megatron.core.tensor_parallel.layers import get_tensor_model_parallel_group_if_none

        tp_group = get_tensor_model_parallel_group_if_none(tp_group)
        return _Fp8Linear.apply(input, weight, bias, gradient_accumulation_fusion and weight.requires_grad,
                                allreduce_dgrad, sequence_parallel, tp_group, self.recipe)


class _Fp8GroupedMM(torch.autograd.Function):
    """FP8 grouped GEMM of the experts: forward and dgrad rowwise e4m3, wgrad bf16 (one grouped GEMM)."""

    @staticmethod
    def forward(ctx, x, w, offs):
        ctx.save_for_backward(x, w, offs)
        return grouped_mm_fp8(x, w, offs)

    @staticmethod
    def backward(ctx, dy):
        from llamafactory_mca.kernels.grouped_gemm import backend_for, grouped_weight_grad

        x, w, offs = ctx.saved_tensors
        dy = dy.contiguous()
        dx = grouped_mm_fp8(dy, w, offs, w_transposed=True) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            dw = grouped_weight_grad(x, dy, offs, w.shape[0], backend_for(x, w))
        return dx, dw, None


def fp8_grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The experts' x [T, K] @ w[e] [K, N] per row group in FP8 (see `_Fp8GroupedMM`)."""
    return _Fp8GroupedMM.apply(x, w, offs)


# ------------------------------------------------------------------------------------------------ conversion

# the linears of a transformer layer that run in FP8 (the output layer, embedding and router stay bf16)
FP8_LINEARS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


def fp8_eligible(module: torch.nn.Module, recipe: Fp8Recipe) -> bool:
    """Whether a linear's per-rank weight has the shape the FP8 kernels need (multiples of 16, or 128 blockwise)."""
    w = getattr(module, "weight", None)
    m = recipe.min_multiple()
    return isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] % m == 0 and w.shape[1] % m == 0


def convert_model_to_fp8(model: torch.nn.Module, recipe: Fp8Recipe) -> list[str]:
    """Make the transformer layers' TP linears and grouped-GEMM experts of `model` compute in FP8 (their
    parameters, state dict and checkpoints are untouched); returns the names of the converted modules.
    A linear whose shard shape the kernels cannot take stays bf16."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from llamafactory_mca.kernels.experts import TorchGroupedMLP

    converted = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and leaf in FP8_LINEARS and ".layers." in f".{name}":
            if fp8_eligible(module, recipe):
                module._forward_impl = Fp8ForwardImpl(recipe)
                module.fp8_recipe = recipe
                converted.append(name)
        elif isinstance(module, TorchGroupedMLP):
            h, f = module.config.hidden_size, module.weight2.shape[0] // module.num_local_experts
            if h % 16 == 0 and f % 16 == 0:
                module.fp8_recipe = recipe
                converted.append(name)
    return converted


def _bench_linear(recipe: Optional[Fp8Recipe], m: int = 8192, k: int = 4096, n: int = 14336, reps: int = 10) -> float:
    """Seconds of one forward + backward of an [m, k] x [k, n] linear (bf16 when recipe is None)."""
    from llamafactory_mca.kernels.timing import cuda_time_ms

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    return cuda_time_ms(lambda: (x @ w.t() if recipe is None else _Fp8Linear.apply(
        x, w, None, False, False, False, None, recipe)).backward(torch.ones(m, n, device="cuda", dtype=torch.bfloat16)),
        reps, warmup=3) / 1000


def _bench_casts(m: int = 8192, k: int = 4096) -> dict[str, float]:
    """Milliseconds of each cast of a [m, k] bf16 operand: the Triton casts and `quantize_eager` (eager and, where
    it compiles, torch.compile'd)."""
    from llamafactory_mca.kernels.timing import cuda_time_ms

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    out = {
        "triton_rowwise": lambda: fp8_cast.cast_rowwise(x, E4M3),
        "triton_tensorwise": lambda: fp8_cast.cast_tensorwise(x, E4M3),
        "triton_tensorwise_plus_transposed": lambda: fp8_cast.cast_tensorwise(x, E4M3, transposed=True),
        "triton_rowwise_of_transpose_padded": lambda: fp8_cast.cast_rowwise_t(x, E4M3),
        "eager_rowwise": lambda: quantize_eager(x, E4M3, -1),
        "eager_tensorwise": lambda: quantize_eager(x, E4M3, None),
        "eager_rowwise_of_transpose_padded": lambda: quantize_eager(_pad_rows(x).t(), E4M3, -1)[0].contiguous(),
    }
    compiled = _compiled_quantize()
    if compiled is not None:
        out.update(compiled_rowwise=lambda: compiled(x, E4M3, -1), compiled_tensorwise=lambda: compiled(x, E4M3, None))
    timed = {}
    for name, fn in out.items():
        try:
            timed[name] = round(cuda_time_ms(fn, reps=20, warmup=3), 4)
        except Exception as err:  # noqa: BLE001 - a report: say what failed, time the rest
            timed[name] = f"{type(err).__name__}: {str(err)[:120]}"
    return timed


if __name__ == "__main__":  # the GPU check as a report: python -m llamafactory_mca.kernels.fp8
    import json

    report = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "cast": cast_backend(), "cast_reason": cast_reason()}
    for name in FP8_RECIPES:
        for fmt in FP8_FORMATS:
            if fmt == "hybrid" and name != "tensorwise":
                continue
            r = Fp8Recipe(name, fmt)
            reason = fp8_unsupported_reason(r)
            report[f"{name}/{fmt}"] = {"ok": reason is None, "reason": reason, "rel_err": check_errors(r)}
            if reason is None and torch.cuda.is_available():
                report[f"{name}/{fmt}"]["linear_fwd_bwd_s"] = _bench_linear(r)
                if report["cast"] == "triton":  # the same linear on the torch casts, for comparison
                    _STATE["cast"] = "torch"
                    report[f"{name}/{fmt}"]["linear_fwd_bwd_s_torch_casts"] = _bench_linear(r)
                    _STATE["cast"] = "triton"
    if torch.cuda.is_available():
        report["bf16_linear_fwd_bwd_s"] = _bench_linear(None)
        report["cast_ms_8192x4096"] = _bench_casts()
    print(json.dumps(report, indent=1))
