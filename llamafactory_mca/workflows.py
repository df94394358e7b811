"""The built-in workflows, one per LLaMA-Factory stage, registered through the plugin hooks."""

from __future__ import annotations

from typing import Any, Callable

from llamafactory_mca.hookspecs import hookimpl

STAGES = ("pt", "sft")


@hookimpl
def mca_supported_stages() -> list[str]:
    return list(STAGES)


@hookimpl
def mca_workflow(stage: str) -> Callable[..., None] | None:
    if stage not in STAGES:
        return None
    from llamafactory_mca import trainer

    return trainer.run_stage
