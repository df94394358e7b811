"""Qwen3-VL-MoE (Qwen3-VL-30B-A3B, 235B-A22B): Qwen3-VL (vision tower, DeepStack, interleaved mRoPE:
`models/qwen3_vl.py`) with the Qwen3-MoE language model (softmax router, top-k renormalised, no shared expert).

Expert weights: Qwen3-VL-MoE checkpoints store all experts of a layer as two fused tensors. The released
checkpoints hold them transposed relative to `nn.Linear` ("hub" layout); transformers 5 transposes them while
loading and its `save_pretrained` writes its in-memory ("memory") layout, so both occur:

    hub:    layers.L.mlp.experts.gate_up_proj [E, H, 2F] (gate_e^T | up_e^T)   down_proj [E, F, H] (down_e^T)
    memory: layers.L.mlp.experts.gate_up_proj [E, 2F, H] (gate_e ; up_e)       down_proj [E, H, F] (down_e)

The two shapes of a layer always tell the layouts apart (`fused_layout`). The table is Qwen3-MoE's per-expert
one (`mlp.experts.{E}.gate_proj.weight` [F, H] ...; the usual GLU / ROW split kinds do the tensor parallelism) in
transformers' Qwen3-VL layout; those per-expert names are views of the fused tensors, one class per direction:
  load    `FusedExpertReader`  answers per-expert names with slices of the fused tensors (only expert e is read),
                               in either layout;
  export  `FusedExpertWriter`  (the bridge's `to_hf`, used by the export, the merge and the upstream-checkpoint
                               conversion alike) collects a layer's per-expert tensors and gives the fused tensor
                               in hub layout (what other tools read) once its last piece has arrived (every caller
                               streams whole layers); memory layout where H == F or H == 2F, where transformers'
                               loader (which decides per tensor by its shape alone) could not tell them apart.
Not yet: merging an expert LoRA adapter into the base model (`merge --merge_lora`) reads the base checkpoint by
per-expert names and refuses such a base (it lacks `...experts.0.gate_proj.weight`); the PEFT adapter export works.
"""

from __future__ import annotations

import re
from typing import Optional

import torch

from llamafactory_mca.models.qwen3_moe import Qwen3MoeBridge
from llamafactory_mca.models.qwen3_vl import Qwen3VLBridge, internal_layout
from llamafactory_mca.models.safetensors_io import SafetensorsReader

EXPERT_NAME = re.compile(r"(?P<prefix>.+\.mlp\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
FUSED_OF = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}


def fused_name(prefix: str, proj: str) -> str:
    """The fused checkpoint tensor holding per-expert projection `proj` of the experts module `prefix`."""
    return f"{prefix}.{FUSED_OF[proj]}"


def fused_layout(gate_up_shape: list, down_shape: list) -> str:
    """"hub" or "memory" (module docstring) from the shapes of one layer's fused gate_up_proj and down_proj."""
    _, gu1, gu2 = gate_up_shape
    _, dn1, dn2 = down_shape
    if gu2 == dn1 and gu1 == 2 * dn2:
        return "memory"
    if gu1 == dn2 and gu2 == 2 * dn1:
        return "hub"
    raise ValueError(f"fused expert tensors of shapes gate_up_proj {list(gate_up_shape)} and down_proj "
                     f"{list(down_shape)} fit neither [E, H, 2F] / [E, F, H] nor [E, 2F, H] / [E, H, F]")


def expert_from_fused(fused_expert: torch.Tensor, proj: str, layout: str) -> torch.Tensor:
    """Expert e's `proj` weight in `nn.Linear` layout ([F, H] gate / up, [H, F] down) from its slice of the fused
    tensor in `layout`."""
    linear = fused_expert.t() if layout == "hub" else fused_expert
    if proj == "down_proj":
        return linear
    half = linear.shape[0] // 2
    return linear[:half] if proj == "gate_proj" else linear[half:]


def hub_layout_safe(hidden: int, ffn: int) -> bool:
    """Whether transformers' per-tensor shape check loads hub-layout tensors right (H differs from F and 2F)."""
    return hidden not in (ffn, 2 * ffn)


class FusedExpertReader(SafetensorsReader):
    """A reader that also answers the per-expert names of the table (`...experts.{e}.gate_proj.weight`) with
    the slices of the fused `gate_up_proj` / `down_proj` tensors (module docstring); other names as stored."""

    def __contains__(self, name: str) -> bool:
        m = EXPERT_NAME.match(name)
        return super().__contains__(fused_name(m["prefix"], m["proj"]) if m else name)

    def layout_of(self, prefix: str) -> str:
        """The layout of the fused tensors of experts module `prefix` (`fused_layout`)."""
        return fused_layout(super().shape(prefix + ".gate_up_proj"), super().shape(prefix + ".down_proj"))

    def shape(self, name: str) -> list[int]:
        m = EXPERT_NAME.match(name)
        if not m:
            return super().shape(name)
        _, rows, cols = super().shape(fused_name(m["prefix"], m["proj"]))
        out, inp = (cols, rows) if self.layout_of(m["prefix"]) == "hub" else (rows, cols)
        return [out // 2, inp] if m["proj"] != "down_proj" else [out, inp]

    def read(self, name: str, dim: Optional[int] = None, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        m = EXPERT_NAME.match(name)
        if not m:
            return super().read(name, dim, start, stop)
        e = int(m["expert"])
        fused = super().read(fused_name(m["prefix"], m["proj"]), 0, e, e + 1)[0]
        full = expert_from_fused(fused, m["proj"], self.layout_of(m["prefix"]))
        if dim is None:
            return full.contiguous()
        return full.narrow(dim, start, (stop if stop is not None else full.shape[dim]) - start).contiguous()


class FusedExpertWriter:
    """Per-expert Hugging Face tensors -> the fused checkpoint tensors of their layer (module docstring).

    `layout`: "hub" or "memory" (module docstring); None: hub unless `hub_layout_safe` says otherwise.
    `add(name, tensor)` returns [(name, tensor)] for any other
    tensor, [] for a per-expert piece until the fused tensor it belongs to is complete, then
    [(fused name, fused tensor)]. A piece that arrives twice starts that
    tensor again (a new pass: the export plans the shapes on `meta` tensors, then streams the real ones)."""

    def __init__(self, num_experts: int, layout: Optional[str] = None):
        self.num_experts = num_experts
        self.layout = layout
        self.pending: dict[str, dict[tuple[int, str], torch.Tensor]] = {}

    def add(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """The tensors that are complete once `name` has arrived (see the class docstring)."""
        m = EXPERT_NAME.match(name)
        if not m:
            return [(name, tensor)]
        fused = fused_name(m["prefix"], m["proj"])
        pieces = self.pending.setdefault(fused, {})
        key = (int(m["expert"]), m["proj"])
        if key in pieces:
            pieces.clear()
        pieces[key] = tensor
        projs = ("down_proj",) if m["proj"] == "down_proj" else ("gate_proj", "up_proj")
        if len(pieces) < self.num_experts * len(projs):
            return []
        del self.pending[fused]
        per_expert = [torch.cat([pieces[(e, p)] for p in projs], 0) for e in range(self.num_experts)]
        ffn = per_expert[0].shape[0] // len(projs) if len(projs) == 2 else per_expert[0].shape[1]
        hidden = per_expert[0].shape[1] if len(projs) == 2 else per_expert[0].shape[0]
        if self.layout == "hub" or (self.layout is None and hub_layout_safe(hidden, ffn)):
            per_expert = [t.t() for t in per_expert]
        return [(fused, torch.stack(per_expert).contiguous())]


class Qwen3VLMoeBridge(Qwen3VLBridge):
    """Qwen3-VL-MoE: Qwen3-VL with a router and fused gate/up/down experts in every layer (module docstring)."""

    model_types = ("qwen3_vl_moe",)
    table = internal_layout(Qwen3MoeBridge.table)
    expert_layout: Optional[str] = None  # the fused tensors' layout on export (`FusedExpertWriter`)

    def check_config(self, hf_config) -> None:
        super().check_config(hf_config)
        text = self.text_config(hf_config)
        if getattr(text, "mlp_only_layers", None):
            raise ValueError(f"{hf_config.model_type} with text_config.mlp_only_layers is not supported by the "
                             "Megatron bridge yet")
        if getattr(text, "decoder_sparse_step", 1) != 1:
            raise ValueError(f"{hf_config.model_type} with text_config.decoder_sparse_step != 1 is not supported by "
                             "the Megatron bridge yet")

    def num_experts(self, hf_config) -> Optional[int]:
        return self.text_config(hf_config).num_experts

    def moe_ffn_hidden_size(self, hf_config) -> Optional[int]:
        return self.text_config(hf_config).moe_intermediate_size

    def moe_topk(self, hf_config) -> Optional[int]:
        return self.text_config(hf_config).num_experts_per_tok

    def moe_router_pre_softmax(self, hf_config) -> bool:
        # Hugging Face's router always renormalises the top-k probabilities (== softmax over the top-k logits)
        return False

    def vision_cls(self):
        """Hugging Face's Qwen3-VL-MoE vision tower (with the DeepStack mergers)."""
        from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel

        return Qwen3VLMoeVisionModel

    def reader(self, hf_path: str) -> SafetensorsReader:
        """The checkpoint with its fused expert tensors readable per expert (`FusedExpertReader`)."""
        return FusedExpertReader(hf_path)

    def expert_writer(self, hf_config) -> FusedExpertWriter:
        """The fuser of this model's per-expert export tensors (one per bridge: callers stream whole layers)."""
        writer = self.__dict__.get("_expert_writer")
        num = self.num_experts(hf_config)
        if writer is None or writer.num_experts != num:
            writer = FusedExpertWriter(num, self.expert_layout)
            self.__dict__["_expert_writer"] = writer
        return writer

    def to_hf(self, kind: str, hf_names: tuple, full: torch.Tensor, hf_config,
              tp_size: int = 1) -> list[tuple[str, torch.Tensor]]:
        """The table's Hugging Face tensors, per-expert ones fused into the checkpoint's layout (`FusedExpertWriter`:
        an expert tensor gives nothing until the last piece of its fused tensor arrives)."""
        writer = self.expert_writer(hf_config)
        return [out for name, t in super().to_hf(kind, hf_names, full, hf_config, tp_size)
                for out in writer.add(name, t)]
