"""Host side of the arguments, run in each training process: a recipe (dict or command line) split into our
dataclasses and LLaMA-Factory's, every value checked, then LLaMA-Factory's own parser on the rest.

The checks that need no LLaMA-Factory import (`recipe.check_recipe`) ran already in the launching process
(`prelaunch.py`); they run again here for launches that bypass `llamafactory-cli` (plain torchrun)."""

from __future__ import annotations

import difflib
import os
from typing import Any

from llamafactory_mca.activation import TRUTHY
from llamafactory_mca.args import (
    McaArgumentError,
    MegatronArguments,
    dataclass_from_dict,
    field_names,
    validate_megatron_args,
)
from llamafactory_mca.log import get_logger
from llamafactory_mca.recipe import CHECKED_MARKER, check_recipe, supported_stages
from llamafactory_mca.recipe_checks import check_stage


def llamafactory_train_dataclasses() -> list[type]:
    """LLaMA-Factory's training argument dataclasses (model, data, training, finetuning, generating)."""
    from llamafactory.hparams import parser as lf_parser

    return list(lf_parser._TRAIN_ARGS)


def mca_dataclasses() -> list[type]:
    """Our argument dataclasses and those of every plugin, checked for clashes with LLaMA-Factory's keys."""
    from llamafactory_mca.plugins import flat, hook

    types = flat(hook().mca_argument_dataclasses())
    clash = field_names(*types) & field_names(*llamafactory_train_dataclasses())
    if clash:
        raise McaArgumentError(
            f"argument dataclasses of llamafactory-mca plugins redefine LLaMA-Factory keys: {sorted(clash)}. "
            "Fix: rename those fields in the plugin."
        )
    return types


def print_help_and_exit() -> None:
    """`llamafactory-cli train -h` under USE_MCA: LLaMA-Factory's options followed by ours."""
    from transformers import HfArgumentParser

    HfArgumentParser(llamafactory_train_dataclasses() + mca_dataclasses()).parse_args_into_dataclasses(["-h"])


def extra_keys_allowed() -> bool:
    """LLaMA-Factory's `ALLOW_EXTRA_ARGS` switch (any of 1, true, y, yes, on)."""
    return os.environ.get("ALLOW_EXTRA_ARGS", "").lower() in TRUTHY


def unknown_keys_error(unknown: list[str], known: set[str]) -> McaArgumentError:
    """The error for recipe keys nobody defines, with a did-you-mean hint per key."""
    hints = {k: difflib.get_close_matches(k, sorted(known), n=1) for k in unknown}
    detail = "; ".join(f"`{k}`" + (f" (did you mean `{h[0]}`?)" if h else "") for k, h in hints.items())
    return McaArgumentError(
        f"unknown key(s) in the training recipe: {detail}. Fix: correct or remove them; "
        "`llamafactory-cli train -h` lists every key."
    )


def split_recipe(args: dict[str, Any] | list[str], types: list[type]) -> tuple[dict[type, Any], Any]:
    """(our dataclass instances by type, the rest for LLaMA-Factory's parser); every value of ours type-checked."""
    if isinstance(args, dict):
        ours = field_names(*types)
        known = ours | field_names(*llamafactory_train_dataclasses())
        unknown = [k for k in args if k not in known]
        if unknown and not extra_keys_allowed():
            raise unknown_keys_error(unknown, known)
        parsed = [dataclass_from_dict(tp, {k: v for k, v in args.items() if k in field_names(tp)}) for tp in types]
        rest = {k: v for k, v in args.items() if k not in ours}
    else:
        from transformers import HfArgumentParser

        *parsed, rest = HfArgumentParser(types).parse_args_into_dataclasses(args=args, return_remaining_strings=True)
    return {type(p): p for p in parsed}, rest


def parse_train_args(args: dict[str, Any] | list[str] | None = None) -> tuple[dict[type, Any], tuple]:
    """Parse a recipe into (our dataclasses by type, LLaMA-Factory's 5-tuple) and validate both.

    Our keys are split off first, the rest goes through LLaMA-Factory's own `get_train_args` untouched.
    """
    from llamafactory.hparams import get_train_args, read_args

    from llamafactory_mca.plugins import hook

    args = read_args(args)
    if isinstance(args, list) and ("-h" in args or "--help" in args):
        print_help_and_exit()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if isinstance(args, dict):
        # Checked on the raw recipe, before LLaMA-Factory's parse (which already sets up torch.distributed and
        # raises its own stage-specific errors, e.g. for PPO).
        args, notices = check_recipe(dict(args), world_size)
        if os.environ.get(CHECKED_MARKER) != "1":  # else the launcher printed them already
            for notice in notices:
                get_logger("args").warning_rank0(notice)
    else:
        check_stage(raw_value(args, "stage", "sft"), supported_stages())
    mca_args, rest = split_recipe(args, mca_dataclasses())
    if MegatronArguments in mca_args and not isinstance(args, dict):  # a recipe dict was validated above
        validate_megatron_args(mca_args[MegatronArguments], world_size, raw_value(rest, "model_name_or_path"))
    lf_args = get_train_args(rest)
    hook().mca_validate_args(mca_args=mca_args, lf_args=lf_args, world_size=world_size)
    return mca_args, lf_args


def raw_value(args: dict[str, Any] | list[str], key: str, default: Any = None) -> Any:
    """A key's value from a recipe dict or a `--key value` / `--key=value` list, before any parsing."""
    if isinstance(args, dict):
        return args.get(key, default)
    flag = f"--{key}"
    for i, item in enumerate(args):
        if item == flag and i + 1 < len(args):
            return args[i + 1]
        if item.startswith(flag + "="):
            return item.split("=", 1)[1]
    return default
