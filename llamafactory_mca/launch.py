"""What runs in place of LLaMA-Factory's training entry points once `patching.py` has swapped them in."""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, NoReturn

from llamafactory_mca.args import McaArgumentError
from llamafactory_mca.parsing import parse_train_args, print_help_and_exit
from llamafactory_mca.plugins import flat, hook

# where patching.py keeps LLaMA-Factory's own `_training_function` on the tuner module
UPSTREAM_TRAINING_FUNCTION = "llamafactory_mca_upstream_training_function"


class _CallbacksBuilt(Exception):
    """Raised by the stand-in stage runner once LLaMA-Factory's `_training_function` has built its callbacks."""

    def __init__(self, callbacks: list[Any]) -> None:
        super().__init__("callbacks built")
        self.callbacks = callbacks


def _stand_in_runner(*args: Any, **kwargs: Any) -> NoReturn:
    raise _CallbacksBuilt(list(kwargs.get("callbacks", args[-1] if args else [])))


def lf_callbacks(lf_args: tuple, callbacks: list[Any]) -> list[Any]:
    """The callbacks LLaMA-Factory's own `_training_function` builds for these arguments (LogCallback, SwanLab,
    early stopping, profilers, ReporterCallback last ... whatever the installed version adds), after `callbacks`,
    with ours (`mca_callbacks`) placed before the reporter, as upstream places its extras.

    Upstream's function runs with its argument parser and stage runners replaced by stand-ins, so the list is
    exactly the installed version's and nothing of its training starts."""
    import llamafactory.train.tuner as tuner

    upstream = getattr(tuner, UPSTREAM_TRAINING_FUNCTION)
    finetuning_args, training_args = lf_args[3], lf_args[2]
    if getattr(finetuning_args, "use_hyper_parallel", False):
        raise McaArgumentError("`use_hyper_parallel`: cannot be combined with the Megatron backend. Fix: remove it, "
                               "or run without USE_MCA.")
    names = ["get_train_args"] + [n for n in dir(tuner) if n.startswith("run_") and n != "run_exp"]
    saved = {name: getattr(tuner, name) for name in names}
    try:
        tuner.get_train_args = lambda *_a, **_k: lf_args
        for name in names[1:]:
            setattr(tuner, name, _stand_in_runner)
        upstream({"args": None, "callbacks": list(callbacks)})
    except _CallbacksBuilt as built:
        built_callbacks = built.callbacks
    else:
        raise RuntimeError("LLaMA-Factory's _training_function ran no stage runner; cannot build its callbacks")
    finally:
        for name, value in saved.items():
            setattr(tuner, name, value)
    ours = flat(hook().mca_callbacks(training_args=training_args))
    reporter = next((i for i in range(len(built_callbacks) - 1, -1, -1)
                     if type(built_callbacks[i]).__name__ == "ReporterCallback"), len(built_callbacks))
    return built_callbacks[:reporter] + ours + built_callbacks[reporter:]


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def training_function(config: dict[str, Any]) -> None:
    """Replaces `llamafactory.train.tuner._training_function`: parse, validate, run our workflow.

    A bad recipe stops every rank with exit code 2; the message (key and fix) is printed once, by rank 0."""
    import torch.distributed as dist

    from llamafactory_mca.activation import is_enabled

    if is_enabled("USE_RAY"):  # LLaMA-Factory 0.9.4 runs this very function inside Ray workers
        refuse_ray()
    try:
        mca_args, lf_args = parse_train_args(config.get("args"))
        stage = lf_args[3].stage
        workflow = hook().mca_workflow(stage=stage)
        if workflow is None:  # a plugin announced the stage but returned no workflow
            raise McaArgumentError(f"`stage`: no workflow registered for '{stage}'. Fix: check installed plugins.")
        callbacks = lf_callbacks(lf_args, list(config.get("callbacks") or []))
    except McaArgumentError as err:
        if _is_rank0():
            print(f"llamafactory-mca: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    workflow(mca_args, *lf_args, callbacks)
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def get_train_args_for_help(args: Any = None) -> NoReturn:
    """Replaces `tuner.get_train_args`, which `run_exp` only calls for `-h`."""
    print_help_and_exit()
    raise SystemExit(0)


def refuse_ray(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise McaArgumentError(
        "`USE_RAY`: Ray training is not supported by the Megatron backend. Fix: unset USE_RAY and launch with "
        "llamafactory-cli (NNODES/NODE_RANK/MASTER_ADDR for several nodes)."
    )


def refuse_v1(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise McaArgumentError(
        "`USE_V1`: LLaMA-Factory's v1 trainer cannot be combined with USE_MCA. Fix: unset USE_V1 (or USE_MCA)."
    )


def export_args_dict(args: Any) -> dict[str, Any]:
    """`llamafactory-cli export`'s arguments as a dict: a recipe dict as it is, or a command-line list in any of
    the forms `--key value`, `--key=value` and `key=value` (a `--flag` without a value is True)."""
    if isinstance(args, dict):
        return dict(args)
    out: dict[str, Any] = {}
    items = list(args or [])
    i = 0
    while i < len(items):
        item = str(items[i])
        i += 1
        if item.startswith("--"):
            key = item[2:]
            if "=" in key:
                key, value = key.split("=", 1)
            elif i < len(items) and not str(items[i]).startswith("--"):
                value = items[i]
                i += 1
            else:
                value = True
            out[key.replace("-", "_")] = value
        elif "=" in item:
            key, value = item.split("=", 1)
            out[key] = value
    return out


def wrap_export(original: Callable[..., None]) -> Callable[..., None]:
    """`llamafactory-cli export` merges a Megatron checkpoint to HF; anything else goes to upstream unchanged.

    The checkpoint is recognised in a recipe file (`export.yaml`, with `key=value` overrides), in a dict, and in
    command-line lists (`--model_name_or_path CKPT --export_dir DIR`, `--key=value`, `key=value`)."""

    def export_model(args: Any = None) -> None:
        from llamafactory.hparams import read_args

        from llamafactory_mca.checkpoint import is_megatron_checkpoint

        read = read_args(args)
        parsed = export_args_dict(read) if isinstance(read, (dict, list, tuple)) else {}
        path = parsed.get("model_name_or_path")
        if isinstance(path, str) and path and is_megatron_checkpoint(path):
            from llamafactory_mca.export import export_from_llamafactory_args

            export_from_llamafactory_args(parsed)
            return
        original(args)

    return export_model
