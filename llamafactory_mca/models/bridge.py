"""The generic Hugging Face <-> megatron-core mapping engine, driven by one small table per model family.

A family table maps *canonical* megatron parameter names to Hugging Face names and a conversion kind::

    "decoder.layers.{L}.self_attention.linear_qkv.weight": (("...q_proj.weight", "...k_proj.weight",
                                                              "...v_proj.weight"), QKV)

Canonical names use the global layer index `{L}` and the global expert index `{E}` (megatron modules hold
local indices: layers are numbered per pipeline chunk, experts per expert-parallel rank; the grouped
`experts.weight1/weight2` tensors are split into one fc1/fc2 entry per expert).

Kinds (how a tensor is sliced for tensor parallelism, and re-assembled):
  REPL     replicated (norms, router)
  COLUMN   split along dim 0
  ROW      split along dim 1
  VOCAB    split along dim 0, vocab padded (see `ModelBridge.padded_vocab_size`: the same padded size for every
           TP size that divides 128, so checkpoints resume across TP changes); padding rows are zero, their
           logits are masked to -inf, and export strips them
  QKV      q, k, v fused; megatron interleaves per query group [q_g (heads/group * d), k_g (d), v_g (d)],
           TP splits by query groups
  GLU      gate, up fused as [gate_shard; up_shard] per TP rank
Loading streams from the safetensors shards and reads only the slices this rank holds.

Public API for other modules (export, LoRA, fine-tuning): `canonical_names`, `hf_names_for`,
`iter_local_params` (-> `BridgeParam`), `megatron_to_hf`, `build_model(device=..., padded_vocab_size=...)`,
`padded_vocab_size`, and the module-level `parse_size`. The underscored methods are overridable hooks of the
families (`_compiled_table`, `_read_local`, `_to_hf`, `_mask_padded_logits` ...), not an API.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.nn.functional as F

REPL, COLUMN, ROW, VOCAB, QKV, GLU = "repl", "column", "row", "vocab", "qkv", "glu"
_GATHER_DIM = {COLUMN: 0, VOCAB: 0, QKV: 0, GLU: 0, ROW: 1}

HFNames = Union[str, tuple]
Table = dict  # canonical megatron name template -> (hf name(s) template, kind)


@dataclass
class BridgeParam:
    """One canonical megatron tensor held (in part) by this rank (`ModelBridge.iter_local_params`).

    `name`: canonical megatron name (global layer `L` and expert `E` indices); `kind`: how TP splits it (module
    docstring); `hf`: the Hugging Face tensor names it maps to; `expert`: split by expert-tensor parallelism;
    `tied`: the output layer that shares the input embedding (no tensor of its own on the HF side);
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
        return self.key.split("#")[0]

    @property
    def tied(self) -> bool:
        return self.key.endswith("#tied")


_Entry = BridgeParam  # the former private name


def skip_adapter_params(name: str) -> bool:
    """The default `skip` of `iter_local_params`: LoRA adapter parameters (`...lora_A.q_proj`) have no HF tensor."""
    return ".lora_" in name


def _set_tensor_parallel_attributes(model: torch.nn.Module) -> None:
    """Mark TP-split weights as megatron's weight-init functions would have.

    With `perform_initialization=False` megatron-core 0.16 skips the init functions, and with them the
    `tensor_model_parallel` / `partition_dim` attributes: the gradient norm (hence clipping), the distributed
    optimizer and checkpoints then treat split weights as duplicates. Biases are marked by megatron itself.
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )
    from megatron.core.transformer.moe.experts import GroupedMLP

    split_dims = {ColumnParallelLinear: {"weight": 0}, VocabParallelEmbedding: {"weight": 0},
                  RowParallelLinear: {"weight": 1}, GroupedMLP: {"weight1": 1, "weight2": 0}}
    for module in model.modules():
        for cls, params in split_dims.items():
            if not isinstance(module, cls):
                continue
            for name, dim in params.items():
                param = getattr(module, name, None)
                if isinstance(param, torch.nn.Parameter) and not getattr(param, "tensor_model_parallel", False):
                    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def wrap_ddp(mca_args: Any, models: Sequence[torch.nn.Module], ddp_config: Any = None) -> list:
    """megatron-core DDP around each model chunk (gradient buckets only for the first chunk), configured from
    our Megatron arguments unless `ddp_config` is given; the wrappers keep the chunk's `hf_config` and
    `mca_bridge`."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    if ddp_config is None:
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=mca_args.accumulate_allreduce_grads_in_fp32,
            overlap_grad_reduce=mca_args.overlap_grad_reduce,
            overlap_param_gather=mca_args.overlap_param_gather,
            use_distributed_optimizer=mca_args.use_distributed_optimizer,
            check_for_nan_in_grad=bool(getattr(mca_args, "check_for_nan_in_loss_and_grad", False)),
            average_in_collective=False,  # the loss is token-weighted over all ranks: sum, do not average
            bucket_size=getattr(mca_args, "ddp_bucket_size", None),
        )
    wrapped = []
    for i, model in enumerate(models):
        ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model,
                                      disable_bucketing=i > 0)
        ddp.hf_config = getattr(model, "hf_config", None)
        ddp.mca_bridge = getattr(model, "mca_bridge", None)
        wrapped.append(ddp)
    return wrapped


def _global_layer_name(model: torch.nn.Module, name: str) -> str:
    """`name` of a parameter of this rank's model chunk with its local decoder-layer index replaced by the
    global one (pipeline stages and virtual chunks number their layers from 0)."""
    layer_match = re.match(r"decoder\.layers\.(\d+)\.(.*)$", name)
    if not layer_match:
        return name
    layer = model.decoder.layers[int(layer_match.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{layer_match.group(2)}"


def parse_size(size: Union[int, str]) -> int:
    """Bytes of a size given as an int or a string such as '5GB', '100KB', '2.5 GiB' (powers of 10, as
    transformers' max_shard_size)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size: cannot parse {size!r}; use e.g. '5GB'")
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[m.group(2)]
    return int(float(m.group(1)) * mult)


_parse_size = parse_size  # the former private name


class _SafetensorsReader:
    """Lazy, sliced access to a Hugging Face checkpoint's safetensors shards."""

    max_open = 2

    def __init__(self, path: str):
        from safetensors import safe_open

        self._safe_open = safe_open
        self.path = path
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                self.weight_map = json.load(f)["weight_map"]
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(
                f"no model.safetensors or model.safetensors.index.json in {path}: the Megatron backend loads "
                "Hugging Face safetensors checkpoints only"
            )
        self._files: dict[str, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _file(self, name: str):
        if name not in self.weight_map:
            raise KeyError(f"{name} not found in the checkpoint at {self.path}")
        fname = self._file_of(name)
        if fname in self._files:
            self._files[fname] = self._files.pop(fname)  # most recently used last
        else:
            # keep few shard files mapped: their touched pages count as this process' RSS
            while len(self._files) >= self.max_open:
                self._files.pop(next(iter(self._files)))
            self._files[fname] = self._safe_open(os.path.join(self.path, fname), "pt")
        return self._files[fname]

    def _file_of(self, name: str) -> str:
        return self.weight_map[name]

    def shape(self, name: str) -> list[int]:
        return list(self._file(name).get_slice(name).get_shape())

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        sl = self._file(name).get_slice(name)
        if dim is None:
            return sl[:]
        if dim == 0:
            return sl[start:stop]
        if dim == 1:
            return sl[:, start:stop]
        raise ValueError(dim)

    def close(self) -> None:
        self._files.clear()


class ModelBridge:
    """HF config -> megatron TransformerConfig + GPTModel; HF safetensors <-> sharded megatron weights.

    A family subclasses this and sets `model_types`, `table` (see module docstring) and, where needed,
    overrides `config_overrides` / `check_config` / `moe_router_pre_softmax`.
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
        rope = self._rope_parameters(hf_config)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3", "dynamic"):
            raise ValueError(f"rope_type {rope_type!r} is not supported by the Megatron bridge yet")

    @staticmethod
    def _rope_parameters(hf_config) -> dict:
        rope = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
        return dict(rope)

    def rope_theta(self, hf_config) -> float:
        rope = self._rope_parameters(hf_config)
        return float(rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))

    def head_dim(self, hf_config) -> int:
        return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads

    def qk_layernorm(self, hf_config) -> bool:
        return False

    def add_qkv_bias(self, hf_config) -> bool:
        return bool(getattr(hf_config, "attention_bias", False))

    def tied_embeddings(self, hf_config) -> bool:
        return bool(getattr(hf_config, "tie_word_embeddings", False))

    def num_experts(self, hf_config) -> Optional[int]:
        return None

    def moe_ffn_hidden_size(self, hf_config) -> Optional[int]:
        return None

    def moe_topk(self, hf_config) -> Optional[int]:
        return getattr(hf_config, "num_experts_per_tok", None)

    def moe_router_pre_softmax(self, hf_config) -> bool:
        """True: softmax over all experts then top-k (no renormalisation); False: softmax over the top-k."""
        return False

    def config_overrides(self, hf_config) -> dict:
        return {}

    def padded_vocab_size(self, hf_config, tp: int) -> int:
        """Rows of the (vocab-parallel) embedding and output layer for `tp` ranks: the vocab rounded up to a
        multiple of lcm(`make_vocab_size_divisible_by`, tp), so the same for every TP size dividing
        `make_vocab_size_divisible_by` (a checkpoint resumes at another TP size; merge reads the rows from the
        checkpoint, whatever they are)."""
        multiple = math.lcm(max(int(self.make_vocab_size_divisible_by), 1), tp)
        return -(-self._vocab_size(hf_config) // multiple) * multiple

    def transformer_config(self, hf_config, mca_args, params_dtype: torch.dtype = torch.float32):
        """The megatron TransformerConfig for `hf_config` under the layout and options of `mca_args`."""
        from megatron.core.transformer.transformer_config import TransformerConfig

        from llamafactory_mca.models.spec import use_transformer_engine
        from llamafactory_mca.platform import on_gpu, wgrad_fusion_available

        self.check_config(hf_config)
        te = use_transformer_engine(mca_args)  # TE kernels only with the (opt-in) TE layer spec
        m = mca_args
        act = getattr(hf_config, "hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"hidden_act {act!r} is not supported by the Megatron bridge yet")
        recompute_modules = None
        if m.recompute_modules:
            recompute_modules = [s.strip() for s in m.recompute_modules.split(",") if s.strip()]
        if m.moe_layer_recompute:
            recompute_modules = sorted(set((recompute_modules or []) + ["moe"]))
        kw: dict[str, Any] = dict(
            num_layers=hf_config.num_hidden_layers,
            hidden_size=hf_config.hidden_size,
            num_attention_heads=hf_config.num_attention_heads,
            num_query_groups=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
            kv_channels=self.head_dim(hf_config),
            ffn_hidden_size=hf_config.intermediate_size,
            normalization="RMSNorm",
            layernorm_epsilon=hf_config.rms_norm_eps,
            gated_linear_unit=True,
            activation_func=F.silu,
            add_bias_linear=False,
            add_qkv_bias=self.add_qkv_bias(hf_config),
            qk_layernorm=self.qk_layernorm(hf_config),
            hidden_dropout=0.0,
            attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0) or 0.0),
            init_method_std=getattr(hf_config, "initializer_range", 0.02),
            # layout
            tensor_model_parallel_size=m.tensor_model_parallel_size,
            pipeline_model_parallel_size=m.pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=m.virtual_pipeline_model_parallel_size,
            context_parallel_size=m.context_parallel_size,
            expert_model_parallel_size=m.expert_model_parallel_size,
            expert_tensor_parallel_size=m.expert_tensor_parallel_size or m.tensor_model_parallel_size,
            sequence_parallel=m.sequence_parallel,
            num_layers_in_first_pipeline_stage=m.num_layers_in_first_pipeline_stage,
            num_layers_in_last_pipeline_stage=m.num_layers_in_last_pipeline_stage,
            # dtypes
            params_dtype=params_dtype,
            pipeline_dtype=params_dtype,
            bf16=params_dtype == torch.bfloat16,
            fp16=params_dtype == torch.float16,
            # memory
            recompute_granularity=m.recompute_granularity,
            recompute_method=(m.recompute_method or "uniform") if m.recompute_granularity == "full" else None,
            recompute_num_layers=(m.recompute_num_layers or 1) if m.recompute_granularity == "full" else None,
            # fusions: off where they need TE/apex/CUDA and those are absent
            bias_activation_fusion=m.bias_activation_fusion and on_gpu(),
            bias_dropout_fusion=m.bias_dropout_fusion and on_gpu(),
            apply_rope_fusion=m.apply_rope_fusion and te,
            masked_softmax_fusion=m.masked_softmax_fusion and on_gpu(),
            gradient_accumulation_fusion=m.gradient_accumulation_fusion and (te or wgrad_fusion_available()),
            cross_entropy_loss_fusion=m.cross_entropy_loss_fusion and on_gpu(),
            persist_layer_norm=False,
            use_cpu_initialization=not on_gpu(),
            calculate_per_token_loss=True,
            # p2p shapes are exchanged per microbatch (LLaMA-Factory batches vary in length)
            variable_seq_lengths=m.moe_token_dispatcher_type != "allgather",
            moe_token_dispatcher_type=m.moe_token_dispatcher_type,
        )
        if recompute_modules is not None:
            kw["recompute_modules"] = recompute_modules
        num_experts = self.num_experts(hf_config)
        if num_experts:
            # As LLaMA-Factory's HF path: no load-balancing loss unless a coefficient is asked for (the trainer
            # passes LLaMA-Factory's own `moe_aux_loss_coef` here when ours is unset).
            aux = m.moe_aux_loss_coeff or 0.0
            balancing = m.moe_router_load_balancing_type
            if aux == 0.0 and balancing in ("aux_loss", "seq_aux_loss", "global_aux_loss"):
                balancing = "none"
            pre_softmax = m.moe_router_pre_softmax
            if pre_softmax is None:
                pre_softmax = self.moe_router_pre_softmax(hf_config)
            kw.update(
                num_moe_experts=num_experts,
                moe_ffn_hidden_size=self.moe_ffn_hidden_size(hf_config),
                moe_router_topk=m.moe_router_topk or self.moe_topk(hf_config),
                moe_router_pre_softmax=pre_softmax,
                moe_router_score_function="softmax",
                moe_router_load_balancing_type=balancing,
                moe_aux_loss_coeff=aux,
                moe_z_loss_coeff=m.moe_z_loss_coeff,
                moe_router_dtype=m.moe_router_dtype,
                moe_grouped_gemm=m.moe_grouped_gemm,
                moe_expert_capacity_factor=m.moe_expert_capacity_factor,
                moe_shared_expert_overlap=m.moe_shared_expert_overlap,
                moe_permute_fusion=m.moe_permute_fusion and te,
            )
        kw.update(self.config_overrides(hf_config))
        return TransformerConfig(**kw)

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
        checkpoint (a multiple of TP, at least the vocab size). Each module carries `hf_config`, `mca_bridge`
        and `mca_padded_vocab_size` attributes.
        """
        from megatron.core import parallel_state as ps

        from llamafactory_mca.kernels.cross_entropy import patch_language_model_loss
        from llamafactory_mca.models.spec import block_spec
        from llamafactory_mca.platform import device as platform_device
        from llamafactory_mca.platform import setup_platform

        setup_platform()
        target = torch.device(device) if device is not None else platform_device()
        tp = ps.get_tensor_model_parallel_world_size()
        rows = self.padded_vocab_size(hf_config, tp) if padded_vocab_size is None else int(padded_vocab_size)
        vocab = self._vocab_size(hf_config)
        if rows % tp or rows < vocab:
            raise ValueError(f"padded_vocab_size {rows}: must be a multiple of the TP size {tp} and at least the "
                             f"vocab size {vocab}")
        config = self.transformer_config(hf_config, mca_args, params_dtype)
        config.perform_initialization = init_weights
        if target.type == "meta":
            config.use_cpu_initialization = True  # megatron passes device=cuda explicitly otherwise: no meta
        vpp = ps.get_virtual_pipeline_model_parallel_world_size() or 1
        rope = self._rope_parameters(hf_config)
        models = []
        for vp in range(vpp):
            vp_stage = vp if vpp > 1 else None
            with torch.device("meta") if target.type == "meta" else contextlib.nullcontext():
                model = self._new_chunk(hf_config, config, mca_args, block_spec, rows, vp_stage)
            model.mca_padded_vocab_size = rows
            self._set_hf_rope(model, hf_config, rope)
            self._mask_padded_logits(model, hf_config)
            if model.post_process:
                # vocab-parallel cross entropy that writes its gradient into the logits buffer (Triton on
                # GPU): less memory and time than megatron's TE-less version, same arithmetic.
                patch_language_model_loss(model)
            if not init_weights:
                _set_tensor_parallel_attributes(model)
            model.hf_config = hf_config
            model.mca_bridge = self
            model.to(target)
            models.append(model)
        if wrap_with_ddp:
            models = wrap_ddp(mca_args, models, ddp_config)
        return models

    def _new_chunk(self, hf_config, config, mca_args, block_spec, rows: int, vp_stage):
        from megatron.core import parallel_state as ps

        return self.new_model(
            hf_config,
            config,
            mca_args,
            transformer_layer_spec=block_spec(config, mca_args, config.qk_layernorm, vp_stage),
            vocab_size=rows,
            max_sequence_length=getattr(hf_config, "max_position_embeddings", 4096),
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            parallel_output=True,
            share_embeddings_and_output_weights=self.tied_embeddings(hf_config),
            position_embedding_type="rope",
            rotary_base=self.rope_theta(hf_config),
            vp_stage=vp_stage,
        )

    def _vocab_size(self, hf_config) -> int:
        """The real (unpadded) vocab size (also of multimodal configs that nest it in `text_config`)."""
        vocab = getattr(hf_config, "vocab_size", None)
        if vocab is None:
            vocab = getattr(getattr(hf_config, "text_config", None), "vocab_size", None)
        return int(vocab)

    def new_model(self, hf_config, config, mca_args, **kwargs):
        """One model chunk: megatron's GPTModel with `kwargs`; multimodal families wrap or extend it."""
        from megatron.core.models.gpt import GPTModel

        return GPTModel(config=config, **kwargs)

    def _mask_padded_logits(self, model, hf_config) -> None:
        """Give the TP vocab-padding columns the lowest finite logit, so softmax and loss equal the HF model's.

        The padding rows of the output weight are zero: left alone they would add exp(0) terms to every
        softmax denominator. Only the TP ranks holding padding columns get the hook.
        """
        from megatron.core import parallel_state as ps

        output_layer = getattr(model, "output_layer", None)
        if output_layer is None:
            return
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        rows = getattr(model, "mca_padded_vocab_size", None) or self.padded_vocab_size(hf_config, tp)
        per_rank = rows // tp
        first_pad = hf_config.vocab_size - rank * per_rank  # local index of the first padding column
        if first_pad >= per_rank:
            return

        def hook(_module, _inputs, output):
            logits, bias = output
            logits = logits.clone()
            # the dtype's lowest finite value, not -inf: a TP rank holding only padding must not turn the
            # vocab-parallel max / log-sum-exp into NaN
            logits[..., max(first_pad, 0):] = torch.finfo(logits.dtype).min
            return logits, bias

        output_layer.register_forward_hook(hook)

    def _set_hf_rope(self, model, hf_config, rope: dict) -> None:
        """Use Hugging Face's own inverse frequencies (covers linear / llama3 / dynamic scaling exactly)."""
        rotary = getattr(model, "rotary_pos_emb", None)
        if rotary is None:
            return
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "default":
            return  # megatron computes the same base ** (-2i/d)
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
        if abs(float(scaling) - 1.0) > 1e-12:
            raise ValueError(f"rope_type {rope_type!r} with attention scaling is not supported yet")
        rotary.inv_freq = inv_freq.to(rotary.inv_freq.device, rotary.inv_freq.dtype)

    # ------------------------------------------------------------------------------------ entries

    def _compiled_table(self, hf_config) -> list:
        out = []
        for mkey, (hf, kind) in self.table.items():
            pattern = re.escape(mkey).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{E\}", r"(?P<E>\d+)")
            out.append((re.compile(pattern + "$"), hf if isinstance(hf, tuple) else (hf,), kind))
        return out

    def _lookup(self, compiled, key: str):
        for regex, hf, kind in compiled:
            mt = regex.match(key)
            if mt:
                fields = mt.groupdict()
                return tuple(h.format(**fields) for h in hf), kind
        return None

    def _compiled(self) -> list:
        compiled = self.__dict__.get("_compiled_cache")
        if compiled is None:
            compiled = self._compiled_table(None)
            self.__dict__["_compiled_cache"] = compiled
        return compiled

    # ---- public API (export, LoRA, fine-tuning)

    def canonical_names(self, model: torch.nn.Module, name: str) -> list[str]:
        """Canonical megatron names (global layer `L`, global expert `E`) of parameter `name` of one model chunk
        of this rank (a grouped-GEMM expert weight gives one name per local expert)."""
        from megatron.core import parallel_state as ps

        model = _unwrap(model)
        canon = _global_layer_name(model, name)
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
        found = self._lookup(self._compiled(), megatron_name.split("#")[0])
        if found is None:
            raise KeyError(f"{type(self).__name__}: no table entry for megatron parameter {megatron_name!r}")
        return found

    def megatron_to_hf(self, megatron_name: str, full: torch.Tensor, hf_config,
                       tp_size: int = 1) -> dict[str, torch.Tensor]:
        """The Hugging Face tensors of one canonical megatron tensor. `full`: the TP shards of this parameter
        concatenated in rank order along its split dimension (`tp_size` of them; a tp=1 model's own tensor with
        the default 1). Vocab padding is stripped, fused qkv / gate-up tensors are split."""
        hf, kind = self.hf_names_for(megatron_name)
        return dict(self._to_hf(kind, tuple(hf), full, hf_config, tp_size))

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
            model = _unwrap(model)
            hf_config = model.hf_config
            tied = self.tied_embeddings(hf_config)
            for name, param in model.named_parameters():
                if skip is not None and skip(name):
                    continue
                canon = _global_layer_name(model, name)
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

    def _entries(self, models: Sequence[torch.nn.Module]) -> list[BridgeParam]:
        """Canonical entries for all (non-adapter) parameters of this rank's model chunks."""
        return list(self.iter_local_params(models))

    def _make_entry(self, compiled, key, get, set_, dtype, expert) -> BridgeParam:
        lookup_key = key.split("#")[0]
        found = self._lookup(compiled, lookup_key)
        if found is None:
            raise KeyError(f"{type(self).__name__}: no table entry for megatron parameter {lookup_key!r}")
        hf, kind = found
        return BridgeParam(key=key, kind=kind, hf=hf, expert=expert, get=get, set=set_, dtype=dtype)

    @staticmethod
    def _tp(expert: bool) -> tuple[int, int, Any]:
        from megatron.core import parallel_state as ps

        if expert:
            return (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size(),
                    ps.get_expert_tensor_parallel_group())
        return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
                ps.get_tensor_model_parallel_group())

    # ------------------------------------------------------------------------------------ load

    def _read_local(self, reader: _SafetensorsReader, entry: BridgeParam, hf_names: tuple, hf_config,
                    tp_rank: int, tp_size: int) -> torch.Tensor:
        kind = entry.kind
        if kind == REPL:
            return reader.read(hf_names[0])
        if kind in (COLUMN, ROW):
            dim = 0 if kind == COLUMN else 1
            n = reader.shape(hf_names[0])[dim]
            per = n // tp_size
            return reader.read(hf_names[0], dim, tp_rank * per, (tp_rank + 1) * per)
        if kind == VOCAB:
            shape = reader.shape(hf_names[0])
            per = entry.get().shape[0]  # this rank's rows of the padded vocab (as the model was built)
            start, stop = tp_rank * per, (tp_rank + 1) * per
            part = reader.read(hf_names[0], 0, min(start, shape[0]), min(stop, shape[0]))
            if part.shape[0] < per:
                part = torch.cat([part, part.new_zeros((per - part.shape[0],) + tuple(shape[1:]))], 0)
            return part
        if kind == GLU:
            n = reader.shape(hf_names[0])[0]
            per = n // tp_size
            return torch.cat([reader.read(h, 0, tp_rank * per, (tp_rank + 1) * per) for h in hf_names], 0)
        if kind == QKV:
            d = self.head_dim(hf_config)
            nq = hf_config.num_attention_heads
            ng = getattr(hf_config, "num_key_value_heads", None) or nq
            hpg = nq // ng
            groups_per_rank = ng // tp_size
            parts = []
            for g in range(tp_rank * groups_per_rank, (tp_rank + 1) * groups_per_rank):
                parts.append(reader.read(hf_names[0], 0, g * hpg * d, (g + 1) * hpg * d))
                parts.append(reader.read(hf_names[1], 0, g * d, (g + 1) * d))
                parts.append(reader.read(hf_names[2], 0, g * d, (g + 1) * d))
            return torch.cat(parts, 0)
        raise ValueError(kind)

    def reader(self, hf_path: str) -> _SafetensorsReader:
        """Sliced access to the HF checkpoint at `hf_path` (families with renamed checkpoints override it)."""
        return _SafetensorsReader(hf_path)

    def load_hf_weights(self, models: Sequence[torch.nn.Module], hf_path: str) -> None:
        """Stream this rank's shards of every parameter from the HF safetensors checkpoint at `hf_path`."""
        reader = self.reader(hf_path)
        try:
            for entry in self._entries(models):
                hf_config = _unwrap(models[0]).hf_config
                hf_names = entry.hf
                if entry.key.endswith("#tied") or (
                    entry.kind == VOCAB and hf_names[0] not in reader and self.tied_embeddings(hf_config)
                ):
                    hf_names = tuple(self.table["embedding.word_embeddings.weight"][0:1])
                tp_rank, tp_size, _ = self._tp(entry.expert)
                with torch.no_grad():
                    local = self._read_local(reader, entry, hf_names, hf_config, tp_rank, tp_size)
                    target = entry.get()
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

    def _to_hf(self, entry_kind: str, hf_names: tuple, full: torch.Tensor, hf_config, tp_size: int) -> list:
        if entry_kind in (REPL, COLUMN, ROW):
            return [(hf_names[0], full)]
        if entry_kind == VOCAB:
            return [(hf_names[0], full[: hf_config.vocab_size])]
        if entry_kind == GLU:
            rest = full.shape[1:]
            per = full.shape[0] // (2 * tp_size)
            view = full.reshape(tp_size, 2, per, *rest)
            return [(hf_names[0], view[:, 0].reshape(-1, *rest)), (hf_names[1], view[:, 1].reshape(-1, *rest))]
        if entry_kind == QKV:
            d = self.head_dim(hf_config)
            nq = hf_config.num_attention_heads
            ng = getattr(hf_config, "num_key_value_heads", None) or nq
            hpg = nq // ng
            rest = full.shape[1:]
            view = full.reshape(ng, (hpg + 2) * d, *rest)
            q = view[:, : hpg * d].reshape(nq * d, *rest)
            k = view[:, hpg * d: (hpg + 1) * d].reshape(ng * d, *rest)
            v = view[:, (hpg + 1) * d:].reshape(ng * d, *rest)
            return [(hf_names[0], q), (hf_names[1], k), (hf_names[2], v)]
        raise ValueError(entry_kind)

    def export_hf_state_dict(self, models: Sequence[torch.nn.Module]) -> Iterator[tuple[str, torch.Tensor]]:
        """Full HF-named tensors, one by one, on global rank 0 (collective: every rank must exhaust it)."""
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        hf_config = _unwrap(models[0]).hf_config
        entries = {e.key: e for e in self._entries(models)}
        dense_writer = ps.get_data_parallel_rank(with_context_parallel=True) == 0
        expert_writer = ps.get_expert_data_parallel_rank() == 0
        rank = dist.get_rank()
        meta = []
        for key, e in entries.items():
            if key.endswith("#tied"):
                continue
            if not (expert_writer if e.expert else dense_writer):
                continue
            tp_rank, tp_size, _ = self._tp(e.expert)
            if tp_rank == 0:
                shape = list(e.get().shape)
                if e.kind in _GATHER_DIM:
                    shape[_GATHER_DIM[e.kind]] *= tp_size
                meta.append((key, rank, shape, str(e.dtype).replace("torch.", ""), e.kind, e.hf, tp_size))
        world = dist.get_world_size()
        gathered: list = [None] * world
        dist.all_gather_object(gathered, meta)
        all_meta = sorted((m for part in gathered for m in part), key=lambda m: _natural_key(m[0]))
        for key, src, shape, dtype, kind, hf_names, tp_size in all_meta:
            e = entries.get(key)
            full = None
            mine = e is not None and (expert_writer if e.expert else dense_writer)
            if mine:
                local = e.get().contiguous()
                _, tsize, group = self._tp(e.expert)
                if kind in _GATHER_DIM and tsize > 1:
                    parts = [torch.empty_like(local) for _ in range(tsize)]
                    dist.all_gather(parts, local, group=group)
                    full = torch.cat(parts, dim=_GATHER_DIM[kind]) if rank == src else None
                    del parts
                else:
                    full = local if rank == src else None
            if rank == 0 and src != 0:
                # on the compute device: NCCL has no CPU transport (gloo on CPU machines: device() is the CPU)
                from llamafactory_mca.platform import device

                full = torch.empty(shape, dtype=getattr(torch, dtype), device=device())
                dist.recv(full, src=src)
            elif rank == src and src != 0:
                dist.send(full.contiguous(), dst=0)
                full = None
            if rank == 0:
                for name, tensor in self._to_hf(kind, tuple(hf_names), full, hf_config, tp_size):
                    yield name, tensor.detach().to("cpu").contiguous()
            full = None

    def save_hf_pretrained(self, models: Sequence[torch.nn.Module], output_dir: str, tokenizer=None,
                           dtype: Optional[torch.dtype] = None, max_shard_size: Union[int, str] = "5GB") -> None:
        """Collective. Rank 0 writes safetensors shards (+ index), config.json and the tokenizer."""
        import torch.distributed as dist
        from safetensors.torch import save_file

        rank = dist.get_rank() if dist.is_initialized() else 0
        hf_config = _unwrap(models[0]).hf_config
        limit = parse_size(max_shard_size)
        shards: list[list[str]] = []
        weight_map: dict[str, str] = {}
        current: dict[str, torch.Tensor] = {}
        size = total = 0
        if rank == 0:
            os.makedirs(output_dir, exist_ok=True)

        def flush() -> None:
            nonlocal current, size
            if not current:
                return
            tmp = os.path.join(output_dir, f".tmp-shard-{len(shards):05d}.safetensors")
            save_file(current, tmp, metadata={"format": "pt"})
            shards.append([tmp, list(current)])
            current, size = {}, 0

        for name, tensor in self.export_hf_state_dict(models):
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            nbytes = tensor.numel() * tensor.element_size()
            if current and size + nbytes > limit:
                flush()
            current[name] = tensor
            size += nbytes
            total += nbytes
        if rank == 0:
            flush()
            n = len(shards)
            for i, (tmp, names) in enumerate(shards):
                final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
                os.replace(tmp, os.path.join(output_dir, final))
                weight_map.update({k: final for k in names})
            index = os.path.join(output_dir, "model.safetensors.index.json")
            if n > 1:
                with open(index, "w", encoding="utf-8") as f:
                    json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                              f, indent=2)
            elif os.path.exists(index):
                os.remove(index)
            config = hf_config
            if dtype is not None:
                import copy

                config = copy.deepcopy(hf_config)
                config.torch_dtype = dtype
            config.save_pretrained(output_dir)
            if tokenizer is not None:
                tokenizer.save_pretrained(output_dir)
        if dist.is_initialized():
            dist.barrier()


def _natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# ------------------------------------------------------------------------------------ shared tables

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


def moe_table(base: Table, router: str, gate: str, up: str, down: str) -> Table:
    """`base` with the dense MLP replaced by a router and per-expert MLPs (names relative to the layer)."""
    p = "model.layers.{L}."
    t = {k: v for k, v in base.items() if ".mlp.linear_fc" not in k}
    t["decoder.layers.{L}.mlp.router.weight"] = (p + router, REPL)
    t["decoder.layers.{L}.mlp.experts.{E}.linear_fc1.weight"] = ((p + gate, p + up), GLU)
    t["decoder.layers.{L}.mlp.experts.{E}.linear_fc2.weight"] = (p + down, ROW)
    return t
