"""Merge a Megatron checkpoint into a Hugging Face model: LLaMA-Factory's script, with all of its forms.

    python scripts/megatron_merge.py saves/mca/run/checkpoint-50 --output_path saves/hf --bf16
    python scripts/megatron_merge.py --checkpoint_path CKPT --bf16 True --convert_model_max_length 8192   # -> ./output
    python scripts/megatron_merge.py --checkpoint_path HF_DIR --output_path MCA_DIR --tensor_model_parallel_size 2

Same as `llamafactory-mca merge ...` (llamafactory_mca/merge_cli.py): checkpoints of llamafactory-mca and of
LLaMA-Factory's own USE_MCA mode (any tp/pp/vpp/ep layout, one process, no GPU); a Hugging Face model directory
is converted the other way, into a llamafactory-mca checkpoint. `-h` lists every option.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    from llamafactory_mca.merge_cli import main

    raise SystemExit(main(sys.argv[1:]))
