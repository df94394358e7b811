"""Every hook of llamafactory-mca, one docstring each.

A plugin is a module (or object) with functions decorated by `llamafactory_mca.hookimpl`, announced through
an entry point in the `llamafactory_mca` group of its distribution's metadata::

    [project.entry-points.llamafactory_mca]
    my_family = "my_package.my_bridge"

Our own built-in pieces (arguments, workflows, model bridges, CLI commands) implement the same hooks; they
are registered first, from the explicit list `plugins.DEFAULT_PLUGINS`, then the entry points (`plugins.py`).
Set `LLAMAFACTORY_MCA_TRACE=1` to print every hook call and its results.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    from llamafactory_mca.models.bridge import ModelBridge

PROJECT = "llamafactory_mca"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def mca_argument_dataclasses() -> list[type]:
    """Dataclass types whose fields become extra keys of the training YAML / command line.

    Their fields are parsed beside LLaMA-Factory's own arguments; a field name that LLaMA-Factory also
    defines is an error at start-up. The parsed instances reach `mca_validate_args` and the workflows.
    """


@hookspec
def mca_validate_args(mca_args: dict[type, Any], lf_args: tuple, world_size: int) -> None:
    """Check the parsed arguments before anything is built; raise `McaArgumentError` naming key and fix.

    `mca_args` maps each dataclass type from `mca_argument_dataclasses` to its parsed instance, `lf_args` is
    LLaMA-Factory's (model, data, training, finetuning, generating) tuple.
    """


@hookspec(firstresult=True)
def mca_model_bridge(hf_config: Any) -> ModelBridge | None:
    """Return the bridge (config + weight mapping) for this Hugging Face config, or None if not yours.

    The first non-None result wins. Third-party plugins are registered after the built-ins (so asked first),
    and the built-in implementation is `trylast`: a third-party bridge always overrides a built-in one for the
    same `model_type`.
    """


@hookspec
def mca_supported_model_types() -> list[str]:
    """The Hugging Face `model_type` names this plugin's bridges handle (used in error messages and doctor)."""


@hookspec(firstresult=True)
def mca_workflow(stage: str) -> Callable[..., None] | None:
    """Return the function that runs LLaMA-Factory stage `stage` ('pt', 'sft', ...), or None.

    It is called as `workflow(mca_args, model_args, data_args, training_args, finetuning_args,
    generating_args, callbacks)`.
    """


@hookspec
def mca_supported_stages() -> list[str]:
    """The LLaMA-Factory stages this plugin's workflows implement (for the early 'unsupported stage' error)."""


@hookspec
def mca_callbacks(training_args: Any) -> list[Any]:
    """Extra `transformers.TrainerCallback` objects for the Megatron trainer (called once per run)."""


@hookspec
def mca_cli_commands() -> dict[str, Callable[[list[str]], int]]:
    """Sub-commands of `llamafactory-mca`: name -> function(argv) returning an exit code."""
