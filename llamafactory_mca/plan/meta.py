"""The recipe's model as one rank of an N-GPU layout would build it: on the `meta` device, in one process.

No process group of N ranks is started. torch's fake process group (`backend="fake"`, the in-process
simulator torch ships for exactly this) stands in for the world: megatron's `initialize_model_parallel` runs on
it for the simulated rank, so every module sees the real group sizes and ranks, and the bridge builds that
rank's model chunks (VPP), expert shards and padded vocabulary on `meta` with no weights read. Collectives are
never called while building.

`ParamCensus` is what the memory model needs from a build: local parameter counts of one rank by kind
(dense, expert, frozen, embedding / output rows) per model chunk, and the bytes of its largest tensor.
`derive_census` computes the same numbers for any layout from one tp=pp=ep=1 build (for `--search`, where a
build per layout would be too slow); a test checks it against the per-rank builds.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass
class ChunkCensus:
    """Local parameter counts of one model chunk (one virtual pipeline stage) of one rank."""

    layers: int = 0
    dense: int = 0  # trainable, reduced over data parallel (x context parallel)
    expert: int = 0  # trainable, reduced over expert data parallel
    frozen: int = 0  # requires_grad False: weights only
    vocab: int = 0  # embedding + output-layer elements among `dense` (padded rows included)
    largest: int = 0  # elements of the largest local tensor
    pre_process: bool = False
    post_process: bool = False

    @property
    def trainable(self) -> int:
        return self.dense + self.expert

    @property
    def total(self) -> int:
        return self.dense + self.expert + self.frozen


@dataclass
class ParamCensus:
    """One rank: its model chunks (one per VPP stage) and the pipeline stage they belong to."""

    pp_rank: int
    chunks: list = field(default_factory=list)

    def sum(self, attr: str) -> int:
        return sum(getattr(c, attr) for c in self.chunks)

    @property
    def layers(self) -> int:
        return self.sum("layers")

    @property
    def pre_process(self) -> bool:
        return any(c.pre_process for c in self.chunks)

    @property
    def post_process(self) -> bool:
        return any(c.post_process for c in self.chunks)


def is_expert_param(name: str) -> bool:
    """Routed-expert weights (reduced over the expert-data-parallel group; megatron marks them `allreduce=False`
    only when EP > 1, so the name decides)."""
    return name.startswith("mlp.experts.") or ".mlp.experts." in name


def build_meta_chunks(bridge: Any, hf_config: Any, mca_args: Any, dtype: torch.dtype) -> list:
    """The ONE call into the model-building API (the same call export's meta build makes): this rank's
    model chunks with every parameter on `meta`, no initialisation, no weights read."""
    return bridge.build_model(hf_config, mca_args, dtype, wrap_with_ddp=False, init_weights=False, device="meta")


@contextlib.contextmanager
def simulated_rank(mca_args: Any, world_size: int, rank: int) -> Iterator[None]:
    """megatron parallel_state for global `rank` of `world_size` on torch's fake process group (no peers,
    no communication). Refuses to run inside a real process group."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    import torch.testing._internal.distributed.fake_pg as fake_pg  # registers the "fake" backend
    from llamafactory_mca.platform import initialize_layout, setup_platform

    if dist.is_initialized():
        raise RuntimeError("plan simulates ranks in one process: run it outside torchrun / an initialised group")
    setup_platform()
    dist.init_process_group("fake", rank=rank, world_size=world_size, store=fake_pg.FakeStore())
    try:
        initialize_layout(mca_args, create_gloo_process_groups=False)  # gloo groups cannot exist on the fake group
        yield
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        dist.destroy_process_group()


def census_of_chunks(chunks: list, pp_rank: int) -> ParamCensus:
    """Count the local parameters of built model chunks (meta or real) by kind."""
    census = ParamCensus(pp_rank=pp_rank)
    for model in chunks:
        while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        c = ChunkCensus(layers=len(model.decoder.layers), pre_process=bool(model.pre_process),
                        post_process=bool(model.post_process))
        for name, p in model.named_parameters():
            n = p.numel()
            c.largest = max(c.largest, n)
            if not p.requires_grad:
                c.frozen += n
            elif not is_expert_param(name):
                c.dense += n
                if name in _VOCAB_PARAMS:
                    c.vocab += n
            else:
                c.expert += n
        census.chunks.append(c)
    return census


def stage_ranks(mca_args: Any, world_size: int) -> list[int]:
    """One global rank per pipeline stage (tp = cp = dp = ep rank 0): the distinct ranks of a layout (ranks of one
    stage hold the same shapes: TP/EP shards are equal, the vocab is padded to a multiple of TP)."""
    pp = mca_args.pipeline_model_parallel_size
    return [s * (world_size // pp) for s in range(pp)]


def build_census(bridge: Any, hf_config: Any, mca_args: Any, world_size: int, dtype: torch.dtype,
                 freeze: Optional[Any] = None) -> list[ParamCensus]:
    """Per pipeline stage: build its rank's model on `meta` under a simulated `world_size` and count it.
    `freeze(bridge, chunks)` marks frozen parameters (e.g. LLaMA-Factory's vision-tower freezing)."""
    from megatron.core import parallel_state as ps

    out = []
    for rank in stage_ranks(mca_args, world_size):
        with simulated_rank(mca_args, world_size, rank):
            chunks = build_meta_chunks(bridge, hf_config, mca_args, dtype)
            if freeze is not None:
                freeze(bridge, chunks)
            out.append(census_of_chunks(chunks, ps.get_pipeline_model_parallel_rank()))
    return out


# --------------------------------------------------------------------------------------------- derived


@dataclass
class ModelDims:
    """The widths the activation model needs, read from a built chunk's TransformerConfig."""

    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    experts: int = 0
    moe_ffn: int = 0
    topk: int = 0
    qk_layernorm: bool = False
    padded_vocab: int = 0
    vocab: int = 0
    # hybrid models (gated delta-net layers): their share of the layers and their widths
    linear_fraction: float = 0.0
    linear_key_heads: int = 0
    linear_value_heads: int = 0
    linear_key_dim: int = 0
    linear_value_dim: int = 0

    @property
    def moe(self) -> bool:
        return self.experts > 0

    def flops_per_token(self, seq: int) -> float:
        """Model FLOPs per trained token, fwd + bwd (benchmarks/shapes.py's definition): 6 x active matmul
        weights (embedding lookup excluded, output layer included) + causal attention."""
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * (self.moe_ffn * self.topk if self.moe else self.ffn) + (
            self.hidden * self.experts if self.moe else 0)
        active = self.num_layers * (attn + mlp) + self.hidden * self.vocab
        return 6.0 * active + 6.0 * self.num_layers * seq * self.heads * self.head_dim


@dataclass
class LayerTemplate:
    """Parameter elements of one decoder layer and of the pre / post parts at tp=pp=ep=1, by how they split."""

    layer_tp: int = 0  # dense, split by TP
    layer_repl: int = 0  # dense, replicated (norms, router)
    layer_expert: int = 0  # expert weights (split by EP x ETP)
    layer_frozen: int = 0
    pre_repl: int = 0  # embedding stage, besides the word embedding (e.g. frozen vision tower counted below)
    pre_frozen: int = 0
    post_repl: int = 0  # final norm
    hidden: int = 0
    tied: bool = False
    largest_layer: int = 0
    dims: Optional[ModelDims] = None


def layer_template(bridge: Any, hf_config: Any, dtype: torch.dtype, freeze: Optional[Any] = None) -> LayerTemplate:
    """Build the model once for one rank (tp=pp=ep=1, meta) and record per-layer counts by split kind."""
    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models.model_state import model_state

    with simulated_rank(MegatronArguments(), 1, 0):
        chunks = build_meta_chunks(bridge, hf_config, MegatronArguments(), dtype)
        if freeze is not None:
            freeze(bridge, chunks)
    model = chunks[0]
    cfg = model.config
    dims = ModelDims(num_layers=cfg.num_layers, hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
                     kv_heads=cfg.num_query_groups or cfg.num_attention_heads, head_dim=cfg.kv_channels,
                     ffn=cfg.ffn_hidden_size, experts=cfg.num_moe_experts or 0, moe_ffn=cfg.moe_ffn_hidden_size or 0,
                     topk=cfg.moe_router_topk or 0, qk_layernorm=bool(cfg.qk_layernorm),
                     padded_vocab=int(model_state(model).padded_vocab_size), vocab=int(bridge.padded_vocab_size(hf_config, 1)))
    dims.vocab = min(dims.vocab, _real_vocab(hf_config))
    from llamafactory_mca.models.gated_delta_net import GatedDeltaNet

    linear = sum(isinstance(layer.self_attention, GatedDeltaNet) for layer in model.decoder.layers)
    if linear:
        dims.linear_fraction = linear / len(model.decoder.layers)
        dims.linear_key_heads, dims.linear_value_heads = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        dims.linear_key_dim, dims.linear_value_dim = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    t = LayerTemplate(hidden=cfg.hidden_size, tied=bool(model.share_embeddings_and_output_weights), dims=dims)
    layer0 = model.decoder.layers[0]
    for _name, p in layer0.named_parameters():
        n = p.numel()
        t.largest_layer = max(t.largest_layer, n)
        if not p.requires_grad:
            t.layer_frozen += n
        elif is_expert_param(_name):
            t.layer_expert += n
        elif getattr(p, "tensor_model_parallel", False):
            t.layer_tp += n
        else:
            t.layer_repl += n
    layer_names = {id(p) for layer in model.decoder.layers for p in layer.parameters()}
    for name, p in model.named_parameters():
        if id(p) in layer_names or name in _VOCAB_PARAMS:
            continue
        post = name.startswith("decoder.final_layernorm")
        if not p.requires_grad:
            t.pre_frozen += p.numel()
        elif post:
            t.post_repl += p.numel()
        else:
            t.pre_repl += p.numel()
    return t


def _real_vocab(hf_config: Any) -> int:
    vocab = getattr(hf_config, "vocab_size", None)
    if vocab is None:
        vocab = getattr(getattr(hf_config, "text_config", None), "vocab_size", None)
    return int(vocab)


def pipeline_layers(num_layers: int, mca_args: Any) -> list[int]:
    """Decoder layers per pipeline stage, as megatron splits them (even, or uneven first / last stage)."""
    pp = mca_args.pipeline_model_parallel_size
    first, last = mca_args.num_layers_in_first_pipeline_stage, mca_args.num_layers_in_last_pipeline_stage
    if first is None and last is None:
        return [num_layers // pp] * pp
    middle_stages = pp - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    mid = rest // middle_stages if middle_stages else 0
    out = [mid] * pp
    if first is not None:
        out[0] = first
    if last is not None:
        out[-1] = last
    return out


def derive_census(t: LayerTemplate, bridge: Any, hf_config: Any, num_layers: int, mca_args: Any) -> list[ParamCensus]:
    """Per-stage `ParamCensus` of a layout computed from a `layer_template` (no build)."""
    tp = mca_args.tensor_model_parallel_size
    etp = mca_args.expert_tensor_parallel_size or tp
    ep = mca_args.expert_model_parallel_size
    vpp = mca_args.virtual_pipeline_model_parallel_size or 1
    rows = bridge.padded_vocab_size(hf_config, tp)
    vocab_local = rows // tp * t.hidden
    dense_layer = t.layer_tp // tp + t.layer_repl
    expert_layer = t.layer_expert // (ep * etp)
    largest = max(t.largest_layer // max(tp, 1), vocab_local)
    out = []
    for s, n in enumerate(pipeline_layers(num_layers, mca_args)):
        census = ParamCensus(pp_rank=s)
        per_chunk = [n // vpp + (1 if v < n % vpp else 0) for v in range(vpp)]
        for v, layers in enumerate(per_chunk):
            c = ChunkCensus(layers=layers, largest=largest)
            c.pre_process = s == 0 and v == 0
            c.post_process = s == mca_args.pipeline_model_parallel_size - 1 and v == vpp - 1
            c.dense = layers * dense_layer
            c.expert = layers * expert_layer
            c.frozen = layers * t.layer_frozen
            if c.pre_process:
                c.dense += vocab_local + t.pre_repl
                c.vocab += vocab_local
                c.frozen += t.pre_frozen
            if c.post_process:
                c.dense += t.post_repl
                if not t.tied or mca_args.pipeline_model_parallel_size * vpp > 1:
                    c.dense += vocab_local
                    c.vocab += vocab_local
            census.chunks.append(c)
        out.append(census)
    return out


__all__ = [
    "ChunkCensus",
    "LayerTemplate",
    "ModelDims",
    "ParamCensus",
    "build_census",
    "build_meta_chunks",
    "census_of_chunks",
    "derive_census",
    "layer_template",
    "pipeline_layers",
    "simulated_rank",
    "stage_ranks",
]
