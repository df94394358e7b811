"""LoRA on the routed experts of `kernels.experts.TorchGroupedMLP`: one A/B pair per expert, run on the grouped GEMM.

Transformers 5 keeps an MoE layer's experts as two fused 3D parameters (Qwen3-MoE, Mixtral, ...):
`mlp.experts.gate_up_proj` [E, 2F, H] (gate rows first) and `mlp.experts.down_proj` [E, H, F]. PEFT adapts them
with `target_parameters` (`lora.ParamWrapper`), which stores per parameter [E, in', out'] (in' = shape[1],
out' = shape[2]) `lora_A.weight` [E * r, in'] (viewed [E, r, in']) and `lora_B.weight` [out', r * E] (viewed
[out', r, E], rank-major) with delta[e] = scaling * A_e^T B_e^T. For the transformers layout in' is the output
side of the projection, so PEFT's lora_A is the *output* factor of the expert's LoRA and its lora_B the *input*
factor. We keep the usual orientation, stacked per expert (`y += scaling * B_e A_e x`):

    gate_up_proj:  lora_A.gate_up_proj [E, r, H]     (input factor; PEFT lora_B.view(H, r, E).permute(2, 1, 0))
                   lora_B.gate_proj   [E, F, r]      (output factor; PEFT lora_A.view(E, r, 2F).transpose(1, 2),
                   lora_B.up_proj     [E, F, r]       split into its gate and up rows)
    down_proj:     lora_A.down_proj   [E, r, F]      (PEFT lora_B.view(F, r, E).permute(2, 1, 0))
                   lora_B.down_proj   [E, H, r]      (PEFT lora_A.view(E, r, H).transpose(1, 2))

so each factor is a stacked [E, r, in] / [E, out, r] tensor that `grouped_mm` runs over the permuted tokens
exactly as it runs the base weights. Parallelism follows the experts: expert parallelism slices the E axis
(rank r holds global experts [r E_local, (r + 1) E_local)); expert tensor parallelism splits F as the base
weights do (gate and up rows, down's input), the other factor (lora_A.gate_up_proj, lora_B.down_proj) being
replicated over the expert-TP group with its gradient all-reduced there (each rank only sees its slice of F).
The dispatcher sums the expert outputs (and the inputs' gradients) over expert-TP ranks for the adapter as for
the base weights, so the loss does not depend on EP / ETP. Parameters carry the base weights' `allreduce`
attribute, so DDP and the optimizer put them where the experts' weights go.

PEFT nests the ParamWrappers of one module in the module's parameter order: with both parameters adapted the
first (gate_up_proj) is wrapped first and its tensors are saved under `...experts.base_layer.lora_A.weight`,
down_proj's under `...experts.lora_A.weight`. PEFT refuses `lora_dropout` on `target_parameters`; so do we.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Optional, Sequence

import torch

EXPERT_PARAMS = ("gate_up_proj", "down_proj")  # transformers' fused expert parameters, in module order
EXPERT_ALIASES = {"experts": EXPERT_PARAMS, "gate_up_proj": ("gate_up_proj",), "down_proj": ("down_proj",)}


def peft_target_parameter(name: str) -> str:
    """PEFT's `target_parameters` entry of a fused expert parameter (`mlp.experts.gate_up_proj`)."""
    return f"mlp.experts.{name}"


def expert_params_of(target_parameters: Sequence[str]) -> list[str]:
    """The fused expert parameters a PEFT `target_parameters` list names (ValueError for anything else)."""
    out = []
    for t in target_parameters:
        short = t.rsplit(".", 1)[-1]
        if short not in EXPERT_PARAMS or not (t == short or t.endswith("experts." + short)):
            raise ValueError(f"adapter target_parameters: '{t}' is not an expert parameter the Megatron backend can "
                             f"adapt (supported: {', '.join(peft_target_parameter(p) for p in EXPERT_PARAMS)})")
        if short not in out:
            out.append(short)
    return [p for p in EXPERT_PARAMS if p in out]


def peft_expert_keys(module_path: str, param: str, adapted: Sequence[str], prefix: str) -> tuple[str, str]:
    """(lora_A key, lora_B key) of fused parameter `param` of the experts module at `module_path` in a PEFT adapter
    file, where `adapted` are the module's adapted parameters (PEFT nests their wrappers in module order)."""
    order = [p for p in EXPERT_PARAMS if p in adapted]
    depth = len(order) - 1 - order.index(param)
    base = f"{prefix}{module_path}" + ".base_layer" * depth
    return f"{base}.lora_A.weight", f"{base}.lora_B.weight"


def peft_to_factors(peft_a: torch.Tensor, peft_b: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT (lora_A [E r, out], lora_B [in, r E]) of one fused expert parameter -> our full (A [E, r, in],
    B [E, out, r]) over all experts (see the module docstring)."""
    r = peft_a.shape[0] // num_experts
    a = peft_b.reshape(peft_b.shape[0], r, num_experts).permute(2, 1, 0).contiguous()
    b = peft_a.reshape(num_experts, r, peft_a.shape[1]).transpose(1, 2).contiguous()
    return a, b


def factors_to_peft(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `peft_to_factors`: our (A [E, r, in], B [E, out, r]) -> PEFT (lora_A [E r, out], lora_B [in, r E])."""
    num_experts, r, n_in = a.shape
    peft_a = b.transpose(1, 2).reshape(num_experts * r, b.shape[1]).contiguous()
    peft_b = a.permute(2, 1, 0).reshape(n_in, r * num_experts).contiguous()
    return peft_a, peft_b


def stack_factors(lora_a: dict, lora_b: dict, param: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of fused parameter `param` from our named factors ({name: tensor} of lora_A / lora_B): gate_up_proj's
    B is its gate and up rows stacked."""
    if param == "gate_up_proj":
        return lora_a["gate_up_proj"], torch.cat([lora_b["gate_proj"], lora_b["up_proj"]], dim=1)
    return lora_a["down_proj"], lora_b["down_proj"]


def expert_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling * B_e A_e for every expert: [E, out, in] in the Hugging Face orientation of the fused parameter."""
    return torch.bmm(b.float(), a.float()) * scaling


def _seed(path: str, seed: Optional[int]) -> int:
    digest = hashlib.sha256(f"{seed or 0}:{path}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def init_factors(path: str, param: str, num_experts: int, r: int, n_in: int, n_out: int,
                 seed: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's initialisation of a fresh expert adapter, as our full factors: its lora_A (our output factor B)
    kaiming-uniform over [E r, out] from a per-parameter seed (so every rank draws the same), its lora_B (our A)
    zeros."""
    peft_a = torch.empty(num_experts * r, n_out, dtype=torch.float32)
    gen = torch.Generator().manual_seed(_seed(f"{path}.{param}", seed))
    torch.nn.init.kaiming_uniform_(peft_a, a=math.sqrt(5), generator=gen)
    return peft_to_factors(peft_a, torch.zeros(n_in, r * num_experts), num_experts)


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; backward sums the gradient over `group` (a factor replicated over expert-TP ranks, each
    of which sees one slice of F). Unlike megatron's copy_to_tensor_model_parallel_region it also reduces a
    non-contiguous gradient (ours arrive transposed from the grouped GEMM): that one all-reduces a contiguous copy
    and returns the unreduced original."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ExpertLora(torch.nn.Module):
    """The per-expert adapters of one `TorchGroupedMLP` (its `adapter` child): factors of this rank's experts and
    expert-TP slice, the deltas its forward adds (`fc1_delta` / `fc2_delta`), checkpoints and merge."""

    def __init__(self, experts: torch.nn.Module, state: Any, params: Sequence[str], hf_module_path: str):
        super().__init__()
        cfg = experts.config
        self.state = state  # models.lora.LoraState (scaling, enabled)
        self.params = [p for p in EXPERT_PARAMS if p in params]
        self.hf_module_path = hf_module_path  # e.g. model.layers.3.mlp.experts
        self.num_local = experts.num_local_experts
        self.hidden = cfg.hidden_size
        self.ffn_local = experts.weight2.numel() // self.num_local // self.hidden
        self.ep_rank, self.ep_size = experts.ep_group.rank(), experts.ep_group.size()
        self.etp_rank, self.etp_size = experts.tp_group.rank(), experts.tp_group.size()
        self.etp_group = experts.tp_group
        self.dp_group = experts.dp_group
        self.lora_A = torch.nn.ParameterDict()
        self.lora_B = torch.nn.ParameterDict()
        w = experts.weight1  # not kept (a Parameter attribute would register it here): what the factors copy of it
        self.base_dtype, self.base_device = w.dtype, w.device
        self.base_allreduce = getattr(w, "allreduce", True)
        self.base_tensor_parallel = bool(getattr(w, "tensor_model_parallel", False))

    # ---- shapes and slices
    @property
    def num_global(self) -> int:
        """Experts of this layer over all expert-parallel ranks."""
        return self.num_local * self.ep_size

    def full_shapes(self, param: str) -> tuple[int, int]:
        """(in, out) of the Hugging Face projection `param` (gate_up_proj: H -> 2F, down_proj: F -> H)."""
        ffn = self.ffn_local * self.etp_size
        return (self.hidden, 2 * ffn) if param == "gate_up_proj" else (ffn, self.hidden)

    def set_full(self, param: str, a: torch.Tensor, b: torch.Tensor) -> None:
        """Create (or overwrite) this rank's slices of the full factors (A [E, r, in], B [E, out, r]) of `param`."""
        lo = self.ep_rank * self.num_local
        a, b = a[lo:lo + self.num_local], b[lo:lo + self.num_local]
        fl, t = self.ffn_local, self.etp_rank
        ffn = fl * self.etp_size
        if param == "gate_up_proj":
            tensors = {("A", "gate_up_proj"): a, ("B", "gate_proj"): b[:, t * fl:(t + 1) * fl],
                       ("B", "up_proj"): b[:, ffn + t * fl:ffn + (t + 1) * fl]}
        else:
            tensors = {("A", "down_proj"): a[:, :, t * fl:(t + 1) * fl], ("B", "down_proj"): b}
        for (which, name), value in tensors.items():
            store = self.lora_A if which == "A" else self.lora_B
            value = value.to(device=self.base_device, dtype=self.base_dtype).contiguous()
            if name in store:
                with torch.no_grad():
                    store[name].copy_(value)
                continue
            p = torch.nn.Parameter(value)
            p.allreduce = self.base_allreduce  # DDP / optimizer: with the experts' weights
            # grad norm: a factor replicated over expert-TP ranks counts once (megatron counts a parameter that is not
            # `tensor_model_parallel` on TP rank 0 only); without expert TP the factors count as the base weights do
            split = self.etp_sliced(which, name) if self.etp_size > 1 else self.base_tensor_parallel
            p.tensor_model_parallel = split
            p.partition_dim, p.partition_stride = self.etp_axis(which, name), 1
            store[name] = p

    @staticmethod
    def etp_sliced(which: str, name: str) -> bool:
        """Is this factor split over expert-TP ranks (else replicated there)?"""
        return (which, name) in (("B", "gate_proj"), ("B", "up_proj"), ("A", "down_proj"))

    @staticmethod
    def etp_axis(which: str, name: str) -> int:
        """The axis of a factor that expert TP splits (F)."""
        return 2 if (which, name) == ("A", "down_proj") else 1

    def full(self, param: str) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's experts' factors of `param` with the expert-TP slices gathered: (A [E_local, r, in],
        B [E_local, out, r]). Collective over the expert-TP group."""
        a = {n: self._gather(p.detach(), self.etp_axis("A", n)) if self.etp_sliced("A", n) else p.detach()
             for n, p in self.lora_A.items()}
        b = {n: self._gather(p.detach(), self.etp_axis("B", n)) if self.etp_sliced("B", n) else p.detach()
             for n, p in self.lora_B.items()}
        return stack_factors(a, b, param)

    def _gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        if self.etp_size == 1:
            return t
        import torch.distributed as dist

        parts = [torch.empty_like(t) for _ in range(self.etp_size)]
        dist.all_gather(parts, t.contiguous(), group=self.etp_group)
        return torch.cat(parts, dim=dim)

    # ---- forward
    def _replicated(self, p: torch.Tensor) -> torch.Tensor:
        return p if self.etp_size == 1 else _SumGradOverGroup.apply(p, self.etp_group)

    def active(self) -> bool:
        """Do the adapters run (not disabled, e.g. for DPO's reference pass)?"""
        return self.state.enabled and bool(self.params)

    def fc1_delta(self, x: torch.Tensor, offs: torch.Tensor, empty: Optional[bool]) -> Optional[torch.Tensor]:
        """scaling * B_e A_e x for gate_up_proj, [T, 2F_local] in weight1's column order; None if not adapted."""
        if "gate_up_proj" not in self.params:
            return None
        from llamafactory_mca.kernels.grouped_gemm import grouped_mm

        a, b = stack_factors(self.lora_A, self.lora_B, "gate_up_proj")
        a, b = self._replicated(a).to(x.dtype), b.to(x.dtype)
        h = grouped_mm(x, a.transpose(1, 2), offs, empty_groups=empty)
        return grouped_mm(h, b.transpose(1, 2), offs, empty_groups=empty) * self.state.scaling

    def fc2_delta(self, h: torch.Tensor, offs: torch.Tensor, empty: Optional[bool]) -> Optional[torch.Tensor]:
        """scaling * B_e A_e h for down_proj ([T, H], a partial sum over expert-TP ranks as the base output)."""
        if "down_proj" not in self.params:
            return None
        from llamafactory_mca.kernels.grouped_gemm import grouped_mm

        a = self.lora_A["down_proj"].to(h.dtype)
        b = self._replicated(self.lora_B["down_proj"]).to(h.dtype)
        t = grouped_mm(h, a.transpose(1, 2), offs, empty_groups=empty)
        return grouped_mm(t, b.transpose(1, 2), offs, empty_groups=empty) * self.state.scaling

    def anchor(self) -> torch.Tensor:
        """A zero that depends on every factor: added when no token reached these experts, so the factors still
        get (zero) gradients as the base weights do."""
        return sum(p.sum() for p in self.parameters()) * 0.0

    # ---- merge
    def local_delta_weights(self) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """scaling * B A in the local layout of (weight1, weight2) of the experts (None where not adapted)."""
        s, h = self.state.scaling, self.hidden
        d1 = d2 = None
        if "gate_up_proj" in self.params:
            d1 = expert_delta(*stack_factors(self.lora_A, self.lora_B, "gate_up_proj"), s).transpose(1, 2)
            d1 = d1.reshape(h, -1)
        if "down_proj" in self.params:
            d2 = expert_delta(*stack_factors(self.lora_A, self.lora_B, "down_proj"), s).transpose(1, 2).reshape(-1, h)
        return d1, d2

    # ---- checkpoints
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """The factors as ShardedTensors over all experts (E axis split by EP, F by expert TP), keyed as this module's
        parameters (`<prefix>adapter.lora_A.gate_up_proj`), so a checkpoint resumes under another EP / ETP."""
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        n = len(sharded_offsets)
        dp_rank = self.dp_group.rank()
        out = {}
        for which, store in (("A", self.lora_A), ("B", self.lora_B)):
            for name, p in store.items():
                key = f"{prefix}adapter.lora_{which}.{name}"
                offsets = [*sharded_offsets, (n, self.ep_rank, self.ep_size)]
                sliced = self.etp_sliced(which, name)
                if sliced:
                    offsets.append((n + self.etp_axis(which, name), self.etp_rank, self.etp_size))
                replica = (0, 0 if sliced else self.etp_rank, dp_rank)
                out[key] = ShardedTensor.from_rank_offsets(key, p, *offsets, replica_id=replica, prepend_axis_num=n)
        return out
