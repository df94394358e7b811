"""LoRA on megatron-core's tensor-parallel linear layers, with PEFT-exact adapters.

Adapters are kept per Hugging Face module, mapped onto megatron's fused layout through the bridge's table:
`linear_qkv` carries q_proj / k_proj / v_proj adapters (their outputs interleaved per query group as megatron
fuses q, k, v), `linear_fc1` carries gate_proj / up_proj (concatenated per TP rank), `linear_proj` o_proj and
`linear_fc2` down_proj. So the adapter exports to PEFT's names exactly and loads from a PEFT adapter.

Tensor parallelism (y = scale * B A x per Hugging Face module):
  column-parallel base (qkv, fc1): A [r, in] replicated, B [out/tp, r] split along its output; the input is
      gathered (sequence parallel) or copied (backward all-reduce) as the base layer does, and A's gradient is
      summed over TP ranks (each rank only sees its slice of the output).
  row-parallel base (proj, fc2): A [r, in/tp] split along its input, B [out, r] replicated; the r-dim partial
      products are all-reduced (or reduce-scattered along the sequence) before B, and under sequence parallelism
      B's gradient is summed over TP ranks.
Only the adapter parameters require gradients, so DDP buffers and the optimizer hold nothing else. Checkpoints
hold only the adapter: each chunk's `ModelState` is marked `adapter_only`, and
`checkpoint.model_sharded_state_dict` keeps its LoRA tensors only (global layer keys, TP-sharded as above;
`state_of(models)` finds the LoraState again), the trainer adds the PEFT adapter files with
`save_checkpoint(extra_files=...)` before publishing, and `load_checkpoint` requires every adapter tensor (the
base weights come from the Hugging Face model). The bridge's `iter_local_params` skips the adapter
parameters, so export and merge see the base model only.
MoE routed experts (`TorchGroupedMLP`) get per-expert adapters on their grouped GEMM (`models/lora_experts.py`),
exported as PEFT `target_parameters` on transformers' fused expert parameters (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`); `lora_target: all` on an MoE family means attention + experts (+ a shared expert's
linears, which are TP linears as above, where the family has one). Routers get no adapters.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from llamafactory_mca.models.lora_experts import (
    EXPERT_ALIASES,
    EXPERT_PARAMS,
    ExpertLora,
    expert_params_of,
    factors_to_peft,
    init_factors,
    peft_expert_keys,
    peft_target_parameter,
    peft_to_factors,
)
from llamafactory_mca.models.model_state import hf_config_of, model_state, unwrap_model
from llamafactory_mca.models.param_mapping import COLUMN, GLU, GQKV, QKV, ROW, mapping_for

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
PEFT_PREFIX = "base_model.model."
# a (sharded) state-dict key of an adapter tensor: `<base module>.lora_<A|B|M>.<HF module short name>` (M: DoRA's
# magnitude vector, PEFT's `lora_magnitude_vector`)
ADAPTER_KEY_RE = re.compile(r"^(?P<base>.+)\.lora_(?P<which>[ABM])\.(?P<short>[A-Za-z0-9_]+)$")


def is_adapter_key(key: str) -> bool:
    """A parameter name or (sharded) state-dict key of a LoRA adapter tensor (the one test for it)."""
    return ".lora_A." in key or ".lora_B." in key or ".lora_M." in key


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """PEFT's scaling of B A: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / (math.sqrt(r) if use_rslora else r)


def peft_lora_config(r: int, alpha: float, dropout: float, use_rslora: bool, target_modules: Sequence[str],
                     base_model_name_or_path: Optional[str], target_parameters: Sequence[str] = (),
                     use_dora: bool = False):
    """The PEFT `LoraConfig` (inference mode, causal LM) of an adapter with these settings; `target_parameters`:
    the adapted fused expert parameters (gate_up_proj / down_proj), written as PEFT's `mlp.experts.<name>`."""
    from peft import LoraConfig, TaskType

    extra = {"target_parameters": [peft_target_parameter(p) for p in target_parameters]} if target_parameters else {}
    return LoraConfig(task_type=TaskType.CAUSAL_LM, inference_mode=True, r=r, lora_alpha=alpha,
                      lora_dropout=dropout, use_rslora=use_rslora, target_modules=list(target_modules),
                      base_model_name_or_path=base_model_name_or_path, use_dora=use_dora, **extra)


@dataclass
class LoraState:
    """The adapter of a run: PEFT's settings and the adapted megatron linears of this rank."""

    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    target_modules: list[str]  # Hugging Face module names (q_proj ...), as PEFT's config lists them
    modules: list = field(default_factory=list)  # the adapted megatron linears of this rank
    target_parameters: list[str] = field(default_factory=list)  # adapted fused expert parameters (gate_up_proj ...)
    experts: list = field(default_factory=list)  # the TorchGroupedMLP modules of this rank with an `adapter`
    enabled: bool = True
    use_dora: bool = False  # DoRA: a trainable magnitude per output row of each adapted linear (`lora_M`)
    base_model_name_or_path: Optional[str] = None  # the Hugging Face model the adapter belongs to

    @property
    def scaling(self) -> float:
        """PEFT's scaling of B A (`lora_scaling`)."""
        return lora_scaling(self.r, self.alpha, self.use_rslora)


def _tp_info() -> tuple[int, int]:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


# --------------------------------------------------------------------------------------------- the layer


class _LoraMixin:
    """Swapped in as the class of an adapted ColumnParallelLinear / RowParallelLinear instance."""

    lora_kind: str  # QKV / GQKV / GLU / COLUMN / ROW
    lora_slots: list  # [(hf module path, short name, local out size)] in fused order
    lora_state: LoraState
    lora_mapping: Any  # the split kind's ParamMapping: fuses the per-module outputs (param_mapping.fuse_outputs)
    lora_ctx: Any  # the ShardContext of this rank

    def forward(self, input_, *args, **kwargs):  # noqa: D102
        out, bias = super().forward(input_, *args, **kwargs)
        if self.lora_state.enabled and getattr(self, "lora_A", None) is not None:
            delta = self._lora_delta(input_).to(out.dtype)
            if self.lora_state.use_dora:
                # PEFT's DoRA: y = W x + b + (m / |W + s B A| - 1) W x + (m / |W + s B A|) s B A x, the norm detached
                scale = self._dora_scale().to(out.dtype)
                base = out - self.bias if (self.bias is not None and not self.skip_bias_add) else out
                out = out + (scale - 1) * base + scale * delta
            else:
                out = out + delta
        return out, bias

    # ---- DoRA
    def _weight_norm(self) -> torch.Tensor:
        """|W + s B A| per output row of the local (fused) weight, detached; a row-parallel layer sums the squares
        of its input slices over TP ranks (every rank gets the full-row norm)."""
        with torch.no_grad():
            w = self.weight.float() + self.lora_delta_weight().float()
            sq = (w * w).sum(dim=1)
            if self.lora_kind == ROW:
                import torch.distributed as dist
                from megatron.core import parallel_state as ps

                if ps.get_tensor_model_parallel_world_size() > 1:
                    dist.all_reduce(sq, group=ps.get_tensor_model_parallel_group())
            return sq.sqrt().to(self.weight.dtype)

    def _dora_scale(self) -> torch.Tensor:
        """m / |W + s B A| in the local output layout (1 for the fused slots without adapter)."""
        from megatron.core.tensor_parallel import mappings

        mags, masks = [], []
        for _, short, size in self.lora_slots:
            if short in self.lora_M:
                m = self.lora_M[short]
                if self.lora_kind == ROW and self.sequence_parallel:  # each rank sees its slice of the tokens
                    m = mappings.copy_to_tensor_model_parallel_region(m)
                mags.append(m)
                masks.append(torch.ones(size, dtype=torch.bool, device=m.device))
            else:
                mags.append(self.weight.new_ones(size))
                masks.append(torch.zeros(size, dtype=torch.bool, device=self.weight.device))
        mag, mask = self._fuse(mags), self._fuse(masks)
        return torch.where(mask, mag / self._weight_norm(), torch.ones_like(mag))

    def slot_values(self, fused: torch.Tensor) -> list:
        """Inverse of `_fuse` for a vector in the local output layout: one piece per slot."""
        sizes = [size for _, _, size in self.lora_slots]
        return self.lora_mapping.split_outputs(fused, sizes, self.lora_ctx)

    # ---- math
    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        p = self.lora_state.dropout
        return F.dropout(x, p=p, training=True) if (p > 0 and self.training) else x

    def _lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import mappings

        sp = self.sequence_parallel
        scale = self.lora_state.scaling
        if self.lora_kind == ROW:
            (path, short, _), = self.lora_slots
            h = F.linear(self._dropout(x), self.lora_A[short].to(x.dtype))
            h = mappings.reduce_scatter_to_sequence_parallel_region(h) if sp else \
                mappings.reduce_from_tensor_model_parallel_region(h)
            b = self.lora_B[short]
            if sp:
                b = mappings.copy_to_tensor_model_parallel_region(b)
            return F.linear(h, b.to(h.dtype)) * scale
        xg = mappings.gather_from_sequence_parallel_region(x) if sp else \
            mappings.copy_to_tensor_model_parallel_region(x)
        outs = []
        for path, short, size in self.lora_slots:
            if short not in self.lora_A:
                outs.append(xg.new_zeros(xg.shape[:-1] + (size,)))
                continue
            a = mappings.copy_to_tensor_model_parallel_region(self.lora_A[short])
            h = F.linear(self._dropout(xg), a.to(xg.dtype))
            outs.append(F.linear(h, self.lora_B[short].to(h.dtype)) * scale)
        return self._fuse(outs)

    def _fuse(self, outs: list) -> torch.Tensor:
        """Per-module outputs [..., out_i] -> the fused layer's local output layout [..., sum out_i]."""
        return self.lora_mapping.fuse_outputs(outs, self.lora_ctx)

    def merged_weight(self) -> torch.Tensor:
        """The local weight with the adapter merged in: W + s B A, with DoRA scaled per row by m / |W + s B A|."""
        w = self.weight + self.lora_delta_weight().to(self.weight.dtype)
        if self.lora_state.use_dora:
            w = w * self._dora_scale().detach().to(w.dtype).unsqueeze(1)
        return w

    def lora_delta_weight(self) -> torch.Tensor:
        """scale * B A in the local (TP-sharded, fused) layout of `self.weight`."""
        scale = self.lora_state.scaling
        if self.lora_kind == ROW:
            (_, short, _), = self.lora_slots
            return (self.lora_B[short] @ self.lora_A[short]) * scale
        in_features = self.weight.shape[1]
        outs = []
        for _, short, size in self.lora_slots:
            if short not in self.lora_A:
                outs.append(self.weight.new_zeros(in_features, size))
            else:
                outs.append((self.lora_B[short] @ self.lora_A[short]).t() * scale)
        return self._fuse(outs).t()

    # ---- checkpoints
    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):  # noqa: D102
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        state_dict = self.state_dict(prefix="", keep_vars=True)
        column = self.lora_kind != ROW
        axes = {"weight": 0 if column else 1}
        if column:
            axes["bias"] = 0
        for key in state_dict:
            if (key.startswith("lora_B.") or key.startswith("lora_M.")) and column:
                axes[key] = 0
            elif key.startswith("lora_A.") and not column:
                axes[key] = 1
        kwargs = {}
        if metadata is not None and "dp_cp_group" in metadata:
            kwargs = dict(tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])
        return make_sharded_tensors_for_checkpoint(state_dict, prefix, axes, sharded_offsets, **kwargs)


_CLASSES: dict[type, type] = {}


def _lora_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Lora{cls.__name__}", (_LoraMixin, cls), {})
    return _CLASSES[cls]


# --------------------------------------------------------------------------------------------- targets


def _module_short(hf_name: str) -> str:
    return hf_name.rsplit(".", 2)[-2]


def _module_path(hf_name: str) -> str:
    return hf_name.rsplit(".", 1)[0]


def _linear_targets(bridge: Any, models: Sequence[torch.nn.Module]) -> Iterator[tuple[Any, str, tuple, str]]:
    """(module, canonical megatron key, hf weight names, kind) of every TP linear inside the decoder layers."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    for chunk in models:
        model = unwrap_model(chunk)
        for name, module in model.named_modules():
            if not name.startswith("decoder.layers.") or ".experts." in name:
                continue
            if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                continue
            key = bridge.canonical_names(model, name + ".weight")[0]
            hf, kind = bridge.hf_names_for(key)
            yield module, key, hf, kind


def _resolve_targets(requested: Sequence[str], available: set[str], has_experts: bool) -> tuple[list[str], list[str]]:
    """(Hugging Face linear module names, fused expert parameters) that `lora_target` names. `all`: every linear
    (attention, dense or shared-expert MLP) and, on an MoE model, the routed experts; `experts` (or
    `gate_up_proj` / `down_proj` / `mlp.experts.<name>` where no dense module has that name): the experts."""
    requested = [t.strip() for t in requested if t and t.strip()]
    if len(requested) == 1 and requested[0] == "all":
        return sorted(available), list(EXPERT_PARAMS) if has_experts else []
    mega = {"linear_qkv": ("q_proj", "k_proj", "v_proj"), "linear_proj": ("o_proj",),
            "linear_fc1": ("gate_proj", "up_proj"), "linear_fc2": ("down_proj",)}
    out: list[str] = []
    experts: list[str] = []
    for t in requested:
        short = t[len("mlp.experts."):] if t.startswith("mlp.experts.") else t
        if has_experts and short in EXPERT_ALIASES and (t != short or short not in available):
            experts.extend(p for p in EXPERT_ALIASES[short] if p not in experts)
            continue
        names = [n for n in mega.get(t, (t,)) if n in available]
        if not names:
            extra = ", experts, gate_up_proj, down_proj" if has_experts else ""
            raise ValueError(
                f"`lora_target`: module '{t}' is not a linear layer the Megatron backend can adapt. Fix: choose "
                f"from all, {', '.join(sorted(available))}{extra}."
            )
        out.extend(n for n in names if n not in out)
    return out, [p for p in EXPERT_PARAMS if p in experts]


def _expert_modules(bridge: Any, models: Sequence[torch.nn.Module]) -> Iterator[tuple[Any, str]]:
    """(experts module, Hugging Face module path of its fused parameters) of every MoE layer of this rank's chunks;
    ValueError for experts that are not the grouped-GEMM `TorchGroupedMLP`."""
    from llamafactory_mca.kernels.experts import TorchGroupedMLP

    for chunk in models:
        model = unwrap_model(chunk)
        for name, module in model.named_modules():
            if not (name.startswith("decoder.layers.") and name.endswith(".mlp.experts")):
                continue
            if not isinstance(module, TorchGroupedMLP):
                raise ValueError(f"LoRA on experts: {name} is a {type(module).__name__}; the Megatron backend adapts "
                                 "the grouped-GEMM experts (TorchGroupedMLP) only. Fix: remove the experts from "
                                 "lora_target (list the attention modules), or use the default MoE layer spec.")
            key = bridge.canonical_names(model, name + ".weight1")[0]
            hf, _ = bridge.hf_names_for(key)
            yield module, hf[0].rsplit(".", 3)[0]  # model.layers.L.mlp.experts(.E.gate_proj.weight)


# --------------------------------------------------------------------------------------------- apply


def _read_peft_config(path: str) -> dict:
    with open(os.path.join(path, ADAPTER_CONFIG), encoding="utf-8") as f:
        return json.load(f)


def apply_lora(bridge: Any, models: Sequence[torch.nn.Module], finetuning_args: Any, model_args: Any = None,
               mca_args: Any = None, seed: Optional[int] = None) -> LoraState:
    """Freeze the base model and add adapters to the targeted linears of every chunk of this rank.

    With `adapter_name_or_path` (LLaMA-Factory's key) the adapter is resumed from that PEFT directory (its
    own r / alpha / dropout / target modules, as PEFT's `from_pretrained` uses them); otherwise A gets PEFT's
    kaiming-uniform initialisation (the full matrix drawn from a per-module seed, so TP ranks agree) and B zeros.
    """
    adapters = list(getattr(model_args, "adapter_name_or_path", None) or []) if model_args is not None else []
    resume = adapters[-1] if adapters else None
    if resume:
        cfg = _read_peft_config(resume)
        targets = cfg.get("target_modules") or []
        if isinstance(targets, str):
            raise ValueError(f"adapter {resume}: regex target_modules are not supported by the Megatron backend")
        state = LoraState(r=int(cfg["r"]), alpha=float(cfg.get("lora_alpha", cfg["r"])),
                          dropout=float(cfg.get("lora_dropout", 0.0)), use_rslora=bool(cfg.get("use_rslora", False)),
                          target_modules=[], use_dora=bool(cfg.get("use_dora", False)))
        requested = list(targets) + [peft_target_parameter(p)
                                     for p in expert_params_of(cfg.get("target_parameters") or [])]
    else:
        state = LoraState(r=finetuning_args.lora_rank,
                          alpha=float(finetuning_args.lora_alpha or finetuning_args.lora_rank * 2),
                          dropout=float(finetuning_args.lora_dropout), use_rslora=bool(finetuning_args.use_rslora),
                          target_modules=[], use_dora=bool(getattr(finetuning_args, "use_dora", False)))
        requested = list(finetuning_args.lora_target)

    state.base_model_name_or_path = getattr(model_args, "model_name_or_path", None) if model_args is not None else None
    for chunk in models:
        for p in unwrap_model(chunk).parameters():
            p.requires_grad_(False)

    targets = list(_linear_targets(bridge, models))
    available = {_module_short(h) for _, _, hf, _ in targets for h in hf}
    has_moe = bool(getattr(unwrap_model(models[0]).config, "num_moe_experts", None))
    state.target_modules, state.target_parameters = _resolve_targets(requested, available, has_moe)
    if [t.strip() for t in requested] == ["all"] and getattr(unwrap_model(models[0]).config, "moe_shared_expert_gate",
                                                              False):
        from llamafactory_mca.log import get_logger

        get_logger("lora").warning_rank0(
            "lora_target: all leaves out the shared expert's gate (`shared_expert_gate`, a 1-output linear), which "
            "LLaMA-Factory's HF path adapts under `all`: the two backends train slightly different adapters. Fix, "
            "where the HF path's exact set matters: list the same modules for both (lora_target: q_proj,v_proj,...)")
    if state.target_parameters and state.dropout > 0:
        raise ValueError("`lora_dropout`: PEFT's LoRA on expert parameters (target_parameters) has no dropout, so "
                         "the Megatron backend's expert adapters have none either. Fix: set lora_dropout: 0, or "
                         "remove the experts from lora_target.")
    if state.use_dora and state.target_parameters:
        raise ValueError("`use_dora`: PEFT has no DoRA for expert parameters (target_parameters). Fix: remove the "
                         "experts from lora_target (e.g. lora_target: q_proj,k_proj,v_proj,o_proj), or set "
                         "use_dora: false.")
    if state.use_dora and state.dropout > 0:
        raise ValueError("`lora_dropout`: DoRA with dropout is not supported by the Megatron backend (PEFT then runs "
                         "the base layer a second time on the dropped-out input). Fix: set lora_dropout: 0, or "
                         "use_dora: false.")

    tp_rank, tp = _tp_info()
    hf_config = hf_config_of(models[0])
    ctx = bridge.shard_context(hf_config, tp_rank, tp)
    for module, key, hf, kind in targets:
        shorts = [_module_short(h) for h in hf]
        if not any(s in state.target_modules for s in shorts):
            continue
        if kind not in (QKV, GQKV, GLU, COLUMN, ROW):
            raise ValueError(f"LoRA: {key} has bridge kind {kind!r}, which the Megatron backend cannot adapt")
        weight = module.weight
        out_local, in_local = weight.shape
        module.lora_mapping, module.lora_ctx = mapping_for(kind), ctx
        sizes = module.lora_mapping.lora_slot_sizes(out_local, ctx)
        module.lora_kind = kind
        module.lora_slots = [(_module_path(h), s, n) for h, s, n in zip(hf, shorts, sizes)]
        module.lora_state = state
        module.lora_A = torch.nn.ParameterDict()
        module.lora_B = torch.nn.ParameterDict()
        module.lora_M = torch.nn.ParameterDict()
        in_full = in_local * (tp if kind == ROW else 1)
        for (path, short, size) in module.lora_slots:
            if short not in state.target_modules:
                continue
            a = torch.empty(state.r, in_full, dtype=torch.float32)
            gen = torch.Generator().manual_seed(_name_seed(path, seed))
            torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
            if kind == ROW:
                a = a.chunk(tp, dim=1)[tp_rank]
                b = torch.zeros(out_local, state.r)
            else:
                b = torch.zeros(size, state.r)
            pa = torch.nn.Parameter(a.to(device=weight.device, dtype=weight.dtype).contiguous())
            pb = torch.nn.Parameter(b.to(device=weight.device, dtype=weight.dtype).contiguous())
            _mark_tp(pa, kind == ROW, 1)
            _mark_tp(pb, kind != ROW, 0)
            module.lora_A[short] = pa
            module.lora_B[short] = pb
        module.__class__ = _lora_class(type(module))
        if state.use_dora:  # PEFT's initial magnitude: |W + s B A| (B = 0: the base rows' norms)
            for (_, short, _), norm in zip(module.lora_slots, module.slot_values(module._weight_norm())):
                if short in module.lora_A:
                    pm = torch.nn.Parameter(norm.clone().contiguous())
                    _mark_tp(pm, kind != ROW, 0)
                    module.lora_M[short] = pm
        state.modules.append(module)
    if state.target_parameters:
        _add_expert_adapters(bridge, models, state, seed)
    if resume:
        load_peft_adapter(state, resume)
    for chunk in models:
        _adapter_only_checkpoints(unwrap_model(chunk), state)
    return state


def _add_expert_adapters(bridge: Any, models: Sequence[torch.nn.Module], state: LoraState,
                         seed: Optional[int]) -> None:
    """An `ExpertLora` (PEFT's initialisation) as the `adapter` of every experts module of this rank."""
    for experts, hf_path in _expert_modules(bridge, models):
        adapter = ExpertLora(experts, state, state.target_parameters, hf_path)
        for param in adapter.params:
            n_in, n_out = adapter.full_shapes(param)
            adapter.set_full(param, *init_factors(hf_path, param, adapter.num_global, state.r, n_in, n_out, seed))
        experts.adapter = adapter
        state.experts.append(experts)


def state_of(models: Sequence[torch.nn.Module]) -> Optional[LoraState]:
    """The LoraState `apply_lora` attached to these model chunks (DDP-wrapped or not), or None without LoRA."""
    for chunk in models:
        state = model_state(chunk)
        if state is not None and state.lora is not None:
            return state.lora
    return None


def checkpoint_marker(state: LoraState) -> dict:
    """What a checkpoint's marker records about its adapter (merge needs the base model)."""
    base = state.base_model_name_or_path
    out = {"finetuning_type": "lora", "adapter_only": True, "base_model_name_or_path": base,
           "lora": {"r": state.r, "alpha": state.alpha, "dropout": state.dropout, "use_rslora": state.use_rslora,
                    "use_dora": state.use_dora,
                    "target_modules": list(state.target_modules),
                    "target_parameters": list(state.target_parameters)}}
    if base and os.path.isdir(base):
        out["base_model_path"] = os.path.abspath(base)
    return out


def _name_seed(path: str, seed: Optional[int]) -> int:
    digest = hashlib.sha256(f"{seed or 0}:{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _mark_tp(param: torch.nn.Parameter, split: bool, dim: int) -> None:
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    if split:
        set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)


def _adapter_only_checkpoints(model: torch.nn.Module, state: LoraState) -> None:
    """Record the adapter in this chunk's `ModelState`: its checkpoints hold the adapter tensors only
    (`checkpoint.model_sharded_state_dict`; the base comes from the HF model)."""
    mstate = model.mca_state
    mstate.lora = state
    if mstate.adapter_only:
        return
    full = model.sharded_state_dict

    def sharded_state_dict(*args, **kwargs):
        return {k: v for k, v in full(*args, **kwargs).items() if is_adapter_key(k)}

    # (kept beside checkpoint.model_sharded_state_dict's filter: test_lora's LoRA checkpoint test failed without it)
    model.sharded_state_dict = sharded_state_dict
    mstate.adapter_only = True


# --------------------------------------------------------------------------------------------- switches


@contextlib.contextmanager
def disabled(state: Optional[LoraState]):
    """The base model alone (DPO's reference model under LoRA)."""
    if state is None:
        yield
        return
    prev = state.enabled
    state.enabled = False
    try:
        yield
    finally:
        state.enabled = prev


def merge(state: LoraState) -> None:
    """W += scale * B A in place, on every rank's shards; the adapters then stay disabled."""
    with torch.no_grad():
        for module in state.modules:
            module.weight.copy_(module.merged_weight())
        for experts in state.experts:
            for weight, delta in zip((experts.weight1, experts.weight2), experts.adapter.local_delta_weights()):
                if delta is not None:
                    weight.add_(delta.to(weight.dtype))
    state.enabled = False


def save_merged_hf(bridge: Any, models: Sequence[torch.nn.Module], state: LoraState, output_dir: str,
                   tokenizer: Any = None, dtype: Optional[torch.dtype] = None) -> None:
    """Collective: the base weights with the adapter merged in, written as a Hugging Face model (the model's
    weights are merged in place)."""
    merge(state)
    bridge.save_hf_pretrained(models, output_dir, tokenizer=tokenizer, dtype=dtype)  # adapters are skipped


# --------------------------------------------------------------------------------------------- PEFT I/O


def _peft_key(path: str, which: str) -> str:
    """PEFT's file key of a module's lora_A / lora_B weight, or (`which` M) of its DoRA magnitude vector."""
    if which == "M":
        return f"{PEFT_PREFIX}{path}.lora_magnitude_vector"
    return f"{PEFT_PREFIX}{path}.lora_{which}.weight"


def adapter_state_dict(state: LoraState) -> dict[str, torch.Tensor]:
    """PEFT-named full adapter tensors, on global rank 0 (collective; empty elsewhere)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    tp_rank, tp = _tp_info()
    group = ps.get_tensor_model_parallel_group()
    local: dict[str, torch.Tensor] = {}
    for module in state.modules:
        row = module.lora_kind == ROW
        for path, short, _ in module.lora_slots:
            if short not in module.lora_A:
                continue
            a, b = module.lora_A[short].detach(), module.lora_B[short].detach()
            if tp > 1:
                split, dim = (a, 1) if row else (b, 0)
                parts = [torch.empty_like(split) for _ in range(tp)]
                dist.all_gather(parts, split.contiguous(), group=group)
                full = torch.cat(parts, dim=dim)
                a, b = (full, b) if row else (a, full)
            local[_peft_key(path, "A")] = a.to("cpu").clone()
            local[_peft_key(path, "B")] = b.to("cpu").clone()
            if short in module.lora_M:
                m = module.lora_M[short].detach()
                if tp > 1 and not row:
                    parts = [torch.empty_like(m) for _ in range(tp)]
                    dist.all_gather(parts, m.contiguous(), group=group)
                    m = torch.cat(parts)
                local[_peft_key(path, "M")] = m.to("cpu").clone()
    writer = tp_rank == 0 and ps.get_data_parallel_rank(with_context_parallel=True) == 0
    experts = _local_expert_factors(state)
    if not dist.is_initialized():
        return {**local, **_assemble_expert_factors([experts])}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (local if writer else {}, experts))
    out: dict[str, torch.Tensor] = {}
    if dist.get_rank() == 0:
        for part, _ in gathered:
            out.update(part)
        out.update(_assemble_expert_factors([e for _, e in gathered]))
    return out


def _local_expert_factors(state: LoraState) -> dict[tuple, tuple]:
    """{(HF module path, parameter, adapted parameters): (first global expert, A, B)} of this rank's experts, the
    expert-TP slices gathered (collective over expert TP); empty except on one rank per expert shard."""
    out: dict = {}
    for experts in state.experts:
        adapter = experts.adapter
        for param in adapter.params:
            a, b = adapter.full(param)
            if adapter.etp_rank == 0 and adapter.dp_group.rank() == 0:
                key = (adapter.hf_module_path, param, tuple(adapter.params))
                out[key] = (adapter.ep_rank * adapter.num_local, a.to("cpu").clone(), b.to("cpu").clone())
    return out


def _assemble_expert_factors(parts: Sequence[dict]) -> dict[str, torch.Tensor]:
    """PEFT-named expert tensors from the expert shards of every rank (`_local_expert_factors`)."""
    shards: dict = {}
    for part in parts:
        for key, value in part.items():
            shards.setdefault(key, []).append(value)
    out: dict[str, torch.Tensor] = {}
    for (path, param, adapted), values in shards.items():
        values.sort(key=lambda v: v[0])
        a = torch.cat([v[1] for v in values])
        b = torch.cat([v[2] for v in values])
        ka, kb = peft_expert_keys(path, param, adapted, PEFT_PREFIX)
        out[ka], out[kb] = factors_to_peft(a, b)
    return out


def peft_config_dict(state: LoraState, base_model_name_or_path: Optional[str]):
    """The PEFT `LoraConfig` of this adapter (`peft_lora_config`)."""
    return peft_lora_config(state.r, state.alpha, state.dropout, state.use_rslora, state.target_modules,
                            base_model_name_or_path, state.target_parameters, state.use_dora)


def save_peft_adapter(models: Sequence[torch.nn.Module], state: LoraState, output_dir: str,
                      base_model_name_or_path: Optional[str] = None) -> None:
    """Collective. Rank 0 writes adapter_model.safetensors + adapter_config.json (what PeftModel.save_pretrained
    writes), which `PeftModel.from_pretrained(hf_model, output_dir)` loads. Into a published checkpoint that
    already holds its adapter nothing is written (checkpoints are immutable once published)."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from llamafactory_mca.checkpoint import is_megatron_checkpoint

    tensors = adapter_state_dict(state)
    rank = dist.get_rank() if dist.is_initialized() else 0
    # A published checkpoint is immutable: its adapter was written before the checkpoint was published
    # (`checkpoint.save_checkpoint(extra_files=...)`); rewriting it now would break that atomicity.
    published = rank == 0 and is_megatron_checkpoint(output_dir) and all(
        os.path.isfile(os.path.join(output_dir, f)) for f in (ADAPTER_WEIGHTS, ADAPTER_CONFIG))
    if rank == 0 and not published:
        os.makedirs(output_dir, exist_ok=True)
        save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, os.path.join(output_dir, ADAPTER_WEIGHTS),
                  metadata={"format": "pt"})
        peft_config_dict(state, base_model_name_or_path).save_pretrained(output_dir)
    if dist.is_initialized():
        dist.barrier()


def load_peft_adapter(state: LoraState, path: str) -> None:
    """Copy this rank's slices of a PEFT adapter (adapter_model.safetensors or .bin) into the adapters."""
    file = os.path.join(path, ADAPTER_WEIGHTS)
    if os.path.isfile(file):
        from safetensors.torch import load_file

        tensors = load_file(file)
    else:
        tensors = torch.load(os.path.join(path, "adapter_model.bin"), map_location="cpu", weights_only=True)
    # PeftModel.save_pretrained strips the adapter name ("default"); accept files that kept it
    tensors = {re.sub(r"\.lora_([AB])\.default\.weight$", r".lora_\1.weight", k): v for k, v in tensors.items()}
    tensors = {re.sub(r"\.lora_magnitude_vector\.default(\.weight)?$", ".lora_magnitude_vector", k): v
               for k, v in tensors.items()}
    tp_rank, tp = _tp_info()
    missing = []
    with torch.no_grad():
        for module in state.modules:
            row = module.lora_kind == ROW
            for path_, short, _ in module.lora_slots:
                if short not in module.lora_A:
                    continue
                ka, kb = _peft_key(path_, "A"), _peft_key(path_, "B")
                if ka not in tensors or kb not in tensors:
                    missing.append(ka)
                    continue
                a, b = tensors[ka], tensors[kb]
                if row:
                    a = a.chunk(tp, dim=1)[tp_rank]
                else:
                    b = b.chunk(tp, dim=0)[tp_rank]
                pa, pb = module.lora_A[short], module.lora_B[short]
                if tuple(a.shape) != tuple(pa.shape) or tuple(b.shape) != tuple(pb.shape):
                    raise ValueError(f"adapter {path}: {ka} has shape {tuple(a.shape)}/{tuple(b.shape)}, expected "
                                     f"{tuple(pa.shape)}/{tuple(pb.shape)} for this layout")
                pa.copy_(a.to(pa.dtype))
                pb.copy_(b.to(pb.dtype))
                if short in module.lora_M:
                    km = _peft_key(path_, "M")
                    if km not in tensors:
                        missing.append(km)
                        continue
                    m = tensors[km] if row else tensors[km].chunk(tp, dim=0)[tp_rank]
                    module.lora_M[short].copy_(m.to(module.lora_M[short].dtype))
        for experts in state.experts:
            adapter = experts.adapter
            for param in adapter.params:
                ka, kb = peft_expert_keys(adapter.hf_module_path, param, adapter.params, PEFT_PREFIX)
                if ka not in tensors or kb not in tensors:
                    missing.append(ka)
                    continue
                a, b = peft_to_factors(tensors[ka], tensors[kb], adapter.num_global)
                n_in, n_out = adapter.full_shapes(param)
                want = ((adapter.num_global, state.r, n_in), (adapter.num_global, n_out, state.r))
                if (tuple(a.shape), tuple(b.shape)) != want:
                    raise ValueError(f"adapter {path}: {ka} / {kb} hold expert factors of shapes {tuple(a.shape)} / "
                                     f"{tuple(b.shape)}, expected {want[0]} / {want[1]} for this model")
                adapter.set_full(param, a, b)
    if missing:
        raise ValueError(f"adapter {path}: missing LoRA tensors, e.g. {missing[:3]}")
