"""Packed sequences and context-parallel splitting of batches, for the trainer and the model.

Packed rows (several samples concatenated in one row) reach megatron-core in one of two ways:

* THD (preferred, no s x s mask): `pack_thd(batch, segment_ids, ...)` flattens the batch to one row
  [1, T] holding each sample once (row padding dropped, each sample padded to the multiple CP/SP need) and
  returns the `PackedSeqParams` (cu_seqlens) to pass to `GPTModel.forward(..., packed_seq_params=...)`.
  megatron applies RoPE per sample (positions restart) and `SDPAttention` runs one causal SDPA per sample.
* a block-diagonal causal mask: `block_causal_attention_mask(segment_ids)` -> megatron's boolean
  [b, 1, s, s] mask (True = masked out) to pass as `attention_mask`; positions then run on across samples,
  which RoPE (relative) does not see.

Segment ids (`[b, s]`, 1, 2, 3 ... per sample, 0 for padding) come from LLaMA-Factory's neat_packing
attention mask (`segment_ids_from_attention_mask`: it is already in that form) or from position ids that
restart at 0 per sample (`segment_ids_from_position_ids`).

Context parallelism: `cp_split(batch, cp_size, cp_rank, packed_seq_params=None)` keeps this CP rank's tokens
(megatron's causal load balancing: chunks r and 2*cp-1-r of 2*cp chunks, per sample under THD); every tensor
is split along its last (sequence) dimension, a 4-D attention mask along its query dimension only.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

IGNORE_INDEX = -100


# --------------------------------------------------------------------------------------------- segments


def segment_ids_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[b, s] segment ids from a 2-D attention mask: LLaMA-Factory's neat_packing mask (1, 2, 3 ... per
    packed sample, 0 = padding) is returned as it is (long); a 0/1 mask gives one segment per row."""
    if attention_mask.dim() != 2:
        raise ValueError(f"expected a [batch, seq] attention mask with segment indices, got {tuple(attention_mask.shape)}")
    return attention_mask.long()


def segment_ids_from_position_ids(position_ids: torch.Tensor,
                                  attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[b, s] segment ids (1, 2, ... per row) from position ids restarting at 0 for each packed sample.

    A new segment starts wherever the position does not continue the previous one (+1). Tokens where
    `attention_mask` is 0 (padding) get segment 0; without a mask, padding with position 0 makes segments of
    one token each, which is harmless (they attend to themselves only).
    """
    if position_ids.dim() == 3:  # mRoPE [3, b, s]: the temporal row restarts per sample as well
        position_ids = position_ids[0]
    pos = position_ids.long()
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    seg = starts.long().cumsum(-1)
    if attention_mask is not None:
        seg = seg.masked_fill(attention_mask == 0, 0)
    return seg


def block_causal_attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """megatron's boolean mask [b, 1, s, s] (True = masked out): causal within each segment, nothing across.
    Padding tokens (segment 0) attend to themselves only (no fully masked row: SDPA would return NaN)."""
    s = segment_ids.shape[-1]
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    pad = segment_ids[:, None, :, None] == 0
    eye = torch.eye(s, dtype=torch.bool, device=segment_ids.device)
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()
    allowed = same & causal & (~pad | eye)
    return ~allowed


def mask_segment_ends(loss_mask: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """`loss_mask` (aligned with shifted, next-token labels) with the last token of every segment zeroed:
    across a packed boundary the next token belongs to another sample."""
    end = torch.ones_like(segment_ids, dtype=torch.bool)
    end[:, :-1] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return loss_mask.masked_fill(end, 0)


# --------------------------------------------------------------------------------------------- THD


def thd_multiples(tp: int = 1, cp: int = 1, sequence_parallel: bool = False) -> tuple[int, int]:
    """(per-sample multiple, total multiple) for THD packing: every sample a multiple of 2*cp under CP, the
    local token count (total / cp) a multiple of tp under sequence parallelism."""
    seg = 2 * cp if cp > 1 else 1
    total = math.lcm(seg, cp * tp) if sequence_parallel else seg
    return seg, total


def seq_multiple(tp: int = 1, cp: int = 1, sequence_parallel: bool = False) -> int:
    """Multiple of the padded sequence length for unpacked (sbhd) batches: 2*cp chunks under CP, and the
    local length (s / cp) a multiple of tp under sequence parallelism."""
    multiple = 2 * cp if cp > 1 else 1
    if sequence_parallel:
        multiple = math.lcm(multiple, cp * tp)
    return multiple


def segment_spans(segment_ids: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, start, end) of every sample of [b, s] `segment_ids` (runs of one id > 0; 0 = padding), in order."""
    seg = segment_ids.to("cpu")
    s = seg.shape[-1]
    spans = []
    for row in range(seg.shape[0]):
        ids = seg[row]
        change = torch.ones(s, dtype=torch.bool)
        change[1:] = ids[1:] != ids[:-1]
        starts = torch.nonzero(change).flatten().tolist() + [s]
        spans += [(row, a, e) for a, e in zip(starts[:-1], starts[1:]) if int(ids[a]) != 0]
    return spans


def pack_thd(
    batch: dict[str, Any],
    segment_ids: torch.Tensor,
    seg_multiple: int = 1,
    total_multiple: int = 1,
    pad_values: Optional[dict[str, Any]] = None,
):
    """Flatten a packed / padded batch to megatron's THD layout.

    batch: tensors whose last two dims are [b, s] (input_ids, labels, loss_mask, position_ids; mRoPE
    position ids [3, b, s] too); others are passed through; `attention_mask` is dropped.
    segment_ids: [b, s], as `segment_ids_from_*` give (0 = padding: dropped).

    Returns (packed, packed_seq_params, index): packed tensors [..., 1, T]; `index` [T] holds, for each packed
    token, its flat position b * s + j in the input (-1 for padding added here), so that
    `unpack_thd(x, index, b, s)` maps per-token outputs back. Each sample is padded at its end to
    `seg_multiple` (padding tokens: labels -100, loss_mask 0, input ids `pad_values["input_ids"]` or 0,
    positions running on), and a padding segment is appended if T is not a multiple of `total_multiple`.
    The padding sits after each sample's real tokens, so causal attention keeps real tokens unaffected.
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    b, s = segment_ids.shape
    pieces = [(row, a, e - a) for row, a, e in segment_spans(segment_ids)]  # (row, start, length) of real samples
    real_lens, padded_lens, index_parts = [], [], []
    for row, a, n in pieces:
        padded = -(-n // seg_multiple) * seg_multiple
        real_lens.append(n)
        padded_lens.append(padded)
        index_parts.append(torch.arange(row * s + a, row * s + a + n))
        if padded > n:
            index_parts.append(torch.full((padded - n,), -1, dtype=torch.long))
    total = sum(padded_lens)
    extra = (-total) % total_multiple
    if extra or not pieces:
        extra = extra or max(seg_multiple, total_multiple)
        real_lens.append(extra)
        padded_lens.append(extra)
        index_parts.append(torch.full((extra,), -1, dtype=torch.long))
    index = torch.cat(index_parts)
    pad_values = dict(pad_values or {})
    pad_values.setdefault("labels", IGNORE_INDEX)

    packed: dict[str, Any] = {}
    for key, value in batch.items():
        if key == "attention_mask":
            continue
        if not torch.is_tensor(value) or value.dim() < 2 or tuple(value.shape[-2:]) != (b, s):
            packed[key] = value
            continue
        flat = value.reshape(*value.shape[:-2], b * s)
        safe = index.clamp(min=0).to(flat.device)
        out = flat.index_select(-1, safe)
        is_pad = (index < 0).to(flat.device)
        if key == "position_ids":
            out = _continue_positions(out, is_pad)
        else:
            out = out.masked_fill(is_pad, pad_values.get(key, 0))
        packed[key] = out.reshape(*value.shape[:-2], 1, -1)

    device = segment_ids.device
    cu_padded = torch.tensor([0] + padded_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    # cu_seqlens_q/kv: cumulative real lengths (TE's convention; its *_padded give the layout in memory).
    # megatron's THD RoPE and SDPAttention read the padded ones.
    cu_real = torch.tensor([0] + real_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_real.to(device),
        cu_seqlens_kv=cu_real.to(device),
        cu_seqlens_q_padded=cu_padded.to(device),
        cu_seqlens_kv_padded=cu_padded.to(device),
        max_seqlen_q=int(max(padded_lens)),
        max_seqlen_kv=int(max(padded_lens)),
    )
    return packed, params, index.to(device)


def _continue_positions(pos: torch.Tensor, is_pad: torch.Tensor) -> torch.Tensor:
    """Padding positions continue from the previous token (+1 each)."""
    out = pos.clone()
    flat = out.reshape(-1, out.shape[-1])
    idx = torch.nonzero(is_pad).flatten().tolist()
    for j in idx:
        flat[:, j] = flat[:, j - 1] + 1 if j > 0 else 0
    return out


def unpack_thd(x: torch.Tensor, index: torch.Tensor, b: int, s: int, fill: float = 0.0) -> torch.Tensor:
    """Per-token outputs [1, T, ...] (or [T, ...]) of a THD batch back to [b, s, ...] (`fill` where absent)."""
    if x.dim() >= 2 and x.shape[0] == 1 and x.shape[1] == index.numel():
        x = x[0]
    out = x.new_full((b * s,) + tuple(x.shape[1:]), fill)
    keep = index >= 0
    out[index[keep]] = x[keep]
    return out.reshape(b, s, *x.shape[1:])


# --------------------------------------------------------------------------------------------- CP


def cp_indices(seq_lens: list[int], cp_size: int, cp_rank: int, device: Any = None) -> torch.Tensor:
    """Indices (full sequence order) of the tokens CP rank `cp_rank` holds, in its local order: for each
    (sub-)sequence of `seq_lens` (one entry for an unpacked batch), chunks r and 2*cp-1-r of 2*cp."""
    parts = []
    start = 0
    for n in seq_lens:
        if n % (2 * cp_size):
            raise ValueError(
                f"context parallelism: sequence length {n} is not a multiple of 2*cp = {2 * cp_size}; pad to "
                "seq_multiple()/thd_multiples() first"
            )
        c = n // (2 * cp_size)
        for m in (cp_rank, 2 * cp_size - 1 - cp_rank):
            parts.append(torch.arange(start + m * c, start + (m + 1) * c))
        start += n
    return torch.cat(parts).to(device) if device is not None else torch.cat(parts)


def packed_boundaries(packed_seq_params: Any) -> torch.Tensor:
    """The cu_seqlens that lay a THD row out: the padded ones where given (each sample padded for CP / SP), else
    the plain ones (megatron's THD RoPE reads them the same way)."""
    cu = packed_seq_params.cu_seqlens_q_padded
    return packed_seq_params.cu_seqlens_q if cu is None else cu


def segment_lengths(packed_seq_params: Any) -> list[int]:
    """Token counts of the (padded) samples of a THD row. The boundaries may live on the GPU: they are read to the
    host once per params object (every layer of a micro-batch gets the same one) and cached on it."""
    cu = packed_boundaries(packed_seq_params)
    cache = getattr(packed_seq_params, "mca_segment_lengths", None)
    if cache is not None and cache[0] is cu:
        return cache[1]
    lens = (cu[1:] - cu[:-1]).tolist()
    try:
        packed_seq_params.mca_segment_lengths = (cu, lens)
    except AttributeError:  # pragma: no cover - a params type with slots: no cache, same result
        pass
    return lens


def cp_split(batch: dict[str, Any], cp_size: int, cp_rank: int, packed_seq_params: Any = None) -> dict[str, Any]:
    """This CP rank's part of `batch` (a new dict). Tensors are split along their last dim when it is the
    sequence length (a 4-D attention mask along dim 2, its query rows, keeping all key columns); others pass.
    With `packed_seq_params` (THD, from `pack_thd`), each sample is split on its own; the params stay global
    (megatron's THD RoPE and `SDPAttention` expect the full cu_seqlens)."""
    if cp_size == 1:
        return dict(batch)
    seq_len = None
    if packed_seq_params is not None:
        lens = segment_lengths(packed_seq_params)
        seq_len = sum(lens)
    else:
        for key in ("input_ids", "tokens", "labels"):
            if torch.is_tensor(batch.get(key)):
                seq_len = batch[key].shape[-1]
                break
        if seq_len is None:
            raise ValueError("cp_split: no input_ids/tokens/labels to take the sequence length from")
        lens = [seq_len]
    out: dict[str, Any] = {}
    idx_cache: dict = {}
    for key, value in batch.items():
        if not torch.is_tensor(value) or value.dim() == 0:
            out[key] = value
            continue
        dim = value.dim() - 1
        if key == "attention_mask" and value.dim() == 4:
            dim = 2
        if value.shape[dim] != seq_len:
            out[key] = value
            continue
        if value.device not in idx_cache:
            idx_cache[value.device] = cp_indices(lens, cp_size, cp_rank, value.device)
        out[key] = value.index_select(dim, idx_cache[value.device])
    return out


__all__ = [
    "block_causal_attention_mask",
    "cp_indices",
    "cp_split",
    "mask_segment_ends",
    "pack_thd",
    "segment_ids_from_attention_mask",
    "segment_ids_from_position_ids",
    "segment_spans",
    "seq_multiple",
    "thd_multiples",
    "unpack_thd",
]
