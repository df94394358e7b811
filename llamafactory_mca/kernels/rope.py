"""Rotary position embedding in one kernel forward and one backward, without Transformer Engine.

megatron-core's unfused RoPE (`rope_utils._apply_rotary_pos_emb_bshd`, what runs when `apply_rope_fusion` has no
TE kernel) launches about a dozen small kernels per call (cos, sin, casts, neg, cat, two muls, an add, a cat
with the empty non-rotary part) and about as many again in backward; a dense layer calls it for q and for k,
each micro-batch. On one GPU with short kernels (benchmarks s1: 16 layers x 8 micro-batches) these launches, not
the GPU, set the step time. Here the same formula, `t * cos(f) + rotate_half(t) * sin(f)`, goes through
torch.compile: one Triton kernel forward, one backward. cos / sin are taken once per angle tensor (megatron's
rotary embedding returns the same cached tensor to every layer and micro-batch) and kept on it.

Measured (benchmarks/run.py s1 on one H200, exploratory run of commit 19debc2 with cos / sin still inside the
kernel, `ours_rope` against `ours` in one invocation): step 0.606 s against 0.688 s, the 512 `cat` and 768 of the
1288 bf16 `add` kernels of a step gone, losses within 5e-4 of megatron's unfused RoPE.

Arithmetic: megatron rounds cos / sin to the input dtype (kept here) and each product to bf16 before adding; the
compiled kernel keeps the products in fp32 and rounds once (within one bf16 rounding of megatron's result).
Installed only on CUDA after a numeric check on the current GPU (`install_rope_fusion`); the cases it does not
cover (interleaved rotary, multi-latent attention, partial rotary, an `mscale`, CPU tensors) keep megatron's own
function.

    from llamafactory_mca.kernels.rope import install_rope_fusion
    install_rope_fusion()   # True when megatron's bshd RoPE now runs on the fused kernel
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

_STATE: dict[str, Any] = {}


def rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """t * cos + rotate_half(t) * sin (non-interleaved halves)."""
    x1, x2 = torch.chunk(t, 2, dim=-1)
    return t * cos + torch.cat((-x2, x1), dim=-1) * sin


def cos_sin(freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin of the angles in `dtype`, as megatron rounds them."""
    return torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)


def rope_reference(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """t [s, b, h, d] rotated by the angles freqs [s, 1 or b, 1, d] (non-interleaved halves), in t's dtype."""
    return rotate(t, *cos_sin(freqs, t.dtype))


def _compiled() -> Callable:
    if "fn" not in _STATE:
        _STATE["fn"] = torch.compile(rotate, dynamic=None)
    return _STATE["fn"]


def _cached_cos_sin(freqs: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`cos_sin`, kept on the angle tensor (megatron's rotary embedding hands the same one to every call)."""
    cached = getattr(freqs, "_mca_cos_sin", None)
    if cached is None or cached[0].dtype != dtype or freqs.requires_grad:
        cached = cos_sin(freqs, dtype)
        if not freqs.requires_grad:
            freqs._mca_cos_sin = cached
    return cached


def fused_rope(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """`rope_reference` on the compiled kernel (CUDA tensors)."""
    return _compiled()(t, *_cached_cos_sin(freqs, t.dtype))


def _works_here() -> bool:
    """The compiled kernel runs on this GPU and matches megatron's formula, forward and backward."""
    if not torch.cuda.is_available():
        return False
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        t = torch.randn(64, 1, 2, 32, device="cuda", generator=g).bfloat16().requires_grad_(True)
        freqs = torch.rand(64, 1, 1, 32, device="cuda", generator=g) * 6
        grad = torch.randn(64, 1, 2, 32, device="cuda", generator=g).bfloat16()
        want = rope_reference(t.float(), freqs)
        (want_grad,) = torch.autograd.grad(want, t, grad.float())
        got = fused_rope(t, freqs)
        (got_grad,) = torch.autograd.grad(got, t, grad)
        return bool(torch.allclose(got.float(), want, rtol=2e-2, atol=2e-2)
                    and torch.allclose(got_grad.float(), want_grad.float(), rtol=2e-2, atol=2e-2))
    except Exception:  # no Triton / compiler here
        return False


def _patched(original: Callable) -> Callable:
    def apply_bshd(t: torch.Tensor, freqs: torch.Tensor, rotary_interleaved: bool = False,
                   multi_latent_attention: bool = False, mscale: float = 1.0) -> torch.Tensor:
        if (t.is_cuda and not rotary_interleaved and not multi_latent_attention and mscale == 1.0
                and freqs.shape[-1] == t.shape[-1]):
            return fused_rope(t, freqs)
        return original(t, freqs, rotary_interleaved=rotary_interleaved,
                        multi_latent_attention=multi_latent_attention, mscale=mscale)

    apply_bshd.original = original
    return apply_bshd


def install_rope_fusion() -> bool:
    """Route megatron's bshd RoPE to `fused_rope` where it applies. Idempotent."""
    if "installed" in _STATE:
        return _STATE["installed"]
    ok = _works_here()
    if ok:
        from megatron.core.models.common.embeddings import rope_utils

        rope_utils._apply_rotary_pos_emb_bshd = _patched(rope_utils._apply_rotary_pos_emb_bshd)
    _STATE["installed"] = ok
    return ok


def installed() -> Optional[bool]:
    """True / False once `install_rope_fusion` ran, None before."""
    return _STATE.get("installed")
