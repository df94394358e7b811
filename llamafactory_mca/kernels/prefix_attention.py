"""Bottom-right causal attention as two SDPA kernel calls merged by their log-sum-exps (issue 22).

Under context parallelism a query chunk at offset `o` of its sequence attends to keys 0 ... o + i (query i). That
is an unmasked block (the queries against keys [0, o)) plus a causal diagonal block (against keys [o, o + lq)).
torch's flash kernel with `causal_lower_right` computes it in one call but, on an H200 at 8k x 32k, ~1.5x slower
than cuDNN does the whole block unmasked; cuDNN takes neither the lower-right bias nor lq != lk with `is_causal`.
`split_lower_right_causal` runs cuDNN on each block (`torch.ops.aten._scaled_dot_product_cudnn_attention`, which
returns the log-sum-exp), merges the two partial outputs exactly (`merge_partials`), and in backward calls each
block's kernel backward with the merged output and log-sum-exp (as torch's ring attention does in
torch/distributed/tensor/experimental/_attention.py): the gradients are those of the whole softmax.

`split_kernel(q)` chooses, once per device and dtype, by a numeric self-check against SDPA with the lower-right
bias (forward and gradients): "cudnn" where it passes, else None (the caller keeps `lower_right_causal`'s flash
path). On CPU the split runs with torch's CPU flash kernel ("cpu"; tests only: the CPU path of the model keeps
SDPA with the bias). Dropout is not supported by the split (the caller keeps SDPA when dropout_p > 0).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

aten = torch.ops.aten


def merge_partials(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                   lse_b: torch.Tensor) -> tuple:
    """Softmax attention over the union of two disjoint key sets from each set's result: outputs [..., lq, d] and
    natural log-sum-exps [..., lq] of the scaled scores. Returns (output in out_a's dtype, log-sum-exp), computed
    in fp32 at least: out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse), lse = log(exp(lse_a) +
    exp(lse_b))."""
    acc = _accumulation_dtype(out_a.dtype)
    lse_a, lse_b = lse_a.to(acc), lse_b.to(acc)
    lse = torch.logaddexp(lse_a, lse_b)
    wa = torch.exp(lse_a - lse).unsqueeze(-1)
    wb = torch.exp(lse_b - lse).unsqueeze(-1)
    out = out_a.to(acc) * wa + out_b.to(acc) * wb
    return out.to(out_a.dtype), lse


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _Block(NamedTuple):
    """What one kernel call's backward needs from its forward, besides the inputs and the merged output."""

    lse_shape: tuple  # the log-sum-exp's shape as the kernel returned it ([b, h, lq] or [b, h, lq, 1])
    saved: tuple  # kernel-specific extra outputs (rng state, cumulative lengths, ...)


class _Kernel(NamedTuple):
    forward: Callable  # (q, k, v, is_causal, scale) -> (out, lse, _Block)
    backward: Callable  # (dout, q, k, v, out, lse, block, is_causal, scale) -> (dq, dk, dv)
    grouped: bool  # takes K/V with fewer heads than Q as they are


def _cudnn_forward(q, k, v, is_causal, scale):
    res = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, is_causal, False, scale=scale)
    return res[0], res[1], _Block(tuple(res[1].shape), tuple(res[2:8]))


def _cudnn_backward(dout, q, k, v, out, lse, block, is_causal, scale):
    cum_q, cum_k, max_q, max_k, seed, offset = block.saved
    return aten._scaled_dot_product_cudnn_attention_backward(
        dout, q, k, v, out, lse, seed, offset, None, cum_q, cum_k, max_q, max_k, 0.0, is_causal, scale=scale)[:3]


def _cpu_forward(q, k, v, is_causal, scale):
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)
    return out, lse, _Block(tuple(lse.shape), ())


def _cpu_backward(dout, q, k, v, out, lse, block, is_causal, scale):
    return aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout, q, k, v, out, lse, 0.0, is_causal, scale=scale)[:3]


KERNELS = {
    "cudnn_gqa": _Kernel(_cudnn_forward, _cudnn_backward, grouped=True),
    "cudnn": _Kernel(_cudnn_forward, _cudnn_backward, grouped=False),
    "cpu": _Kernel(_cpu_forward, _cpu_backward, grouped=False),
}
CUDA_PREFERENCE = ("cudnn_gqa", "cudnn")  # the first that passes the self-check is used


def _block_kv(k: torch.Tensor, v: torch.Tensor, lo: int, hi: int, rep: int) -> tuple:
    """Keys / values [lo, hi), heads repeated `rep` times (for kernels without grouped K/V), contiguous."""
    kb, vb = k[:, :, lo:hi], v[:, :, lo:hi]
    if rep > 1:
        kb, vb = kb.repeat_interleave(rep, dim=1), vb.repeat_interleave(rep, dim=1)
    return kb.contiguous(), vb.contiguous()


def _sum_heads(grad: torch.Tensor, rep: int) -> torch.Tensor:
    if rep == 1:
        return grad
    b, h, s, d = grad.shape
    return grad.view(b, h // rep, rep, s, d).sum(2)


class _SplitLowerRightCausal(torch.autograd.Function):
    """Keys [0, prefix) unmasked + keys [prefix, lk) causal, merged by log-sum-exp; see the module docstring.
    Saves the grouped K/V (repeated again in backward where the kernel needs it), the merged output and lse."""

    @staticmethod
    def forward(ctx, q, k, v, scale, kernel_name):
        kernel = KERNELS[kernel_name]
        lq, lk = q.shape[2], k.shape[2]
        rep = 1 if kernel.grouped else q.shape[1] // k.shape[1]
        q = q.contiguous()
        ctx.spans = ((0, lk - lq, False), (lk - lq, lk, True))
        results = [kernel.forward(q, *_block_kv(k, v, lo, hi, rep), causal, scale) for lo, hi, causal in ctx.spans]
        (out_a, lse_a, block_a), (out_b, lse_b, block_b) = results
        rows = (q.shape[0], q.shape[1], lq)
        out, lse = merge_partials(out_a, lse_a.reshape(rows), out_b, lse_b.reshape(rows))
        ctx.kernel_name, ctx.scale, ctx.rep, ctx.blocks = kernel_name, scale, rep, (block_a, block_b)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        kernel = KERNELS[ctx.kernel_name]
        q, k, v, out, lse = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dks, dvs = None, [], []
        for (lo, hi, causal), block in zip(ctx.spans, ctx.blocks):
            kb, vb = _block_kv(k, v, lo, hi, ctx.rep)
            dqx, dkx, dvx = kernel.backward(dout, q, kb, vb, out, lse.reshape(block.lse_shape), block, causal,
                                            ctx.scale)
            dq = dqx.to(_accumulation_dtype(dqx.dtype)) if dq is None else dq + dqx
            dks.append(_sum_heads(dkx, ctx.rep))
            dvs.append(_sum_heads(dvx, ctx.rep))
        return dq.to(q.dtype), torch.cat(dks, dim=2), torch.cat(dvs, dim=2), None, None


def split_lower_right_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                             kernel: str = "cudnn") -> torch.Tensor:
    """Queries q [b, h, lq, d] as the last lq rows of a sequence whose keys are k / v [b, g, lk, d] (lk > lq, g
    divides h): query i sees keys 0 ... lk - lq + i. Two calls of `kernel` ("cudnn" on CUDA, "cpu" on CPU) merged
    by log-sum-exp, differentiable (no dropout). A kernel name from `KERNELS`."""
    if k.shape[2] <= q.shape[2]:
        raise ValueError(f"split_lower_right_causal: {k.shape[2]} keys for {q.shape[2]} queries; needs more keys")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _SplitLowerRightCausal.apply(q, k, v, float(scale), kernel)


_CHOICE: dict = {}


def split_kernel(q: torch.Tensor) -> Optional[str]:
    """The kernel `split_lower_right_causal` uses for CUDA tensors like q ("cudnn_gqa": cuDNN with grouped K/V
    heads as they are, else "cudnn": K/V heads repeated), or None where the split is not
    to be used (CPU, other dtypes, or cuDNN failing the self-check: forward and q/k/v gradients against SDPA with
    the lower-right causal bias, at bf16 tolerance, once per device and dtype)."""
    if not q.is_cuda or q.dtype not in (torch.bfloat16, torch.float16):
        return None
    key = (q.device.index, q.dtype)
    if key not in _CHOICE:
        _CHOICE[key] = next((name for name in CUDA_PREFERENCE if _self_check(name, q.device, q.dtype)), None)
    return _CHOICE[key]


SELF_CHECK_TOLERANCE = 2e-2  # on |split - reference| / (1 + |reference|), bf16 outputs and gradients


def _self_check(kernel: str, device: torch.device, dtype: torch.dtype) -> bool:
    try:
        return reference_error(kernel, device, dtype) < SELF_CHECK_TOLERANCE
    except Exception:  # a torch / cuDNN without these ops or shapes: keep the flash path
        return False


def reference_error(kernel: str, device: torch.device, dtype: torch.dtype) -> float:
    """Largest |split - reference| / (1 + |reference|) over the output and q/k/v gradients of a small grouped
    problem (4 query heads, 2 K/V groups, 192 queries, 640 keys), the reference being fp32 SDPA with the
    lower-right causal bias. Raises where the kernel cannot run."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import causal_lower_right

    with torch.enable_grad(), torch.autocast(device_type=device.type, enabled=False):
        g = torch.Generator(device=device).manual_seed(0)
        heads, groups, lq, lk, d = 4, 2, 192, 640, 128
        q = torch.randn(1, heads, lq, d, device=device, generator=g).to(dtype).requires_grad_()
        k, v = (torch.randn(1, groups, lk, d, device=device, generator=g).to(dtype).requires_grad_()
                for _ in range(2))
        dy = torch.randn(1, heads, lq, d, device=device, generator=g).to(dtype)
        out = split_lower_right_causal(q, k, v, 0.1, kernel)
        grads = torch.autograd.grad(out, (q, k, v), dy)
        acc = _accumulation_dtype(dtype)
        qf, kf, vf = (x.detach().to(acc).requires_grad_() for x in (q, k, v))
        rep = heads // groups
        ref = F.scaled_dot_product_attention(qf, kf.repeat_interleave(rep, 1), vf.repeat_interleave(rep, 1),
                                             attn_mask=causal_lower_right(lq, lk), scale=0.1)
        ref_grads = torch.autograd.grad(ref, (qf, kf, vf), dy.to(acc))
    errors = []
    for x, y in [(out, ref)] + list(zip(grads, ref_grads)):
        if x.shape != y.shape:
            return float("inf")
        errors.append(float(((x.detach().to(acc) - y.detach()).abs() / (1 + y.detach().abs())).max()))
    return max(errors)
