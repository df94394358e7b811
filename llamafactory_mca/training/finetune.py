"""`finetuning_type` on the Megatron model: full, freeze (here) and lora (`llamafactory_mca.models.lora`).

Freeze tuning decides trainability with LLaMA-Factory's own `_setup_freeze_tuning`, run on the Hugging Face
parameter names of the whole model (every pipeline stage's names are gathered first, so layer indices are
global), then maps the answer back onto this rank's megatron parameters through the bridge's table. A fused
megatron tensor (qkv, gate/up, grouped experts) is trainable exactly when its Hugging Face tensors are.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Sequence

import torch

from llamafactory_mca.models.lora import is_adapter_key
from llamafactory_mca.models.model_state import hf_config_of, unwrap_model
from llamafactory_mca.models.param_mapping import natural_key

_EXPERT_INDEX = re.compile(r"\.experts\.\d+\.")


def param_hf_names(bridge: Any, models: Sequence[torch.nn.Module]) -> Iterator[tuple[str, torch.nn.Parameter, tuple]]:
    """(megatron name, parameter, Hugging Face names) for every parameter of this rank's model chunks.

    Tied output weights map to the input embedding's name (one parameter on the Hugging Face side); expert
    indices are dropped from the names, as transformers 5 holds all experts of a layer in one tensor.
    """
    hf_config = hf_config_of(models[0])
    tied = bridge.tied_embeddings(hf_config)
    for chunk in models:
        model = unwrap_model(chunk)
        for name, param in model.named_parameters():
            if is_adapter_key(name):
                continue
            names: list[str] = []
            for key in bridge.canonical_names(model, name):
                if key == "output_layer.weight" and tied:
                    key = "embedding.word_embeddings.weight"
                hf_names, _kind = bridge.hf_names_for(key)
                names.extend(_EXPERT_INDEX.sub(".experts.", h) for h in hf_names)
            yield name, param, tuple(dict.fromkeys(names))


class _NamedOnly:
    """What `_setup_freeze_tuning` needs of a model: `config` and `named_parameters()` (names only)."""

    class _Param:
        def __init__(self) -> None:
            self.requires_grad = True

        def requires_grad_(self, flag: bool = True) -> "_NamedOnly._Param":
            self.requires_grad = flag
            return self

    def __init__(self, config: Any, names: Sequence[str]) -> None:
        self.config = config
        self._params = {n: self._Param() for n in names}

    def named_parameters(self):
        return iter(self._params.items())

    def trainable(self) -> set[str]:
        return {n for n, p in self._params.items() if p.requires_grad}


def freeze_trainable_hf_names(hf_config: Any, names: Sequence[str], finetuning_args: Any) -> set[str]:
    """The Hugging Face parameter names that LLaMA-Factory's freeze tuning leaves trainable."""
    from llamafactory.model.adapter import _setup_freeze_tuning

    model = _NamedOnly(hf_config, sorted(set(names), key=natural_key))
    _setup_freeze_tuning(model, finetuning_args, is_trainable=True, cast_trainable_params_to_fp32=False)
    return model.trainable()


def _all_gather_names(names: list[str]) -> list[str]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return names
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, names)
    return sorted({n for part in gathered for n in part}, key=natural_key)


def apply_freeze(bridge: Any, models: Sequence[torch.nn.Module], finetuning_args: Any) -> list[str]:
    """Set requires_grad on this rank's megatron parameters as LLaMA-Factory's freeze tuning does (collective).

    Returns the megatron names (local to this rank) of the trainable parameters.
    """
    hf_config = hf_config_of(models[0])
    entries = list(param_hf_names(bridge, models))
    all_names = _all_gather_names(sorted({n for _, _, hf in entries for n in hf}))
    trainable = freeze_trainable_hf_names(hf_config, all_names, finetuning_args)
    out = []
    for name, param, hf in entries:
        flags = {h in trainable for h in hf}
        if len(flags) != 1:
            raise ValueError(
                f"freeze tuning: megatron parameter {name} fuses Hugging Face tensors {list(hf)} of which only some "
                "are trainable. Fix: choose freeze_trainable_modules / freeze_extra_modules that cover all of them."
            )
        param.requires_grad_(flags.pop())
        if param.requires_grad:
            out.append(name)
    return out


def count_parameters(models: Sequence[torch.nn.Module]) -> tuple[int, int]:
    """(trainable, all) parameter counts of the whole model (collective; TP/PP/EP shards summed once)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    trainable = total = 0
    for chunk in models:
        for param in unwrap_model(chunk).parameters():
            tp_split = getattr(param, "tensor_model_parallel", False)
            if not tp_split and ps.get_tensor_model_parallel_rank() != 0:
                continue
            n = param.numel()
            total += n
            if param.requires_grad:
                trainable += n
    from llamafactory_mca.platform import device

    t = torch.tensor([trainable, total], dtype=torch.float64, device=device())  # NCCL reduces device tensors only
    if dist.is_available() and dist.is_initialized():
        # one copy per model replica: sum over tp and pp (and ep) ranks of data-parallel rank 0
        if ps.get_data_parallel_rank(with_context_parallel=True) != 0:
            t.zero_()
        dist.all_reduce(t)
    return int(t[0]), int(t[1])
