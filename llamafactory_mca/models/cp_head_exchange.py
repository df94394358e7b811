"""Context parallelism for token mixers that need the whole sequence (the gated delta-net's recurrence): an
all-to-all over the CP group trades "my load-balanced sequence chunks, all heads" for "the whole sequence, my
share of the heads" and back (the Ulysses exchange), with the CP layout of `models/packing.cp_indices`:

    rank r holds, of every (packed) sequence, chunks r and 2*cp-1-r of 2*cp        (cp_split's layout)
    to_heads       [s_local, b, H, C]  ->  [s_local * cp, b, H / cp, C]   whole sequences in natural order,
                                                                         heads block r of H
    to_sequence    [s_local * cp, b, H', C']  ->  [s_local, b, cp * H', C']   back to this rank's chunks, the
                                                                         head blocks of all ranks in rank order

Both directions are megatron's autograd all-to-all (its backward is the opposite exchange). Packed (THD) rows
are split per sample (the params' padded cu_seqlens, global as cp_split keeps them), so the permutation follows
each sample. The permutation of the last layout is kept (both directions of a micro-batch use it; packed
layouts change with every micro-batch, so no more is kept).
"""

from __future__ import annotations

from typing import Any

import torch

from llamafactory_mca.models.packing import cp_indices, segment_lengths


class CpHeadExchange:
    """The all-to-all between CP's sequence chunks and whole sequences of a head subset (module docstring)."""

    def __init__(self, group: Any, size: int, rank: int):
        self.group, self.size, self.rank = group, size, rank
        self._order: tuple = (None, None)  # (layout key, (order, inverse)) of the last layout seen

    @classmethod
    def of_parallel_state(cls) -> "CpHeadExchange":
        """The exchange over megatron's context-parallel group."""
        from megatron.core import parallel_state as ps

        size = ps.get_context_parallel_world_size()
        return cls(ps.get_context_parallel_group() if size > 1 else None, size, ps.get_context_parallel_rank())

    def received_order(self, full_len: int, packed_seq_params: Any, device: torch.device) -> tuple:
        """(positions in the whole sequence of the tokens as received: rank 0's chunks, then rank 1's ...;
        its inverse permutation)."""
        lens = [full_len] if packed_seq_params is None else segment_lengths(packed_seq_params)
        key = (tuple(lens), device)
        # one entry: to_heads and to_sequence of a micro-batch share it, and packed layouts change with every
        # micro-batch, so keeping older ones would only grow
        if self._order[0] != key:
            order = torch.cat([cp_indices(lens, self.size, r) for r in range(self.size)]).to(device)
            self._order = (key, (order, torch.argsort(order)))
        return self._order[1]

    def to_heads(self, x: torch.Tensor, packed_seq_params: Any = None) -> torch.Tensor:
        """[s_local, b, H, C] (this rank's chunks, all heads) -> [s_local * cp, b, H / cp, C] (whole sequences,
        this rank's block of heads)."""
        if self.size == 1:
            return x
        from megatron.core.tensor_parallel.mappings import all_to_all

        s, b, heads, c = x.shape
        if heads % self.size:
            raise ValueError(f"context parallelism: {heads} heads do not split over {self.size} CP ranks")
        send = x.reshape(s, b, self.size, heads // self.size, c).permute(2, 0, 1, 3, 4).reshape(-1, b,
                                                                                                  heads // self.size, c)
        received = all_to_all(self.group, send)  # rank r's chunks (my heads), r = 0 .. cp-1
        _, inverse = self.received_order(s * self.size, packed_seq_params, x.device)
        return received.index_select(0, inverse)

    def to_sequence(self, y: torch.Tensor, packed_seq_params: Any = None) -> torch.Tensor:
        """[s_local * cp, b, H', C'] (whole sequences, this rank's heads) -> [s_local, b, cp * H', C'] (this
        rank's chunks, every rank's heads in rank order)."""
        if self.size == 1:
            return y
        from megatron.core.tensor_parallel.mappings import all_to_all

        full, b, heads, c = y.shape
        order, _ = self.received_order(full, packed_seq_params, y.device)
        received = all_to_all(self.group, y.index_select(0, order))  # [cp (head block of rank r), s_local, ...]
        s = full // self.size
        return received.reshape(self.size, s, b, heads, c).permute(1, 2, 0, 3, 4).reshape(s, b, self.size * heads, c)
