"""Core attention on `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on
GPU, no [b, h, s, s] score matrix in Python), a drop-in for megatron-core's `DotProductAttention`.

Layouts follow megatron: query [sq, b, np, hn], key/value [sk, b, ng, hn] (ng = query groups on this TP
rank); output [sq, b, np * hn]. `attention_mask` is megatron's boolean mask (True = masked out), shape
broadcastable to [b, 1 or np, sq, sk]; with the causal mask type it is combined with the causal mask.

Packed sequences (`packed_seq_params`, THD: query [t, np, hn]) run one SDPA call per sub-sequence (causal, no
t x t mask); the layout comes from `cu_seqlens_q_padded` (else `cu_seqlens_q`), as megatron's THD RoPE uses.

Context parallelism (cp > 1, no Transformer Engine needed) follows megatron's causal load balancing: the
sequence (each packed sub-sequence under THD) is cut into 2*cp chunks and CP rank r holds chunks r and
2*cp-1-r, concatenated (`megatron.core.utils.get_batch_on_this_cp_rank`, `models/packing.py`). Keys and values
are all-gathered over the CP group (backward: reduce-scatter of their gradients), put back into sequence order,
and each local query chunk attends to the key prefix up to its own end (chunks 0..j for the chunk at position j)
with the causal diagonal aligned to the bottom right (`lower_right_causal`: on CUDA cuDNN over the unmasked key
prefix plus cuDNN causal over the diagonal block, merged by log-sum-exp, `kernels/prefix_attention.py`; else
SDPA with `torch.nn.attention.bias.causal_lower_right`: no mask is materialised, the flash kernel skips the
masked blocks and takes grouped K/V heads without repeating them). RoPE needs nothing here: megatron's rotary
embedding already slices positions per CP rank the same way.

Sliding window (`config.window_size = (left, 0)`, megatron's convention, on the layers `window_attn_skip_freq`
selects): query i attends keys i - left ... i, as Hugging Face's `sliding_window = left + 1` (`kv > q - window`).
It applies to padded, plainly packed and THD-packed batches; context parallelism with a window is refused.

Multi-latent attention passes `k_channels` / `v_channels` (query/key head size != value head size) and its own
`softmax_scale`; the output then has `v_channels` per head.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from llamafactory_mca.kernels import prefix_attention
from llamafactory_mca.models.packing import packed_boundaries, segment_lengths

try:  # torch >= 2.5
    _SDPA_HAS_GQA = "enable_gqa" in F.scaled_dot_product_attention.__doc__
except Exception:  # pragma: no cover
    _SDPA_HAS_GQA = False


def _packed_mask(cu_seqlens: torch.Tensor, total: int, device: torch.device) -> torch.Tensor:
    """Block-diagonal causal mask [1, 1, t, t] (True = attend) from cumulative sequence lengths."""
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    pos = torch.arange(total, device=device)
    seq_id = torch.bucketize(pos, cu[1:], right=True)
    same = seq_id[:, None] == seq_id[None, :]
    causal = pos[:, None] >= pos[None, :]
    return (same & causal)[None, None]


def causal_band(rows: int, cols: int, diagonal: int, window: Optional[int], device: torch.device) -> torch.Tensor:
    """[rows, cols] boolean mask (True = attend): key j <= query i + `diagonal` (causal, the queries being the last
    rows of a longer sequence when `diagonal` > 0) and, with a `window`, key j >= query i + `diagonal` - `window`."""
    mask = torch.ones(rows, cols, dtype=torch.bool, device=device).tril(diagonal)
    if window is not None:
        mask = mask.triu(diagonal - window)
    return mask


def window_left(config: TransformerConfig, layer_number: int) -> Optional[int]:
    """Keys before the query that a sliding-window layer sees (`config.window_size[0]`), None without a window.

    Only causal windows are supported (`window_size[1]` must be 0)."""
    from megatron.core.transformer.utils import is_layer_window_attention

    size = getattr(config, "window_size", None)
    if not is_layer_window_attention(size, getattr(config, "window_attn_skip_freq", None), layer_number):
        return None
    left, right = size
    if right != 0:
        raise ValueError(f"window_size {tuple(size)}: SDPAttention supports causal windows (left, 0) only")
    return int(left)


def sliding_window_overrides(hf_config) -> dict:
    """TransformerConfig fields of a Hugging Face `sliding_window` (Mistral, Mixtral): megatron's `window_size`
    (left, 0) with left = sliding_window - 1; {} without one."""
    window = getattr(hf_config, "sliding_window", None)
    if not window:
        return {}
    return {"window_size": (int(window) - 1, 0)}


def _flash_takes_gqa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> bool:
    """Whether SDPA's flash kernel runs these CUDA tensors with grouped K/V heads as they are (`enable_gqa`)."""
    from torch.backends.cuda import SDPAParams, can_use_flash_attention

    if not q.is_cuda:
        return False
    try:
        # is_causal False, as CausalBias asks it (flash refuses is_causal with lq != lk; the bias is causal)
        return bool(can_use_flash_attention(SDPAParams(q, k, v, None, dropout_p, False, True)))
    except Exception:  # pragma: no cover - SDPAParams without the enable_gqa argument (torch < 2.5)
        return False


def lower_right_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                       scale: Optional[float] = None) -> torch.Tensor:
    """Causal attention of the queries q [b, h, lq, d] as the last lq rows of a longer sequence whose keys are
    k / v [b, g, lk, d] (lk >= lq, g divides h): query i sees keys 0 ... lk - lq + i (a bottom-right aligned
    causal mask). On CUDA without dropout, where cuDNN passed its self-check (`kernels.prefix_attention`): cuDNN
    over the unmasked keys [0, lk - lq) plus cuDNN causal over the diagonal block, merged by log-sum-exp;
    otherwise `lower_right_causal_sdpa`."""
    if dropout_p == 0.0 and k.shape[2] > q.shape[2]:
        kernel = prefix_attention.split_kernel(q)
        if kernel is not None:
            return prefix_attention.split_lower_right_causal(q, k, v, scale, kernel)
    return lower_right_causal_sdpa(q, k, v, dropout_p, scale)


def lower_right_causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                            scale: Optional[float] = None) -> torch.Tensor:
    """`lower_right_causal` by one SDPA call with `causal_lower_right(lq, lk)`: on CUDA the flash kernel skips
    the masked blocks and reads no mask; elsewhere the mask is materialised (math kernel). Grouped K/V heads are
    repeated only where the flash kernel cannot take them as they are."""
    from torch.nn.attention.bias import causal_lower_right

    kwargs = {}
    if q.shape[1] != k.shape[1]:
        if _SDPA_HAS_GQA and _flash_takes_gqa(q, k, v, dropout_p):
            kwargs["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
    bias = causal_lower_right(q.shape[2], k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale, **kwargs)


class _Piece(NamedTuple):
    """A run of local query rows: local start, length, its sub-sequence (start, length) in the full sequence,
    and the offset of its first row inside that sub-sequence."""

    local_start: int
    length: int
    seg_start: int
    seg_len: int
    offset: int


class _Layout(NamedTuple):
    pieces: tuple
    perm: Optional[torch.Tensor]  # full-order index into the rank-major gathered keys (cp > 1), else None


def _layout(seg_lens: list, cp: int, rank: int, device: torch.device) -> _Layout:
    """Local pieces (and the gather permutation) for sub-sequences of `seg_lens` under causal CP splitting."""
    pieces = []
    local = 0
    start = 0
    for n in seg_lens:
        if cp == 1:
            pieces.append(_Piece(local, n, start, n, 0))
            local += n
        else:
            if n % (2 * cp):
                raise ValueError(
                    f"context parallelism: every (sub-)sequence length must be a multiple of 2*cp = {2 * cp}, got "
                    f"{n}; pad sequences (llamafactory_mca.models.packing does so) before splitting them"
                )
            c = n // (2 * cp)
            for m in (rank, 2 * cp - 1 - rank):
                pieces.append(_Piece(local, c, start, n, m * c))
                local += c
        start += n
    perm = None
    if cp > 1:
        local_total = start // cp
        idx = []
        seg_start = 0
        for n in seg_lens:
            c = n // (2 * cp)
            for m in range(2 * cp):
                owner, within = (m, 0) if m < cp else (2 * cp - 1 - m, c)
                src = owner * local_total + seg_start // cp + within
                idx.append(torch.arange(src, src + c))
            seg_start += n
        perm = torch.cat(idx).to(device)
    return _Layout(tuple(pieces), perm)


class _GatherSeq(torch.autograd.Function):
    """All-gather along dim 0 over `group` (rank-major); backward: reduce-scatter (sum) of the gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        x = x.contiguous()
        out = x.new_empty((world * x.shape[0],) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world = dist.get_world_size(ctx.group)
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // world,) + tuple(grad.shape[1:]))
        dist.reduce_scatter_tensor(out, grad, group=ctx.group)
        return out, None


def gather_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """Autograd-aware all-gather of `x` along dim 0 over `group` (rank-major)."""
    return _GatherSeq.apply(x, group)


class SDPAttention(MegatronModule):
    """megatron `DotProductAttention` contract, computed by torch SDPA (also under context parallelism)."""

    window: Optional[int] = None  # keys before the query a sliding-window layer sees (`window_left`)

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
    ):
        super().__init__(config=config)
        if pg_collection is None:
            required = ["tp", "cp"] if config.context_parallel_size > 1 else ["tp"]
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=required)
        tp = pg_collection.tp.size()
        self.cp_group = getattr(pg_collection, "cp", None) if config.context_parallel_size > 1 else None
        if config.context_parallel_size > 1 and self.cp_group is None:
            raise ValueError("context_parallel_size > 1 but no context-parallel process group is initialised")
        if cp_comm_type not in (None, "p2p", "all_gather", "a2a", "a2a+p2p"):
            raise ValueError(f"unknown cp_comm_type {cp_comm_type!r}")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.window = window_left(config, self.layer_number)
        if self.window is not None and config.context_parallel_size > 1:
            raise ValueError("context_parallel_size: sliding-window attention cannot be split over context-parallel "
                             "ranks yet. Fix: set context_parallel_size: 1")
        head_dim = k_channels or config.kv_channels
        self.hidden_size_per_partition = divide((v_channels or config.kv_channels) * config.num_attention_heads, tp)
        self.num_heads = divide(config.num_attention_heads, tp)
        self.num_groups = divide(config.num_query_groups, tp)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    # ------------------------------------------------------------------------------------ helpers

    def _window_for(self, keys: int) -> Optional[int]:
        """The sliding window where it cuts something off among `keys` keys (None: plain causal attention)."""
        return self.window if self.window is not None and keys - 1 > self.window else None

    def _sdpa(self, q, k, v, mask, is_causal):
        kwargs = {}
        if self.num_heads != self.num_groups:
            if _SDPA_HAS_GQA and mask is None:
                kwargs["enable_gqa"] = True
            else:
                rep = self.num_heads // self.num_groups
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout_p if self.training else 0.0, is_causal=is_causal,
            scale=self.softmax_scale, **kwargs,
        )

    def _cp_size_rank(self) -> tuple:
        group = getattr(self, "cp_group", None)
        if group is None:
            return 1, 0
        return group.size(), group.rank()

    def _pieces_forward(self, q, k, v, seg_lens, causal, attention_mask) -> torch.Tensor:
        """q [b, h, sq, d] local rows; k/v [b, g, sk_local, d]. Attention per piece, rows in local order."""
        cp, rank = self._cp_size_rank()
        layout = _layout(seg_lens, cp, rank, q.device)
        if cp > 1:
            # one all-gather for k and v: [sk, b, g, 2d] rank-major -> full sequence order
            kv = torch.cat([k, v], dim=-1).permute(2, 0, 1, 3)
            kv = gather_sequence(kv, self.cp_group).index_select(0, layout.perm)
            kv = kv.permute(1, 2, 0, 3)
            k, v = kv[..., : k.shape[-1]], kv[..., k.shape[-1]:]
        sq = q.shape[2]
        outs = []
        for p in layout.pieces:
            qi = q[:, :, p.local_start: p.local_start + p.length]
            k_end = p.seg_start + (p.offset + p.length if causal else p.seg_len)
            ki = k[:, :, p.seg_start: k_end]
            vi = v[:, :, p.seg_start: k_end]
            window = self._window_for(k_end - p.seg_start) if causal else None
            if causal and p.offset > 0 and window is None and attention_mask is None:
                # keys of chunks 0..j for the chunk at position j: bottom-right causal, masked blocks skipped
                outs.append(lower_right_causal(qi, ki, vi, self.dropout_p if self.training else 0.0,
                                               self.softmax_scale))
                continue
            mask = None
            if causal and (p.offset > 0 or window is not None):
                mask = causal_band(p.length, k_end - p.seg_start, p.offset, window, q.device)
            if attention_mask is not None:
                am = attention_mask
                if am.shape[-2] == sq:
                    am = am[..., p.local_start: p.local_start + p.length, :]
                if am.shape[-1] != 1:
                    am = am[..., p.seg_start: k_end]
                allowed = ~am.bool()
                if mask is None and causal:
                    mask = causal_band(p.length, k_end - p.seg_start, 0, None, q.device)
                mask = allowed if mask is None else (mask & allowed)
            outs.append(self._sdpa(qi, ki, vi, mask, is_causal=causal and mask is None))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    # ------------------------------------------------------------------------------------ forward

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by SDPAttention")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        thd = query.dim() == 3
        if thd:  # [t, np, hn] -> [t, 1, np, hn]
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        sq, b = query.shape[0], query.shape[1]
        # [s, b, h, d] -> [b, h, s, d]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        cp, _ = self._cp_size_rank()
        packed = packed_seq_params is not None and packed_seq_params.cu_seqlens_q is not None

        if cp > 1 or (packed and attention_mask is None):
            if packed:
                if attention_mask is not None:
                    raise NotImplementedError(
                        "context parallelism with packed sequences takes cu_seqlens only, not an attention_mask")
                seg_lens = segment_lengths(packed_seq_params)
            else:
                seg_lens = [sq * cp]
            if sum(seg_lens) != sq * cp:
                raise ValueError(
                    f"packed sequence lengths sum to {sum(seg_lens)} but the input holds {sq} tokens x cp {cp}")
            out = self._pieces_forward(q, k, v, seg_lens, causal, attention_mask)
        else:
            out = self._dense_forward(q, k, v, sq, causal, attention_mask, packed_seq_params if packed else None)
        # [b, h, s, d] -> [s, b, h*d]
        out = out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
        if thd:
            out = out.squeeze(1)
        return out

    def _dense_forward(self, q, k, v, sq, causal, attention_mask, packed_seq_params) -> torch.Tensor:
        mask = None
        if packed_seq_params is not None:
            mask = _packed_mask(packed_boundaries(packed_seq_params), sq, q.device)
            if self._window_for(sq) is not None:
                mask = mask & causal_band(sq, sq, 0, self.window, q.device)
            if attention_mask is not None:
                mask = mask & ~attention_mask.bool()
        elif attention_mask is not None or (causal and self._window_for(k.shape[2]) is not None):
            sk = k.shape[2]
            mask = causal_band(sq, sk, sk - sq, self._window_for(sk), q.device) if causal else None
            if attention_mask is not None:
                allowed = ~attention_mask.bool()
                mask = allowed if mask is None else mask & allowed
        return self._sdpa(q, k, v, mask, is_causal=causal and mask is None)
