"""The whole-recipe check that needs neither torch nor LLaMA-Factory: run by the launching process before torchrun
starts (`prelaunch.py`) and again by each training process (`parsing.py`), on the recipe as a plain dict.

Order: mcore_adapter keys resolved, LLaMA-Factory keys checked, our Megatron keys typed and validated (with the
model's config.json when it is a local directory). Returns the recipe to parse (translated keys, `deepspeed`
dropped) and the notices to print once.
"""

from __future__ import annotations

from typing import Any, Optional

from llamafactory_mca.args import MegatronArguments, field_names, megatron_args_from_dict, validate_megatron_args
from llamafactory_mca.mcore_adapter_keys import translate_upstream_keys
from llamafactory_mca.recipe_checks import check_llamafactory_keys
from llamafactory_mca.training.loss_weighting import check_loss_weighting

# set by the launching process for its torchrun children once the recipe passed and its notices were printed
CHECKED_MARKER = "LLAMAFACTORY_MCA_RECIPE_CHECKED"


def supported_stages() -> list[str]:
    """The stages of every installed workflow plugin."""
    from llamafactory_mca.plugins import flat, hook

    return flat(hook().mca_supported_stages())


def check_recipe(recipe: dict[str, Any], world_size: Optional[int]) -> tuple[dict[str, Any], list[str]]:
    """(the recipe to parse, notices) or McaArgumentError naming the first bad key and its fix."""
    from llamafactory_mca.training.lr_schedule import SCHEDULES

    recipe = translate_upstream_keys(recipe)
    recipe, notices = check_llamafactory_keys(recipe, stages=supported_stages(), schedules=SCHEDULES)
    ours = field_names(MegatronArguments)
    m = megatron_args_from_dict({k: v for k, v in recipe.items() if k in ours})
    validate_megatron_args(m, world_size, recipe.get("model_name_or_path"))
    check_loss_weighting(m.loss_weighting, recipe.get("stage", "sft"))
    return recipe, notices
