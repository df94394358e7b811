"""Megatron checkpoints: save, load (exact resume, any layout), find, rotate.

Layout of `output_dir/checkpoint-N/` (a directory is complete exactly when MARKER_FILE exists in it)::

    *.distcp, .metadata, common.pt, metadata.json   megatron-core dist_checkpointing, `torch_dist` format:
                                                     `model{i}` (one per VPP chunk) and `optimizer`
    rng_state_{rank}.pth                             python / numpy / torch / megatron RNG state of every rank (tensors
                                                     and numbers only: read with torch.load(weights_only=True))
    scheduler.json                                   the LR scheduler's state_dict (rank 0; JSON)
    trainer_state.json                               the trainer's state (global step, data position, logs)
    mca_args.json                                    our MegatronArguments at save time
    config.json, tokenizer files                     the Hugging Face config and tokenizer (merge reads them)
    adapter_model.safetensors, adapter_config.json   LoRA only: the PEFT adapter (`extra_files`); the torch_dist
                                                     tensors then hold the adapter (and its optimizer state) only
    mca_checkpoint.json                              MARKER_FILE: format, step, layout, `save_only_model` (+
                                                     `extra_info`, e.g. the LoRA base model); written last

With `save_only_model` (the Hugging Face TrainingArguments key) the torch_dist tensors hold `model{i}` only and
`rng_state_*.pth` / `scheduler.json` are not written: such a checkpoint merges and loads as weights, but training
cannot resume from it (`check_resumable`).

Writing is atomic: every rank writes into the sibling `.checkpoint-N.tmp` (a name that transformers'
`get_last_checkpoint` does not match), `extra_files` go there too, rank 0 writes the marker last and publishes
with one rename. A published checkpoint is never written to again.

Sharded tensors use global names (`decoder.layers.{global_layer}.…`, one key per layer: metadata
`non_homogeneous_layers=True`), so a checkpoint loads into any tp/pp/vpp/ep/dp layout and `export.py` can
stream it layer by layer. The distributed optimizer is saved `fully_reshardable` (model-space tensors).

Loading runs no pickled code from checkpoint files (`verify_checkpoint`, before anything is read): torch DCP's
`.metadata` (a pickle) is read with an unpickler that knows only DCP's metadata classes, the pickled objects
stored inside the shards and `common.pt` must load with `torch.load(weights_only=True)`, RNG state loads with
weights_only=True, the scheduler and trainer state are JSON. Shards shorter than the metadata says (a truncated
copy) are refused, naming the file. (`scheduler.pt` and numpy RNG arrays of earlier versions still load, with
weights_only=True and numpy's array classes allowed.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import os
import pickle
import random
import re
import shutil
import time
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from llamafactory_mca.models.lora import is_adapter_key
from llamafactory_mca.models.model_state import model_state, unwrap_model
from llamafactory_mca.optimizer_layout import OptimizerLayoutError, container_copy, optimizer_state_for_layout



def _logger() -> Any:
    """LLaMA-Factory's logger `llamafactory.mca.checkpoint` (a plain `llamafactory_mca.*` logger has no handler:
    its INFO lines never showed, see log.py); imported on first use, as merge runs without LLaMA-Factory's
    logging set up."""
    from llamafactory_mca.log import get_logger

    return get_logger("checkpoint")

MARKER_FILE = "mca_checkpoint.json"
FORMAT = "llamafactory-mca/torch_dist"
FORMAT_VERSION = 1
PREFIX_CHECKPOINT_DIR = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
TRAINER_STATE_FILE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.json"
LEGACY_SCHEDULER_FILE = "scheduler.pt"  # earlier versions: torch.save of the same dict
MCA_ARGS_FILE = "mca_args.json"
RNG_FILE = "rng_state_{rank}.pth"
_CHECKPOINT_RE = re.compile(r"^" + PREFIX_CHECKPOINT_DIR + r"-(\d+)$")

# Passed to every `sharded_state_dict(...)` call, on save and on load (the keys depend on it).
SHARDED_STATE_DICT_METADATA = {
    "non_homogeneous_layers": True,  # one key per layer: streaming merge, PP/VPP resharding
    "distrib_optim_sharding_type": "fully_reshardable",  # optimizer state in model space: any layout
    "chained_optim_avoid_prefix": True,  # optimizer keys independent of how optimizers are chained
}


# `extra_files` of save_checkpoint: a callable(tmp_dir) run on every rank, or {relative path: content} (rank 0)
ExtraFiles = Union[Callable[[str], None], Mapping[str, Any], None]


class CheckpointError(ValueError):
    """A path is not a usable checkpoint (or an output path is unsafe); the message names path and fix."""


# --------------------------------------------------------------------------------------------- finding


def is_megatron_checkpoint(path: str) -> bool:
    """True for a complete checkpoint written by llamafactory-mca (see MARKER_FILE)."""
    return bool(path) and os.path.isfile(os.path.join(path, MARKER_FILE))


def _tmp_dir(final_dir: str) -> str:
    parent, name = os.path.split(os.path.normpath(final_dir))
    return os.path.join(parent, f".{name}.tmp")


def checkpoint_info(path: str) -> dict[str, Any]:
    """The marker's content of a complete checkpoint; CheckpointError (naming path and fix) otherwise."""
    path = os.path.normpath(path)
    name = os.path.basename(path)
    if name.startswith(".") and name.endswith(".tmp"):
        raise CheckpointError(
            f"{path} is a checkpoint that was still being written (a temporary directory; the run stopped before "
            f"publishing it). Fix: resume from the newest complete `checkpoint-N` next to it, and delete {path}."
        )
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} does not exist or is not a directory. Fix: pass a `checkpoint-N` directory.")
    marker = os.path.join(path, MARKER_FILE)
    if not os.path.isfile(marker):
        if os.path.isfile(os.path.join(path, "metadata.json")) or any(f.endswith(".distcp") for f in os.listdir(path)):
            previous = get_last_checkpoint(os.path.dirname(path))
            use = (f"resume_from_checkpoint: {previous} (the newest complete one next to it)" if previous else
                   "an older complete checkpoint-N")
            raise CheckpointError(
                f"{path} is an incomplete Megatron checkpoint (no {MARKER_FILE}: it was not finished, or the marker "
                f"was deleted). Fix: delete or move {path} (LLaMA-Factory's automatic resume from output_dir picks "
                f"the newest checkpoint-N directory), or set {use}."
            )
        if os.path.isfile(os.path.join(path, "config.json")):
            raise CheckpointError(
                f"{path} is a Hugging Face model, not a Megatron checkpoint (no {MARKER_FILE}). Fix: use it as "
                f"model_name_or_path for training, or `llamafactory-mca convert` it into a Megatron checkpoint."
            )
        raise CheckpointError(
            f"{path} is not a llamafactory-mca checkpoint (no {MARKER_FILE}). Fix: pass a directory "
            f"`output_dir/checkpoint-N` written by `USE_MCA=1 llamafactory-cli train` or `llamafactory-mca convert`."
        )
    with open(marker, encoding="utf-8") as f:
        info = json.load(f)
    if info.get("format") != FORMAT or int(info.get("version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: unknown checkpoint format {info.get('format')!r} version {info.get('version')!r}. "
            f"Fix: upgrade llamafactory-mca."
        )
    return info


def check_resumable(path: str, info: Optional[dict[str, Any]] = None) -> None:
    """CheckpointError (naming save_only_model and the fix) for a checkpoint written with save_only_model.

    It holds no optimizer, LR scheduler or RNG state, so a resume would silently restart Adam's moments and the
    LR warmup in the middle of a run; the Hugging Face Trainer refuses such checkpoints too. Nothing is deleted.
    """
    info = checkpoint_info(path) if info is None else info
    if not info.get("save_only_model"):
        return
    if info.get("adapter_only"):  # LoRA: the checkpoint is also a PEFT adapter directory
        start = (f"start a new run from its adapter with adapter_name_or_path: {path} (or from the merged model: "
                 f"`llamafactory-mca merge --checkpoint_path {path} --output_path DIR --merge_lora`, then "
                 "model_name_or_path: DIR)")
    else:
        start = (f"start a new run from its weights: `llamafactory-mca merge --checkpoint_path {path} --output_path "
                 "DIR`, then model_name_or_path: DIR")
    raise CheckpointError(
        f"{path} was saved with save_only_model: true: it holds the model weights but no optimizer, LR scheduler "
        "or RNG state, so training cannot resume from it (the Hugging Face Trainer refuses such checkpoints too). "
        f"Fix: {start}, without resume_from_checkpoint and with a new output_dir (LLaMA-Factory resumes from the "
        "last checkpoint in output_dir unless overwrite_output_dir is set); or train without save_only_model to "
        "write resumable checkpoints."
    )


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints under `output_dir`, oldest first, as (step, path)."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CHECKPOINT_RE.match(name)
        path = os.path.join(output_dir, name)
        if m and is_megatron_checkpoint(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def get_last_checkpoint(output_dir: str) -> Optional[str]:
    """The newest complete checkpoint in `output_dir` (half-written ones are skipped), or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def rotate_checkpoints(output_dir: str, save_total_limit: Optional[int], keep: Sequence[str] = ()) -> list[str]:
    """Delete the oldest complete checkpoints beyond `save_total_limit`; never the newest nor `keep`."""
    if not save_total_limit or save_total_limit <= 0:
        return []
    found = list_checkpoints(output_dir)
    protect = {os.path.normpath(p) for p in keep}
    if found:
        protect.add(os.path.normpath(found[-1][1]))
    deleted = []
    excess = len(found) - save_total_limit
    for _, path in found:
        if excess <= 0:
            break
        if os.path.normpath(path) in protect:
            continue
        # Unpublish first (atomic), then delete: a crash mid-delete leaves only a hidden directory.
        trash = os.path.join(output_dir, f".{os.path.basename(path)}.deleting")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
        deleted.append(path)
        excess -= 1
    return deleted


# --------------------------------------------------------------------------------------------- helpers


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def _world_size() -> int:
    d = _dist()
    return d.get_world_size() if d else 1


def _barrier() -> None:
    d = _dist()
    if d:
        d.barrier()


def model_sharded_state_dict(models: Sequence[torch.nn.Module]) -> dict[str, Any]:
    """{'model0': ..., 'model1': ...}: one sharded state dict per VPP chunk, with global keys; a LoRA chunk's
    holds its adapter tensors only (the base weights come from the Hugging Face model)."""
    return {f"model{i}": _chunk_sharded_state_dict(unwrap_model(m)) for i, m in enumerate(models)}


def _chunk_sharded_state_dict(model: torch.nn.Module) -> dict[str, Any]:
    sd = model.sharded_state_dict(metadata=dict(SHARDED_STATE_DICT_METADATA))
    if _adapter_only(model):
        sd = {k: v for k, v in sd.items() if is_adapter_key(k)}
    return sd


# What a rank's RNG streams are made of: every rank is seeded with `seed` (platform.seed_everything), megatron's
# tracker adds tp_rank (model-parallel stream) and ep/etp ranks (expert stream), and each pipeline stage / context
# chunk draws for its own layers and tokens. Data-parallel replicas start from the same seeds (they drift apart
# only as far as their batches' shapes differ).
_RNG_LAYOUT_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                    "virtual_pipeline_model_parallel_size", "context_parallel_size", "expert_model_parallel_size",
                    "expert_tensor_parallel_size")


def rank_coordinates() -> list[int]:
    """This rank's [tp, pp, cp, ep, etp, dp] ranks (megatron's parallel_state)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return [0, 0, 0, 0, 0, _rank()]
    return [ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
            ps.get_context_parallel_rank(), ps.get_expert_model_parallel_rank(),
            ps.get_expert_tensor_parallel_rank(), ps.get_data_parallel_rank()]


def rng_source_rank(info: dict[str, Any]) -> Optional[int]:
    """The rank of the checkpoint whose RNG state this rank continues, or None.

    Same layout: this rank's own. Only the data-parallel size (world size) changed: the saved rank at the same
    tp/pp/cp/ep/etp coordinates and data-parallel rank, or data-parallel rank 0 of those coordinates where the new
    layout has more replicas (replicas start from the same seeds): every stream continues one of the saved run
    instead of starting again from `seed`. Tensor/pipeline/context/expert layout changed: None (no saved stream
    draws for the same weights and tokens as this rank's).
    """
    saved, now = info.get("layout") or {}, _layout()
    if saved == now:
        return _rank()
    coords = info.get("rank_coordinates")
    if not coords or any(saved.get(k, 1) != now.get(k, 1) for k in _RNG_LAYOUT_KEYS):
        return None
    mine = rank_coordinates()
    same = [(c[5], r) for r, c in enumerate(coords) if list(c[:5]) == mine[:5]]
    exact = [r for dp, r in same if dp == mine[5]]
    return exact[0] if exact else (min(same)[1] if same else None)


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return {"world_size": _world_size()}
    return {
        "world_size": _world_size(),
        "tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
        "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
        "virtual_pipeline_model_parallel_size": ps.get_virtual_pipeline_model_parallel_world_size() or 1,
        "context_parallel_size": ps.get_context_parallel_world_size(),
        "expert_model_parallel_size": ps.get_expert_model_parallel_world_size(),
        "expert_tensor_parallel_size": ps.get_expert_tensor_parallel_world_size(),
        "data_parallel_size": ps.get_data_parallel_world_size(),
    }


def _save_strategy():
    """torch_dist, written synchronously by the calling process with torch DCP's own FileSystemWriter.

    megatron-core's default torch_dist writer starts a `spawn` multiprocessing Manager and forks writer
    processes (which needs `if __name__ == "__main__"` in every entry script); this one starts nothing. The
    files are the same torch DCP format, read back by megatron-core's default torch_dist loader.
    """
    from megatron.core.dist_checkpointing.strategies.torch import (
        MCoreSavePlanner,
        TorchDistSaveShardedStrategy,
        _replace_state_dict_keys_with_sharded_keys,
        mcore_to_pyt_state_dict,
    )
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    class SyncTorchDistSaveStrategy(TorchDistSaveShardedStrategy):
        def save(self, sharded_state_dict, checkpoint_dir):  # noqa: D102
            sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
                sharded_state_dict, self.keep_only_main_replica
            )
            pyt_state_dict = mcore_to_pyt_state_dict(sharded_state_dict, False)
            dcp_save(
                pyt_state_dict,
                storage_writer=FileSystemWriter(str(checkpoint_dir), thread_count=1, sync_files=True),
                planner=MCoreSavePlanner(
                    dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False
                ),
            )

    return SyncTorchDistSaveStrategy("torch_dist", 1)


def _mca_optimizers(optimizer: Any) -> list[Any]:
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _torch_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    out = []
    for opt in _mca_optimizers(optimizer):
        inner = getattr(opt, "optimizer", opt)
        out.extend(getattr(inner, "sub_optimizers", None) or [inner])
    return [o for o in out if isinstance(o, torch.optim.Optimizer)]


def init_optimizer_state(optimizer: Any) -> None:
    """Allocate the state of a fresh optimizer (zeros, step 0) so a checkpoint can be loaded into it.

    Without this, megatron's DistributedOptimizer.state_dict() fails on an empty torch optimizer, and Adam
    would lazily create its state at the first step after loading. Nothing is computed: no dummy step, so
    parameters stay untouched (a zero-grad AdamW step would still apply weight decay).
    """
    for opt in _torch_optimizers(optimizer):
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state[p]
                if len(state) > 0:
                    continue
                if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group.get("amsgrad"):
                        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif isinstance(opt, torch.optim.SGD):
                    if group.get("momentum", 0):
                        state["momentum_buffer"] = torch.zeros_like(p)
                else:
                    raise CheckpointError(
                        f"cannot initialise the state of optimizer {type(opt).__name__} before loading. "
                        "Fix: use optimizer adam/adamw or sgd."
                    )


def untie_optimizer_steps(optimizer: Any) -> int:
    """Give every parameter its own `step` tensor; returns how many were shared.

    megatron-core 0.16.1's DistributedOptimizer.load_state_dict assigns ONE step tensor to every parameter
    (without TE/apex); torch AdamW then increments it in place once per parameter per step, so the bias
    correction runs ahead and training silently diverges after a resume.
    """
    fixed = 0
    for opt in _torch_optimizers(optimizer):
        seen: set[int] = set()
        for state in opt.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                if id(step) in seen or step.untyped_storage().data_ptr() in seen:
                    state["step"] = step.detach().clone()
                    fixed += 1
                seen.add(id(state["step"]))
                seen.add(state["step"].untyped_storage().data_ptr())
    return fixed


@contextlib.contextmanager
def _tolerate_step_in_fully_reshardable_load(optimizer: Any):
    """Let DistributedOptimizer load `fully_reshardable` state into a torch Adam/AdamW (no TE/apex).

    megatron-core 0.16.1 copies every key of the torch optimizer's per-param state from the loaded tensors,
    but the loaded tensors never carry `step` (it travels in the param groups) -> KeyError: 'step'. During
    the load we copy the keys that are there; `step` itself is set by load_state_dict (and then untied).
    """
    patched = []
    for opt in _mca_optimizers(optimizer):
        if type(opt).__name__ != "DistributedOptimizer" or opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            continue

        def _set(model_param, tensors, opt=opt):
            group_index, group_order = opt.model_param_group_index_map[model_param]
            main_param = opt.optimizer.param_groups[group_index]["params"][group_order]
            dst = {"param": main_param, **opt.optimizer.state[main_param]}
            missing = set(dst) - set(tensors) - {"step"}
            if missing:
                raise CheckpointError(f"optimizer state {sorted(missing)} missing in the checkpoint")
            for key, value in tensors.items():
                dst[key].copy_(value)

        opt._set_main_param_and_optimizer_states = _set
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states


def optimizer_sharded_state_dict(optimizer: Any, model_sd: dict[str, Any], is_loading: bool) -> Any:
    """The optimizer's sharded state dict over the model chunks' sharded state dicts `model_sd`."""
    # Local state-dict keys repeat across VPP chunks (each numbers its layers from 0): keep them apart.
    flat_model_sd = {f"{name}.{k}": v for name, chunk in model_sd.items() for k, v in chunk.items()}
    return optimizer.sharded_state_dict(
        flat_model_sd, is_loading=is_loading, metadata=dict(SHARDED_STATE_DICT_METADATA)
    )


# --------------------------------------------------------------------------------------------- RNG


def get_rng_state() -> dict[str, Any]:
    """Python, numpy, torch (CUDA) and megatron's tracked RNG states of this process."""
    import numpy as np

    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    try:
        from megatron.core import tensor_parallel

        state["megatron"] = tracker_states_as_tensors(tensor_parallel.get_cuda_rng_tracker().get_states())
    except Exception:  # noqa: BLE001 - tracker not initialised (no parallel state)
        pass
    return state


def tracker_states_as_tensors(states: dict[str, Any]) -> dict[str, Any]:
    """megatron's tracked RNG states as state tensors: under `cuda_graph_impl: local` the tracker holds graph-safe
    generators (objects that torch.load(weights_only=True) refuses), otherwise the tensors already."""
    return {name: s.get_state() if isinstance(s, torch.Generator) else s for name, s in states.items()}


def restore_tracker_states(live: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """The tracker states to set from `saved` (state tensors): a live graph-safe generator keeps its identity
    (captured CUDA graphs hold it) and takes the saved state; other names take the saved tensor."""
    out = dict(saved)
    for name, state in saved.items():
        gen = live.get(name)
        if isinstance(gen, torch.Generator):
            gen.set_state(state.get_state() if isinstance(state, torch.Generator) else state)
            out[name] = gen
    return out


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `get_rng_state` returned."""
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if "megatron" in state:
        from megatron.core import tensor_parallel

        tracker = tensor_parallel.get_cuda_rng_tracker()
        tracker.set_states(restore_tracker_states(tracker.get_states(), state["megatron"]))


def rng_state_to_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """`get_rng_state()` with the python and numpy states as tensors and numbers, so that the file loads with
    torch.load(weights_only=True) (no numpy classes, no pickled code)."""
    out = dict(state)
    version, internal, gauss = state["python"]
    out["python"] = {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}
    kind, keys, pos, has_gauss, cached = state["numpy"]
    out["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                    "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return out


def rng_state_from_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `rng_state_to_tensors` (states saved by earlier versions pass through unchanged)."""
    import numpy as np

    out = dict(state)
    py, npy = state["python"], state["numpy"]
    if isinstance(py, dict):
        out["python"] = (py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"])
    if isinstance(npy, dict):
        out["numpy"] = (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                        npy["cached_gaussian"])
    return out


def read_rng_state(path: str) -> dict[str, Any]:
    """A `rng_state_{rank}.pth` file as `get_rng_state()` returns it, read with weights_only=True."""
    return rng_state_from_tensors(_load_weights_only(path))


def _load_weights_only(source: Union[str, io.BytesIO], name: str = "") -> Any:
    """torch.load(weights_only=True) of a file path (or bytes named `name`); numpy arrays (RNG files of earlier
    versions) are allowed, nothing else. CheckpointError naming the file when it is damaged or holds other
    objects."""
    import warnings

    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 renamed numpy.core (the alias still works)
        allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), np.core.multiarray._reconstruct]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - reported with the file's name
        raise _unreadable(name or str(source), e, "tensors and numbers") from None


def _unreadable(name: str, error: BaseException, allowed: str) -> CheckpointError:
    return CheckpointError(
        f"{name} cannot be read safely ({type(error).__name__}: {str(error).splitlines()[0][:300]}): it is "
        f"truncated, corrupted, or holds pickled objects other than {allowed}, which are never executed. Fix: "
        "resume from an earlier checkpoint-N (or copy this one again)."
    )


# --------------------------------------------------------------------------------------------- verify

# The classes torch DCP's `.metadata` pickle is made of; anything else (e.g. `os.system`) is refused.
_DCP_METADATA_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "MetadataIndex", "TensorStorageMetadata",
                                              "ChunkStorageMetadata", "BytesStorageMetadata", "StorageMeta",
                                              "TensorProperties", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {"WriteItemType", "LoadItemType"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """pickle's documented "restricting globals" recipe, for DCP metadata: only the classes above, torch
    dtypes and builtin containers."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_METADATA_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in checkpoint metadata")


def read_dcp_metadata(path: str) -> Any:
    """torch DCP's `Metadata` of a torch_dist checkpoint, unpickled without running any other code;
    CheckpointError naming the file if it is missing, damaged or holds anything else."""
    meta_path = os.path.join(path, ".metadata")
    try:
        with open(meta_path, "rb") as f:
            md = _MetadataUnpickler(f).load()
    except Exception as e:  # noqa: BLE001 - reported with the file's name
        raise _unreadable(meta_path, e, "torch DCP's metadata classes") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(md, Metadata):
        raise CheckpointError(f"{meta_path} is not torch DCP metadata. Fix: resume from an earlier checkpoint-N.")
    return md


def verify_checkpoint(path: str) -> dict[str, Any]:
    """Check a checkpoint before anything of it is loaded; return its marker (see `checkpoint_info`).

    Raises CheckpointError naming the file and the fix when the metadata cannot be read safely, a shard file is
    missing or shorter than the metadata says (truncated), or a pickled object stored in a shard or in
    `common.pt` needs more than torch.load(weights_only=True) allows. Nothing in the checkpoint is executed.
    Reads the metadata and the (small) pickled objects; the tensors' bytes are not read (there are no
    checksums: bit flips inside tensor data go unnoticed, as with torch DCP).
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    info = checkpoint_info(path)
    md = read_dcp_metadata(path)
    needed: dict[str, int] = {}
    for item in (md.storage_data or {}).values():
        needed[item.relative_path] = max(needed.get(item.relative_path, 0), item.offset + item.length)
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        actual = os.path.getsize(file) if os.path.isfile(file) else None
        if actual is None or actual < size:
            raise CheckpointError(
                f"{file} is {'missing' if actual is None else f'truncated ({actual} of {size} bytes)'}: this "
                f"checkpoint is damaged. Fix: resume from an earlier checkpoint-N in {os.path.dirname(path)} "
                f"(resume_from_checkpoint, or delete or move {path} so the automatic resume picks the one before)."
            )
    for index, item in (md.storage_data or {}).items():
        if not isinstance(md.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        file = os.path.join(path, item.relative_path)
        if getattr(item, "transform_descriptors", None):
            raise CheckpointError(f"{file}: {index.fqn} is stored with transforms {item.transform_descriptors}, "
                                  "which this version does not read. Fix: re-save the checkpoint uncompressed.")
        with open(file, "rb") as f:
            f.seek(item.offset)
            data = f.read(item.length)
        _load_weights_only(io.BytesIO(data), f"{file} (object {index.fqn})")
    common = os.path.join(path, "common.pt")
    if os.path.isfile(common):
        _load_weights_only(common)
    return info


# --------------------------------------------------------------------------------------------- save


def _to_jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if hasattr(obj, "to_dict") and not isinstance(obj, dict):
        obj = obj.to_dict()
    return json.loads(json.dumps(obj, default=str))


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    output_dir: str,
    step: int,
    models: Sequence[torch.nn.Module],
    optimizer: Any = None,
    scheduler: Any = None,
    *,
    save_total_limit: Optional[int] = None,
    **options: Any,
) -> str:
    """Write `output_dir/checkpoint-{step}` (collective: every rank calls it) with `write_checkpoint` (which
    documents `options`) and return its path. After publishing, the oldest complete checkpoints beyond
    `save_total_limit` are deleted (never the newest)."""
    final_dir = os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")
    write_checkpoint(final_dir, step, models, optimizer, scheduler, **options)
    if _rank() == 0:
        rotate_checkpoints(output_dir, save_total_limit, keep=[final_dir])
    _barrier()
    return final_dir


def write_checkpoint(
    final_dir: str,
    step: int,
    models: Sequence[torch.nn.Module],
    optimizer: Any = None,
    scheduler: Any = None,
    *,
    trainer_state: Optional[dict[str, Any]] = None,
    mca_args: Any = None,
    hf_config: Any = None,
    tokenizer: Any = None,
    save_rng: bool = True,
    extra_files: ExtraFiles = None,
    extra_info: Optional[dict[str, Any]] = None,
    save_only_model: bool = False,
) -> str:
    """Write a checkpoint into exactly `final_dir` (collective: every rank calls it), atomically (see the
    module docstring), and return its path.

    `models`: the model chunks (one per VPP stage; DDP/Float16Module wrappers are fine). `optimizer`: a
    megatron-core optimizer (distributed or not, chained or not). `scheduler`: anything with
    state_dict()/load_state_dict(). `trainer_state`: a JSON-able dict (global step, data position, log
    history, ...) given back by load_checkpoint. `mca_args`: our MegatronArguments. `hf_config`/`tokenizer`:
    saved with save_pretrained (merge needs the config's model_type). `extra_files`: more files that belong to
    the checkpoint, written into the temporary directory before the marker and the publishing rename, either
    a callable `f(tmp_dir)` run on every rank (it may be collective, e.g. `lora.save_peft_adapter`) or a dict
    {relative path: bytes | str | JSON-able dict/list | callable(path)} written by rank 0. `extra_info`:
    JSON-able entries added to the marker. `save_only_model`: as the HF TrainingArguments key, write the model
    (and the files above) but not the optimizer, scheduler or RNG state; the marker records it and
    `load_checkpoint` refuses to resume from it.
    """
    if save_only_model:
        # The distributed optimizer's state alone is ~6x the bf16 weights (fp32 main params + two Adam moments):
        # model-only checkpoints leave it out, with the scheduler and RNG state that only matter for a resume.
        optimizer, scheduler, save_rng = None, None, False
    rank = _rank()
    final_dir = os.path.normpath(final_dir)
    parent = os.path.dirname(final_dir) or "."
    tmp_dir = _tmp_dir(final_dir)
    t0 = time.time()
    # Every phase ends with all ranks agreeing whether it worked anywhere (`_phase`), so a failure on one
    # rank (disk full, permissions) stops every rank with the same message instead of leaving the others waiting
    # in a barrier; nothing is published then, and earlier checkpoints are not touched.
    with _phase(final_dir, tmp_dir):
        if rank == 0:
            os.makedirs(parent, exist_ok=True)
            if os.path.exists(tmp_dir):  # left by a run that died while saving
                shutil.rmtree(tmp_dir)
            os.makedirs(tmp_dir)
    with _phase(final_dir, tmp_dir):
        coordinates = _write_state(tmp_dir, rank, models, optimizer, scheduler, save_rng, trainer_state, mca_args,
                                   hf_config, tokenizer)
    if extra_files is not None:
        with _phase(final_dir, tmp_dir):
            _write_extra_files(tmp_dir, extra_files, rank)
    with _phase(final_dir, tmp_dir):
        if rank == 0:
            marker = {
                **_to_jsonable(extra_info or {}),
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "step": step,
                "model_type": getattr(hf_config, "model_type", None),
                "num_model_chunks": len(models),
                "layout": _layout(),
                "has_optimizer": optimizer is not None,
                "has_scheduler": scheduler is not None,
                "has_rng": save_rng,
                "rank_coordinates": coordinates,  # [tp, pp, cp, ep, etp, dp] of every rank: `rng_source_rank`
                "save_only_model": save_only_model,  # `check_resumable` refuses to resume from it
                "sharded_state_dict_metadata": SHARDED_STATE_DICT_METADATA,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            _write_json(os.path.join(tmp_dir, MARKER_FILE), marker)  # last file: the checkpoint is complete
            _publish(tmp_dir, final_dir)
            _logger().info("saved %s in %.1fs", final_dir, time.time() - t0)
    return final_dir


def _write_state(tmp_dir: str, rank: int, models: Sequence[torch.nn.Module], optimizer: Any, scheduler: Any,
                 save_rng: bool, trainer_state: Optional[dict[str, Any]], mca_args: Any, hf_config: Any,
                 tokenizer: Any) -> list[list[int]]:
    """Everything but the extra files and the marker, into `tmp_dir` (collective: torch_dist); returns every
    rank's `rank_coordinates()`."""
    from megatron.core import dist_checkpointing

    sharded_sd: dict[str, Any] = model_sharded_state_dict(models)
    if optimizer is not None:
        sharded_sd["optimizer"] = optimizer_sharded_state_dict(optimizer, sharded_sd, is_loading=False)
    dist_checkpointing.save(sharded_sd, tmp_dir, sharded_strategy=_save_strategy(), async_sharded_save=False)
    if save_rng:
        torch.save(rng_state_to_tensors(get_rng_state()), os.path.join(tmp_dir, RNG_FILE.format(rank=rank)))
    if rank == 0:
        if scheduler is not None:
            _write_json(os.path.join(tmp_dir, SCHEDULER_FILE), scheduler.state_dict())
        _write_json(os.path.join(tmp_dir, TRAINER_STATE_FILE), _to_jsonable(trainer_state or {}))
        if mca_args is not None:
            _write_json(os.path.join(tmp_dir, MCA_ARGS_FILE), _to_jsonable(mca_args))
        if hf_config is not None:
            hf_config.save_pretrained(tmp_dir)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp_dir)
    coordinates = [rank_coordinates()] * _world_size()
    d = _dist()
    if d is not None:
        d.all_gather_object(coordinates, rank_coordinates())
    return coordinates


def _publish(tmp_dir: str, final_dir: str) -> None:
    """Rank 0: one rename makes the complete `tmp_dir` the checkpoint `final_dir`."""
    parent = os.path.dirname(final_dir) or "."
    old = None
    if os.path.exists(final_dir):  # the same step saved again (e.g. after a resume): replace it
        old = os.path.join(parent, f".{os.path.basename(final_dir)}.replaced")
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(final_dir, old)
    os.rename(tmp_dir, final_dir)  # publish
    if old:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(parent)


@contextlib.contextmanager
def _phase(final_dir: str, tmp_dir: str):
    """Run one phase of a save on every rank, then agree (collective) on whether it failed anywhere: if so,
    rank 0 removes `tmp_dir` and every rank raises the same CheckpointError, naming the rank, the error and
    the fix."""
    error: Optional[BaseException] = None
    try:
        yield
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: BLE001 - torch DCP's CheckpointException is a BaseException
        error = e
    failures = _gather_failures(error)
    if not failures:
        return
    if _rank() == 0:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    disk_full = any("No space left on device" in m or f"[Errno {errno.ENOSPC}]" in m for m in failures.values())
    parent = os.path.dirname(final_dir) or "."
    fix = (f"free disk space under {parent} (each checkpoint needs about the size of the last one; lower "
           "save_total_limit to keep fewer)" if disk_full else f"check that {parent} is writable from every rank")
    detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(failures.items())[:4])
    raise CheckpointError(
        f"saving {final_dir} failed ({detail}). Nothing was published and earlier checkpoints are untouched. "
        f"Fix: {fix}, then restart: the run resumes from the last complete checkpoint-N."
    ) from error


def _gather_failures(error: Optional[BaseException]) -> dict[int, str]:
    """{rank: error} of the ranks whose phase failed (collective; the same on every rank). A torch DCP error
    that every rank re-raises counts for the ranks it names (`CheckpointException.failures`)."""
    mine: dict[int, str] = {}
    if error is not None:
        ranks = list(getattr(error, "failures", None) or [_rank()])
        lines = [line for line in str(error).splitlines() if line.strip()]
        text = lines[-1].strip() if len(lines) > 1 else f"{type(error).__name__}: {error}"  # DCP: the cause
        mine = {int(r): text for r in ranks}
    d = _dist()
    if d is None:
        return mine
    everyone: list[Optional[dict[int, str]]] = [None] * d.get_world_size()
    d.all_gather_object(everyone, mine)
    return {r: m for part in everyone for r, m in (part or {}).items()}


def _write_extra_files(tmp_dir: str, extra_files: ExtraFiles, rank: int) -> None:
    if callable(extra_files):
        extra_files(tmp_dir)
        return
    if rank != 0:
        return
    for rel, content in extra_files.items():
        path = os.path.normpath(os.path.join(tmp_dir, rel))
        if os.path.isabs(rel) or not path.startswith(tmp_dir + os.sep) or os.path.basename(path) == MARKER_FILE:
            raise CheckpointError(f"extra_files: {rel!r} must be a relative path inside the checkpoint (not the marker)")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if callable(content):
            content(path)
        elif isinstance(content, (dict, list)):
            _write_json(path, content)
        else:
            with open(path, "wb") as f:
                f.write(content.encode("utf-8") if isinstance(content, str) else bytes(content))
                f.flush()
                os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------- load


def load_checkpoint(
    path: str,
    models: Sequence[torch.nn.Module],
    optimizer: Any = None,
    scheduler: Any = None,
    *,
    load_optimizer: bool = True,
    load_rng: bool = True,
    strict: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint into `models` (and `optimizer`, `scheduler`), whatever layout it was saved with.

    Collective. Returns {"trainer_state": dict, "step": int, "info": marker dict, "rng_restored": bool,
    "optimizer_loaded": bool}. A checkpoint without optimizer state (e.g. from `llamafactory-mca convert`)
    loads the weights only. `strict`: every model parameter must be in the checkpoint; for LoRA model chunks
    (whose checkpoints hold the adapter only, the base weights coming from the Hugging Face model) every
    adapter tensor must be. A checkpoint that lacks tensors or holds other shapes (another model, a full
    checkpoint for a LoRA run or the reverse, another lora_rank) is refused with a CheckpointError before
    anything is loaded. The RNG state of each rank is restored only when the world size and layout are
    unchanged (otherwise there is no one-to-one mapping of ranks; a warning is logged). A checkpoint written
    with save_only_model is refused (CheckpointError, see `check_resumable`) when an optimizer is to be loaded,
    i.e. for a resume; without `optimizer` (or with `load_optimizer=False`) its weights load.
    """
    from megatron.core import dist_checkpointing

    info = checkpoint_info(path)
    if optimizer is not None and load_optimizer:
        check_resumable(path, info)
    verify_checkpoint(path)  # nothing of the checkpoint is read before this, nothing pickled is executed
    sharded_sd: dict[str, Any] = model_sharded_state_dict(models)
    _check_model_tensors(path, info, sharded_sd, models)
    want_optimizer = optimizer is not None and load_optimizer and info.get("has_optimizer", False)
    if optimizer is not None and load_optimizer and not info.get("has_optimizer", False):
        _logger().warning("%s has no optimizer state: the optimizer starts fresh", path)
    if want_optimizer:
        init_optimizer_state(optimizer)
        sharded_sd["optimizer"] = optimizer_sharded_state_dict(optimizer, sharded_sd, is_loading=True)
        requested_optimizer = container_copy(sharded_sd["optimizer"])

    # Keys we ask for and the checkpoint lacks fail inside torch DCP; keys we do not ask for (the optimizer
    # when it is not loaded) are fine.
    loaded = dist_checkpointing.load(sharded_sd, path, strict="assume_ok_unexpected")
    for i, m in enumerate(models):
        model = unwrap_model(m)
        if not _adapter_only(model):
            model.load_state_dict(loaded[f"model{i}"], strict=strict)
            continue
        result = model.load_state_dict(loaded[f"model{i}"], strict=False)
        not_loaded = [k for k in result.missing_keys if is_adapter_key(k)]
        if strict and (not_loaded or result.unexpected_keys):
            raise CheckpointError(
                f"{path}: LoRA adapter tensors not loaded {not_loaded[:3]}, unexpected {result.unexpected_keys[:3]}. "
                "Fix: resume with the lora_rank / lora_target the checkpoint was trained with."
            )
    if want_optimizer:
        # The non-tensor part (param groups, step) comes in the saving layout's structure: rebuild it for this one
        # (an EP change chains the expert optimizer differently; optimizer_layout).
        saved_common = dist_checkpointing.load_common_state_dict(path).get("optimizer")
        try:
            state = optimizer_state_for_layout(requested_optimizer, loaded["optimizer"], saved_common,
                                               len(_mca_optimizers(optimizer)))
        except OptimizerLayoutError as e:
            raise CheckpointError(f"{path}: {e}") from None
        with _tolerate_step_in_fully_reshardable_load(optimizer):
            optimizer.load_state_dict(state)
        untie_optimizer_steps(optimizer)
        # No reload_model_params(): it copies model params (bf16) over the loaded fp32 main params.

    if scheduler is not None and want_optimizer:
        sched_path, legacy = os.path.join(path, SCHEDULER_FILE), os.path.join(path, LEGACY_SCHEDULER_FILE)
        if os.path.isfile(sched_path):
            with open(sched_path, encoding="utf-8") as f:
                scheduler.load_state_dict(json.load(f))
        elif os.path.isfile(legacy):
            scheduler.load_state_dict(_load_weights_only(legacy))

    rng_restored = False
    if load_rng and info.get("has_rng"):
        source = rng_source_rank(info)
        rng_path = os.path.join(path, RNG_FILE.format(rank=source)) if source is not None else None
        if rng_path and os.path.isfile(rng_path):
            set_rng_state(read_rng_state(rng_path))
            rng_restored = True
        elif _rank() == 0:
            _logger().warning(
                "%s was saved with layout %s, now %s: RNG states are not restored, the RNGs stay seeded from `seed` "
                "(dropout masks differ from an uninterrupted run; README: Preemption and resume)", path,
                info.get("layout"), _layout()
            )

    trainer_state: dict[str, Any] = {}
    state_path = os.path.join(path, TRAINER_STATE_FILE)
    if os.path.isfile(state_path):
        with open(state_path, encoding="utf-8") as f:
            trainer_state = json.load(f)
    _barrier()
    return {
        "trainer_state": trainer_state,
        "step": int(info.get("step", 0)),
        "info": info,
        "rng_restored": rng_restored,
        "optimizer_loaded": want_optimizer,
    }


def checkpoint_tensor_meta(path: str) -> dict[str, tuple[tuple, torch.dtype]]:
    """{sharded key: (global shape, dtype)} of every tensor stored in a torch_dist checkpoint (metadata only)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = read_dcp_metadata(path)
    return {
        k: (tuple(v.size), v.properties.dtype)
        for k, v in md.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }


def _adapter_only(model: torch.nn.Module) -> bool:
    state = model_state(model)
    return bool(state is not None and state.adapter_only)


_VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _check_model_tensors(path: str, info: dict[str, Any], sharded_sd: dict[str, Any],
                         models: Sequence[torch.nn.Module]) -> None:
    """Refuse (CheckpointError with a fix) a checkpoint that lacks a tensor the models ask for or holds it with
    another shape; megatron / torch DCP would otherwise fail deep inside the load."""
    from megatron.core.dist_checkpointing.mapping import (
        ShardedTensor,
        ShardedTensorFactory,
    )

    stored = checkpoint_tensor_meta(path)
    lora_run = any(_adapter_only(unwrap_model(m)) for m in models)
    lora_ckpt = bool(info.get("adapter_only")) or (
        bool(stored) and all(is_adapter_key(k) for k in stored if not k.startswith("optimizer")))
    if lora_run and not lora_ckpt:
        raise CheckpointError(
            f"{path} holds full model weights, but this run trains LoRA adapters (finetuning_type: lora). Fix: resume "
            "it with finetuning_type: full (or freeze), or start the LoRA run from its merged model "
            "(`llamafactory-mca merge`, then model_name_or_path) without resume_from_checkpoint."
        )
    if lora_ckpt and not lora_run:
        raise CheckpointError(
            f"{path} is a LoRA checkpoint (it holds the adapter only), but this run trains the full model. Fix: resume "
            "it with finetuning_type: lora and the same lora_rank / lora_target, or merge it first "
            f"(`llamafactory-mca merge --checkpoint_path {path} --merge_lora ...`) and train from the merged model."
        )
    missing, mismatched = [], []
    for chunk in sharded_sd.values():
        for sh in chunk.values():
            if not isinstance(sh, (ShardedTensor, ShardedTensorFactory)):
                continue
            if sh.key not in stored:
                missing.append(sh.key)
            elif isinstance(sh, ShardedTensor) and tuple(sh.global_shape) != stored[sh.key][0]:
                mismatched.append((sh.key, stored[sh.key][0], tuple(sh.global_shape)))
    vocab = [m for m in mismatched if m[0] in _VOCAB_KEYS]
    if vocab:
        key, saved, wanted = vocab[0]
        raise CheckpointError(
            f"{path}: {key} was saved with {saved[0]} (padded) vocab rows, this model has {wanted[0]}: the checkpoint "
            "was written by an older llamafactory-mca, whose vocab padding depended on the TP size, or for another "
            f"model. Fix: merge it to Hugging Face (`llamafactory-mca merge --checkpoint_path {path} ...`) and train "
            "from the merged model, or check model_name_or_path."
        )
    if missing or mismatched:
        detail = "; ".join([f"missing {k}" for k in missing[:3]]
                           + [f"{k}: saved {a}, expected {b}" for k, a, b in mismatched[:3]])
        fix = ("resume with the lora_rank / lora_target the checkpoint was trained with" if lora_run else
               "check that model_name_or_path is the model the checkpoint was trained from")
        raise CheckpointError(
            f"{path} does not fit this model ({len(missing)} tensors missing, {len(mismatched)} with other shapes: "
            f"{detail}). Fix: {fix}."
        )


def read_mca_args(path: str) -> dict[str, Any]:
    """The MegatronArguments a checkpoint was saved with (a dict; empty if absent)."""
    p = os.path.join(path, MCA_ARGS_FILE)
    if not os.path.isfile(p):
        return {}
    with open(p, encoding="utf-8") as f:
        return json.load(f)
