"""Optimizer-step fixes for megatron-core without Transformer Engine or Apex.

Measured on an H200 (benchmarks/micro.py, dense 1.1B Qwen3, seq 4096): without TE/Apex megatron-core
1. builds `torch.optim.AdamW` without `fused=True`: the foreach path runs ~8 passes over the fp32 states
   (24 ms a step for 1.1B parameters, 69 ms for 3B, against 9 / 27 ms fused);
2. computes the gradient norm for clipping with `megatron.core.utils.local_multi_tensor_l2_norm`, which
   turns every parameter's norm into a Python float (`torch.tensor([...cuda scalars...])`): one
   device->host sync per parameter tensor, a few hundred per step, so the CPU can never run ahead of the GPU;
3. scales gradients with a Python loop of `dst.copy_(src * scale)` (two kernels per tensor).

    from llamafactory_mca.kernels.optim import install_fast_multi_tensor, use_fused_adamw
    install_fast_multi_tensor()          # once, any time before the first optimizer step (GPU or CPU)
    optimizer = get_megatron_optimizer(...)
    use_fused_adamw(optimizer)           # after building it; no-op on CPU / non-torch optimizers

Both keep the arithmetic of the originals (same L2 norm, same AdamW update): only the kernels change.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch


def fast_multi_tensor_l2norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for amp_C.multi_tensor_l2norm / megatron's local version, with no host sync."""
    tensors = [t for t in tensor_lists[0] if t.numel() > 0]
    if not tensors:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.zeros(1, dtype=torch.float, device=dev), None
    norms = torch._foreach_norm([t.float() if t.dtype != torch.float32 else t for t in tensors])
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    return total.reshape(1).float(), None


def fast_multi_tensor_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for amp_C.multi_tensor_scale: dst = src * scale for every pair, two foreach kernels."""
    src, dst = list(tensor_lists[0]), list(tensor_lists[1])
    if not src:
        return
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
        return
    torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def fast_multi_tensor_applier(op, noop_flag_buffer, tensor_lists, *args):
    return op(2048 * 32, noop_flag_buffer, tensor_lists, *args)


_INSTALLED = False


def install_fast_multi_tensor() -> bool:
    """Replace megatron-core's local (no TE, no Apex) multi-tensor fallbacks in clip_grads and optimizer.
    Returns True when something was replaced (i.e. TE/Apex are absent). Idempotent."""
    global _INSTALLED
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads, optimizer

    changed = False
    if getattr(clip_grads, "l2_norm_impl", None) is mutils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = fast_multi_tensor_l2norm
        changed = True
    if getattr(clip_grads, "multi_tensor_scale_impl", None) is mutils.local_multi_tensor_scale:
        clip_grads.multi_tensor_scale_impl = fast_multi_tensor_scale
        changed = True
    if getattr(clip_grads, "multi_tensor_applier", None) is mutils.local_multi_tensor_applier:
        clip_grads.multi_tensor_applier = fast_multi_tensor_applier
    if getattr(optimizer, "multi_tensor_scale_impl", None) is mutils.local_multi_tensor_scale:
        optimizer.multi_tensor_scale_impl = fast_multi_tensor_scale
        changed = True
    if getattr(optimizer, "multi_tensor_applier", None) is mutils.local_multi_tensor_applier:
        optimizer.multi_tensor_applier = fast_multi_tensor_applier
    _INSTALLED = _INSTALLED or changed
    return changed


def _torch_optimizers(opt: Any) -> Iterable[torch.optim.Optimizer]:
    if isinstance(opt, torch.optim.Optimizer):
        yield opt
        return
    chained = getattr(opt, "chained_optimizers", None)
    if chained is not None:
        # A ChainedOptimizer (dense + expert parameters under EP) asserts on `.optimizer` when it holds more
        # than one: walk its children only.
        for child in chained:
            yield from _torch_optimizers(child)
        return
    inner = getattr(opt, "optimizer", None)
    if inner is not None and inner is not opt:
        yield from _torch_optimizers(inner)


def use_fused_adamw(megatron_optimizer: Any) -> int:
    """Switch every torch Adam/AdamW inside a megatron optimizer (ChainedOptimizer, DistributedOptimizer,
    Float16OptimizerWithFloat16Params ...) to the fused CUDA kernel. Returns how many were switched.
    Only where every parameter is a floating CUDA tensor (the fused kernel's requirement)."""
    n = 0
    for opt in _torch_optimizers(megatron_optimizer):
        if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        params = [p for g in opt.param_groups for p in g["params"]]
        if not params or not all(p.is_cuda and p.is_floating_point() for p in params):
            continue
        for g in opt.param_groups:
            g["fused"] = True
            g["foreach"] = False
            for p in g["params"]:  # the fused kernel wants its `step` counters on the device, in fp32
                st = opt.state.get(p)
                if st and torch.is_tensor(st.get("step")) and st["step"].device != p.device:
                    st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
        opt.defaults["fused"] = True
        opt.defaults["foreach"] = False
        n += 1
    return n
