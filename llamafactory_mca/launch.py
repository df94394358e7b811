"""What runs in place of LLaMA-Factory's training entry points once `patching.py` has swapped them in."""

from __future__ import annotations

from typing import Any, Callable, NoReturn

from llamafactory_mca.args import McaArgumentError, parse_train_args, print_help_and_exit
from llamafactory_mca.plugins import flat, hook


def _lf_callbacks(lf_args: tuple) -> list[Any]:
    """The callbacks LLaMA-Factory's own `_training_function` adds, where they apply to our trainer."""
    from llamafactory.train.callbacks import LogCallback, ReporterCallback
    from transformers import EarlyStoppingCallback

    model_args, data_args, training_args, finetuning_args, generating_args = lf_args
    callbacks: list[Any] = [LogCallback()]
    if finetuning_args.early_stopping_steps is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=finetuning_args.early_stopping_steps))
    callbacks.extend(flat(hook().mca_callbacks(training_args=training_args)))
    callbacks.append(ReporterCallback(model_args, data_args, finetuning_args, generating_args))  # last, as upstream
    return callbacks


def training_function(config: dict[str, Any]) -> None:
    """Replaces `llamafactory.train.tuner._training_function`: parse, validate, run our workflow."""
    import torch.distributed as dist

    from llamafactory_mca.activation import is_enabled

    if is_enabled("USE_RAY"):  # LLaMA-Factory 0.9.4 runs this very function inside Ray workers
        refuse_ray()
    mca_args, lf_args = parse_train_args(config.get("args"))
    stage = lf_args[3].stage
    workflow = hook().mca_workflow(stage=stage)
    if workflow is None:  # a plugin announced the stage but returned no workflow
        raise McaArgumentError(f"`stage`: no workflow registered for '{stage}'. Fix: check installed plugins.")
    callbacks = list(config.get("callbacks") or []) + _lf_callbacks(lf_args)
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
