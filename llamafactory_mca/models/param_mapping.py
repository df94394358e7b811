"""Parameter-name tables and tensor-parallel split kinds: pure tensor arithmetic, no I/O, no collectives.

A family table maps *canonical* megatron parameter names to Hugging Face names and a split kind::

    "decoder.layers.{L}.self_attention.linear_qkv.weight": (("...q_proj.weight", "...k_proj.weight",
                                                              "...v_proj.weight"), QKV)

Canonical names use the global layer index `{L}` and the global expert index `{E}` (megatron modules hold
local indices: layers are numbered per pipeline chunk, experts per expert-parallel rank; the grouped
`experts.weight1/weight2` tensors are split into one fc1/fc2 entry per expert).

Kinds (how a tensor is sliced for tensor parallelism, and re-assembled), one `ParamMapping` class each:
  REPL     `Replicated`  (norms, router)
  COLUMN   `Column`      split along dim 0
  ROW      `Row`         split along dim 1
  VOCAB    `Vocab`       split along dim 0, vocab padded (see `ModelBridge.padded_vocab_size`: the same padded size
                         for every TP size that divides 128, so checkpoints resume across TP changes); padding
                         rows are zero, their logits are masked to -inf, and export strips them
  QKV      `FusedQKV`    q, k, v fused; megatron interleaves per query group [q_g (heads/group * d), k_g (d),
                         v_g (d)], TP splits by query groups
  GLU      `GatedMLP`    gate, up fused as [gate_shard; up_shard] per TP rank (dense MLP and expert fc1)
  GQKV     `GatedFusedQKV`  q with its output gate, k, v (Qwen3-Next's gated attention): HF `q_proj` holds per head
                         [q_h; gate_h]; megatron (`attention_output_gate`) per query group [q_g, gate_g, k_g, v_g]
  CONV3    `ConvSections`   the depthwise convolution of a linear-attention layer over the channels [q | k | v]
                         (Qwen3-Next's `conv1d`): each of the three sections is split over TP
Each class knows both directions: `local_shard` (this rank's shard, from slices of the Hugging Face tensors of
a `TensorSource`) and `to_hf` (the Hugging Face tensors of the TP shards concatenated in rank order). The
bridge's load, the export, the merge and LoRA (`lora_slot_sizes`) all use them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional, Protocol, Union

import torch

REPL, COLUMN, ROW, VOCAB, QKV, GLU = "repl", "column", "row", "vocab", "qkv", "glu"
GQKV, CONV3 = "gated_qkv", "conv_sections"

HFNames = Union[str, tuple]
Table = dict  # canonical megatron name template -> (hf name(s) template, kind)


class TensorSource(Protocol):
    """Sliced read access to Hugging Face tensors by name (e.g. `safetensors_io.SafetensorsReader`)."""

    def shape(self, name: str) -> list[int]:
        """The full shape of tensor `name`."""

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Tensor `name`, or its rows (`dim=0`) / columns (`dim=1`) start:stop."""


@dataclass(frozen=True)
class QkvLayout:
    """Head arithmetic of a fused QKV tensor: `head_dim` d, `num_heads` query heads in `num_groups` groups."""

    head_dim: int
    num_heads: int
    num_groups: int

    @property
    def heads_per_group(self) -> int:
        """Query heads per key/value group."""
        return self.num_heads // self.num_groups

    @property
    def group_rows(self) -> int:
        """Rows of one query group in megatron's fused layout: [q_g, k_g, v_g]."""
        return (self.heads_per_group + 2) * self.head_dim

    def local_groups(self, tp_size: int) -> int:
        """Query groups held by one of `tp_size` TP ranks."""
        return self.num_groups // tp_size

    def rank_groups(self, tp_size: int, tp_rank: int) -> range:
        """Indices of the query groups held by TP rank `tp_rank` of `tp_size`."""
        per_rank = self.local_groups(tp_size)
        return range(tp_rank * per_rank, (tp_rank + 1) * per_rank)

    def local_sizes(self, tp_size: int) -> list[int]:
        """Rows of q, k and v in one TP rank's shard of the fused tensor."""
        groups = self.local_groups(tp_size)
        return [groups * self.heads_per_group * self.head_dim, groups * self.head_dim, groups * self.head_dim]


def qkv_layout(hf_config: Any, head_dim: int) -> QkvLayout:
    """The `QkvLayout` of a (text) Hugging Face config whose heads have `head_dim` channels."""
    nq = hf_config.num_attention_heads
    return QkvLayout(head_dim=head_dim, num_heads=nq, num_groups=getattr(hf_config, "num_key_value_heads", None) or nq)


@dataclass(frozen=True)
class ShardContext:
    """What a split needs besides the tensors: this rank's place in its TP group and the model's shapes.

    `hf_config`: the text model's config (`vocab_size`, heads); `qkv`: its `QkvLayout`; `local_rows`: rows of
    this rank's shard as the model was built (the padded vocab of `Vocab`).
    """

    tp_rank: int
    tp_size: int
    hf_config: Any = None
    qkv: Optional[QkvLayout] = None
    local_rows: Optional[int] = None


class ParamMapping:
    """One split kind: Hugging Face full tensors <-> megatron TP shards (subclasses below)."""

    kind: str = ""
    gather_dim: Optional[int] = None  # dimension the TP shards are concatenated along (None: replicated)

    def local_shard(self, source: TensorSource, hf_names: tuple, ctx: ShardContext) -> torch.Tensor:
        """This rank's shard, in megatron's layout, read as slices of the Hugging Face tensors `hf_names`."""
        raise NotImplementedError

    def to_hf(self, hf_names: tuple, full: torch.Tensor, ctx: ShardContext) -> list[tuple[str, torch.Tensor]]:
        """The Hugging Face tensors of `full`, the `ctx.tp_size` shards concatenated along `gather_dim`."""
        return [(hf_names[0], full)]

    def lora_slot_sizes(self, out_local: int, ctx: ShardContext) -> list[int]:
        """Output rows of each Hugging Face module fused in this rank's shard of `out_local` rows (LoRA)."""
        return [out_local]

    def fuse_outputs(self, outs: list[torch.Tensor], ctx: ShardContext) -> torch.Tensor:
        """Per-Hugging-Face-module outputs [..., n_i] (in `lora_slot_sizes` order, each in HF row order) -> this
        rank's fused output layout [..., sum n_i] (LoRA's outputs, delta weights and DoRA vectors)."""
        return torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]

    def split_outputs(self, fused: torch.Tensor, sizes: list[int], ctx: ShardContext) -> list[torch.Tensor]:
        """Inverse of `fuse_outputs` for a vector in the fused layout: one piece per module."""
        return list(fused.split(sizes))


class Replicated(ParamMapping):
    """The same full tensor on every TP rank (norms, router)."""

    kind = REPL

    def local_shard(self, source: TensorSource, hf_names: tuple, ctx: ShardContext) -> torch.Tensor:
        """The whole tensor."""
        return source.read(hf_names[0])


class Column(ParamMapping):
    """Split along dim 0 (output features)."""

    kind = COLUMN
    gather_dim = 0

    def local_shard(self, source: TensorSource, hf_names: tuple, ctx: ShardContext) -> torch.Tensor:
        """Rows tp_rank * n / tp ... of the tensor."""
        dim = self.gather_dim
        per = source.shape(hf_names[0])[dim] // ctx.tp_size
        return source.read(hf_names[0], dim, ctx.tp_rank * per, (ctx.tp_rank + 1) * per)


class Row(Column):
    """Split along dim 1 (input features)."""

    kind = ROW
    gather_dim = 1


class Vocab(ParamMapping):
    """Split along dim 0 over the padded vocabulary; padding rows are zero and stripped on export."""

    kind = VOCAB
    gather_dim = 0

    def local_shard(self, source: TensorSource, hf_names: tuple, ctx: ShardContext) -> torch.Tensor:
        """This rank's `ctx.local_rows` rows of the padded vocabulary (zeros past the real vocab)."""
        shape = source.shape(hf_names[0])
        per = ctx.local_rows  # this rank's rows of the padded vocab (as the model was built)
        start, stop = ctx.tp_rank * per, (ctx.tp_rank + 1) * per
        part = source.read(hf_names[0], 0, min(start, shape[0]), min(stop, shape[0]))
        if part.shape[0] < per:
            part = torch.cat([part, part.new_zeros((per - part.shape[0],) + tuple(shape[1:]))], 0)
        return part

    def to_hf(self, hf_names: tuple, full: torch.Tensor, ctx: ShardContext) -> list[tuple[str, torch.Tensor]]:
        """The real vocabulary's rows."""
        return [(hf_names[0], full[: ctx.hf_config.vocab_size])]


class GatedMLP(ParamMapping):
    """gate and up fused as [gate_shard; up_shard] per TP rank (dense fc1 and expert fc1)."""

    kind = GLU
    gather_dim = 0

    def local_shard(self, source: TensorSource, hf_names: tuple, ctx: ShardContext) -> torch.Tensor:
        """This rank's rows of gate, then of up."""
        per = source.shape(hf_names[0])[0] // ctx.tp_size
        return torch.cat([source.read(h, 0, ctx.tp_rank * per, (ctx.tp_rank + 1) * per) for h in hf_names], 0)

    def to_hf(self, hf_names: tuple, full: torch.Tensor, ctx: ShardContext) -> list[tuple[str, torch.Tensor]]:
        """gate and up, each re-assembled from the per-rank halves."""
        tp_size = ctx.tp_size
        rest = full.shape[1:]
        per = full.shape[0] // (2 * tp_size)
        view = full.reshape(tp_size, 2, per, *rest)
        return [(hf_names[0], view[:, 0].reshape(-1, *rest)), (hf_names[1], view[:, 1].reshape(-1, *rest))]

    def lora_slot_sizes(self, out_local: int, ctx: ShardContext) -> list[int]:
        """Half the rows for gate, half for up."""
        return [out_local // 2, out_local // 2]


class FusedQKV(ParamMapping):
    """q, k, v interleaved per query group; TP splits by query groups."""

    kind = QKV
    gather_dim = 0

    def local_shard(self, source: TensorSource, hf_names: tuple, ctx: ShardContext) -> torch.Tensor:
        """[query rows of g, k_g, v_g] for each query group g of this rank (`query_rows`)."""
        lay = ctx.qkv
        d = lay.head_dim
        parts = []
        for g in lay.rank_groups(ctx.tp_size, ctx.tp_rank):
            parts += self.query_rows(source, hf_names[0], g, lay)
            parts.append(source.read(hf_names[1], 0, g * d, (g + 1) * d))
            parts.append(source.read(hf_names[2], 0, g * d, (g + 1) * d))
        return torch.cat(parts, 0)

    def query_rows(self, source: TensorSource, q_name: str, g: int, lay: "QkvLayout") -> list[torch.Tensor]:
        """The fused tensor's rows before k_g in query group g: q_g."""
        size = lay.heads_per_group * lay.head_dim
        return [source.read(q_name, 0, g * size, (g + 1) * size)]

    def to_hf(self, hf_names: tuple, full: torch.Tensor, ctx: ShardContext) -> list[tuple[str, torch.Tensor]]:
        """q, k and v, de-interleaved."""
        lay = ctx.qkv
        d, nq, ng, hpg = lay.head_dim, lay.num_heads, lay.num_groups, lay.heads_per_group
        rest = full.shape[1:]
        view = full.reshape(ng, lay.group_rows, *rest)
        q = view[:, : hpg * d].reshape(nq * d, *rest)
        k = view[:, hpg * d: (hpg + 1) * d].reshape(ng * d, *rest)
        v = view[:, (hpg + 1) * d:].reshape(ng * d, *rest)
        return [(hf_names[0], q), (hf_names[1], k), (hf_names[2], v)]

    def lora_slot_sizes(self, out_local: int, ctx: ShardContext) -> list[int]:
        """Rows of q, k and v of this rank's query groups."""
        return ctx.qkv.local_sizes(ctx.tp_size)

    def fuse_outputs(self, outs: list[torch.Tensor], ctx: ShardContext) -> torch.Tensor:
        """q, k, v outputs interleaved per query group ([q_g, k_g, v_g] for each of the rank's groups)."""
        lead, groups = outs[0].shape[:-1], ctx.qkv.local_groups(ctx.tp_size)
        q, k, v = (o.reshape(*lead, groups, -1) for o in outs)
        return torch.cat([self.fused_query(q, ctx.qkv.head_dim), k, v], dim=-1).reshape(*lead, -1)

    def split_outputs(self, fused: torch.Tensor, sizes: list[int], ctx: ShardContext) -> list[torch.Tensor]:
        """q, k and v pieces of a fused vector (per-group interleaving undone)."""
        groups = ctx.qkv.local_groups(ctx.tp_size)
        q, k, v = fused.reshape(groups, -1).split([n // groups for n in sizes], dim=-1)
        return [self.hf_query(q, ctx.qkv.head_dim).reshape(-1), k.reshape(-1), v.reshape(-1)]

    def fused_query(self, q: torch.Tensor, head_dim: int) -> torch.Tensor:
        """[..., groups, rows] of q_proj's output in HF order -> the fused tensor's query rows of each group."""
        return q

    def hf_query(self, q: torch.Tensor, head_dim: int) -> torch.Tensor:
        """Inverse of `fused_query`."""
        return q


class GatedFusedQKV(FusedQKV):
    """Gated attention: HF `q_proj` rows per head [q_h (d); gate_h (d)], k, v; megatron's fused tensor per query
    group [q_g (heads/group * d), gate_g (heads/group * d), k_g (d), v_g (d)]; TP splits by query groups."""

    kind = GQKV

    def query_rows(self, source: TensorSource, q_name: str, g: int, lay: "QkvLayout") -> list[torch.Tensor]:
        """q_g then gate_g: HF's per-head [q_h; gate_h] rows of query group g, de-interleaved."""
        d, hpg = lay.head_dim, lay.heads_per_group
        q_gate = source.read(q_name, 0, g * hpg * 2 * d, (g + 1) * hpg * 2 * d)
        q_gate = q_gate.reshape(hpg, 2, d, *q_gate.shape[1:])
        return [q_gate[:, 0].reshape(hpg * d, *q_gate.shape[3:]), q_gate[:, 1].reshape(hpg * d, *q_gate.shape[3:])]

    def lora_slot_sizes(self, out_local: int, ctx: ShardContext) -> list[int]:
        """Rows of q_proj (q and gate), k and v of this rank's query groups."""
        q, k, v = ctx.qkv.local_sizes(ctx.tp_size)
        return [2 * q, k, v]

    def fused_query(self, q: torch.Tensor, head_dim: int) -> torch.Tensor:
        """HF's per-head [q_h; gate_h] rows of each group -> [q of the group's heads; their gates]."""
        return q.unflatten(-1, (-1, 2, head_dim)).transpose(-3, -2).flatten(-3)

    def hf_query(self, q: torch.Tensor, head_dim: int) -> torch.Tensor:
        """Inverse of `fused_query`."""
        return q.unflatten(-1, (2, -1, head_dim)).transpose(-3, -2).flatten(-3)

    def to_hf(self, hf_names: tuple, full: torch.Tensor, ctx: ShardContext) -> list[tuple[str, torch.Tensor]]:
        """q_proj (q and gate interleaved per head again), k and v."""
        lay = ctx.qkv
        d, nq, ng, hpg = lay.head_dim, lay.num_heads, lay.num_groups, lay.heads_per_group
        rest = full.shape[1:]
        view = full.reshape(ng, (2 * hpg + 2) * d, *rest)
        q = view[:, : hpg * d].reshape(ng, hpg, 1, d, *rest)
        gate = view[:, hpg * d: 2 * hpg * d].reshape(ng, hpg, 1, d, *rest)
        k = view[:, 2 * hpg * d: (2 * hpg + 1) * d].reshape(ng * d, *rest)
        v = view[:, (2 * hpg + 1) * d:].reshape(ng * d, *rest)
        return [(hf_names[0], torch.cat([q, gate], 2).reshape(nq * 2 * d, *rest)), (hf_names[1], k),
                (hf_names[2], v)]


class ConvSections(ParamMapping):
    """A depthwise convolution over the channels [q (key heads * dk) | k (key heads * dk) | v (value heads * dv)]
    (`linear_num_key_heads`, `linear_key_head_dim`, ... of `ctx.hf_config`): each section split over TP, a rank
    holding [q_r | k_r | v_r]."""

    kind = CONV3
    gather_dim = 0

    @staticmethod
    def sections(ctx: ShardContext) -> list[int]:
        """Channels of q, k and v."""
        cfg = ctx.hf_config
        keys = cfg.linear_num_key_heads * cfg.linear_key_head_dim
        return [keys, keys, cfg.linear_num_value_heads * cfg.linear_value_head_dim]

    def local_shard(self, source: TensorSource, hf_names: tuple, ctx: ShardContext) -> torch.Tensor:
        """This rank's channels of each section."""
        parts, start = [], 0
        for size in self.sections(ctx):
            per = size // ctx.tp_size
            parts.append(source.read(hf_names[0], 0, start + ctx.tp_rank * per, start + (ctx.tp_rank + 1) * per))
            start += size
        return torch.cat(parts, 0)

    def to_hf(self, hf_names: tuple, full: torch.Tensor, ctx: ShardContext) -> list[tuple[str, torch.Tensor]]:
        """The sections put back together from the ranks' shards."""
        local = [size // ctx.tp_size for size in self.sections(ctx)]
        ranks = [torch.split(shard, local, 0) for shard in torch.chunk(full, ctx.tp_size, 0)]
        return [(hf_names[0], torch.cat([r[i] for i in range(len(local)) for r in ranks], 0))]


MAPPINGS: dict[str, ParamMapping] = {m.kind: m for m in (Replicated(), Column(), Row(), Vocab(), GatedMLP(),
                                                         FusedQKV(), GatedFusedQKV(), ConvSections())}


def mapping_for(kind: str) -> ParamMapping:
    """The `ParamMapping` of a table kind (REPL, COLUMN ...); ValueError for an unknown kind."""
    try:
        return MAPPINGS[kind]
    except KeyError:
        raise ValueError(kind) from None


# ------------------------------------------------------------------------------------ name tables


def compile_table(table: Table) -> list:
    """[(regex, hf name templates, kind)] of a table: `{L}` / `{E}` become named groups."""
    out = []
    for mkey, (hf, kind) in table.items():
        pattern = re.escape(mkey).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{E\}", r"(?P<E>\d+)")
        out.append((re.compile(pattern + "$"), hf if isinstance(hf, tuple) else (hf,), kind))
    return out


def lookup(compiled: list, key: str) -> Optional[tuple[tuple[str, ...], str]]:
    """(Hugging Face names, kind) of canonical megatron name `key` in a compiled table, or None."""
    for regex, hf, kind in compiled:
        mt = regex.match(key)
        if mt:
            fields = mt.groupdict()
            return tuple(h.format(**fields) for h in hf), kind
    return None


def natural_key(s: str) -> list:
    """Sort key that orders embedded numbers numerically (layer 2 before layer 10)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def dense_table(attn_bias: bool = False, qk_norm: bool = False) -> Table:
    """The Llama-style decoder table (also Qwen2 with q/k/v bias, Qwen3 with q/k norm)."""
    p = "model.layers.{L}."
    t: Table = {
        "embedding.word_embeddings.weight": ("model.embed_tokens.weight", VOCAB),
        "output_layer.weight": ("lm_head.weight", VOCAB),
        "decoder.final_layernorm.weight": ("model.norm.weight", REPL),
        "decoder.layers.{L}.input_layernorm.weight": (p + "input_layernorm.weight", REPL),
        "decoder.layers.{L}.self_attention.linear_qkv.weight": (
            (p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"), QKV),
        "decoder.layers.{L}.self_attention.linear_proj.weight": (p + "self_attn.o_proj.weight", ROW),
        "decoder.layers.{L}.pre_mlp_layernorm.weight": (p + "post_attention_layernorm.weight", REPL),
        "decoder.layers.{L}.mlp.linear_fc1.weight": ((p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"), GLU),
        "decoder.layers.{L}.mlp.linear_fc2.weight": (p + "mlp.down_proj.weight", ROW),
    }
    if attn_bias:
        t["decoder.layers.{L}.self_attention.linear_qkv.bias"] = (
            (p + "self_attn.q_proj.bias", p + "self_attn.k_proj.bias", p + "self_attn.v_proj.bias"), QKV)
    if qk_norm:
        t["decoder.layers.{L}.self_attention.q_layernorm.weight"] = (p + "self_attn.q_norm.weight", REPL)
        t["decoder.layers.{L}.self_attention.k_layernorm.weight"] = (p + "self_attn.k_norm.weight", REPL)
    return t


def moe_table(base: Table, router: str, gate: str, up: str, down: str, keep_dense_mlp: bool = False) -> Table:
    """`base` with the dense MLP replaced by a router and per-expert MLPs (names relative to the layer).

    `keep_dense_mlp`: keep the dense MLP entries too, for models that mix dense and MoE layers (the canonical
    names tell them apart: `mlp.linear_fc1` is a dense layer's, `mlp.experts.{E}.linear_fc1` an expert's)."""
    p = "model.layers.{L}."
    t = dict(base) if keep_dense_mlp else {k: v for k, v in base.items() if ".mlp.linear_fc" not in k}
    t["decoder.layers.{L}.mlp.router.weight"] = (p + router, REPL)
    t["decoder.layers.{L}.mlp.experts.{E}.linear_fc1.weight"] = ((p + gate, p + up), GLU)
    t["decoder.layers.{L}.mlp.experts.{E}.linear_fc2.weight"] = (p + down, ROW)
    return t


def shared_expert_entries(module: str, gate: Optional[str] = None, expert_bias: Optional[str] = None) -> Table:
    """Table entries of a MoE layer's shared expert and router extras (names relative to the layer).

    `module`: the Hugging Face shared-expert MLP (`mlp.shared_expert` in Qwen2-MoE, `mlp.shared_experts` in
    GLM-4-MoE / DeepSeek) with gate_proj / up_proj / down_proj, split over TP like a dense MLP (megatron's
    `SharedExpertMLP`); `gate`: the sigmoid gate's weight [1, hidden] (`mlp.shared_expert_gate.weight`,
    megatron's `shared_experts.gate_weight`); `expert_bias`: the router's score-correction bias used for the
    expert choice only (`mlp.gate.e_score_correction_bias`, megatron's `router.expert_bias` buffer)."""
    p = "model.layers.{L}."
    m = "decoder.layers.{L}.mlp."
    t: Table = {
        m + "shared_experts.linear_fc1.weight": ((p + module + ".gate_proj.weight", p + module + ".up_proj.weight"),
                                                 GLU),
        m + "shared_experts.linear_fc2.weight": (p + module + ".down_proj.weight", ROW),
    }
    if gate:
        t[m + "shared_experts.gate_weight"] = (p + gate, REPL)
    if expert_bias:
        t[m + "router.expert_bias"] = (p + expert_bias, REPL)
    return t


def mla_table(base: Table) -> Table:
    """`base` with the fused q/k/v attention replaced by multi-latent attention (DeepSeek-V2/V3 names).

    Both query forms are listed: `q_proj` (q_lora_rank None) and `q_a_proj` / `q_a_layernorm` / `q_b_proj`; a model
    uses the entries its modules have. The down projections are megatron ColumnParallelLinears (rows split over TP,
    gathered before use), the up projections split by heads, `o_proj` by its input columns."""
    p = "model.layers.{L}.self_attn."
    a = "decoder.layers.{L}.self_attention."
    t = {k: v for k, v in base.items() if ".self_attention." not in k}
    t.update({
        a + "linear_q_proj.weight": (p + "q_proj.weight", COLUMN),
        a + "linear_q_down_proj.weight": (p + "q_a_proj.weight", COLUMN),
        a + "q_layernorm.weight": (p + "q_a_layernorm.weight", REPL),
        a + "linear_q_up_proj.weight": (p + "q_b_proj.weight", COLUMN),
        a + "linear_kv_down_proj.weight": (p + "kv_a_proj_with_mqa.weight", COLUMN),
        a + "kv_layernorm.weight": (p + "kv_a_layernorm.weight", REPL),
        a + "linear_kv_up_proj.weight": (p + "kv_b_proj.weight", COLUMN),
        a + "linear_proj.weight": (p + "o_proj.weight", ROW),
    })
    return t
