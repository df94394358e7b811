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


def unit_lower_inverse(strict_lower: torch.Tensor) -> torch.Tensor:
    """(I - L)^-1 for strictly lower triangular L [..., c, c]: one batched triangular solve. Equals the row-by-row
    recurrence `T[i, :i] += T[i, :i] @ T[:i, :i]` (+ I) of the reference implementations, which launches c small
    kernels per direction instead of one."""
    c = strict_lower.shape[-1]
    eye = torch.eye(c, dtype=strict_lower.dtype, device=strict_lower.device)
    return torch.linalg.solve_triangular(eye - strict_lower, eye.expand_as(strict_lower), upper=False,
                                         unitriangular=True)


def torch_gated_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                           beta: torch.Tensor, chunk_size: int = 64) -> torch.Tensor:
    """The torch path: the chunked gated delta rule of transformers' / megatron-core's `torch_chunk_gated_delta_rule`
    (fp32 inside, chunks of 64, l2-normalised q/k), with the same arithmetic organised for few kernel launches:
    the intra-chunk inverse is one triangular solve over all chunks, and the sequential loop over chunks carries
    only the state update (two small matmuls), every chunk's output being computed batched after it. No
    in-place writes into slices, so autograd's backward is as short as the forward.

    Measured (benchmarks/kernel_check.py, H200, Qwen3-Next-80B-A3B's 32 value / 16 key heads of 128, 4096
    tokens, fwd+bwd): see RESULTS.md; the reference launches ~10x more kernels."""
    out_dtype, seq = query.dtype, query.shape[1]
    q, k, v, beta, g = (x.transpose(1, 2).to(torch.float32) for x in (l2norm(query), l2norm(key), value, beta, g))
    pad = (chunk_size - seq % chunk_size) % chunk_size
    if pad:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        beta, g = (torch.nn.functional.pad(x, (0, pad)) for x in (beta, g))
    b, h, t, dk = k.shape
    n = t // chunk_size
    q = q * dk ** -0.5
    q, k, v = (x.reshape(b, h, n, chunk_size, x.shape[-1]) for x in (q, k, v))
    beta = beta.reshape(b, h, n, chunk_size, 1)
    g = g.reshape(b, h, n, chunk_size).cumsum(-1)                            # log-decay from the chunk start
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    decay = (g.unsqueeze(-1) - g.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()  # [.., i, j], j <= i
    k_beta = k * beta
    inverse = unit_lower_inverse(-(k_beta @ k.transpose(-1, -2)) * decay.tril(-1))
    u = inverse @ (v * beta)                                                 # the chunk's pseudo-values
    w = inverse @ (k_beta * g.exp().unsqueeze(-1))                           # what the incoming state removes
    g_last = g[..., -1:]                                                     # [b, h, n, 1]
    k_to_end = k * (g_last - g).exp().unsqueeze(-1)                          # keys decayed to the chunk's end
    state = q.new_zeros(b, h, dk, v.shape[-1])
    states, news = [], []
    for i in range(n):
        states.append(state)
        new = u[:, :, i] - w[:, :, i] @ state
        news.append(new)
        state = state * g_last[:, :, i, :, None].exp() + k_to_end[:, :, i].transpose(-1, -2) @ new
    incoming, new = torch.stack(states, dim=2), torch.stack(news, dim=2)
    intra = (q @ k.transpose(-1, -2)) * decay
    out = (q * g.exp().unsqueeze(-1)) @ incoming + intra @ new
    out = out.reshape(b, h, t, -1)[:, :, :seq]
    return out.transpose(1, 2).contiguous().to(out_dtype)


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
