"""LoRA checkpoints (adapter only) -> a PEFT adapter directory, or the base model with the adapter merged in."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any, Optional

import torch

from llamafactory_mca.checkpoint import CheckpointError, checkpoint_tensor_meta, verify_checkpoint
from llamafactory_mca.export.files import (
    bridge_for_config,
    check_output_dir,
    config_dtype,
    copy_tokenizer,
    fresh_tmp,
    hf_config_of_dir,
    publish,
)
from llamafactory_mca.models.lora import ADAPTER_KEY_RE, PEFT_PREFIX, is_adapter_key, lora_scaling, peft_lora_config
from llamafactory_mca.models.lora_experts import (
    EXPERT_PARAMS,
    expert_delta,
    expert_params_of,
    factors_to_peft,
    peft_expert_keys,
    peft_to_factors,
    stack_factors,
)
from llamafactory_mca.models.safetensors_io import SafetensorsReader, StreamingSafetensorsWriter, parse_size


def is_lora_checkpoint(info: dict, tensor_meta: Optional[dict] = None) -> bool:
    """True for a checkpoint of a `finetuning_type: lora` run (its tensors are the adapter only)."""
    if info.get("adapter_only") or info.get("finetuning_type") == "lora":
        return True
    if tensor_meta is None:
        return False
    model_keys = [k for k in tensor_meta if not k.startswith("optimizer")]
    return bool(model_keys) and all(is_adapter_key(k) for k in model_keys)


def adapter_from_checkpoint(checkpoint_path: str, bridge: Any = None) -> dict[str, torch.Tensor]:
    """The PEFT-named adapter tensors of a LoRA checkpoint, read from its torch_dist tensors (the checkpoint's
    source of truth; full tensors, whatever TP layout wrote them). Single process."""
    from torch.distributed.checkpoint import FileSystemReader, load

    if bridge is None:
        bridge = bridge_for_config(hf_config_of_dir(checkpoint_path), checkpoint_path)
    meta = checkpoint_tensor_meta(checkpoint_path)
    pattern = ADAPTER_KEY_RE
    keys = {k: pattern.match(k) for k in meta if not k.startswith("optimizer")}
    if not keys or not all(keys.values()):
        raise CheckpointError(f"{checkpoint_path} is not a LoRA checkpoint (its tensors are not adapter tensors).")
    sd = {k: torch.empty(meta[k][0], dtype=meta[k][1]) for k in keys}
    load(sd, storage_reader=FileSystemReader(checkpoint_path), no_dist=True)
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict] = {}  # decoder.layers.L.mlp.experts -> {"A": {name: t}, "B": {name: t}}
    for key, m in keys.items():
        if m.group("base").endswith(".mlp.experts.adapter"):
            layer = experts.setdefault(m.group("base")[:-len(".adapter")], {"A": {}, "B": {}})
            layer[m.group("which")][m.group("short")] = sd[key]
            continue
        hf_names, _kind = bridge.hf_names_for(m.group("base") + ".weight")
        module = [h.rsplit(".", 1)[0] for h in hf_names if h.rsplit(".", 2)[-2] == m.group("short")]
        if len(module) != 1:
            raise CheckpointError(f"{checkpoint_path}: adapter tensor {key} maps to no Hugging Face module")
        which = m.group("which")
        suffix = "lora_magnitude_vector" if which == "M" else f"lora_{which}.weight"
        out[f"{PEFT_PREFIX}{module[0]}.{suffix}"] = sd[key]
    for base, factors in experts.items():
        hf_path = bridge.hf_names_for(f"{base}.0.linear_fc1.weight")[0][0].rsplit(".", 3)[0]
        adapted = [p for p in EXPERT_PARAMS if p in factors["A"]]
        for param in adapted:
            ka, kb = peft_expert_keys(hf_path, param, adapted, PEFT_PREFIX)
            out[ka], out[kb] = factors_to_peft(*stack_factors(factors["A"], factors["B"], param))
    return out


def adapter_config(checkpoint_path: str, info: dict) -> dict:
    """The PEFT adapter_config.json of a LoRA checkpoint (rebuilt from its marker where the file is absent)."""
    from llamafactory_mca.models.lora import ADAPTER_CONFIG

    path = os.path.join(checkpoint_path, ADAPTER_CONFIG)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    lora = info.get("lora")
    if not lora:
        raise CheckpointError(f"{checkpoint_path} has no {ADAPTER_CONFIG} and its marker no LoRA settings. Fix: copy "
                              f"the adapter_config.json of the run (output_dir) into {checkpoint_path}.")
    config = peft_lora_config(lora["r"], lora["alpha"], lora.get("dropout", 0.0), lora.get("use_rslora", False),
                              lora["target_modules"], info.get("base_model_name_or_path"),
                              lora.get("target_parameters") or (), bool(lora.get("use_dora"))).to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}  # JSON, as PEFT writes it


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
    from safetensors.torch import save_file

    from llamafactory_mca.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    checkpoint_path = os.path.normpath(checkpoint_path)
    output_path = os.path.normpath(output_path)
    info = verify_checkpoint(checkpoint_path)
    check_output_dir(output_path, overwrite)
    hf_config = hf_config_of_dir(checkpoint_path)
    bridge = bridge_for_config(hf_config, checkpoint_path)
    adapter = adapter_from_checkpoint(checkpoint_path, bridge)
    config = adapter_config(checkpoint_path, info)
    tmp = fresh_tmp(output_path)
    try:
        if not merge_lora:
            if dtype is not None:
                adapter = {k: v.to(dtype) for k, v in adapter.items()}
            save_file({k: v.contiguous() for k, v in sorted(adapter.items())}, os.path.join(tmp, ADAPTER_WEIGHTS),
                      metadata={"format": "pt"})
            with open(os.path.join(tmp, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
                json.dump(config, f, indent=2, sort_keys=True)
        else:
            if config.get("rank_pattern") or config.get("alpha_pattern"):
                raise CheckpointError(f"{checkpoint_path}: rank_pattern / alpha_pattern adapters cannot be "
                                      "merged here. Fix: merge with peft's merge_and_unload.")
            base = resolve_base_model(checkpoint_path, info, config, base_model)
            r, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
            scaling = lora_scaling(r, alpha, bool(config.get("use_rslora")))
            updates = merge_updates(adapter, config, scaling, bridge, hf_config)
            reader = base_model_reader(base)
            if dtype is None:
                dtype = config_dtype(hf_config, None)
            specs = []
            for name, (shape, st_dtype) in reader.tensor_index().items():
                out_dtype = dtype if (dtype is not None and st_dtype.is_floating_point) else st_dtype
                specs.append((name, shape, out_dtype))
            missing = sorted(set(updates) - {n for n, _, _ in specs})
            if missing:
                raise CheckpointError(f"the base model {base} lacks {missing[:3]}, which the adapter modifies. Fix: "
                                      "pass the base model the LoRA run was trained on (--base_model).")
            writer = StreamingSafetensorsWriter(tmp, specs, parse_size(max_shard_size))
            try:
                with torch.no_grad():
                    for name, _shape, out_dtype in specs:
                        t = reader.read(name)
                        if name in updates:
                            t = updates[name](t.float())
                        writer.write(name, t.to(out_dtype))
                        del t
            except BaseException:
                writer.abort()
                raise
            finally:
                reader.close()
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
            copy_tokenizer(checkpoint_path, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, output_path)
    return output_path


def merge_updates(adapter: dict[str, torch.Tensor], config: dict, scaling: float, bridge: Any,
                  hf_config: Any) -> dict[str, Any]:
    """{Hugging Face tensor name of the base model: W (fp32) -> W with the adapter merged} of a PEFT adapter (PEFT's
    merge): W + scaling * B A per adapted linear (DoRA: scaled per row by m / |W + scaling * B A|), and for
    expert `target_parameters` per expert's gate / up / down tensor as the base model stores them (the bridge's
    names: per-expert tensors in the checkpoint, fused in transformers' memory)."""
    adapted = expert_params_of(config.get("target_parameters") or [])
    expert_keys = set()
    updates: dict[str, Any] = {}
    num_experts = bridge.num_experts(bridge.text_config(hf_config)) if adapted else 0
    for key in adapter:
        if not key.endswith(".lora_A.weight") or ".experts." in key:
            continue
        module = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
        a, b = adapter[key], adapter[key.replace(".lora_A.", ".lora_B.")]
        magnitude = adapter.get(f"{PEFT_PREFIX}{module}.lora_magnitude_vector")
        if config.get("use_dora") and magnitude is None:
            raise CheckpointError(f"the DoRA adapter lacks {module}.lora_magnitude_vector. Fix: export the adapter "
                                  "again from its checkpoint.")
        updates[module + ".weight"] = lambda w, a=a, b=b, m=magnitude: dora_merge(
            w, (b.float() @ a.float()) * scaling, m)
    for layer in range(bridge.text_config(hf_config).num_hidden_layers if adapted else 0):
        fc1 = bridge.hf_names_for(f"decoder.layers.{layer}.mlp.experts.0.linear_fc1.weight")[0]
        hf_path = fc1[0].rsplit(".", 3)[0]
        for param in adapted:
            ka, kb = peft_expert_keys(hf_path, param, adapted, PEFT_PREFIX)
            if ka not in adapter or kb not in adapter:
                raise CheckpointError(f"the adapter lacks {ka} / {kb} (its target_parameters name {param}).")
            expert_keys.update((ka, kb))
            factors = peft_to_factors(adapter[ka], adapter[kb], num_experts)
            fc = "linear_fc1" if param == "gate_up_proj" else "linear_fc2"
            for e in range(num_experts):
                names = bridge.hf_names_for(f"decoder.layers.{layer}.mlp.experts.{e}.{fc}.weight")[0]
                rows = factors[1].shape[1] // len(names)  # gate_up_proj: gate rows, then up rows
                for i, name in enumerate(names):
                    updates[name] = lambda w, f=factors, e=e, i=i, rows=rows: w + expert_delta(
                        f[0][e:e + 1], f[1][e:e + 1, i * rows:(i + 1) * rows], scaling)[0]
    unused = sorted(k for k in adapter if ".experts." in k and k not in expert_keys)
    if unused:
        raise CheckpointError(f"adapter tensors {unused[:3]} belong to no expert parameter of its config's "
                              "target_parameters. Fix: export the adapter with its adapter_config.json.")
    return updates


def dora_merge(weight: torch.Tensor, delta: torch.Tensor, magnitude: Optional[torch.Tensor]) -> torch.Tensor:
    """W + delta, or with a DoRA magnitude m PEFT's merge (m / |W + delta|) (W + delta), norms per output row."""
    merged = weight + delta
    if magnitude is None:
        return merged
    return merged * (magnitude.float() / torch.linalg.norm(merged, dim=1)).unsqueeze(1)


def base_model_reader(path: str) -> SafetensorsReader:
    """The safetensors reader of a LoRA checkpoint's base model; CheckpointError with a fix without weights."""
    try:
        return SafetensorsReader(path)
    except FileNotFoundError:
        raise CheckpointError(f"the base model {path} has no safetensors weights. Fix: pass a Hugging Face model "
                              "directory with model.safetensors (or an index).") from None
