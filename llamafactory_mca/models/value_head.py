"""A scalar value head (hidden -> 1) in place of the output layer: LLaMA-Factory's reward model (TRL's
`AutoModelForCausalLMWithValueHead`: `v_head.summary`, a linear layer with bias, after dropout
`summary_dropout_prob`, default 0.1, on the last hidden state after the final norm).

On the model chunk of the last pipeline stage the head is a child module `v_head` of the GPTModel (so DDP, the
optimizer and checkpoints see it) and the output layer's forward returns the values [s, b, 1] instead of the
vocabulary logits; GPTModel then returns them as [b, s, 1]. The head is replicated over tensor-parallel ranks:
each computes the same values from the (replicated) final hidden states, the same loss and the same head
gradient; under sequence parallelism the hidden states are gathered first, with a backward that keeps each
rank's own slice (no reduction: every rank differentiates the same loss). The output layer's own weight stays in
the model (exports write it unchanged); an untied one is frozen, as on the HF path, where it gets no gradient.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import torch

from llamafactory_mca.models.model_state import hf_config_of, unwrap_model

V_HEAD_SAFE_WEIGHTS_NAME = "value_head.safetensors"  # LLaMA-Factory's extras.constants names
WEIGHT_KEY, BIAS_KEY = "v_head.summary.weight", "v_head.summary.bias"
TRL_DEFAULT_DROPOUT = 0.1  # trl ValueHead: summary_dropout_prob when the config has none


class ValueHead(torch.nn.Module):
    """TRL's ValueHead (dropout, then `summary`: Linear(hidden, 1)), TP-replicated."""

    def __init__(self, hidden_size: int, dropout: float, sequence_parallel: bool, dtype: torch.dtype,
                 device: torch.device, seed: int) -> None:
        super().__init__()
        self.dropout = torch.nn.Dropout(dropout) if dropout else torch.nn.Identity()
        self.summary = torch.nn.Linear(hidden_size, 1, dtype=torch.float32)
        # nn.Linear's default init, drawn from a generator of its own: every rank holds the same head
        bound = 1.0 / hidden_size ** 0.5
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.summary.weight.uniform_(-bound, bound, generator=generator)
            self.summary.bias.uniform_(-bound, bound, generator=generator)
        self.summary.to(device=device, dtype=dtype)
        self.sequence_parallel = sequence_parallel

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[s(/tp under SP), b, h] final hidden states -> [s, b, 1] values."""
        if self.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            hidden_states = gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False)
        return self.summary(self.dropout(hidden_states).to(self.summary.weight.dtype))

    def as_output_layer(self, hidden_states: torch.Tensor, weight: Optional[torch.Tensor] = None,
                        runtime_gather_output: Optional[bool] = None) -> tuple[torch.Tensor, None]:
        """The output layer's call signature (GPTModel passes the tied weight, unused here)."""
        return self(hidden_states), None


def attach_value_heads(models: Sequence[torch.nn.Module], tied: bool, dropout: float, seed: int,
                       initial: Optional[dict[str, torch.Tensor]] = None) -> list[ValueHead]:
    """Give the last-stage chunk of `models` a value head in place of its output layer (see the module docstring).
    `initial`: LLaMA-Factory's value head tensors ({'v_head.summary.weight', 'v_head.summary.bias'}) to start from.
    Returns the heads attached (one on the last pipeline stage, none elsewhere)."""
    heads = []
    for chunk in models:
        model = unwrap_model(chunk)
        if not model.post_process:
            continue
        config = model.config
        out = model.output_layer
        head = ValueHead(config.hidden_size, dropout, bool(config.sequence_parallel), out.weight.dtype
                         if out.weight is not None else config.params_dtype, next(model.parameters()).device, seed)
        if initial is not None:
            with torch.no_grad():
                head.summary.weight.copy_(initial[WEIGHT_KEY].reshape(1, -1))
                head.summary.bias.copy_(initial[BIAS_KEY].reshape(1))
        model.v_head = head
        out.forward = head.as_output_layer
        if out.weight is not None and not tied:
            out.weight.requires_grad_(False)
        heads.append(head)
    return heads


def is_value_head_key(name: str) -> bool:
    """A parameter name or state-dict key of the value head (no tensor of the Hugging Face base model)."""
    return name.startswith("v_head.") or ".v_head." in name


def save_value_head(models: Sequence[torch.nn.Module], output_dir: str) -> None:
    """Collective. Write `value_head.safetensors` ({'v_head.summary.weight' [1, h], 'v_head.summary.bias' [1]},
    fp32) into `output_dir`, as LLaMA-Factory's `fix_valuehead_checkpoint` does: the last pipeline stage sends the
    head over each pipeline group, global rank 0 writes it."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from llamafactory_mca.platform import device

    hidden = hf_config_of(models[0]).hidden_size
    flat = torch.zeros(hidden + 1, dtype=torch.float32, device=device())
    for chunk in models:
        head = getattr(unwrap_model(chunk), "v_head", None)
        if head is not None:
            flat[:hidden] = head.summary.weight.detach().float().reshape(-1)
            flat[hidden:] = head.summary.bias.detach().float().reshape(-1)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(flat, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    if dist.get_rank() == 0:
        flat = flat.cpu()
        write_value_head({WEIGHT_KEY: flat[:hidden].reshape(1, hidden).contiguous(), BIAS_KEY: flat[hidden:].clone()},
                         output_dir)
    dist.barrier()


def write_value_head(tensors: dict[str, torch.Tensor], output_dir: str) -> str:
    """Write {'v_head.summary.weight' [1, h], 'v_head.summary.bias' [1]} as fp32 `value_head.safetensors` into
    `output_dir` (LLaMA-Factory's layout); returns the file's path."""
    from safetensors.torch import save_file

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, V_HEAD_SAFE_WEIGHTS_NAME)
    save_file({k: tensors[k].detach().float().contiguous() for k in (WEIGHT_KEY, BIAS_KEY)}, path,
              metadata={"format": "pt"})
    return path


def read_checkpoint_value_head(checkpoint_path: str) -> Optional[dict[str, torch.Tensor]]:
    """The value head an rm checkpoint holds ({'v_head.summary.weight', 'v_head.summary.bias'}, as saved), or None
    for a checkpoint without one. Single process: reads the two tensors with torch DCP, nothing else."""
    from torch.distributed.checkpoint import FileSystemReader, load
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(checkpoint_path)
    meta = reader.read_metadata().state_dict_metadata
    found = {k: v for k, v in meta.items() if k in (WEIGHT_KEY, BIAS_KEY) and isinstance(v, TensorStorageMetadata)}
    if len(found) != 2:
        return None
    tensors = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in found.items()}
    load(tensors, storage_reader=reader, no_dist=True)
    return tensors


def summary_dropout(hf_config: Any) -> float:
    """The value head's dropout as TRL reads it from the model config."""
    return float(getattr(hf_config, "summary_dropout_prob", TRL_DEFAULT_DROPOUT) or 0.0)


__all__ = ["ValueHead", "attach_value_heads", "is_value_head_key", "read_checkpoint_value_head", "save_value_head",
           "summary_dropout", "write_value_head", "V_HEAD_SAFE_WEIGHTS_NAME"]
