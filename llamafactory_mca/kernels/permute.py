"""MoE token permutation without host syncs, for megatron-core's dispatchers without Transformer Engine.

What megatron-core 0.16 does without TE (`moe_permute_fusion` needs it), and what costs the host its lead:
- `moe_utils.permute` finds each expert's tokens with `masked_select`: its output size is known on the device
  only, so every call copies a count to the host and waits for the GPU (a stream sync per MoE layer,
  micro-batch and recompute);
- `moe_utils.sort_chunks_by_idxs` (the alltoall dispatcher's "permutation 2", one chunk per rank and local
  expert) splits on host-side sizes and `cat`s hundreds of slices: the dispatcher copies those sizes to the
  host first, and the `cat` is hundreds of small kernels (42 ms a step on s3x4, RESULTS.md);
- the alltoall dispatcher copies the per-expert token counts to the host in every layer, micro-batch and
  direction, also where EP = TP = 1 and no collective needs split sizes; the grouped-GEMM experts
  (`kernels.experts.TorchGroupedMLP`) take device-side counts.

The replacements give the same tensors, bit for bit (same order, same ops on the values):
- `permute`: with a static output size (dropless routing: tokens x top-k, as the alltoall dispatcher passes;
  or a size already on the host) the expert-major positions come from a cumsum of the routing map and one
  scatter; otherwise megatron's own function;
- `sort_chunks_by_idxs`: an identity chunk order (EP = TP = 1) returns the input; with device-side sizes, one
  row permutation computed on the device (cumsums, searchsorted), a gather forward and backward
  (`permute_rows`); else megatron's own;
- `keep_counts_on_device`: the alltoall dispatcher's DtoH step, except that with EP = TP = 1 nothing moves
  (no copy, no sync), and with EP or TP > 1 the per-local-expert counts stay on the device for the
  device-side chunk sort (the one sync left is the split sizes that `all_to_all` needs on the host).
`install()` puts them into megatron's token_dispatcher module (platform.setup_platform calls it).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

_INSTALLED = False
_IDENTITY: dict = {}
_ON_DEVICE: dict = {}


def expert_major_positions(routing_map: torch.Tensor, num_out: int) -> torch.Tensor:
    """Flat indices (expert * num_tokens + token) of the True entries of routing_map [tokens, experts], in
    expert-major order (what `masked_select` on the transposed map yields), given their count `num_out`.
    No host sync: positions from a cumsum, one scatter into a buffer with a discard slot."""
    flat = routing_map.bool().T.reshape(-1)
    slot = torch.cumsum(flat, 0) - 1
    slot = torch.where(flat, slot, torch.full_like(slot, num_out))
    picked = torch.empty(num_out + 1, dtype=torch.long, device=routing_map.device)
    picked.scatter_(0, slot, torch.arange(flat.numel(), device=routing_map.device))
    return picked[:num_out]


def _static_size(num_out_tokens: Any) -> Optional[int]:
    """The output size when the host knows it without waiting for the GPU (an int or a CPU tensor)."""
    if isinstance(num_out_tokens, int):
        return num_out_tokens
    if torch.is_tensor(num_out_tokens) and num_out_tokens.device.type == "cpu" and num_out_tokens.numel() == 1:
        return int(num_out_tokens)
    return None


def permute(tokens: torch.Tensor, routing_map: torch.Tensor, probs: Optional[torch.Tensor] = None,
            num_out_tokens: Any = None, fused: bool = False, drop_and_pad: bool = False):
    """megatron's `moe_utils.permute` (same signature and results), without the host sync where the output
    size is static."""
    from megatron.core.transformer.moe import moe_utils

    size = _static_size(num_out_tokens)
    if fused or drop_and_pad or size is None:
        return moe_utils.permute(tokens, routing_map, probs=probs, num_out_tokens=num_out_tokens, fused=fused,
                                 drop_and_pad=drop_and_pad)
    picked = expert_major_positions(routing_map, size)
    sorted_indices = picked % tokens.shape[0]
    permuted_probs = probs.T.contiguous().view(-1).index_select(0, picked) if probs is not None else None
    return tokens.index_select(0, sorted_indices), permuted_probs, sorted_indices


def _chunk_order(sorted_idxs: torch.Tensor, device: torch.device) -> Optional[torch.Tensor]:
    """None for the identity order, else the order on `device` (cached: the dispatchers' orders are constants)."""
    key = tuple(sorted_idxs.tolist()) if sorted_idxs.device.type == "cpu" else None
    if key is None:
        return sorted_idxs
    if key not in _IDENTITY:
        _IDENTITY[key] = key == tuple(range(len(key)))
    if _IDENTITY[key]:
        return None
    if (key, device) not in _ON_DEVICE:
        _ON_DEVICE[(key, device)] = sorted_idxs.to(device)
    return _ON_DEVICE[(key, device)]


def chunk_sort_rows(split_sizes: torch.Tensor, order: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Source row of every output row when the chunks of sizes `split_sizes` are laid out in `order`; all on
    the device of split_sizes."""
    sizes = split_sizes.long()
    order = order.to(sizes.device).long()
    starts = torch.cumsum(sizes, 0) - sizes
    out_sizes = sizes.index_select(0, order)
    out_ends = torch.cumsum(out_sizes, 0)
    rows = torch.arange(num_rows, device=sizes.device)
    chunk = torch.searchsorted(out_ends, rows, right=True)
    return starts.index_select(0, order.index_select(0, chunk)) + rows - (out_ends - out_sizes).index_select(0, chunk)


class _RowPermutation(torch.autograd.Function):
    """out = x[src] for a permutation `src` of the rows; backward gathers with the inverse permutation
    (index_select's own backward is an atomic index_add: several times slower for a permutation)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(src)
        return x.index_select(0, src)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (src,) = ctx.saved_tensors
        inverse = torch.empty_like(src)
        inverse.scatter_(0, src, torch.arange(src.numel(), device=src.device))
        return grad.index_select(0, inverse), None


def permute_rows(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """x[src] where src is a permutation of x's rows; gradients by a gather too."""
    return _RowPermutation.apply(x, src)


def sort_chunks_by_idxs(input: torch.Tensor, split_sizes: torch.Tensor, sorted_idxs: torch.Tensor,
                        probs: Optional[torch.Tensor] = None, fused: bool = False):
    """megatron's `moe_utils.sort_chunks_by_idxs` (same signature and results): identity orders cost
    nothing, device-side sizes need no host round trip and no `cat`."""
    from megatron.core.transformer.moe import moe_utils

    if not fused:
        order = _chunk_order(sorted_idxs, input.device)
        if order is None:
            return input, probs
        if split_sizes.device == input.device and input.device.type != "cpu":
            src = chunk_sort_rows(split_sizes, order, input.shape[0])
            return permute_rows(input, src), permute_rows(probs, src) if probs is not None else None
    return moe_utils.sort_chunks_by_idxs(input, split_sizes, sorted_idxs, probs=probs, fused=fused)


def keep_counts_on_device(original: Any) -> Any:
    """Wrap `MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize` (see the module docstring)."""

    def dtoh_and_synchronize(self, point: str, tokens_per_expert: Optional[torch.Tensor] = None):
        if self.drop_and_pad or self.config.moe_permute_fusion or not torch.is_tensor(tokens_per_expert) \
                or not tokens_per_expert.is_cuda:
            return original(self, point, tokens_per_expert)
        if self.ep_size == 1 and self.tp_size == 1 and (
                self.config.moe_expert_capacity_factor is None and not self.config.moe_router_padding_for_quantization):
            return tokens_per_expert
        per_local_expert = getattr(self, "num_global_tokens_per_local_expert", None)
        self.num_global_tokens_per_local_expert = None  # stays on the device: sort_chunks_by_idxs sorts there
        try:
            return original(self, point, tokens_per_expert)
        finally:
            self.num_global_tokens_per_local_expert = per_local_expert

    dtoh_and_synchronize.__wrapped__ = original
    return dtoh_and_synchronize


def install() -> None:
    """Use the sync-free permutation in megatron-core's token dispatchers (idempotent)."""
    global _INSTALLED
    if _INSTALLED:
        return
    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.permute = permute
    token_dispatcher.sort_chunks_by_idxs = sort_chunks_by_idxs
    cls = token_dispatcher.MoEAlltoAllTokenDispatcher
    cls._maybe_dtoh_and_synchronize = keep_counts_on_device(cls._maybe_dtoh_and_synchronize)
    _INSTALLED = True
