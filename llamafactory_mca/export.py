"""Megatron checkpoint -> Hugging Face safetensors (merge), and Hugging Face -> Megatron checkpoint (convert).

Merge runs in one process, without GPUs, whatever tp/pp/vpp/ep/dp layout wrote the checkpoint, and streams:

1. the model is built for tp=pp=ep=1 on the `meta` device (no memory), in the checkpoint's dtype;
2. a pass over the bridge's table on the meta tensors gives every HF tensor's name, shape and dtype, so the
   safetensors shards (and their headers) are planned before any weight is read;
3. unit by unit (embedding, each decoder layer, final norm + output layer) the unit is materialised, filled
   with megatron-core's own `dist_checkpointing.load` (it reads only that unit's tensors and re-assembles TP
   shards, swiglu halves and expert-parallel experts), converted with the bridge's table, and each tensor is
   written straight to its planned place in its shard file; then the unit goes back to `meta`.

Peak host memory is about one unit (one decoder layer, or the embedding) plus its HF copy, not the model.
The output is written into a hidden sibling directory and published by one rename.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import torch

from llamafactory_mca.checkpoint import (
    MARKER_FILE,
    SHARDED_STATE_DICT_METADATA,
    CheckpointError,
    checkpoint_info,
    checkpoint_tensor_meta,
    unwrap_model,
    verify_checkpoint,
)

_ST_DTYPE = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)


# --------------------------------------------------------------------------------------------- checks


def check_output_dir(path: str, overwrite: bool = False) -> None:
    """Refuse to write into a non-empty directory (or over a file) unless `overwrite`."""
    if os.path.isfile(path):
        raise CheckpointError(f"output path {path} is an existing file. Fix: choose a directory path that does not exist.")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise CheckpointError(
            f"output path {path} exists and is not empty; writing there would overwrite or mix files. Fix: choose a "
            f"new directory, delete {path}, or pass --overwrite_output_dir."
        )


def _get_bridge(hf_config: Any, where: str):
    from llamafactory_mca.models import get_bridge

    try:
        return get_bridge(hf_config)
    except ValueError as err:
        raise CheckpointError(f"{where}: {err}") from None


def _hf_config_of(path: str):
    from transformers import AutoConfig

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(
            f"{path} has no config.json, so its model family is unknown. Fix: save checkpoints with llamafactory-mca "
            f">= 0.1 (it stores the Hugging Face config), or copy the base model's config.json into {path}."
        )
    return AutoConfig.from_pretrained(path)


# --------------------------------------------------------------------------------------------- safetensors


@dataclass
class _Planned:
    name: str
    shape: tuple
    dtype: torch.dtype
    shard: int
    begin: int
    end: int


class StreamingSafetensorsWriter:
    """Safetensors shards whose headers are written first, then each tensor at its offset, in any order."""

    def __init__(self, out_dir: str, specs: Sequence[tuple[str, tuple, torch.dtype]], max_shard_size: int):
        self.out_dir = out_dir
        shards: list[list[tuple[str, tuple, torch.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in specs:
            nbytes = _numel(shape) * _itemsize(dtype)
            if shards[-1] and size + nbytes > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype, nbytes))
            size += nbytes
        n = len(shards)
        self.files = ["model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self.plan: dict[str, _Planned] = {}
        self.data_start: list[int] = []
        self.total_size = 0
        for i, shard in enumerate(shards):
            header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, shape, dtype, nbytes in shard:
                if name in self.plan:
                    raise CheckpointError(f"the bridge maps two tensors to the same Hugging Face name {name!r}")
                header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                self.plan[name] = _Planned(name, shape, dtype, i, offset, offset + nbytes)
                offset += nbytes
            raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
            raw += b" " * (-len(raw) % 8)
            with open(os.path.join(out_dir, self.files[i]), "wb") as f:
                f.write(struct.pack("<Q", len(raw)))
                f.write(raw)
                f.truncate(8 + len(raw) + offset)
            self.data_start.append(8 + len(raw))
            self.total_size += offset
        self.written: set[str] = set()
        self._handles: dict[int, Any] = {}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        p = self.plan.get(name)
        if p is None:
            raise CheckpointError(f"tensor {name!r} was not planned (the bridge's mapping is not deterministic)")
        if tuple(tensor.shape) != p.shape or tensor.dtype != p.dtype:
            raise CheckpointError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {p.shape} {p.dtype}")
        if name in self.written:
            raise CheckpointError(f"tensor {name!r} written twice")
        f = self._handles.get(p.shard)
        if f is None:
            for h in self._handles.values():
                h.close()
            self._handles = {p.shard: open(os.path.join(self.out_dir, self.files[p.shard]), "r+b")}
            f = self._handles[p.shard]
        f.seek(self.data_start[p.shard] + p.begin)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        f.write(memoryview(data))
        self.written.add(name)

    def abort(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles = {}

    def close(self) -> None:
        for h in self._handles.values():
            h.flush()
            os.fsync(h.fileno())
            h.close()
        self._handles = {}
        missing = set(self.plan) - self.written
        if missing:
            raise CheckpointError(f"{len(missing)} planned tensors were never written, e.g. {sorted(missing)[:3]}")
        if len(self.files) > 1:
            weight_map = {name: self.files[p.shard] for name, p in sorted(self.plan.items())}
            with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": self.total_size}, "weight_map": weight_map}, f, indent=2)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _parse_size(size: Any) -> int:
    from llamafactory_mca.models.bridge import parse_size

    return parse_size(size)


# --------------------------------------------------------------------------------------------- the model


@contextlib.contextmanager
def _single_process_parallel():
    """A one-process gloo group with tp=pp=ep=1 (reused if the caller already has one of world size 1)."""
    import torch.distributed as dist

    from llamafactory_mca import platform
    from llamafactory_mca.args import MegatronArguments

    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() != 1:
            raise CheckpointError("merge runs in a single process; launch it without torchrun.")
        yield
        return
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    for k in saved:
        os.environ.pop(k, None)
    platform.init_parallel(MegatronArguments(), seed=0)
    try:
        yield
    finally:
        platform.destroy_parallel()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _build_meta_model(bridge: Any, hf_config: Any, dtype: torch.dtype, vocab_rows: Optional[int]):
    """GPTModel for tp=pp=ep=1 with every parameter on `meta`; the vocab padded as in the checkpoint."""
    from llamafactory_mca.args import MegatronArguments

    # `vocab_rows`: the checkpoint's padded vocab (older checkpoints padded depending on their TP size)
    models = bridge.build_model(hf_config, MegatronArguments(), dtype, wrap_with_ddp=False, init_weights=False,
                                device="meta", padded_vocab_size=vocab_rows)
    if len(models) != 1:
        raise CheckpointError("internal: expected one model chunk for tp=pp=1")
    return models[0]


def _units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules materialised one at a time: the vision tower (VL models), embedding, each layer, then the rest
    (final norm, output layer)."""
    units: list[torch.nn.Module] = []
    if getattr(model, "vision_model", None) is not None:
        units.append(model.vision_model)
    if getattr(model, "embedding", None) is not None:
        units.append(model.embedding)
    units.extend(model.decoder.layers)
    rest = [
        m for m in (getattr(model.decoder, "final_layernorm", None), getattr(model, "output_layer", None)) if m is not None
    ]
    if rest:
        units.append(torch.nn.ModuleList(rest))
    return units


def _is_meta(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.is_meta


def _materialized_sharded_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    from megatron.core.dist_checkpointing.mapping import (
        ShardedTensor,
        ShardedTensorFactory,
    )

    sd = model.sharded_state_dict(metadata=dict(SHARDED_STATE_DICT_METADATA))
    return {
        k: v
        for k, v in sd.items()
        if isinstance(v, (ShardedTensor, ShardedTensorFactory)) and not _is_meta(v.data)
    }


def _hf_tensors(bridge: Any, model: torch.nn.Module, hf_config: Any, meta: bool = False
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """(hf name, tensor) for the materialised parameters of `model` (tp=1) via the bridge's table; with
    `meta`, for the parameters still on `meta` instead (shapes only: the shard plan)."""
    for param in bridge.iter_local_params([model]):
        if param.tied:
            continue
        full = param.get()
        if _is_meta(full) != meta:
            continue
        yield from bridge.megatron_to_hf(param.name, full, hf_config).items()


def _plan(bridge: Any, model: torch.nn.Module, hf_config: Any, dtype: torch.dtype) -> list[tuple[str, tuple, torch.dtype]]:
    return [
        (name, tuple(t.shape), dtype if t.is_floating_point() else t.dtype)
        for name, t in _hf_tensors(bridge, model, hf_config, meta=True)
    ]


# --------------------------------------------------------------------------------------------- merge


def merge_checkpoint(
    checkpoint_path: str,
    output_path: str,
    dtype: Optional[torch.dtype] = None,
    max_shard_size: Any = "5GB",
    overwrite: bool = False,
    save_tokenizer: bool = True,
    merge_lora: bool = False,
    base_model: Optional[str] = None,
) -> str:
    """Write the Hugging Face model of a llamafactory-mca checkpoint to `output_path`; returns the path.

    `dtype`: the saved dtype (default: the HF config's dtype, else the checkpoint's). Single process, no GPU.
    A LoRA checkpoint (adapter only) gives its PEFT adapter, or with `merge_lora` the base model with the
    adapter merged in (the base model recorded in the checkpoint, or `base_model`): see `merge_lora_checkpoint`.
    """
    from megatron.core import dist_checkpointing

    checkpoint_path = os.path.normpath(checkpoint_path)
    output_path = os.path.normpath(output_path)
    info = checkpoint_info(checkpoint_path)  # raises for anything but a complete checkpoint
    check_output_dir(output_path, overwrite)
    hf_config = _hf_config_of(checkpoint_path)
    bridge = _get_bridge(hf_config, checkpoint_path)
    verify_checkpoint(checkpoint_path)  # before any tensor is read: undamaged, nothing pickled is executed
    tensor_meta = checkpoint_tensor_meta(checkpoint_path)
    if is_lora_checkpoint(info, tensor_meta):
        return merge_lora_checkpoint(checkpoint_path, output_path, merge_lora=merge_lora, base_model=base_model,
                                     dtype=dtype, max_shard_size=max_shard_size, overwrite=overwrite,
                                     save_tokenizer=save_tokenizer)
    if base_model:
        raise CheckpointError(f"--base_model: {checkpoint_path} holds full model weights, not a LoRA adapter. Fix: "
                              "leave --base_model out.")
    emb = tensor_meta.get("embedding.word_embeddings.weight")
    if emb is None:
        raise CheckpointError(f"{checkpoint_path} holds no model weights (no embedding). Fix: pass a model checkpoint.")
    ckpt_dtype = emb[1]
    if dtype is None:
        cfg_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        if isinstance(cfg_dtype, str):
            cfg_dtype = getattr(torch, cfg_dtype, None)
        dtype = cfg_dtype if isinstance(cfg_dtype, torch.dtype) else ckpt_dtype

    tmp = _fresh_tmp(output_path)

    with _single_process_parallel():
        model = _build_meta_model(bridge, hf_config, ckpt_dtype, emb[0][0])
        writer = StreamingSafetensorsWriter(tmp, _plan(bridge, model, hf_config, dtype), _parse_size(max_shard_size))
        try:
            for unit in _units(model):
                unit.to_empty(device="cpu")
                sharded = _materialized_sharded_state_dict(model)
                missing = [sh.key for sh in sharded.values() if sh.key not in tensor_meta]
                if missing:
                    raise CheckpointError(
                        f"{checkpoint_path} lacks {missing[:3]}: it was written for another model or with another "
                        f"llamafactory-mca version. Fix: check that config.json in the checkpoint matches its weights."
                    )
                loaded = dist_checkpointing.load(sharded, checkpoint_path)
                loaded = {k: loaded[k] for k in sharded}  # (the common state of the checkpoint comes back too)
                result = model.load_state_dict(loaded, strict=False)
                if result.unexpected_keys:
                    raise CheckpointError(f"unexpected keys while merging: {result.unexpected_keys[:3]}")
                with torch.no_grad():
                    for name, tensor in _hf_tensors(bridge, model, hf_config):
                        writer.write(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
                del loaded, sharded
                unit.to("meta")
        except BaseException:
            writer.abort()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        writer.close()

    cfg = hf_config
    cfg.dtype = dtype
    if hasattr(cfg, "torch_dtype"):
        with contextlib.suppress(Exception):
            cfg.torch_dtype = dtype
    cfg.save_pretrained(tmp)
    if save_tokenizer:
        _copy_tokenizer(checkpoint_path, tmp)
    _publish(tmp, output_path)
    return output_path


def _fresh_tmp(output_path: str) -> str:
    """The hidden sibling directory an output is written into before `_publish` renames it."""
    parent = os.path.dirname(output_path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(output_path)}.tmp")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def _copy_tokenizer(checkpoint_path: str, tmp: str) -> None:
    for name in _TOKENIZER_FILES:
        src = os.path.join(checkpoint_path, name)
        if os.path.isfile(src) and not (name == "generation_config.json" and os.path.exists(os.path.join(tmp, name))):
            shutil.copy2(src, os.path.join(tmp, name))


def _publish(tmp: str, output_path: str) -> None:
    if os.path.exists(output_path):  # empty, or overwrite was asked for
        shutil.rmtree(output_path)
    os.rename(tmp, output_path)


# --------------------------------------------------------------------------------------------- LoRA checkpoints


def is_lora_checkpoint(info: dict, tensor_meta: Optional[dict] = None) -> bool:
    """True for a checkpoint of a `finetuning_type: lora` run (its tensors are the adapter only)."""
    if info.get("adapter_only") or info.get("finetuning_type") == "lora":
        return True
    if tensor_meta is None:
        return False
    model_keys = [k for k in tensor_meta if not k.startswith("optimizer")]
    return bool(model_keys) and all(".lora_A." in k or ".lora_B." in k for k in model_keys)


def _lora_key_re():
    import re

    return re.compile(r"^(?P<base>.+)\.lora_(?P<which>[AB])\.(?P<short>[A-Za-z0-9_]+)$")


def adapter_from_checkpoint(checkpoint_path: str, bridge: Any = None) -> dict[str, torch.Tensor]:
    """The PEFT-named adapter tensors of a LoRA checkpoint, read from its torch_dist tensors (the checkpoint's
    source of truth; full tensors, whatever TP layout wrote them). Single process."""
    from torch.distributed.checkpoint import FileSystemReader, load

    from llamafactory_mca.models.lora import PEFT_PREFIX

    if bridge is None:
        bridge = _get_bridge(_hf_config_of(checkpoint_path), checkpoint_path)
    meta = checkpoint_tensor_meta(checkpoint_path)
    pattern = _lora_key_re()
    keys = {k: pattern.match(k) for k in meta if not k.startswith("optimizer")}
    if not keys or not all(keys.values()):
        raise CheckpointError(f"{checkpoint_path} is not a LoRA checkpoint (its tensors are not adapter tensors).")
    sd = {k: torch.empty(meta[k][0], dtype=meta[k][1]) for k in keys}
    load(sd, storage_reader=FileSystemReader(checkpoint_path), no_dist=True)
    out: dict[str, torch.Tensor] = {}
    for key, m in keys.items():
        hf_names, _kind = bridge.hf_names_for(m.group("base") + ".weight")
        module = [h.rsplit(".", 1)[0] for h in hf_names if h.rsplit(".", 2)[-2] == m.group("short")]
        if len(module) != 1:
            raise CheckpointError(f"{checkpoint_path}: adapter tensor {key} maps to no Hugging Face module")
        out[f"{PEFT_PREFIX}{module[0]}.lora_{m.group('which')}.weight"] = sd[key]
    return out


def _adapter_config(checkpoint_path: str, info: dict) -> dict:
    from llamafactory_mca.models.lora import ADAPTER_CONFIG

    path = os.path.join(checkpoint_path, ADAPTER_CONFIG)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    lora = info.get("lora")
    if not lora:
        raise CheckpointError(f"{checkpoint_path} has no {ADAPTER_CONFIG} and its marker no LoRA settings. Fix: copy "
                              f"the adapter_config.json of the run (output_dir) into {checkpoint_path}.")
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.CAUSAL_LM, inference_mode=True, r=lora["r"], lora_alpha=lora["alpha"],
                      lora_dropout=lora.get("dropout", 0.0), use_rslora=lora.get("use_rslora", False),
                      target_modules=list(lora["target_modules"]),
                      base_model_name_or_path=info.get("base_model_name_or_path")).to_dict()


def resolve_base_model(checkpoint_path: str, info: dict, adapter_config: dict, base_model: Optional[str]) -> str:
    """The local directory of the Hugging Face base model of a LoRA checkpoint: `base_model`, else the path
    recorded at training time, else (for a hub id) the local Hugging Face cache; never downloads."""
    if base_model:
        if not os.path.isdir(base_model):
            raise CheckpointError(f"--base_model {base_model} is not a directory. Fix: pass the local Hugging Face "
                                  "model the LoRA run was trained on.")
        return base_model
    candidates = [info.get("base_model_path"), info.get("base_model_name_or_path"),
                  adapter_config.get("base_model_name_or_path")]
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "config.json")):
            return c
    name = next((c for c in candidates[1:] if c), None)
    if name:
        with contextlib.suppress(Exception):
            from huggingface_hub import snapshot_download

            return snapshot_download(name, local_files_only=True)
    raise CheckpointError(
        f"{checkpoint_path}: the base model of this LoRA checkpoint ({name or 'not recorded'}) is not found on this "
        "machine. Fix: pass --base_model DIR (the Hugging Face model the run was trained on)."
    )


def merge_lora_checkpoint(
    checkpoint_path: str,
    output_path: str,
    merge_lora: bool = False,
    base_model: Optional[str] = None,
    dtype: Optional[torch.dtype] = None,
    max_shard_size: Any = "5GB",
    overwrite: bool = False,
    save_tokenizer: bool = True,
) -> str:
    """A LoRA checkpoint to Hugging Face: the PEFT adapter (adapter_model.safetensors + adapter_config.json,
    what LLaMA-Factory's LoRA training leaves in output_dir; `PeftModel.from_pretrained` / `adapter_name_or_path`
    load it), or with `merge_lora` the base model with W += scaling * B @ A (PEFT's merge, computed in fp32)
    as a full model. The base is streamed tensor by tensor. Single process, no GPU, no megatron model."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from llamafactory_mca.models.lora import (
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
        PEFT_PREFIX,
    )

    checkpoint_path = os.path.normpath(checkpoint_path)
    output_path = os.path.normpath(output_path)
    info = verify_checkpoint(checkpoint_path)
    check_output_dir(output_path, overwrite)
    hf_config = _hf_config_of(checkpoint_path)
    adapter = adapter_from_checkpoint(checkpoint_path, _get_bridge(hf_config, checkpoint_path))
    config = _adapter_config(checkpoint_path, info)
    tmp = _fresh_tmp(output_path)
    try:
        if not merge_lora:
            if dtype is not None:
                adapter = {k: v.to(dtype) for k, v in adapter.items()}
            save_file({k: v.contiguous() for k, v in sorted(adapter.items())}, os.path.join(tmp, ADAPTER_WEIGHTS),
                      metadata={"format": "pt"})
            with open(os.path.join(tmp, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, sort_keys=True)
        else:
            if config.get("use_dora") or config.get("rank_pattern") or config.get("alpha_pattern"):
                raise CheckpointError(f"{checkpoint_path}: DoRA / rank_pattern / alpha_pattern adapters cannot be "
                                      "merged here. Fix: merge with peft's merge_and_unload.")
            base = resolve_base_model(checkpoint_path, info, config, base_model)
            r, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
            scaling = alpha / (r ** 0.5 if config.get("use_rslora") else r)
            deltas: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
            for key in adapter:
                if key.endswith(".lora_A.weight"):
                    module = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
                    deltas[module + ".weight"] = (adapter[key], adapter[key.replace(".lora_A.", ".lora_B.")])
            reader = _base_reader(base)
            if dtype is None:
                cfg_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
                if isinstance(cfg_dtype, str):
                    cfg_dtype = getattr(torch, cfg_dtype, None)
                dtype = cfg_dtype if isinstance(cfg_dtype, torch.dtype) else None
            specs = []
            for name, (shape, st_dtype) in reader.items():
                out_dtype = dtype if (dtype is not None and st_dtype.is_floating_point) else st_dtype
                specs.append((name, shape, out_dtype))
            missing = sorted(set(deltas) - {n for n, _, _ in specs})
            if missing:
                raise CheckpointError(f"the base model {base} lacks {missing[:3]}, which the adapter modifies. Fix: "
                                      "pass the base model the LoRA run was trained on (--base_model).")
            writer = StreamingSafetensorsWriter(tmp, specs, _parse_size(max_shard_size))
            try:
                with torch.no_grad():
                    for name, _shape, out_dtype in specs:
                        with safe_open(os.path.join(base, reader.file_of(name)), "pt") as f:
                            t = f.get_tensor(name)
                        if name in deltas:
                            a, b = deltas[name]
                            t = (t.float() + (b.float() @ a.float()) * scaling)
                        writer.write(name, t.to(out_dtype))
                        del t
            except BaseException:
                writer.abort()
                raise
            writer.close()
            cfg = hf_config
            if dtype is not None:
                cfg.dtype = dtype
                if hasattr(cfg, "torch_dtype"):
                    with contextlib.suppress(Exception):
                        cfg.torch_dtype = dtype
            cfg.save_pretrained(tmp)
            gen = os.path.join(base, "generation_config.json")
            if os.path.isfile(gen):
                shutil.copy2(gen, os.path.join(tmp, "generation_config.json"))
        if save_tokenizer:
            _copy_tokenizer(checkpoint_path, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, output_path)
    return output_path


class _BaseIndex(dict):
    """{name: (shape, dtype)} of a Hugging Face safetensors model, in file order, with each tensor's file."""

    def __init__(self, path: str):
        super().__init__()
        from safetensors import safe_open

        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise CheckpointError(f"the base model {path} has no safetensors weights. Fix: pass a Hugging Face model "
                                  "directory with model.safetensors (or an index).")
        self._file: dict[str, str] = {}
        for fname in files:
            with safe_open(os.path.join(path, fname), "pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    self[name] = (tuple(sl.get_shape()), _ST_TO_TORCH[sl.get_dtype()])
                    self._file[name] = fname

    def file_of(self, name: str) -> str:
        return self._file[name]


def _base_reader(path: str) -> _BaseIndex:
    return _BaseIndex(path)


_ST_TO_TORCH = {v: k for k, v in _ST_DTYPE.items()}


# --------------------------------------------------------------------------------------------- convert


def convert_hf_to_megatron(
    model_name_or_path: str,
    output_path: str,
    mca_args: Any = None,
    dtype: Optional[torch.dtype] = None,
    overwrite: bool = False,
) -> str:
    """Write the HF model at `model_name_or_path` as a llamafactory-mca checkpoint (model only) at `output_path`.

    The torch_dist format reshards on load, so the checkpoint loads into any layout; `mca_args` (the layout
    asked for) is recorded. Launched with torchrun, the model is built in that layout across the ranks;
    in one process it is built with tp=pp=ep=1.
    """
    import torch.distributed as dist
    from transformers import AutoConfig, AutoTokenizer

    from llamafactory_mca import platform
    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.checkpoint import write_checkpoint

    output_path = os.path.normpath(output_path)
    check_output_dir(output_path, overwrite)
    if not os.path.isfile(os.path.join(model_name_or_path, "config.json")):
        raise CheckpointError(
            f"{model_name_or_path} is not a local Hugging Face model directory (no config.json). Fix: download it "
            "first (e.g. `huggingface-cli download NAME --local-dir DIR`) and pass DIR."
        )
    hf_config = AutoConfig.from_pretrained(model_name_or_path)
    bridge = _get_bridge(hf_config, model_name_or_path)
    requested = mca_args or MegatronArguments()
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    build_args = requested if launched else MegatronArguments()
    if dtype is None:
        cfg_dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
        if isinstance(cfg_dtype, str):
            cfg_dtype = getattr(torch, cfg_dtype, None)
        dtype = cfg_dtype if isinstance(cfg_dtype, torch.dtype) else torch.float32
    tokenizer = None
    with contextlib.suppress(Exception):
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    was_initialized = dist.is_available() and dist.is_initialized()
    platform.init_parallel(build_args, seed=0)
    try:
        models = bridge.build_model(hf_config, build_args, dtype, wrap_with_ddp=False, init_weights=False)
        bridge.load_hf_weights(models, model_name_or_path)
        write_checkpoint(output_path, 0, models, mca_args=requested, hf_config=hf_config, tokenizer=tokenizer,
                         trainer_state={"global_step": 0}, save_rng=False)
    finally:
        if not was_initialized:
            platform.destroy_parallel()
    return output_path


# --------------------------------------------------------------------------------------------- CLI


def merge_command(argv: list[str]) -> int:
    """`llamafactory-mca merge [CKPT] --output_path DIR ...`: every form of LLaMA-Factory's scripts/megatron_merge.py
    and ours (`llamafactory_mca.merge_cli`)."""
    from llamafactory_mca.merge_cli import main

    return main(argv)


def convert_command(argv: list[str]) -> int:
    """`llamafactory-mca convert --model_name_or_path HF_DIR --output_path DIR [--tensor_model_parallel_size N ...]`
    (`llamafactory_mca.merge_cli`)."""
    from llamafactory_mca.merge_cli import main

    return main(argv, convert=True)


def export_from_llamafactory_args(args: dict[str, Any]) -> None:
    """`llamafactory-cli export` with model_name_or_path = a Megatron checkpoint: merge it into export_dir.

    As LLaMA-Factory's export merges adapters, a LoRA checkpoint is exported as its base model (recorded in the
    checkpoint) with the adapter merged in. (A LoRA checkpoint also holds a PEFT adapter: with the base model as
    model_name_or_path and the checkpoint as adapter_name_or_path, LLaMA-Factory's own export merges it.)"""
    path = args.get("model_name_or_path")
    export_dir = args.get("export_dir")
    if not export_dir:
        raise CheckpointError("`export_dir`: required to export a Megatron checkpoint. Fix: set export_dir: DIR.")
    if args.get("adapter_name_or_path"):
        raise CheckpointError(
            "`adapter_name_or_path`: a Megatron checkpoint as model_name_or_path is exported with its own weights "
            "(a LoRA checkpoint with its adapter merged in). Fix: remove adapter_name_or_path, or pass the base model "
            "as model_name_or_path and the LoRA checkpoint as adapter_name_or_path."
        )
    if args.get("export_quantization_bit"):
        raise CheckpointError(
            "`export_quantization_bit`: not supported for Megatron checkpoints. Fix: export first, then quantize "
            "the exported model with llamafactory-cli export."
        )
    dtype = None
    infer = str(args.get("infer_dtype", "auto") or "auto")
    if infer in ("bfloat16", "float16", "float32"):
        dtype = getattr(torch, infer)
    size = args.get("export_size", 5)
    max_shard = f"{size}GB" if isinstance(size, (int, float)) or str(size).isdigit() else str(size)
    merge_checkpoint(path, export_dir, dtype, max_shard, merge_lora=True)
    print(f"exported {path} -> {export_dir}")


__all__ = [
    "MARKER_FILE",
    "StreamingSafetensorsWriter",
    "adapter_from_checkpoint",
    "check_output_dir",
    "convert_command",
    "convert_hf_to_megatron",
    "export_from_llamafactory_args",
    "is_lora_checkpoint",
    "merge_checkpoint",
    "merge_command",
    "merge_lora_checkpoint",
    "unwrap_model",
]


def _main() -> int:  # python -m llamafactory_mca.export merge|convert ...
    argv = sys.argv[1:]
    if not argv or argv[0] not in ("merge", "convert"):
        print("usage: python -m llamafactory_mca.export {merge,convert} ...", file=sys.stderr)
        return 2
    return (merge_command if argv[0] == "merge" else convert_command)(argv[1:])


if __name__ == "__main__":
    raise SystemExit(_main())
