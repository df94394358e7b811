"""The gated delta rule (Qwen3-Next's linear attention), the kernel choice in one place.

    out = gated_delta_rule(query, key, value, g, beta)     # [b, s, heads, d] in, [b, s, heads, dv] out

Arithmetic (Yang et al., "Gated Delta Networks"; transformers' `torch_chunk_gated_delta_rule`): queries and keys
are L2-normalised (eps 1e-6), queries scaled by d ** -0.5; per head a state S [dk, dv] decays by exp(g_t), then
takes the delta-rule update S += k_t (beta_t (v_t - k_t S))^T, and o_t = q_t S.

* CUDA with flash-linear-attention (`fla`) importable: its Triton `chunk_gated_delta_rule` (what transformers'
  Qwen3-Next uses when fla is installed), after a one-time check on the GPU against the torch reference below
  (outputs and gradients); if the check fails or fla is absent, the torch reference is used.
* elsewhere (CPU tests): megatron-core's torch `torch_chunk_gated_delta_rule` (chunks of 64, fp32 inside), the
  same chunked arithmetic as transformers' fallback; megatron-core's `GatedDeltaNet` itself needs fla to build.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

_STATE: dict[str, Optional[Callable]] = {}


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dimension (fla's and transformers' l2norm)."""
    return x * torch.rsqrt((x * x).sum(dim=-1, keepdim=True) + eps)


def torch_gated_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                           beta: torch.Tensor) -> torch.Tensor:
    """The torch reference: l2-normalised q/k, megatron-core's chunked gated delta rule (fp32 inside)."""
    from megatron.core.ssm.gated_delta_net import torch_chunk_gated_delta_rule

    out, _ = torch_chunk_gated_delta_rule(l2norm(query), l2norm(key), value, g=g, beta=beta,
                                          use_qk_l2norm_in_kernel=False)
    return out


def fla_gated_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                         beta: torch.Tensor) -> torch.Tensor:
    """flash-linear-attention's Triton chunked kernel (l2 norm of q/k inside the kernel)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    out, _ = chunk_gated_delta_rule(query, key, value, g=g, beta=beta, initial_state=None,
                                    output_final_state=False, use_qk_l2norm_in_kernel=True)
    return out


def fla_matches_reference() -> bool:
    """fla imports, runs on this GPU and matches the torch reference (forward and input gradients, fp32 inputs,
    tolerance 2e-3: the kernel computes in tf32/bf16 blocks)."""
    if not torch.cuda.is_available():
        return False
    try:
        gen = torch.Generator(device="cuda").manual_seed(0)
        b, s, h, dk, dv = 2, 100, 4, 32, 16  # s not a multiple of the 64-token chunk on purpose
        shapes = [(b, s, h, dk), (b, s, h, dk), (b, s, h, dv)]
        q, k, v = (torch.randn(*shape, device="cuda", generator=gen) for shape in shapes)
        g = -torch.rand(b, s, h, device="cuda", generator=gen)
        beta = torch.rand(b, s, h, device="cuda", generator=gen)
        results = []
        for fn in (fla_gated_delta_rule, torch_gated_delta_rule):
            inputs = [t.clone().requires_grad_(True) for t in (q, k, v, g, beta)]
            out = fn(*inputs)
            out.square().sum().backward()
            results.append([out.detach()] + [t.grad for t in inputs])
        return all(torch.allclose(a, r, rtol=2e-3, atol=2e-3) for a, r in zip(*results))
    except Exception:  # fla missing, Triton unable to compile for this GPU, an API change
        return False


def chosen_kernel(device: torch.device) -> Callable:
    """The gated delta rule used for tensors on `device`: fla on a GPU where it passed the check, else torch."""
    if device.type != "cuda":
        return torch_gated_delta_rule
    if "cuda" not in _STATE:
        _STATE["cuda"] = fla_gated_delta_rule if fla_matches_reference() else torch_gated_delta_rule
    return _STATE["cuda"]


def kernel_name(device: torch.device) -> str:
    """`fla` or `torch`: which implementation `gated_delta_rule` runs on `device` (for logs and benchmarks)."""
    return "fla" if chosen_kernel(device) is fla_gated_delta_rule else "torch"


def gated_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                     beta: torch.Tensor) -> torch.Tensor:
    """Outputs [b, s, heads, dv] of the gated delta rule over q/k [b, s, heads, dk] (not yet l2-normalised),
    v [b, s, heads, dv], log-decay `g` and write strength `beta` [b, s, heads] (see the module docstring)."""
    return chosen_kernel(query.device)(query, key, value, g, beta)
