"""The recipe check in the launching process: `llamafactory-cli train recipe.yaml` under USE_MCA refuses a bad
recipe before torchrun starts (and before torch is imported), with one message naming the key and the fix.

`activation.py` wraps `llamafactory.cli.main` with `checked_main` in the process where the user set USE_MCA.
The recipe is read exactly as LLaMA-Factory's `read_args` reads it (a YAML or JSON file plus `key=value`
overrides through OmegaConf); a command line of `--key value` flags is left to the training processes.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from llamafactory_mca.args import McaArgumentError, field_names
from llamafactory_mca.recipe import CHECKED_MARKER, check_recipe

MESSAGE_PREFIX = "llamafactory-mca: "


def read_recipe(argv: list[str]) -> Optional[dict[str, Any]]:
    """The recipe of `llamafactory-cli train ARGV` as LLaMA-Factory's `read_args` builds it, or None for a plain
    command line of flags."""
    if not argv or not argv[0].endswith((".yaml", ".yml", ".json")):
        return None
    from omegaconf import OmegaConf

    path = Path(argv[0]).absolute()
    if not path.is_file():
        raise McaArgumentError(f"the recipe file {argv[0]} does not exist. Fix: check the path.")
    overrides = OmegaConf.from_cli(argv[1:])
    if argv[0].endswith(".json"):
        with open(path, encoding="utf-8") as f:
            base = OmegaConf.create(json.load(f))
    else:
        base = OmegaConf.load(path)
    recipe = OmegaConf.to_container(OmegaConf.merge(base, overrides))
    if not isinstance(recipe, dict):
        raise McaArgumentError(f"the recipe {argv[0]} is not a mapping of keys to values. Fix: write one "
                               "`key: value` per line.")
    return recipe


def _dataclass_fields_in_source(path: str) -> set[str]:
    """Names of the annotated class-level assignments of every class in a Python file (its dataclass fields)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
    return names


def llamafactory_keys() -> Optional[set[str]]:
    """Every key LLaMA-Factory's training parser knows (its hparams dataclasses and transformers' training
    arguments), read from their source files without importing them (that would import torch); None if not found.
    A superset at worst: the training processes check the exact set again."""
    import importlib.util

    names: set[str] = set()
    for package, files in (("llamafactory", ("hparams/model_args.py", "hparams/data_args.py",
                                             "hparams/training_args.py", "hparams/finetuning_args.py",
                                             "hparams/generating_args.py")),
                           ("transformers", ("training_args.py", "training_args_seq2seq.py"))):
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            return None
        root = list(spec.submodule_search_locations)[0]
        for name in files:
            path = os.path.join(root, name)
            if not os.path.isfile(path):
                return None
            names |= _dataclass_fields_in_source(path)
    return names


def launch_world_size() -> Optional[int]:
    """NNODES * NPROC_PER_NODE when both are known without counting GPUs (None: the launcher counts them)."""
    nproc = os.environ.get("NPROC_PER_NODE")
    if not nproc or not nproc.isdigit():
        return None
    nnodes = os.environ.get("NNODES", "1")
    return int(nproc) * int(nnodes) if nnodes.isdigit() else None


def refuse_unsupported_launch_modes() -> None:
    """USE_V1 / USE_RAY cannot run the Megatron backend: say so before torchrun or Ray start."""
    from llamafactory_mca.activation import is_enabled
    from llamafactory_mca.launch import refuse_ray, refuse_v1

    if is_enabled("USE_V1"):
        refuse_v1()
    if is_enabled("USE_RAY"):
        refuse_ray()


def check_recipe_before_launch(argv: list[str]) -> list[str]:
    """Check the recipe of `llamafactory-cli train ARGV`; return the notices to print; McaArgumentError if bad."""
    refuse_unsupported_launch_modes()
    recipe = read_recipe(argv)
    if recipe is None:
        return []
    from llamafactory_mca.parsing import extra_keys_allowed, unknown_keys_error
    from llamafactory_mca.plugins import flat, hook

    recipe, notices = check_recipe(recipe, launch_world_size())
    known = llamafactory_keys()
    if known is not None and not extra_keys_allowed():
        known |= field_names(*flat(hook().mca_argument_dataclasses()))
        unknown = [k for k in recipe if k not in known]
        if unknown:
            raise unknown_keys_error(unknown, known)
    return notices


def plan_instead_of_training(recipe: dict[str, Any]) -> int:
    """`plan_only: true`: the plan of this recipe on the launch's GPUs (NNODES x NPROC_PER_NODE, else the GPUs of
    this machine, as LLaMA-Factory's launcher counts them); nothing is launched, nothing written."""
    from llamafactory_mca.plan.command import run_plan
    from llamafactory_mca.plan.options import PlanArguments

    nodes = int(os.environ.get("NNODES", "1") or 1)
    gpus = launch_world_size()
    if gpus is None:
        from llamafactory.extras.misc import get_device_count

        gpus = max(get_device_count(), 1) * nodes
    options = PlanArguments(**{key: recipe[key] for key in field_names(PlanArguments) if key in recipe})
    print(f"plan_only: {gpus} GPUs on {nodes} node(s), {options.plan_gpu_memory} each; no training is launched",
          flush=True)
    try:
        return run_plan(recipe, gpus, nodes, str(options.plan_gpu_memory), search=bool(options.plan_search))
    except (McaArgumentError, ValueError) as err:
        report(f"error: {err}")
        return 2


def report(message: str) -> None:
    """Print one message for the user on stderr."""
    print(MESSAGE_PREFIX + message, file=sys.stderr, flush=True)


def checked_main(main: Callable[[], Any]) -> Callable[[], Any]:
    """`llamafactory.cli.main` with `train` taken over: the recipe checked first, then torchrun started as
    LLaMA-Factory's launcher starts it (`torchrun_launch.py`, without importing LLaMA-Factory's training stack
    here). `train -h` goes to torchrun unchecked, as upstream (the training process prints the keys, ours included).
    Other commands go to upstream's main."""

    def main_with_checks() -> Any:
        args = sys.argv[1:]
        if not args or args[0] != "train":
            return main()
        if not ({"-h", "--help"} & set(args)):
            try:
                notices = check_recipe_before_launch(args[1:])
            except McaArgumentError as err:
                report(f"error: {err}")
                raise SystemExit(2) from None
            for notice in notices:
                report(f"note: {notice}")
            os.environ[CHECKED_MARKER] = "1"
            recipe = read_recipe(args[1:])
            if recipe and recipe.get("plan_only"):
                raise SystemExit(plan_instead_of_training(recipe))
        from llamafactory_mca.torchrun_launch import launch_training

        raise SystemExit(launch_training(args[1:]))

    main_with_checks.__wrapped__ = main
    return main_with_checks
