"""Checkpoints written by LLaMA-Factory's own USE_MCA mode (ROLL's mcore_adapter): find, read, merge to HF.

Such a directory (a `checkpoint-N` of that mode, its final `output_dir`, or the output of its
`scripts/megatron_merge.py` HF -> Megatron direction) holds, as mcore_adapter writes it
(ROLL `mcore_adapter/src/mcore_adapter/checkpointing.py`, `save_config_and_state_dict`; `constants.py`)::

    mca_config.json                       McaModelConfig: the TransformerConfig fields, the layout
                                          (tensor/pipeline/expert/virtual sizes), `hf_model_type`,
                                          `hf_config_json` (the Hugging Face config as a JSON string)
    latest_checkpointed_iteration.txt     the tracker: "1" (always iteration 1) or "release"
    iter_0000001/mp_rank_TT[_PPP][_EEE]/model_optim_rng.pt
                                          `ckpt_format: legacy` (the default): one torch.save per
                                          (tp, pp, ep) rank, {"model": state_dict} or {"model0": ...,
                                          "model1": ...} per virtual pipeline chunk; local layer and
                                          expert numbers; `_PPP` only with PP > 1, `_EEE` only with EP > 1
    iter_0000001/dist_model/              `ckpt_format: torch_dist`: megatron-core dist_checkpointing of
                                          `{"model": model.sharded_state_dict()}` (global keys)
    iter_0000001/.../optimizer.pt, dist_optimizer/, scheduler.pt, rng_state_*.pth, trainer_state.json,
    tokenizer files                       (training checkpoints only)

What we do with one: `merge_upstream_checkpoint` writes its Hugging Face model (bit-exact weights, any
layout, one process, no GPU, memory about one parameter); `llamafactory-mca merge` / `convert` and
`scripts/megatron_merge.py` route such paths here. Training from one (model_name_or_path) or resuming one
(resume_from_checkpoint, LLaMA-Factory's automatic resume from output_dir) is refused before anything is
built, naming the way out (`check_training_paths`): merge it, then train from the Hugging Face directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Iterator, Optional

import torch

from llamafactory_mca.checkpoint import CheckpointError

MCA_CONFIG_FILE = "mca_config.json"  # mcore_adapter/constants.py: MCA_CONFIG_NAME
TRACKER_FILE = "latest_checkpointed_iteration.txt"  # constants.py: TRACKER_FILENAME
DIST_MODEL_DIR = "dist_model"  # constants.py: DIST_MODEL_DIR
LEGACY_FILE = "model_optim_rng.pt"  # checkpointing.py: get_checkpoint_name
ADAPTER_CONFIG = "adapter_config.json"

# Transformer Engine fuses the layer norm into the next linear; the canonical (local-module) names are ours.
# (mcore_adapter converter/dist_converter.py: default_dist_config.te_to_local_key_map)
_TE_TO_LOCAL = {
    ".self_attention.linear_qkv.layer_norm_weight": ".input_layernorm.weight",
    ".mlp.linear_fc1.layer_norm_weight": ".pre_mlp_layernorm.weight",
}
# mca_config.json field -> Hugging Face config key (the structural part of the families' templates,
# mcore_adapter converter/template.py `config_hf_to_mca`, reversed as `convert_mca_to_hf_config` does)
_MCA_TO_HF = {
    "padded_vocab_size": "vocab_size",
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_query_groups": "num_key_value_heads",
    "ffn_hidden_size": "intermediate_size",
    "kv_channels": "head_dim",
    "tie_embeddings_and_output_weights": "tie_word_embeddings",
    "num_moe_experts": "num_experts",
    "moe_ffn_hidden_size": "moe_intermediate_size",
}


class UpstreamCheckpointError(CheckpointError):
    """An upstream (mcore_adapter) checkpoint that cannot be used where it was given; the message names the fix."""


# --------------------------------------------------------------------------------------------- finding


def is_upstream_checkpoint(path: Any) -> bool:
    """True for a directory written by LLaMA-Factory's USE_MCA mode (mcore_adapter): it has `mca_config.json`."""
    return isinstance(path, str) and bool(path) and os.path.isfile(os.path.join(path, MCA_CONFIG_FILE))


def has_hf_weights(path: str) -> bool:
    """True when `path` also holds a Hugging Face model (config.json + safetensors), e.g. an upstream final
    output_dir saved with `save_hf_model: true`."""
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, n)) for n in ("model.safetensors", "model.safetensors.index.json"))


def read_mca_config(path: str) -> dict[str, Any]:
    """The content of `mca_config.json`."""
    with open(os.path.join(path, MCA_CONFIG_FILE), encoding="utf-8") as f:
        return json.load(f)


def iteration_dir(path: str) -> str:
    """`path/iter_XXXXXXX` (or `path/release`) named by the tracker file (checkpointing.py: read_metadata,
    get_checkpoint_dir); without a tracker, the only `iter_*` directory."""
    tracker = os.path.join(path, TRACKER_FILE)
    if os.path.isfile(tracker):
        with open(tracker, encoding="utf-8") as f:
            text = f.read().strip()
        name = "release" if text == "release" else f"iter_{int(text):07d}" if text.isdigit() else None
        if name is None:
            raise UpstreamCheckpointError(f"{tracker}: cannot read iteration {text!r}. Fix: write the iteration "
                                          "number of the iter_* directory into it (e.g. 1).")
    else:
        found = sorted(n for n in os.listdir(path) if re.fullmatch(r"iter_\d{7}|release", n))
        if len(found) != 1:
            raise UpstreamCheckpointError(
                f"{path}: no {TRACKER_FILE} and {len(found)} iter_* directories. Fix: write the iteration to use "
                f"into {tracker}.")
        name = found[0]
    full = os.path.join(path, name)
    if not os.path.isdir(full):
        raise UpstreamCheckpointError(f"{path}: {name} (named by {TRACKER_FILE}) is missing: the checkpoint is "
                                      "incomplete. Fix: use another checkpoint.")
    return full


def checkpoint_format(path: str) -> str:
    """`torch_dist` or `legacy` (mcore_adapter checkpointing.py: find_dist_ckpt, find_checkpoint_rank_0)."""
    it = iteration_dir(path)
    if os.path.isfile(os.path.join(it, DIST_MODEL_DIR, "metadata.json")):
        return "torch_dist"
    if any(os.path.isfile(os.path.join(it, d, LEGACY_FILE)) for d in os.listdir(it)):
        return "legacy"
    raise UpstreamCheckpointError(f"{it} holds neither {DIST_MODEL_DIR}/ nor mp_rank_*/{LEGACY_FILE}: the checkpoint "
                                  "is incomplete. Fix: use another checkpoint.")


def _refuse_lora(path: str) -> None:
    adapters = [n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n, ADAPTER_CONFIG))]
    if adapters:
        raise UpstreamCheckpointError(
            f"{path} is a LoRA checkpoint of LLaMA-Factory's USE_MCA mode (adapter directories {adapters}); "
            "llamafactory-mca reads full-model checkpoints of that mode only. Fix: export the adapter with that "
            "mode's own scripts/megatron_merge.py, or train LoRA again with llamafactory-mca.")


def upstream_hf_config(path: str):
    """The Hugging Face config of an upstream checkpoint: `hf_config_json` of mca_config.json with the
    structural fields taken from mca_config.json (as mcore_adapter's `convert_mca_to_hf_config`)."""
    from transformers import AutoConfig

    mca = read_mca_config(path)
    raw = mca.get("hf_config_json")
    if raw:
        cfg = json.loads(raw) if isinstance(raw, str) else dict(raw)
    elif os.path.isfile(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            cfg = json.load(f)
    else:
        raise UpstreamCheckpointError(f"{path}/{MCA_CONFIG_FILE} has no hf_config_json and there is no config.json. "
                                      "Fix: copy the base model's config.json into the checkpoint directory.")
    model_type = mca.get("hf_model_type") or cfg.get("model_type")
    if not model_type:
        raise UpstreamCheckpointError(f"{path}: the model family is unknown (no hf_model_type). Fix: copy the base "
                                      "model's config.json into the checkpoint directory.")
    for mca_key, hf_key in _MCA_TO_HF.items():
        if mca.get(mca_key) is not None and (hf_key in cfg or hf_key == "vocab_size"):
            cfg[hf_key] = mca[mca_key]
    cfg["model_type"] = model_type
    cfg.pop("transformers_version", None)
    return AutoConfig.for_model(**cfg)


# --------------------------------------------------------------------------------------------- names


def _num_layers_per_chunk(mca: dict[str, Any]) -> int:
    """dist_converter.py: DistConverter._get_num_layers_per_virtual_rank (even split, embedding/loss counted)."""
    pp = mca.get("pipeline_model_parallel_size") or 1
    vpp = mca.get("virtual_pipeline_model_parallel_size") or 1
    layers = int(mca["num_layers"]) + bool(mca.get("account_for_embedding_in_pipeline_split")) + bool(
        mca.get("account_for_loss_in_pipeline_split"))
    if layers % (pp * vpp):
        raise UpstreamCheckpointError(f"mca_config.json: {layers} layers do not split evenly over pp={pp} x vpp={vpp}")
    return layers // (pp * vpp)


def global_layer_index(mca: dict[str, Any], local: int, pp_rank: int, vp_stage: int) -> int:
    """The global decoder layer of local layer `local` of pipeline rank `pp_rank`, virtual chunk `vp_stage`
    (dist_converter.py: DistConverter.get_global_layer_index)."""
    if mca.get("pipeline_model_parallel_layout"):
        raise UpstreamCheckpointError(
            "mca_config.json: pipeline_model_parallel_layout is set; its legacy checkpoints are not read here. Fix: "
            "save the checkpoint with ckpt_format: torch_dist, or merge it with that mode's scripts/megatron_merge.py.")
    if mca.get("num_layers_in_first_pipeline_stage") or mca.get("num_layers_in_last_pipeline_stage"):
        raise UpstreamCheckpointError("mca_config.json: uneven pipeline stages in a legacy checkpoint are not read "
                                      "here. Fix: save with ckpt_format: torch_dist.")
    pp = mca.get("pipeline_model_parallel_size") or 1
    chunk = pp_rank + vp_stage * pp
    index = local + chunk * _num_layers_per_chunk(mca)
    if mca.get("account_for_embedding_in_pipeline_split") and chunk > 0:
        index -= 1
    return index


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_TE_GROUPED = re.compile(r"^mlp\.experts\.linear_fc([12])\.weight(\d+)$")
_SEQUENTIAL = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12]\.weight)$")
_LEGACY_GROUPED = re.compile(r"^mlp\.experts\.weight([12])$")


def canonical_tensors(name: str, tensor: torch.Tensor, mca: dict[str, Any], pp_rank: int, vp_stage: int,
                      ep_rank: int) -> list[tuple[str, torch.Tensor]]:
    """(canonical name, this TP rank's shard) pairs of one entry of a legacy rank file: global layer and expert
    indices, local-module names (models/bridge.py docstring), grouped experts split per expert."""
    m = _LAYER.match(name)
    if not m:
        return [(name, tensor)]
    layer = global_layer_index(mca, int(m.group(1)), pp_rank, vp_stage)
    rest = "." + m.group(2)
    rest = _TE_TO_LOCAL.get(rest, rest)[1:]
    prefix = f"decoder.layers.{layer}."
    n_local = (mca.get("num_moe_experts") or 0) // (mca.get("expert_model_parallel_size") or 1)
    te = _TE_GROUPED.match(rest)
    if te:  # TEGroupedMLP: one [out, in] weight per local expert (dist_converter.py: _revert_te_grouped_*)
        return [(f"{prefix}mlp.experts.{ep_rank * n_local + int(te.group(2))}.linear_fc{te.group(1)}.weight", tensor)]
    seq = _SEQUENTIAL.match(rest)
    if seq:  # SequentialMLP
        return [(f"{prefix}mlp.experts.{ep_rank * n_local + int(seq.group(1))}.{seq.group(2)}", tensor)]
    grouped = _LEGACY_GROUPED.match(rest)
    if grouped:  # GroupedMLP weight1 [h, n*out] / weight2 [n*in, h] (dist_converter.py: _revert_grouped_*)
        hidden = int(mca["hidden_size"])
        fc = grouped.group(1)
        view = tensor.view(n_local, hidden, -1) if fc == "1" else tensor.view(n_local, -1, hidden)
        return [(f"{prefix}mlp.experts.{ep_rank * n_local + j}.linear_fc{fc}.weight", view[j].t())
                for j in range(n_local)]
    return [(prefix + rest, tensor)]


def _rank_dir(it: str, tp: int, pp: int, ep: int, mca: dict[str, Any]) -> str:
    """checkpointing.py: get_checkpoint_dir."""
    name = f"mp_rank_{tp:02d}"
    if (mca.get("pipeline_model_parallel_size") or 1) > 1:
        name += f"_{pp:03d}"
    if (mca.get("expert_model_parallel_size") or 1) > 1:
        name += f"_{ep:03d}"
    return os.path.join(it, name, LEGACY_FILE)


def _load_rank_file(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise UpstreamCheckpointError(f"{path} is missing: the checkpoint is incomplete or its mca_config.json "
                                      "names another layout. Fix: use a complete checkpoint.")
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


# --------------------------------------------------------------------------------------------- tensors


def iter_upstream_tensors(path: str, bridge: Any) -> Iterator[tuple[str, torch.Tensor, int]]:
    """(canonical megatron name, TP shards concatenated in rank order, TP size) of every model tensor of an
    upstream checkpoint, ready for `bridge.megatron_to_hf`. Replicated tensors must agree on every TP rank."""
    mca = read_mca_config(path)
    _refuse_lora(path)
    if checkpoint_format(path) == "torch_dist":
        yield from _iter_dist_tensors(path, bridge, mca)
        return
    it = iteration_dir(path)
    tp = mca.get("tensor_model_parallel_size") or 1
    pp = mca.get("pipeline_model_parallel_size") or 1
    ep = mca.get("expert_model_parallel_size") or 1
    vpp = mca.get("virtual_pipeline_model_parallel_size") or 1
    etp = mca.get("expert_tensor_parallel_size") or tp
    if etp != tp:  # training_args.py: such runs always save torch_dist
        raise UpstreamCheckpointError(f"{path}: a legacy checkpoint with expert_tensor_parallel_size {etp} != "
                                      f"tensor_model_parallel_size {tp} is not a format mcore_adapter writes.")
    tied = bool(mca.get("tie_embeddings_and_output_weights"))
    seen: set[str] = set()
    for pp_rank in range(pp):
        for ep_rank in range(ep):
            files = [_load_rank_file(_rank_dir(it, t, pp_rank, ep_rank, mca)) for t in range(tp)]
            for vp in range(vpp):
                key = f"model{vp}" if vpp > 1 else "model"
                chunks = [f[key] for f in files]
                for name in chunks[0]:
                    if name.endswith("_extra_state") or (tied and name == "output_layer.weight"):
                        continue
                    per_rank = [canonical_tensors(name, c[name], mca, pp_rank, vp, ep_rank) for c in chunks]
                    for i, (canon, _) in enumerate(per_rank[0]):
                        if canon in seen:  # dense tensors repeat on every EP rank
                            continue
                        seen.add(canon)
                        yield canon, _join_tp(bridge, canon, [r[i][1] for r in per_rank], path), tp


def _join_tp(bridge: Any, canon: str, shards: list[torch.Tensor], path: str) -> torch.Tensor:
    from llamafactory_mca.models.param_mapping import mapping_for

    try:
        _hf, kind = bridge.hf_names_for(canon)
    except KeyError:
        raise UpstreamCheckpointError(
            f"{path}: tensor {canon} has no Hugging Face counterpart in llamafactory-mca's {type(bridge).__name__} "
            "(a feature of the model this version does not map). Fix: merge it with that mode's own "
            "scripts/megatron_merge.py.") from None
    dim = mapping_for(kind).gather_dim  # the split kind's TP dimension (None: replicated)
    if dim is not None:
        return torch.cat(shards, dim) if len(shards) > 1 else shards[0]
    for other in shards[1:]:
        if not torch.equal(other, shards[0]):
            raise UpstreamCheckpointError(f"{path}: the replicated tensor {canon} differs between TP ranks. Fix: use "
                                          "another checkpoint.")
    return shards[0]


_STACKED_EXPERTS = re.compile(r"^mlp\.experts\.experts\.(linear_fc[12]\.weight)$")


def dist_canonical_tensors(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """(canonical name, full tensor) pairs of one global tensor of a torch_dist checkpoint.

    megatron-core 0.16 writes `model.sharded_state_dict()` (mcore_adapter passes no metadata) with the layers
    stacked: `decoder.layers.<name>` of shape [num_layers, ...] (global layer index first), experts as
    `decoder.layers.mlp.experts.experts.linear_fc1.weight` [num_layers, num_experts, out, in] (Sequential,
    Grouped and TEGrouped MLPs share that key), the local modules' norms under the Transformer Engine names;
    fused SwiGLU tensors are stored as [gate; up] and fused QKV per query group, i.e. in the tp=1 layout.
    Keys with a layer number (`non_homogeneous_layers`) are taken as they are."""
    m = re.match(r"^decoder\.layers\.(.+)$", key)
    if not m:
        return [(key, tensor)]
    rest = m.group(1)
    if re.match(r"^\d+\.", rest):
        layer, name = rest.split(".", 1)
        return [(f"decoder.layers.{layer}." + _TE_TO_LOCAL.get("." + name, "." + name)[1:], tensor)]
    rest = _TE_TO_LOCAL.get("." + rest, "." + rest)[1:]
    experts = _STACKED_EXPERTS.match(rest)
    out = []
    for layer in range(tensor.shape[0]):
        if experts:
            out.extend((f"decoder.layers.{layer}.mlp.experts.{e}.{experts.group(1)}", tensor[layer, e])
                       for e in range(tensor.shape[1]))
        else:
            out.append((f"decoder.layers.{layer}.{rest}", tensor[layer]))
    return out


def _iter_dist_tensors(path: str, bridge: Any, mca: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor, int]]:
    """The tensors of `iter_*/dist_model/`, one stored key at a time (a stacked key holds that tensor of every
    layer: memory is the largest key, e.g. all layers' expert fc1 weights)."""
    from torch.distributed.checkpoint import FileSystemReader, load

    from llamafactory_mca.checkpoint import checkpoint_tensor_meta

    dist_dir = os.path.join(iteration_dir(path), DIST_MODEL_DIR)
    tied = bool(mca.get("tie_embeddings_and_output_weights"))
    for key, (shape, dtype) in sorted(checkpoint_tensor_meta(dist_dir).items()):
        if "_extra_state" in key or (tied and key == "output_layer.weight"):
            continue
        full = {key: torch.empty(shape, dtype=dtype)}
        load(full, storage_reader=FileSystemReader(dist_dir), no_dist=True)
        for canon, tensor in dist_canonical_tensors(key, full[key]):
            _join_tp(bridge, canon, [tensor], path)  # refuses names without a Hugging Face counterpart
            yield canon, tensor, 1


# --------------------------------------------------------------------------------------------- merge


def _hf_items(path: str, bridge: Any, hf_config: Any, meta: bool) -> Iterator[tuple[str, torch.Tensor]]:
    for canon, full, tp in iter_upstream_tensors(path, bridge):
        if meta:
            full = torch.empty(full.shape, dtype=full.dtype, device="meta")
        yield from bridge.megatron_to_hf(canon, full, hf_config, tp).items()


def merge_upstream_checkpoint(
    checkpoint_path: str,
    output_path: str,
    dtype: Optional[torch.dtype] = None,
    max_shard_size: Any = "5GB",
    overwrite: bool = False,
) -> str:
    """Write the Hugging Face model (safetensors, config, tokenizer) of an upstream checkpoint to `output_path`.

    Weights are copied bit for bit (converted only when `dtype` differs from the stored one); the default dtype
    is the Hugging Face config's. One process, no GPU, no megatron model: the rank files are memory-mapped and
    one parameter at a time is assembled. Written into a hidden sibling directory, published by one rename."""
    from llamafactory_mca.export import StreamingSafetensorsWriter, check_output_dir
    from llamafactory_mca.export.files import config_dtype, fresh_tmp, publish
    from llamafactory_mca.models import get_bridge
    from llamafactory_mca.models.safetensors_io import parse_size

    checkpoint_path = os.path.normpath(checkpoint_path)
    output_path = os.path.normpath(output_path)
    if not is_upstream_checkpoint(checkpoint_path):
        raise UpstreamCheckpointError(f"{checkpoint_path} has no {MCA_CONFIG_FILE}: not a checkpoint of "
                                      "LLaMA-Factory's USE_MCA mode.")
    check_output_dir(output_path, overwrite)
    hf_config = upstream_hf_config(checkpoint_path)
    try:
        bridge = get_bridge(hf_config)
    except ValueError as err:
        raise UpstreamCheckpointError(f"{checkpoint_path}: {err}") from None
    specs, stored = [], None
    for name, t in _hf_items(checkpoint_path, bridge, hf_config, meta=True):
        stored = stored or t.dtype
        specs.append((name, tuple(t.shape), t.dtype))
    out = dtype or config_dtype(hf_config, stored or torch.float32)
    specs = [(n, s, out if d.is_floating_point else d) for n, s, d in specs]

    tmp = fresh_tmp(output_path)
    try:
        writer = StreamingSafetensorsWriter(tmp, specs, parse_size(max_shard_size))
        try:
            with torch.no_grad():
                for name, t in _hf_items(checkpoint_path, bridge, hf_config, meta=False):
                    writer.write(name, t.to(out) if t.is_floating_point() else t)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        hf_config.dtype = out
        hf_config.save_pretrained(tmp)
        _save_tokenizer(checkpoint_path, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, output_path)
    return output_path


def _save_tokenizer(checkpoint_path: str, out_dir: str) -> None:
    """The tokenizer (and processor) saved in the checkpoint, re-saved with transformers, as mcore_adapter's
    converter does (post_converter.py: BaseHFConverter._finalize); nothing when there is none."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint_path)
    except Exception:  # noqa: BLE001 - a checkpoint without tokenizer files
        return
    tokenizer.save_pretrained(out_dir)


# --------------------------------------------------------------------------------------------- training


def _merge_hint(path: str) -> str:
    return (f"`llamafactory-mca merge {path} --output_path DIR` (or scripts/megatron_merge.py with the same "
            "arguments) writes its Hugging Face model")


def check_training_paths(model_name_or_path: Any, resume_from_checkpoint: Any, output_dir: Any = None) -> None:
    """Refuse, before anything is built, an upstream checkpoint as `model_name_or_path` (unless the directory
    also holds Hugging Face weights) or as `resume_from_checkpoint` (given, or picked from `output_dir` by
    LLaMA-Factory's automatic resume); McaArgumentError naming the key and the way out."""
    from llamafactory_mca.args import McaArgumentError

    if is_upstream_checkpoint(model_name_or_path) and not has_hf_weights(model_name_or_path):
        raise McaArgumentError(
            f"`model_name_or_path`: {model_name_or_path} is a Megatron checkpoint of LLaMA-Factory's own USE_MCA "
            f"mode (mca_config.json), which llamafactory-mca does not train from directly. Fix: "
            f"{_merge_hint(model_name_or_path)}; then set model_name_or_path: DIR.")
    if is_upstream_checkpoint(resume_from_checkpoint):
        auto = output_dir and os.path.dirname(os.path.normpath(resume_from_checkpoint)) == os.path.normpath(output_dir)
        where = (f"LLaMA-Factory picked it up from output_dir {output_dir} (automatic resume)" if auto else
                 "given as resume_from_checkpoint")
        raise McaArgumentError(
            f"`resume_from_checkpoint`: {resume_from_checkpoint} was written by LLaMA-Factory's own USE_MCA mode "
            f"({where}); its optimizer and scheduler state cannot be resumed by llamafactory-mca. Fix: "
            f"{_merge_hint(resume_from_checkpoint)}; then start a new run with model_name_or_path: DIR and a new "
            "output_dir (or overwrite_output_dir: true), without resume_from_checkpoint.")


__all__ = [
    "MCA_CONFIG_FILE",
    "UpstreamCheckpointError",
    "canonical_tensors",
    "check_training_paths",
    "checkpoint_format",
    "global_layer_index",
    "has_hf_weights",
    "is_upstream_checkpoint",
    "iter_upstream_tensors",
    "merge_upstream_checkpoint",
    "read_mca_config",
    "upstream_hf_config",
]
