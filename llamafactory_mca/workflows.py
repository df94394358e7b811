"""The built-in workflows, one per LLaMA-Factory stage, registered through the plugin hooks."""

from __future__ import annotations

import importlib
from typing import Callable

from llamafactory_mca.hookspecs import hookimpl

# stage -> (module, workflow function)
WORKFLOWS = {
    "pt": ("llamafactory_mca.trainer", "run_stage"),
    "sft": ("llamafactory_mca.trainer", "run_stage"),
    "rm": ("llamafactory_mca.training.rm", "run_rm"),
    "dpo": ("llamafactory_mca.training.dpo", "run_dpo"),
    "kto": ("llamafactory_mca.training.kto", "run_kto"),
}
STAGES = tuple(WORKFLOWS)


@hookimpl
def mca_supported_stages() -> list[str]:
    return list(STAGES)


@hookimpl
def mca_workflow(stage: str) -> Callable[..., None] | None:
    if stage not in WORKFLOWS:
        return None
    module, name = WORKFLOWS[stage]
    return getattr(importlib.import_module(module), name)
