"""The built-in workflows, one per LLaMA-Factory stage, registered through the plugin hooks."""

from __future__ import annotations

from typing import Callable

from llamafactory_mca.hookspecs import hookimpl

STAGES = ("pt", "sft", "dpo")


@hookimpl
def mca_supported_stages() -> list[str]:
    return list(STAGES)


@hookimpl
def mca_workflow(stage: str) -> Callable[..., None] | None:
    if stage not in STAGES:
        return None
    if stage == "dpo":
        from llamafactory_mca.training.dpo import run_dpo

        return run_dpo
    from llamafactory_mca import trainer

    return trainer.run_stage
