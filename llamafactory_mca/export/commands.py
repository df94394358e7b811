"""The command-line entry points `merge_command` / `convert_command` (`llamafactory-mca merge|convert`,
`python -m llamafactory_mca.export merge|convert`). Argument parsing, with every form of LLaMA-Factory's own
`scripts/megatron_merge.py`, lives in `llamafactory_mca.merge_cli`."""

from __future__ import annotations

import sys
from typing import Optional


def merge_command(argv: list[str]) -> int:
    """`llamafactory-mca merge [CKPT] --output_path DIR ...`: every form of LLaMA-Factory's scripts/megatron_merge.py
    and ours (`llamafactory_mca.merge_cli`)."""
    from llamafactory_mca.merge_cli import main as merge_main

    return merge_main(argv)


def convert_command(argv: list[str]) -> int:
    """`llamafactory-mca convert --model_name_or_path HF_DIR --output_path DIR [--tensor_model_parallel_size N ...]`
    (`llamafactory_mca.merge_cli`)."""
    from llamafactory_mca.merge_cli import main as merge_main

    return merge_main(argv, convert=True)


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m llamafactory_mca.export merge|convert ...`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("merge", "convert"):
        print("usage: python -m llamafactory_mca.export {merge,convert} ...", file=sys.stderr)
        return 2
    return (merge_command if argv[0] == "merge" else convert_command)(argv[1:])
