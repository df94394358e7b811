"""Weight-gradient accumulation fusion without Apex or Transformer Engine.

megatron-core's `gradient_accumulation_fusion` writes each linear layer's weight gradient straight into the
fp32 `main_grad` buffer of its DDP wrapper (`main_grad += dY^T @ X` inside the GEMM, cuBLAS beta=1) instead of
producing a bf16 `weight.grad` that a backward hook then adds to `main_grad`. It needs Apex's
`fused_weight_gradient_mlp_cuda` extension (or TE). Measured without it (benchmarks/RESULTS.md, s2 profile,
Llama-3-8B, 4 micro-batches a step): the separate `main_grad.add_(grad)` pass is 130 ms of a 1.69 s step.

torch (>= 2.8, CUDA) has the same GEMM: `torch.addmm(main_grad, dY^T, X, out_dtype=torch.float32, out=main_grad)`
takes bf16/fp16 operands, accumulates in fp32 and adds into the fp32 output in place. This module offers it under
the extension's two entry points and installs it into megatron's linear layers, after checking on the GPU that
the op exists and gives the right numbers (otherwise nothing is installed and megatron keeps its own path).

    from llamafactory_mca.kernels.wgrad import install_wgrad_accumulation
    install_wgrad_accumulation()   # True when megatron's gradient_accumulation_fusion can now be switched on
"""

from __future__ import annotations

import types

import torch

_STATE: dict[str, bool] = {}


def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """main_grad (fp32, [out, in]) += grad_output[N, out]^T @ total_input[N, in] (bf16/fp16/fp32 operands)."""
    a, b = grad_output.reshape(-1, grad_output.shape[-1]).t(), total_input.reshape(-1, total_input.shape[-1])
    if a.dtype == main_grad.dtype:
        torch.addmm(main_grad, a, b, out=main_grad)
    else:
        torch.addmm(main_grad, a, b, out_dtype=main_grad.dtype, out=main_grad)


def wgrad_gemm_accum_fp16(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
    """The same for a bf16/fp16 main_grad (operands of its dtype)."""
    a, b = grad_output.reshape(-1, grad_output.shape[-1]).t(), total_input.reshape(-1, total_input.shape[-1])
    torch.addmm(main_grad, a, b, out=main_grad)


def _works_here() -> bool:
    """The mixed-dtype in-place addmm exists on this GPU and matches an fp32 reference."""
    if not torch.cuda.is_available():
        return False
    try:
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(96, 40, device="cuda", generator=g).bfloat16()
        dy = torch.randn(96, 24, device="cuda", generator=g).bfloat16()
        acc = torch.randn(24, 40, device="cuda", generator=g)
        want = acc + dy.float().t() @ x.float()
        wgrad_gemm_accum_fp32(x, dy, acc)
        return bool(torch.allclose(acc, want, rtol=1e-3, atol=1e-3))
    except Exception:  # torch without out_dtype, or a cuBLAS that refuses the combination
        return False


def install_wgrad_accumulation() -> bool:
    """Give megatron's tensor-parallel linear layers the fused weight-gradient accumulation. Idempotent."""
    if "installed" in _STATE:
        return _STATE["installed"]
    ok = _works_here()
    if ok:
        from megatron.core.tensor_parallel import layers

        if not getattr(layers, "_grad_accum_fusion_available", False):
            layers.fused_weight_gradient_mlp_cuda = types.SimpleNamespace(
                wgrad_gemm_accum_fp32=wgrad_gemm_accum_fp32, wgrad_gemm_accum_fp16=wgrad_gemm_accum_fp16
            )
            layers._grad_accum_fusion_available = True
    _STATE["installed"] = ok
    return ok
