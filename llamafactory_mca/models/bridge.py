"""The family bridge: Hugging Face config and weights <-> megatron-core model chunks, driven by one table.

A family subclasses `ModelBridge`, sets `model_types` and `table` (canonical megatron name -> Hugging Face
name(s) and split kind, see `models/param_mapping.py`) and overrides the public hooks it needs (below). The
concerns live in their own modules; this class is their one entry point for a family:

  param_mapping.py       name tables and the TP split kinds (pure: no I/O, no collectives)
  transformer_config.py  megatron's TransformerConfig (`transformer_config`)
  construction.py        the model chunks (`build_model`), with their `model_state.ModelState`
  safetensors_io.py      the safetensors reader (`reader`, `load_hf_weights`) and writer
  hf_export.py           export to Hugging Face (`export_hf_state_dict`, `save_hf_pretrained`)

Hooks a family may override (all public): `check_config`, `text_config`, `rope_parameters`, `rope_theta`,
`rotary_percent`, `head_dim`, `qk_layernorm`, `add_qkv_bias`, `tied_embeddings`, `num_experts`, `moe_ffn_hidden_size`,
`moe_topk`, `moe_router_pre_softmax`, the MoE structure / router hooks (`moe_layer_freq`,
`moe_shared_expert_intermediate_size`, `moe_shared_expert_gate`, `moe_router_score_function`,
`moe_router_expert_bias`, `moe_router_groups`, `moe_router_topk_scaling_factor`), `config_overrides`, `vocab_size`, `padded_vocab_size`,
`transformer_config`, `new_model`, `set_hf_rope`, `mask_padded_logits`, `compiled_table`, `reader`.
API for other modules (export, LoRA, fine-tuning): `canonical_names`, `hf_names_for`, `iter_local_params`
(-> `BridgeParam`), `megatron_to_hf`, `to_hf`, `shard_context`, `tp_of`, `build_model`, `load_hf_weights`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

from llamafactory_mca.models import construction, hf_export
from llamafactory_mca.models.lora import is_adapter_key
from llamafactory_mca.models.model_state import hf_config_of, unwrap_model
from llamafactory_mca.models.param_mapping import (
    COLUMN,
    GLU,
    QKV,
    REPL,
    ROW,
    VOCAB,
    HFNames,
    ShardContext,
    Table,
    compile_table,
    dense_table,
    lookup,
    mapping_for,
    moe_table,
    qkv_layout,
)
from llamafactory_mca.models.safetensors_io import SafetensorsReader, parse_size
from llamafactory_mca.models.value_head import is_value_head_key

__all__ = ["COLUMN", "GLU", "QKV", "REPL", "ROW", "VOCAB", "BridgeParam", "HFNames", "ModelBridge", "Table",
           "dense_table", "global_layer_name", "moe_table", "parse_size", "skip_adapter_params"]


@dataclass
class BridgeParam:
    """One canonical megatron tensor held (in part) by this rank (`ModelBridge.iter_local_params`).

    `name`: canonical megatron name (global layer `L` and expert `E` indices); `kind`: how TP splits it
    (`param_mapping`); `hf`: the Hugging Face tensor names it maps to; `expert`: split by expert-tensor
    parallelism; `tied`: the output layer that shares the input embedding (no tensor of its own on the HF side);
    `get()` / `set(t)`: this rank's TP shard in the canonical layout (e.g. one expert of a grouped weight).
    """

    key: str  # canonical megatron name, "#tied" appended for a tied output layer
    kind: str
    hf: tuple  # hf names (templates filled)
    expert: bool
    get: Callable[[], torch.Tensor]  # canonical local tensor (this rank's TP shard)
    set: Callable[[torch.Tensor], None]
    dtype: torch.dtype

    @property
    def name(self) -> str:
        """The canonical megatron name (without the `#tied` mark)."""
        return self.key.split("#")[0]

    @property
    def tied(self) -> bool:
        """The output layer that shares the input embedding."""
        return self.key.endswith("#tied")


def skip_adapter_params(name: str) -> bool:
    """The default `skip` of `iter_local_params`: LoRA adapter parameters (`...lora_A.q_proj`) and the reward
    model's value head (`v_head.summary.weight`) have no HF tensor of the base model."""
    return is_adapter_key(name) or is_value_head_key(name)


def global_layer_name(model: torch.nn.Module, name: str) -> str:
    """`name` of a parameter of this rank's model chunk with its local decoder-layer index replaced by the
    global one (pipeline stages and virtual chunks number their layers from 0)."""
    layer_match = re.match(r"decoder\.layers\.(\d+)\.(.*)$", name)
    if not layer_match:
        return name
    layer = model.decoder.layers[int(layer_match.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{layer_match.group(2)}"


class ModelBridge:
    """HF config -> megatron TransformerConfig + GPTModel; HF safetensors <-> sharded megatron weights.

    A family subclasses this and sets `model_types`, `table` (see `param_mapping`) and, where needed,
    overrides the public hooks listed in the module docstring.
    """

    model_types: tuple = ()
    table: Table = {}
    # The vocab is padded to a multiple of lcm(this, TP): the same padded size for every TP size that divides it
    # (1, 2, 4 ... 128), so a checkpoint saved at one TP size resumes at another. Real vocabularies are mostly
    # multiples of 128 already (no padding at all); 1 restores megatron's TP-dependent "multiple of TP".
    make_vocab_size_divisible_by: int = 128

    # ------------------------------------------------------------------------------------ config

    def check_config(self, hf_config) -> None:
        """Raise for HF features the mapping does not support."""
        rope = self.rope_parameters(hf_config)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3", "dynamic"):
            raise ValueError(f"rope_type {rope_type!r} is not supported by the Megatron bridge yet")

    def text_config(self, hf_config):
        """The language model's config (multimodal families nest it in `text_config`)."""
        return hf_config

    def rope_parameters(self, hf_config) -> dict:
        """The rope settings (`rope_parameters` or `rope_scaling`) of the config, as a dict."""
        rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
        return dict(rope)

    def rope_theta(self, hf_config) -> float:
        """The rotary base."""
        rope = self.rope_parameters(hf_config)
        return float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))

    def rotary_percent(self, hf_config) -> float:
        """The share of each head's channels that get the rotary embedding (HF `partial_rotary_factor`; families
        with partial rotary pass it to GPTModel in their `new_model`)."""
        rope = self.rope_parameters(hf_config)
        return float(rope.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0)))

    def head_dim(self, hf_config) -> int:
        """Channels per attention head."""
        return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads

    def qk_layernorm(self, hf_config) -> bool:
        """RMSNorm on queries and keys."""
        return False

    def add_qkv_bias(self, hf_config) -> bool:
        """Biases on q, k, v."""
        return bool(getattr(hf_config, "attention_bias", False))

    def tied_embeddings(self, hf_config) -> bool:
        """The output layer shares the input embedding."""
        return bool(getattr(hf_config, "tie_word_embeddings", False))

    def num_experts(self, hf_config) -> Optional[int]:
        """Experts per MoE layer (None: dense)."""
        return None

    def moe_ffn_hidden_size(self, hf_config) -> Optional[int]:
        """Hidden size of one expert (None: dense)."""
        return None

    def moe_topk(self, hf_config) -> Optional[int]:
        """Experts per token."""
        return getattr(hf_config, "num_experts_per_tok", None)

    def moe_router_pre_softmax(self, hf_config) -> bool:
        """True: softmax over all experts then top-k (no renormalisation); False: softmax over the top-k."""
        return False

    # ---- MoE structure and router variants (shared experts, dense layers, sigmoid / group-limited routing)

    def moe_layer_freq(self, hf_config) -> Union[int, list]:
        """Which decoder layers are MoE layers: 1 (all of them) or megatron's `moe_layer_freq` list, one 0 (dense
        MLP of `intermediate_size`) or 1 (MoE) per layer."""
        return 1

    def moe_shared_expert_intermediate_size(self, hf_config) -> Optional[int]:
        """Hidden size of the shared expert of each MoE layer (all shared experts of a layer as one MLP), or None."""
        return None

    def moe_shared_expert_gate(self, hf_config) -> bool:
        """The shared expert's output is scaled by sigmoid(x @ gate_weight.T) (Qwen2-MoE's shared_expert_gate)."""
        return False

    def moe_router_score_function(self, hf_config) -> str:
        """`softmax` or `sigmoid` routing scores."""
        return "softmax"

    def moe_router_expert_bias(self, hf_config) -> bool:
        """The router adds a per-expert bias (HF `e_score_correction_bias`) to the scores that choose experts."""
        return False

    def moe_router_groups(self, hf_config) -> tuple[Optional[int], Optional[int]]:
        """(expert groups, groups kept per token) of group-limited top-k routing, or (None, None)."""
        return None, None

    def moe_router_topk_scaling_factor(self, hf_config) -> Optional[float]:
        """Factor on the routing weights of the chosen experts (HF `routed_scaling_factor`), or None."""
        return None

    def hf_router_aux_loss(self, hf_config) -> bool:
        """LLaMA-Factory's HF path adds a router load-balancing loss when `moe_aux_loss_coef` is set (False for
        families whose HF model has none, e.g. glm4_moe): only then does that key turn ours on."""
        return True

    def config_overrides(self, hf_config) -> dict:
        """Extra TransformerConfig fields of the family."""
        return {}

    def padded_vocab_size(self, hf_config, tp: int) -> int:
        """Rows of the (vocab-parallel) embedding and output layer for `tp` ranks: the vocab rounded up to a
        multiple of lcm(`make_vocab_size_divisible_by`, tp), so the same for every TP size dividing
        `make_vocab_size_divisible_by` (a checkpoint resumes at another TP size; merge reads the rows from the
        checkpoint, whatever they are)."""
        multiple = math.lcm(max(int(self.make_vocab_size_divisible_by), 1), tp)
        return -(-self.vocab_size(hf_config) // multiple) * multiple

    def vocab_size(self, hf_config) -> int:
        """The real (unpadded) vocab size (also of multimodal configs that nest it in `text_config`)."""
        vocab = getattr(hf_config, "vocab_size", None)
        if vocab is None:
            vocab = getattr(getattr(hf_config, "text_config", None), "vocab_size", None)
        return int(vocab)

    def transformer_config(self, hf_config, mca_args, params_dtype: torch.dtype = torch.float32):
        """The megatron TransformerConfig for `hf_config` under the layout and options of `mca_args`."""
        from llamafactory_mca.models.transformer_config import build_transformer_config

        return build_transformer_config(self, hf_config, mca_args, params_dtype)

    # ------------------------------------------------------------------------------------ model

    def build_model(
        self,
        hf_config,
        mca_args,
        params_dtype: torch.dtype = torch.float32,
        wrap_with_ddp: bool = False,
        init_weights: bool = True,
        ddp_config: Any = None,
        device: Union[str, torch.device, None] = None,
        padded_vocab_size: Optional[int] = None,
    ) -> list:
        """One GPTModel per virtual pipeline chunk of this rank (parallel_state must be initialised).

        `init_weights=False` skips random initialisation (use it when `load_hf_weights` follows: much faster
        for large models). `device`: where the parameters live (default: the platform's device); `"meta"`
        builds without allocating anything (shapes only; materialise parts with `to_empty`). `padded_vocab_size`:
        the embedding / output rows to use instead of `self.padded_vocab_size(hf_config, tp)`, e.g. those of a
        checkpoint (a multiple of TP, at least the vocab size). Each chunk carries a `model_state.ModelState`
        (`model.mca_state`: hf_config, bridge, padded vocab rows).
        """
        return construction.build_model(self, hf_config, mca_args, params_dtype, wrap_with_ddp, init_weights,
                                        ddp_config, device, padded_vocab_size)

    def new_model(self, hf_config, config, mca_args, **kwargs):
        """One model chunk: megatron's GPTModel with `kwargs`; multimodal families wrap or extend it."""
        from megatron.core.models.gpt import GPTModel

        return GPTModel(config=config, **kwargs)

    def mask_padded_logits(self, model, hf_config) -> None:
        """Mask the logits of the vocab-padding columns (`construction.mask_padded_logits`)."""
        construction.mask_padded_logits(model, self.text_config(hf_config).vocab_size,
                                        model.mca_state.padded_vocab_size)

    def set_hf_rope(self, model, hf_config, rope: dict) -> None:
        """Use Hugging Face's own inverse rotary frequencies (`construction.set_hf_rope`)."""
        construction.set_hf_rope(model, hf_config, rope)

    # ------------------------------------------------------------------------------------ entries

    def compiled_table(self) -> list:
        """The table compiled for matching (`param_mapping.compile_table`); families may append entries."""
        return compile_table(self.table)

    def _compiled(self) -> list:
        compiled = self.__dict__.get("_compiled_cache")
        if compiled is None:
            compiled = self.compiled_table()
            self.__dict__["_compiled_cache"] = compiled
        return compiled

    # ---- public API (export, LoRA, fine-tuning)

    def canonical_names(self, model: torch.nn.Module, name: str) -> list[str]:
        """Canonical megatron names (global layer `L`, global expert `E`) of parameter `name` of one model chunk
        of this rank (a grouped-GEMM expert weight gives one name per local expert)."""
        from megatron.core import parallel_state as ps

        model = unwrap_model(model)
        canon = global_layer_name(model, name)
        grouped = re.match(r"(decoder\.layers\.\d+\.mlp\.experts)\.weight([12])$", canon)
        if grouped:
            experts = model.get_submodule(name.rsplit(".", 1)[0])
            n = experts.num_local_experts
            ep_rank = ps.get_expert_model_parallel_rank()
            which = "linear_fc1.weight" if grouped.group(2) == "1" else "linear_fc2.weight"
            return [f"{grouped.group(1)}.{ep_rank * n + j}.{which}" for j in range(n)]
        seq = re.match(r"(decoder\.layers\.\d+\.mlp\.experts)\.local_experts\.(\d+)\.(.*)$", canon)
        if seq:
            experts = model.get_submodule(name.split(".local_experts.")[0])
            g = ps.get_expert_model_parallel_rank() * experts.num_local_experts + int(seq.group(2))
            return [f"{seq.group(1)}.{g}.{seq.group(3)}"]
        return [canon]

    def hf_names_for(self, megatron_name: str) -> tuple[tuple[str, ...], str]:
        """(Hugging Face tensor names, kind) of a canonical megatron parameter name; KeyError if unmapped."""
        found = lookup(self._compiled(), megatron_name.split("#")[0])
        if found is None:
            raise KeyError(f"{type(self).__name__}: no table entry for megatron parameter {megatron_name!r}")
        return found

    def shard_context(self, hf_config, tp_rank: int = 0, tp_size: int = 1,
                      local_rows: Optional[int] = None) -> ShardContext:
        """The `ShardContext` the split kinds need for `hf_config` at this TP position."""
        text = self.text_config(hf_config)
        return ShardContext(tp_rank=tp_rank, tp_size=tp_size, hf_config=text,
                            qkv=qkv_layout(text, self.head_dim(text)), local_rows=local_rows)

    def to_hf(self, kind: str, hf_names: tuple, full: torch.Tensor, hf_config,
              tp_size: int = 1) -> list[tuple[str, torch.Tensor]]:
        """The Hugging Face tensors of `full` (TP shards concatenated in rank order) of split kind `kind`."""
        return mapping_for(kind).to_hf(hf_names, full, self.shard_context(hf_config, 0, tp_size))

    def megatron_to_hf(self, megatron_name: str, full: torch.Tensor, hf_config,
                       tp_size: int = 1) -> dict[str, torch.Tensor]:
        """The Hugging Face tensors of one canonical megatron tensor. `full`: the TP shards of this parameter
        concatenated in rank order along its split dimension (`tp_size` of them; a tp=1 model's own tensor with
        the default 1). Vocab padding is stripped, fused qkv / gate-up tensors are split."""
        hf, kind = self.hf_names_for(megatron_name)
        return dict(self.to_hf(kind, tuple(hf), full, hf_config, tp_size))

    def iter_local_params(self, models: Sequence[torch.nn.Module],
                          skip: Optional[Callable[[str], bool]] = skip_adapter_params) -> Iterator[BridgeParam]:
        """A `BridgeParam` for every (canonical) parameter of this rank's model chunks, in module order.

        `skip(local megatron name) -> bool` leaves parameters out; the default skips LoRA adapter parameters
        (which have no Hugging Face tensor of the base model). `skip=None` visits everything (and raises
        KeyError for a parameter the table does not map)."""
        from megatron.core import parallel_state as ps

        compiled = self._compiled()
        ep_rank = ps.get_expert_model_parallel_rank()
        for model in models:
            model = unwrap_model(model)
            hf_config = model.mca_state.hf_config
            tied = self.tied_embeddings(hf_config)
            for name, param in model.named_parameters():
                if skip is not None and skip(name):
                    continue
                canon = global_layer_name(model, name)
                grouped = re.match(r"(decoder\.layers\.\d+\.mlp\.experts)\.weight([12])$", canon)
                seq = re.match(r"(decoder\.layers\.\d+\.mlp\.experts)\.local_experts\.(\d+)\.(linear_fc[12]\.weight)$",
                               canon)
                if grouped:
                    experts = model.get_submodule(name.rsplit(".", 1)[0])
                    n_local = experts.num_local_experts
                    h = experts.config.hidden_size
                    for j in range(n_local):
                        g = ep_rank * n_local + j
                        which = "linear_fc1.weight" if grouped.group(2) == "1" else "linear_fc2.weight"
                        key = f"{grouped.group(1)}.{g}.{which}"
                        if grouped.group(2) == "1":
                            # weight1 viewed [E, h, out]: canonical [out, h]
                            def get(p=param, j=j, n=n_local, h=h):
                                return p.detach().view(n, h, -1)[j].t()

                            def set_(t, p=param, j=j, n=n_local, h=h):
                                p.data.view(n, h, -1)[j].copy_(t.t())
                        else:
                            # weight2 viewed [E, in, h]: canonical [h, in]
                            def get(p=param, j=j, n=n_local, h=h):
                                return p.detach().view(n, -1, h)[j].t()

                            def set_(t, p=param, j=j, n=n_local, h=h):
                                p.data.view(n, -1, h)[j].copy_(t.t())
                        yield self._make_entry(compiled, key, get, set_, param.dtype, expert=True)
                    continue
                if seq:
                    experts = model.get_submodule(name.split(".local_experts.")[0])
                    g = ep_rank * experts.num_local_experts + int(seq.group(2))
                    key = f"{seq.group(1)}.{g}.{seq.group(3)}"
                    yield self._make_entry(
                        compiled, key, (lambda p=param: p.detach()), (lambda t, p=param: p.data.copy_(t)),
                        param.dtype, expert=True)
                    continue
                if canon == "output_layer.weight" and tied:
                    key = "output_layer.weight#tied"
                else:
                    key = canon
                yield self._make_entry(
                    compiled, key, (lambda p=param: p.detach()), (lambda t, p=param: p.data.copy_(t)),
                    param.dtype, expert=False)
            yield from self.iter_mapped_buffers(model, compiled)

    def iter_mapped_buffers(self, model: torch.nn.Module, compiled: list) -> Iterator[BridgeParam]:
        """A `BridgeParam` for each persistent buffer of one model chunk that the table maps to a Hugging Face
        tensor (e.g. the router's `expert_bias`, HF's `e_score_correction_bias`); other buffers have none."""
        for name, buf in model.named_buffers():
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            if name.rsplit(".", 1)[-1] in getattr(owner, "_non_persistent_buffers_set", ()):
                continue
            key = global_layer_name(model, name)
            if lookup(compiled, key) is None:
                continue

            attr = name.rsplit(".", 1)[-1]

            def get(owner=owner, attr=attr):
                return getattr(owner, attr).detach()

            def set_(t, owner=owner, attr=attr):
                getattr(owner, attr).copy_(t)

            yield self._make_entry(compiled, key, get, set_, buf.dtype, expert=False)

    def _make_entry(self, compiled, key, get, set_, dtype, expert) -> BridgeParam:
        lookup_key = key.split("#")[0]
        found = lookup(compiled, lookup_key)
        if found is None:
            raise KeyError(f"{type(self).__name__}: no table entry for megatron parameter {lookup_key!r}")
        hf, kind = found
        return BridgeParam(key=key, kind=kind, hf=hf, expert=expert, get=get, set=set_, dtype=dtype)

    @staticmethod
    def tp_of(expert: bool) -> tuple[int, int, Any]:
        """(rank, size, group) of the tensor-parallel group that splits a dense (or, `expert`, an expert) tensor."""
        from megatron.core import parallel_state as ps

        if expert:
            return (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size(),
                    ps.get_expert_tensor_parallel_group())
        return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
                ps.get_tensor_model_parallel_group())

    # ------------------------------------------------------------------------------------ load

    def reader(self, hf_path: str) -> SafetensorsReader:
        """Sliced access to the HF checkpoint at `hf_path` (families with renamed checkpoints override it)."""
        return SafetensorsReader(hf_path)

    def load_hf_weights(self, models: Sequence[torch.nn.Module], hf_path: str) -> None:
        """Stream this rank's shards of every parameter from the HF safetensors checkpoint at `hf_path`."""
        reader = self.reader(hf_path)
        try:
            hf_config = hf_config_of(models[0])
            for entry in self.iter_local_params(models):
                hf_names = entry.hf
                if entry.key.endswith("#tied") or (
                    entry.kind == VOCAB and hf_names[0] not in reader and self.tied_embeddings(hf_config)
                ):
                    hf_names = tuple(self.table["embedding.word_embeddings.weight"][0:1])
                tp_rank, tp_size, _ = self.tp_of(entry.expert)
                with torch.no_grad():
                    target = entry.get()
                    ctx = self.shard_context(hf_config, tp_rank, tp_size, local_rows=target.shape[0])
                    local = mapping_for(entry.kind).local_shard(reader, hf_names, ctx)
                    if tuple(local.shape) != tuple(target.shape):
                        raise ValueError(
                            f"{entry.key}: shape {tuple(local.shape)} read from {hf_names} does not match the "
                            f"megatron shard {tuple(target.shape)}"
                        )
                    entry.set(local.to(target.dtype))
                    del local
        finally:
            reader.close()

    # ------------------------------------------------------------------------------------ export

    def export_hf_state_dict(self, models: Sequence[torch.nn.Module]) -> Iterator[tuple[str, torch.Tensor]]:
        """Full HF-named tensors, one by one, on global rank 0 (collective: every rank must exhaust it)."""
        return hf_export.export_hf_state_dict(self, models)

    def save_hf_pretrained(self, models: Sequence[torch.nn.Module], output_dir: str, tokenizer=None,
                           dtype: Optional[torch.dtype] = None, max_shard_size: Union[int, str] = "5GB") -> None:
        """Collective. Rank 0 writes safetensors shards (+ index), config.json and the tokenizer."""
        hf_export.save_hf_pretrained(self, models, output_dir, tokenizer, dtype, max_shard_size)
