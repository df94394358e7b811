"""Merge a llamafactory-mca Megatron checkpoint into a Hugging Face model (the script LLaMA-Factory users know).

    python scripts/megatron_merge.py --checkpoint_path saves/mca/run/checkpoint-50 --output_path saves/hf --bf16

Same as `llamafactory-mca merge ...`: any tp/pp/vpp/ep layout, one process, no GPU; `-h` lists every option.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from llamafactory_mca.export import merge_command

    raise SystemExit(merge_command(sys.argv[1:]))
