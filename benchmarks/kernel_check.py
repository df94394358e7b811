"""GPU check of this round's kernels (issue 22), one JSON line on stdout:

    python benchmarks/kernel_check.py

* cp_attention: one CP rank's core attention at s4x2's shape (Llama-3-8B heads: 32 queries, 8 K/V groups, head
  dim 128; 32768 tokens, cp=2: chunks of 8192, rank r holds chunks r and 3-r), forward + backward, bf16.
  `before`: each query chunk against the key prefix up to its end with a materialised boolean causal mask and
  K/V repeated per query head (models/attention.py up to c1a2d75); `flash`: `lower_right_causal_sdpa` (bottom-right
  causal bias, flash kernel, grouped K/V; 12f52c5); `now`: `lower_right_causal` (cuDNN over the unmasked key prefix
  + cuDNN causal diagonal, merged by log-sum-exp, where cuDNN passes its self-check: `split_kernel` says which).
  `full_causal_32k` is one whole-sequence causal attention (HF's work per sample) for scale. Also the largest
  output / gradient difference of `flash` and `now` against `before`.
* lower_right_backends: rank 0's far chunk alone (8192 queries against 32768 keys, bottom-right causal), forward +
  backward, by each SDPA kernel that can take it: flash with grouped K/V (what `lower_right_causal` picks), flash
  with K/V repeated, memory-efficient (its own lower-right mask type, K/V repeated), the two-call split with cuDNN
  (grouped K/V as they are / repeated); and, as bounds, the same shapes with no mask at all (cuDNN / flash).
* diagonal_chunk: the chunk at position 0 (8192 queries, plain causal): SDPA's own choice vs cuDNN forced.
* self_check: `reference_error` of each split kernel (the once-per-device check's number) and `split_kernel`.
* delta_rule (issue 15): the gated delta rule at Qwen3-Next-80B-A3B's linear-attention shape (32 value / 16 key
  heads of 128 channels, 4096 tokens, bf16 in), forward + backward: ours (kernels/linear_attention's torch path:
  one triangular solve, state-only loop), transformers' `torch_chunk_gated_delta_rule` (what HF's path runs
  without fla), and fla's Triton kernel where it passes our check; with each one's largest difference to the
  reference (output and input gradients).

    python benchmarks/kernel_check.py --only delta_rule     # one check
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from llamafactory_mca.kernels.timing import cuda_time_ms  # noqa: E402

from llamafactory_mca.kernels import prefix_attention  # noqa: E402
from llamafactory_mca.models.attention import causal_band, lower_right_causal, lower_right_causal_sdpa  # noqa: E402


def _masked_prefix(q, k, v, offset):
    """The c1a2d75 path: boolean mask (diagonal shifted by the offset), K/V repeated per query head."""
    rep = q.shape[1] // k.shape[1]
    mask = causal_band(q.shape[2], k.shape[2], offset, None, q.device)
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          attn_mask=mask)


def _rank_attention(q, k, v, chunk, cp, rank, fn):
    """Every local chunk of `rank` against the key prefix up to its end; the chunk at position 0 is plain causal."""
    outs = []
    for i, m in enumerate((rank, 2 * cp - 1 - rank)):
        qi = q[:, :, i * chunk:(i + 1) * chunk]
        ki, vi = k[:, :, :(m + 1) * chunk], v[:, :, :(m + 1) * chunk]
        if m == 0:
            outs.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=True))
        else:
            outs.append(fn(qi, ki, vi, m * chunk))
    return torch.cat(outs, 2)


def _backend(backend):
    """SDPA restricted to `backend`; None: SDPA's own choice (and the split's private ops, which ignore it)."""
    from torch.nn.attention import sdpa_kernel

    return contextlib.nullcontext() if backend is None else sdpa_kernel([backend])


def _fwd_bwd(fn, inputs, grad):
    def run():
        for t in inputs:
            t.grad = None
        fn().backward(grad)
    return run


def check_cp_attention(seq: int = 32768, cp: int = 2, heads: int = 32, groups: int = 8, dim: int = 128) -> dict:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    chunk = seq // (2 * cp)
    k = torch.randn(1, groups, seq, dim, device=dev, generator=g).bfloat16().requires_grad_()
    v = torch.randn(1, groups, seq, dim, device=dev, generator=g).bfloat16().requires_grad_()
    out: dict = dict(seq=seq, cp=cp, heads=heads, groups=groups, head_dim=dim)
    for rank in range(cp):
        q = torch.randn(1, heads, 2 * chunk, dim, device=dev, generator=g).bfloat16().requires_grad_()
        dy = torch.randn(1, heads, 2 * chunk, dim, device=dev, generator=g).bfloat16()
        res = {}
        for name, fn in (("before", _masked_prefix), ("flash", lambda a, b, c, off: lower_right_causal_sdpa(a, b, c)),
                         ("now", lambda a, b, c, off: lower_right_causal(a, b, c))):
            o = _rank_attention(q, k, v, chunk, cp, rank, fn)
            grads = torch.autograd.grad(o, (q, k, v), dy)
            res[name] = (o.float(), [x.float() for x in grads])
            torch.cuda.reset_peak_memory_stats()
            ms = cuda_time_ms(_fwd_bwd(lambda: _rank_attention(q, k, v, chunk, cp, rank, fn), (q, k, v), dy), 5)
            out[f"rank{rank}_{name}_ms"] = round(ms, 2)
            out[f"rank{rank}_{name}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        for name in ("flash", "now"):
            out[f"rank{rank}_{name}_out_max_abs_diff"] = float((res["before"][0] - res[name][0]).abs().max().detach())
            out[f"rank{rank}_{name}_grad_max_abs_diff"] = max(float((a - b).abs().max())
                                                              for a, b in zip(res["before"][1], res[name][1]))
    qf = torch.randn(1, heads, seq, dim, device=dev, generator=g).bfloat16().requires_grad_()
    dyf = torch.randn_like(qf)
    out["full_causal_32k_ms"] = round(cuda_time_ms(_fwd_bwd(
        lambda: F.scaled_dot_product_attention(qf, k, v, is_causal=True, enable_gqa=True), (qf, k, v), dyf), 5), 2)
    return out


def check_lower_right_backends(seq: int = 32768, heads: int = 32, groups: int = 8, dim: int = 128) -> dict:
    from torch.nn.attention import SDPBackend
    from torch.nn.attention.bias import causal_lower_right

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(1)
    lq = seq // 4
    q = torch.randn(1, heads, lq, dim, device=dev, generator=g).bfloat16().requires_grad_()
    k = torch.randn(1, groups, seq, dim, device=dev, generator=g).bfloat16().requires_grad_()
    v = torch.randn(1, groups, seq, dim, device=dev, generator=g).bfloat16().requires_grad_()
    dy = torch.randn_like(q)
    rep = heads // groups
    bias = causal_lower_right(lq, seq)
    variants = {
        "flash_gqa": (SDPBackend.FLASH_ATTENTION, lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias, enable_gqa=True)),
        "flash_repeat": (SDPBackend.FLASH_ATTENTION, lambda: F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=bias)),
        "efficient_repeat": (SDPBackend.EFFICIENT_ATTENTION, lambda: F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=bias)),
        "split_cudnn_gqa": (None, lambda: prefix_attention.split_lower_right_causal(q, k, v, kernel="cudnn_gqa")),
        "split_cudnn_repeat": (None, lambda: prefix_attention.split_lower_right_causal(q, k, v, kernel="cudnn")),
        "bound_no_mask_cudnn_repeat": (SDPBackend.CUDNN_ATTENTION, lambda: F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1))),
        "bound_no_mask_flash_gqa": (SDPBackend.FLASH_ATTENTION, lambda: F.scaled_dot_product_attention(
            q, k, v, enable_gqa=True)),
    }
    out: dict = dict(lq=lq, lk=seq, heads=heads, groups=groups)
    ref = None
    for name, (backend, fn) in variants.items():
        try:
            with _backend(backend):
                o = fn()
                if not name.startswith("bound") and ref is None:
                    ref = o.detach().float()
                elif not name.startswith("bound"):
                    out[f"{name}_max_abs_diff"] = float((o.detach().float() - ref).abs().max())
                out[f"{name}_ms"] = round(cuda_time_ms(_fwd_bwd(fn, (q, k, v), dy), 5), 2)
        except Exception as exc:
            out[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:200]
    return out


def check_diagonal_chunk(chunk: int = 8192, heads: int = 32, groups: int = 8, dim: int = 128) -> dict:
    from torch.nn.attention import SDPBackend

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(2)
    q = torch.randn(1, heads, chunk, dim, device=dev, generator=g).bfloat16().requires_grad_()
    k, v = (torch.randn(1, groups, chunk, dim, device=dev, generator=g).bfloat16().requires_grad_() for _ in range(2))
    dy = torch.randn_like(q)
    rep = heads // groups
    out: dict = dict(lq=chunk, heads=heads, groups=groups)
    variants = {
        "sdpa_default_gqa": (None, lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)),
        "cudnn_repeat": (SDPBackend.CUDNN_ATTENTION, lambda: F.scaled_dot_product_attention(
            q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)),
        "flash_gqa": (SDPBackend.FLASH_ATTENTION, lambda: F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True)),
    }
    for name, (backend, fn) in variants.items():
        try:
            with _backend(backend):
                out[f"{name}_ms"] = round(cuda_time_ms(_fwd_bwd(fn, (q, k, v), dy), 5), 2)
        except Exception as exc:
            out[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:200]
    return out


def check_self_check() -> dict:
    dev = torch.device("cuda")
    out: dict = {}
    for name in prefix_attention.CUDA_PREFERENCE:
        try:
            out[f"{name}_reference_error"] = prefix_attention.reference_error(name, dev, torch.bfloat16)
        except Exception as exc:
            out[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:300]
    out["split_kernel"] = prefix_attention.split_kernel(torch.empty(1, device=dev, dtype=torch.bfloat16))
    try:  # cuDNN's log-sum-exp against the scores' own (natural log, scaled scores expected)
        q, k = torch.randn(1, 2, 64, 128, device=dev).bfloat16(), torch.randn(1, 2, 96, 128, device=dev).bfloat16()
        res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, k, None, True, 0.0, False, False, scale=0.1)
        want = torch.logsumexp(0.1 * q.float() @ k.float().transpose(-1, -2), dim=-1)
        got = res[1].float().reshape(want.shape)
        out["cudnn_lse_shape"] = list(res[1].shape)
        out["cudnn_lse_max_abs_diff"] = float((got - want).abs().max())
        out["cudnn_lse_ratio_mean"] = float((got / want).mean())
    except Exception as exc:
        out["cudnn_lse_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return out


def check_delta_rule(seq: int = 4096, heads: int = 32, key_heads: int = 16, dim: int = 128) -> dict:
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    from llamafactory_mca.kernels import linear_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(1, seq, key_heads, dim, device="cuda", generator=gen).repeat_interleave(heads // key_heads, 2)
            for _ in range(2))
    v = torch.randn(1, seq, heads, dim, device="cuda", generator=gen)
    g = -torch.rand(1, seq, heads, device="cuda", generator=gen) * 0.5
    beta = torch.rand(1, seq, heads, device="cuda", generator=gen)
    inputs = [t.to(torch.bfloat16).requires_grad_(True) for t in (q, k, v, g, beta)]
    grad = torch.randn(1, seq, heads, dim, device="cuda", generator=gen, dtype=torch.bfloat16)

    def hf(*a):
        return torch_chunk_gated_delta_rule(*a[:3], g=a[3], beta=a[4], use_qk_l2norm_in_kernel=True)[0]

    kernels = {"hf_torch": hf, "ours_torch": linear_attention.torch_gated_delta_rule}
    if linear_attention.fla_matches_reference():
        kernels["fla"] = linear_attention.fla_gated_delta_rule
    results, ref = {}, None
    for name, fn in kernels.items():
        run = _fwd_bwd(lambda fn=fn: fn(*inputs), inputs, grad)
        run()
        got = [fn(*inputs).detach().float()] + [t.grad.float() for t in inputs]
        ref = ref or got
        results[name] = dict(fwd_bwd_ms=round(cuda_time_ms(run, reps=5), 2),
                             max_diff_vs_hf=[round((a - b).abs().max().item(), 5) for a, b in zip(got, ref)])
    results["chosen"] = linear_attention.kernel_name(torch.device("cuda"))
    return results


CHECKS = {"self_check": check_self_check, "cp_attention": check_cp_attention,
          "lower_right_backends": check_lower_right_backends, "diagonal_chunk": check_diagonal_chunk,
          "delta_rule": check_delta_rule}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    only = argv[argv.index("--only") + 1:] if "--only" in argv else list(CHECKS)
    out = dict(card=torch.cuda.get_device_name(0), torch=torch.__version__)
    for name, fn in ((name, CHECKS[name]) for name in only):
        try:
            out[name] = fn()
        except Exception as exc:  # one failing check still reports the other
            out[name] = dict(error=f"{type(exc).__name__}: {exc}"[:500])
        print(json.dumps({name: out[name]}), file=sys.stderr, flush=True)  # partial results if a later one hangs
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
