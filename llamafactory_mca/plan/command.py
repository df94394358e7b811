"""`llamafactory-mca plan recipe.yaml --gpus N [--nodes M] [--gpu-memory 80GiB] [--search] [--plot out.png]`."""

from __future__ import annotations

import argparse
import re
import sys
from typing import Optional

from llamafactory_mca.args import McaArgumentError, validate_megatron_args


def parse_memory(text: str) -> int:
    """Bytes of '80GiB', '80GB' (taken as GiB, as GPU vendors mean it), '141 GiB' or '96000MiB'."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([GMT])I?B?\s*", text.upper())
    if not m:
        raise McaArgumentError(f"--gpu-memory: cannot read {text!r}. Fix: give it as e.g. 80GiB or 141GiB.")
    return int(float(m.group(1)) * {"M": 1024**2, "G": 1024**3, "T": 1024**4}[m.group(2)])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="llamafactory-mca plan",
        description="Memory per rank, batch arithmetic and layout search for a training recipe on N GPUs, before "
        "any GPU is used: the model of each pipeline stage is built on the meta device on this CPU (no weights "
        "read; the model's config.json must be local).",
    )
    p.add_argument("recipe", help="a training YAML (the one given to llamafactory-cli train)")
    p.add_argument("--gpus", type=int, required=True, help="total number of GPUs")
    p.add_argument("--nodes", type=int, default=1, help="number of nodes (TP stays inside a node); default 1")
    p.add_argument("--gpu-memory", default="80GiB", help="memory of one GPU, e.g. 80GiB (default), 141GiB")
    p.add_argument("--search", action="store_true", help="rank every layout of these GPUs that fits")
    p.add_argument("--top", type=int, default=5, help="layouts shown by --search (default 5)")
    p.add_argument("--plot", default=None, help="write a stacked bar chart of memory per rank to this PNG")
    return p


def plan_command(argv: list[str], out=None) -> int:
    """Entry point of `llamafactory-mca plan`; returns 0 when the recipe fits, 1 when it does not (or on a bad
    argument, with the key and the fix)."""
    out = out or sys.stdout
    ns = _parser().parse_args(argv)
    try:
        return _run(ns, out)
    except (McaArgumentError, RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def _run(ns: argparse.Namespace, out) -> int:
    from llamafactory_mca.plan.recipe import read_recipe

    return run_plan(read_recipe(ns.recipe), ns.gpus, ns.nodes, ns.gpu_memory, search=ns.search, top=ns.top,
                    plot=ns.plot, out=out)


def run_plan(recipe: dict, gpus: int, nodes: int = 1, gpu_memory: str = "80GiB", search: bool = False, top: int = 5,
             plot: Optional[str] = None, out=None) -> int:
    """Print the plan of `recipe` on `gpus` GPUs over `nodes` nodes (and the ranked layouts with `search`); 0 when it
    fits, 1 when it does not. McaArgumentError / ValueError name the key and the fix."""
    from llamafactory_mca.plan.meta import layer_template
    from llamafactory_mca.plan.planner import make_plan
    from llamafactory_mca.plan.recipe import (
        freeze_rule,
        hf_config_of,
        megatron_args,
        recipe_lines,
        training_dtype,
        workload_of,
    )
    from llamafactory_mca.plan.report import plan_text, plot_memory, search_text
    from llamafactory_mca.plan.search import search as search_layouts
    from llamafactory_mca.plan.search import smallest_fix

    out = out or sys.stdout
    if gpus < 1 or nodes < 1 or gpus % nodes:
        raise McaArgumentError(f"--gpus {gpus} / --nodes {nodes}: the GPUs must split evenly over the nodes. "
                               "Fix: pass the total GPU count, a multiple of --nodes.")
    gpu_bytes = parse_memory(gpu_memory)
    m = megatron_args(recipe)
    model_path = recipe.get("model_name_or_path")
    validate_megatron_args(m, gpus, model_path)
    hf_config = hf_config_of(recipe)
    from llamafactory_mca.models import get_bridge

    bridge = get_bridge(hf_config)
    workload = workload_of(recipe, gpus)
    dtype = training_dtype(recipe)
    freeze = freeze_rule(recipe)
    template = layer_template(bridge, hf_config, dtype, freeze=freeze)
    plan = make_plan(hf_config, bridge, m, workload, gpu_bytes, template, exact=True, freeze=freeze, dtype=dtype)
    if recipe.get("finetuning_type", "lora") != "full":
        plan.notes.append(f"finetuning_type {recipe.get('finetuning_type', 'lora')}: planned as full fine-tuning "
                          "(an upper bound; adapters / frozen layers need less)")
    print(plan_text(plan), file=out)
    gpus_per_node = gpus // nodes
    if not plan.fits:
        fix = smallest_fix(plan, hf_config, bridge, template, gpus_per_node)
        if fix is None:
            print("smallest change that fits: none found on these GPUs (more GPUs, a shorter cutoff_len or LoRA)",
                  file=out)
        else:
            what, fixed = fix
            print(f"smallest change that fits: {what} -> peak {fixed.peak / 1024**3:.1f} GiB", file=out)
            for line in recipe_lines(fixed.mca_args, recipe):
                print("    " + line, file=out)
    if search:
        ranked = search_layouts(hf_config, bridge, m, workload, gpu_bytes, template, gpus_per_node)
        print("", file=out)
        print(search_text(ranked, recipe, top), file=out)
    if plot:
        print(f"plot: {plot_memory(plan, plot)}", file=out)
    return 0 if plan.fits else 1


__all__ = ["parse_memory", "plan_command", "run_plan"]


def main(argv: Optional[list[str]] = None) -> int:  # python -m llamafactory_mca.plan.command
    return plan_command(list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())
