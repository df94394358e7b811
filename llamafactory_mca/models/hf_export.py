"""Distributed model chunks -> a Hugging Face model directory: the collectives (TP gather, send to rank 0) and
the file writing (the one safetensors writer, `safetensors_io.StreamingSafetensorsWriter`)."""

from __future__ import annotations

import copy
import os
from typing import Any, Iterator, Optional, Sequence, Union

import torch

from llamafactory_mca.models.model_state import hf_config_of
from llamafactory_mca.models.param_mapping import mapping_for, natural_key
from llamafactory_mca.models.safetensors_io import StreamingSafetensorsWriter, parse_size


def gather_export_plan(bridge: Any, models: Sequence[torch.nn.Module]) -> tuple[dict, list]:
    """Collective. ({canonical key: BridgeParam} of this rank, [(key, source rank, full shape, dtype name, kind,
    hf names, tp size)] of every canonical tensor of the model, in natural name order)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    entries = {e.key: e for e in bridge.iter_local_params(models)}
    dense_writer = ps.get_data_parallel_rank(with_context_parallel=True) == 0
    expert_writer = ps.get_expert_data_parallel_rank() == 0
    rank = dist.get_rank()
    meta = []
    for key, e in entries.items():
        if key.endswith("#tied"):
            continue
        if not (expert_writer if e.expert else dense_writer):
            continue
        tp_rank, tp_size, _ = bridge.tp_of(e.expert)
        if tp_rank == 0:
            shape = list(e.get().shape)
            gather_dim = mapping_for(e.kind).gather_dim
            if gather_dim is not None:
                shape[gather_dim] *= tp_size
            meta.append((key, rank, shape, str(e.dtype).replace("torch.", ""), e.kind, e.hf, tp_size))
    world = dist.get_world_size()
    gathered: list = [None] * world
    dist.all_gather_object(gathered, meta)
    return entries, sorted((m for part in gathered for m in part), key=lambda m: natural_key(m[0]))


def export_hf_state_dict(bridge: Any, models: Sequence[torch.nn.Module],
                         plan: Optional[tuple[dict, list]] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Full HF-named tensors, one by one, on global rank 0 (collective: every rank must exhaust it).
    `plan`: `gather_export_plan`'s result, if the caller has it already."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    hf_config = hf_config_of(models[0])
    entries, all_meta = plan if plan is not None else gather_export_plan(bridge, models)
    dense_writer = ps.get_data_parallel_rank(with_context_parallel=True) == 0
    expert_writer = ps.get_expert_data_parallel_rank() == 0
    rank = dist.get_rank()
    for key, src, shape, dtype, kind, hf_names, tp_size in all_meta:
        e = entries.get(key)
        full = None
        mine = e is not None and (expert_writer if e.expert else dense_writer)
        gather_dim = mapping_for(kind).gather_dim
        if mine:
            local = e.get().contiguous()
            _, tsize, group = bridge.tp_of(e.expert)
            if gather_dim is not None and tsize > 1:
                parts = [torch.empty_like(local) for _ in range(tsize)]
                dist.all_gather(parts, local, group=group)
                full = torch.cat(parts, dim=gather_dim) if rank == src else None
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
            for name, tensor in bridge.to_hf(kind, tuple(hf_names), full, hf_config, tp_size):
                yield name, tensor.detach().to("cpu").contiguous()
        full = None


def _hf_specs(bridge: Any, hf_config: Any, all_meta: list,
              dtype: Optional[torch.dtype]) -> list[tuple[str, tuple, torch.dtype]]:
    """(name, shape, saved dtype) of every Hugging Face tensor of the export, in the order they are streamed."""
    specs = []
    for _key, _src, shape, st_dtype, kind, hf_names, tp_size in all_meta:
        full = torch.empty(shape, dtype=getattr(torch, st_dtype), device="meta")
        for name, tensor in bridge.to_hf(kind, tuple(hf_names), full, hf_config, tp_size):
            out_dtype = dtype if (dtype is not None and tensor.is_floating_point()) else tensor.dtype
            specs.append((name, tuple(tensor.shape), out_dtype))
    return specs


def save_hf_pretrained(bridge: Any, models: Sequence[torch.nn.Module], output_dir: str, tokenizer: Any = None,
                       dtype: Optional[torch.dtype] = None, max_shard_size: Union[int, str] = "5GB") -> None:
    """Collective. Rank 0 writes safetensors shards (+ index), config.json and the tokenizer."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    hf_config = hf_config_of(models[0])
    plan = gather_export_plan(bridge, models)
    writer = None
    if rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        index = os.path.join(output_dir, "model.safetensors.index.json")
        if os.path.exists(index):  # a stale index of an earlier export (the writer writes one for several shards)
            os.remove(index)
        writer = StreamingSafetensorsWriter(output_dir, _hf_specs(bridge, hf_config, plan[1], dtype),
                                            parse_size(max_shard_size), save_file_layout=True)
    try:
        for name, tensor in export_hf_state_dict(bridge, models, plan):
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            writer.write(name, tensor)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if rank == 0:
        writer.close()
        config = hf_config
        if dtype is not None:
            config = copy.deepcopy(hf_config)
            config.torch_dtype = dtype
        config.save_pretrained(output_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
    if dist.is_initialized():
        dist.barrier()
