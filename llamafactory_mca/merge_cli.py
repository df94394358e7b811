"""`llamafactory-mca merge` / `convert` and `scripts/megatron_merge.py`: every invocation of LLaMA-Factory's own
(fire-based) `scripts/megatron_merge.py` works unchanged, plus our own flags.

Upstream's script (LLaMA-Factory `scripts/megatron_merge.py`, `convert`): `checkpoint_path` positionally or as
`--checkpoint_path`; `--output_path` (default `./output`); `--bf16` / `--fp16` as flags or with a value
(`--bf16 True`, `--bf16=false`); `--convert_model_max_length N` (sets `model_max_length` in the written
config.json); and when the path holds no Megatron checkpoint, the other direction: Hugging Face -> Megatron with
`--tensor_model_parallel_size`, `--pipeline_model_parallel_size`, `--expert_model_parallel_size`,
`--virtual_pipeline_model_parallel_size`, `--moe_grouped_gemm`. Fire also takes `--output-path` for
`--output_path` and `--nobf16` for `--bf16 False`; so do we.

What the input path is decides what happens (for `merge`, `convert` and the script alike):
  a llamafactory-mca checkpoint (`mca_checkpoint.json`)   -> Hugging Face model (merge)
  an upstream USE_MCA checkpoint (`mca_config.json`)      -> Hugging Face model (merge); with `convert`, a
                                                             llamafactory-mca checkpoint (through a Hugging
                                                             Face model in a temporary directory)
  a Hugging Face model directory (`config.json`)          -> llamafactory-mca checkpoint (convert)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any

BOOL_FLAGS = ("bf16", "fp16", "fp32", "overwrite_output_dir", "merge_lora", "moe_grouped_gemm")
_TRUE = ("true", "1", "yes", "y", "on", "t")
_FALSE = ("false", "0", "no", "n", "off", "f", "none")
LAYOUT_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
               "expert_model_parallel_size", "expert_tensor_parallel_size", "context_parallel_size")


class MergeUsageError(ValueError):
    """A command line that cannot be honoured; the message names the flag and the fix."""


def normalize_fire_argv(argv: list[str]) -> list[str]:
    """Rewrite fire-style arguments into argparse ones: `--a-b` -> `--a_b`, `--flag True|False` and
    `--flag=value` for the boolean flags -> `--flag` or nothing, `--noflag` -> nothing."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--") or arg == "--":
            out.append(arg)
            continue
        name, eq, value = arg[2:].partition("=")
        name = name.replace("-", "_")
        if name.startswith("no") and name[2:] in BOOL_FLAGS and not eq:
            continue  # fire's --noflag
        if name in BOOL_FLAGS:
            if not eq and i < len(argv) and argv[i].lower() in _TRUE + _FALSE:
                value, eq = argv[i], "="
                i += 1
            if eq:
                if value.lower() in _TRUE:
                    out.append(f"--{name}")
                elif value.lower() not in _FALSE:
                    raise MergeUsageError(f"--{name}: {value!r} is not a boolean. Fix: --{name} True or --{name} "
                                          "False (or --" + name + " alone).")
                continue
            out.append(f"--{name}")
            continue
        out.append(f"--{name}" + (f"={value}" if eq else ""))
    return out


def build_parser(prog: str, convert: bool) -> argparse.ArgumentParser:
    """One parser for merge and convert: the upstream script's arguments and ours."""
    what = ("Convert a Hugging Face model into a llamafactory-mca Megatron checkpoint (model weights only; usable as "
            "resume_from_checkpoint or with merge; it loads into any parallel layout)" if convert else
            "Merge a Megatron checkpoint (any tp/pp/vpp/ep layout; ours or one written by LLaMA-Factory's own "
            "USE_MCA mode) into Hugging Face safetensors, config and tokenizer. One process, no GPU; memory about "
            "one decoder layer. A LoRA checkpoint gives its PEFT adapter, or with --merge_lora the base model with "
            "the adapter merged in")
    p = argparse.ArgumentParser(
        prog=prog, description=what + ". As LLaMA-Factory's scripts/megatron_merge.py, a Hugging Face model "
        "directory as input is converted the other way. Boolean flags also take a value (--bf16 True).")
    p.add_argument("paths", nargs="*", default=[], metavar="PATH", help="the input directory (or --checkpoint_path "
                   "/ --model_name_or_path), then optionally the output directory (or --output_path), as fire "
                   "passes upstream's positional arguments")
    p.add_argument("--checkpoint_path", default=None, help="a checkpoint-N directory, or a Hugging Face model "
                   "directory to convert into a Megatron checkpoint")
    p.add_argument("--model_name_or_path", default=None, help="same as --checkpoint_path")
    p.add_argument("--output_path", default=None, help="a new (or empty) output directory (default ./output)")
    p.add_argument("--bf16", action="store_true", help="save bfloat16 weights")
    p.add_argument("--fp16", action="store_true", help="save float16 weights")
    p.add_argument("--fp32", action="store_true", help="save float32 weights")
    p.add_argument("--convert_model_max_length", type=int, default=None,
                   help="merge: set model_max_length in the written config.json")
    p.add_argument("--max_shard_size", default="5GB", help="merge: largest safetensors shard, e.g. 5GB (default)")
    p.add_argument("--overwrite_output_dir", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--merge_lora", action="store_true", help="LoRA checkpoints: write the base model with the adapter "
                   "merged in (a full model) instead of the PEFT adapter")
    p.add_argument("--base_model", default=None, help="LoRA checkpoints with --merge_lora: the base Hugging Face model "
                   "directory (default: the one recorded at training time)")
    for key in LAYOUT_KEYS:
        p.add_argument(f"--{key}", type=int, default=None, help="convert: the layout recorded in the checkpoint")
    p.add_argument("--moe_grouped_gemm", action="store_true", help="convert: recorded with the layout (the checkpoint "
                   "is the same either way: torch_dist tensors load into grouped and per-expert MLPs alike)")
    return p


def _dtype(ns: argparse.Namespace):
    import torch

    chosen = [name for name in ("bf16", "fp16", "fp32") if getattr(ns, name)]
    if len(chosen) > 1:
        raise MergeUsageError(f"choose one of --bf16/--fp16/--fp32, got {', '.join('--' + c for c in chosen)}")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[chosen[0]] if chosen else None


def _resolve_positionals(ns: argparse.Namespace) -> None:
    """fire's positional order of upstream's `convert(checkpoint_path, output_path, ...)`."""
    if len(ns.paths) > 2:
        raise MergeUsageError(f"too many positional arguments {ns.paths}. Fix: pass the input directory and at most "
                              "the output directory positionally, everything else as --flags.")
    ns.path = ns.paths[0] if ns.paths else None
    if len(ns.paths) == 2:
        if ns.output_path not in (None, ns.paths[1]):
            raise MergeUsageError(f"two different outputs {[ns.paths[1], ns.output_path]}. Fix: pass one (positionally "
                                  "or as --output_path).")
        ns.output_path = ns.paths[1]
    if ns.output_path is None:
        ns.output_path = "./output"


def _input_path(ns: argparse.Namespace) -> str:
    given = [v for v in (ns.path, ns.checkpoint_path, ns.model_name_or_path) if v]
    if not given:
        raise MergeUsageError("no input: pass the checkpoint (or Hugging Face model) directory, positionally or as "
                              "--checkpoint_path DIR.")
    if len(set(given)) > 1:
        raise MergeUsageError(f"two different inputs {given}. Fix: pass one directory (positionally, or as "
                              "--checkpoint_path / --model_name_or_path).")
    return given[0]


def set_model_max_length(hf_dir: str, length: int) -> None:
    """`--convert_model_max_length`: `model_max_length` in config.json, as upstream's script writes it."""
    path = os.path.join(hf_dir, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["model_max_length"] = int(length)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")


def _layout_args(ns: argparse.Namespace, source: str):
    from llamafactory_mca.args import MegatronArguments, validate_megatron_args

    layout = {k: getattr(ns, k) for k in LAYOUT_KEYS if getattr(ns, k) is not None}
    m = MegatronArguments(**layout, moe_grouped_gemm=bool(ns.moe_grouped_gemm))
    # one process builds the model with tp=pp=ep=1 and records the layout: check it as if launched to fit
    world = int(os.environ.get("WORLD_SIZE") or 1)
    validate_megatron_args(m, world if world > 1 else m.model_parallel_size * m.expert_model_parallel_size, source)
    return m


def _to_megatron(ns: argparse.Namespace, source: str, dtype: Any) -> str:
    from llamafactory_mca.export import convert_hf_to_megatron

    return convert_hf_to_megatron(source, ns.output_path, _layout_args(ns, source), dtype, ns.overwrite_output_dir)


def run(ns: argparse.Namespace, convert: bool) -> str:
    """Carry out a parsed merge / convert command line; returns a line saying what was written."""
    from llamafactory_mca.checkpoint import is_megatron_checkpoint
    from llamafactory_mca.export import merge_checkpoint
    from llamafactory_mca.upstream_checkpoint import is_upstream_checkpoint, merge_upstream_checkpoint

    path = _input_path(ns)
    dtype = _dtype(ns)
    if not os.path.isdir(path):
        raise MergeUsageError(f"{path} does not exist or is not a directory. Fix: pass a checkpoint-N directory (or "
                              "a Hugging Face model directory to convert).")
    if is_megatron_checkpoint(path):
        if convert:
            raise MergeUsageError(f"{path} already is a llamafactory-mca checkpoint (it loads into any layout). Fix: "
                                  f"use it as it is, or `llamafactory-mca merge {path}` for a Hugging Face model.")
        out = merge_checkpoint(path, ns.output_path, dtype, ns.max_shard_size, ns.overwrite_output_dir,
                               merge_lora=ns.merge_lora, base_model=ns.base_model)
    elif is_upstream_checkpoint(path) and not convert:
        out = merge_upstream_checkpoint(path, ns.output_path, dtype, ns.max_shard_size, ns.overwrite_output_dir)
    elif is_upstream_checkpoint(path):
        with tempfile.TemporaryDirectory(prefix=".upstream-hf-", dir=os.path.dirname(os.path.abspath(ns.output_path))
                                         ) as tmp:
            hf_dir = merge_upstream_checkpoint(path, os.path.join(tmp, "hf"), dtype)
            return f"converted {path} (LLaMA-Factory USE_MCA checkpoint) -> {_to_megatron(ns, hf_dir, dtype)}"
    elif os.path.isfile(os.path.join(path, "config.json")):
        # upstream's script: a path without a Megatron checkpoint is converted Hugging Face -> Megatron
        if ns.convert_model_max_length is not None:
            print("note: --convert_model_max_length applies to Megatron -> Hugging Face merges; not used here",
                  file=sys.stderr)
        return f"converted {path} -> {_to_megatron(ns, path, dtype)}"
    else:
        from llamafactory_mca.checkpoint import checkpoint_info

        checkpoint_info(path)  # raises, naming what the directory is and the fix
        raise MergeUsageError(f"{path}: not a checkpoint")
    if ns.convert_model_max_length is not None:
        set_model_max_length(out, ns.convert_model_max_length)
    return f"merged {path} -> {out}"


def main(argv: list[str], convert: bool = False) -> int:
    """Entry point of `llamafactory-mca merge` (convert=False), `llamafactory-mca convert` and the script."""
    from llamafactory_mca.args import McaArgumentError
    from llamafactory_mca.checkpoint import CheckpointError

    prog = "llamafactory-mca convert" if convert else "llamafactory-mca merge"
    parser = build_parser(prog, convert)
    try:
        ns = parser.parse_args(normalize_fire_argv(list(argv)))
        _resolve_positionals(ns)
        print(run(ns, convert))
    except (MergeUsageError, CheckpointError, McaArgumentError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


__all__ = ["BOOL_FLAGS", "MergeUsageError", "build_parser", "main", "normalize_fire_argv", "run",
           "set_model_max_length"]
