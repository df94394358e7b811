"""Core attention on `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on
GPU, no [b, h, s, s] score matrix in Python), a drop-in for megatron-core's `DotProductAttention`.

Layouts follow megatron: query [sq, b, np, hn], key/value [sk, b, ng, hn] (ng = query groups on this TP
rank); output [sq, b, np * hn]. `attention_mask` is megatron's boolean mask (True = masked out), shape
broadcastable to [b, 1 or np, sq, sk]; with the causal mask type it is combined with the causal mask.
Packed sequences (`packed_seq_params`, THD) run as one sequence with a block-diagonal causal mask.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

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


class SDPAttention(MegatronModule):
    """megatron `DotProductAttention` contract, computed by torch SDPA."""

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
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError(
                "context_parallel_size > 1 needs Transformer Engine attention; "
                "set context_parallel_size: 1 or install transformer_engine"
            )
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, tp)
        self.num_heads = divide(config.num_attention_heads, tp)
        self.num_groups = divide(config.num_query_groups, tp)
        head_dim = divide(projection_size, config.num_attention_heads)
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

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

        mask = None
        if packed_seq_params is not None and packed_seq_params.cu_seqlens_q is not None:
            mask = _packed_mask(packed_seq_params.cu_seqlens_q, sq, q.device)
            if attention_mask is not None:
                mask = mask & ~attention_mask.bool()
        elif attention_mask is not None:
            mask = ~attention_mask.bool()
            if causal:
                sk = k.shape[2]
                tri = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(diagonal=sk - sq)
                mask = mask & tri
        use_causal_flag = causal and mask is None

        kwargs = {}
        if self.num_heads != self.num_groups:
            if _SDPA_HAS_GQA and mask is None:
                kwargs["enable_gqa"] = True
            else:
                rep = self.num_heads // self.num_groups
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=use_causal_flag,
            scale=self.softmax_scale,
            **kwargs,
        )
        # [b, h, s, d] -> [s, b, h*d]
        out = out.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
        if thd:
            out = out.squeeze(1)
        return out
