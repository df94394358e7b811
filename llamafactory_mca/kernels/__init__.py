"""Fast pieces that need no Transformer Engine (see each module's docstring).

- grouped_gemm.grouped_mm: one grouped GEMM for all local experts (torch._grouped_mm on Hopper, bf16).
- experts.TorchGroupedMLP: drop-in experts module for megatron-core's MoE layer spec.
- grad_accum.accumulate_: fp32 main_grad += bf16 weight gradient at memory speed (Triton; the experts' backward).
- prefix_attention.split_lower_right_causal: bottom-right causal attention as cuDNN over the unmasked key prefix
  + cuDNN causal on the diagonal block, merged by log-sum-exp (context parallelism's far query chunks).
Nothing heavy is imported here: import the submodule you need.
"""
