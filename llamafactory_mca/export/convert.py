"""Hugging Face model -> llamafactory-mca checkpoint (convert)."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Optional

import torch

from llamafactory_mca.checkpoint import CheckpointError
from llamafactory_mca.export.files import bridge_for_config, check_output_dir, config_dtype


def convert_hf_to_megatron(
    model_name_or_path: str,
    output_path: str,
    mca_args: Any = None,
    dtype: Optional[torch.dtype] = None,
    overwrite: bool = False,
) -> str:
    """Write the HF model at `model_name_or_path` as a llamafactory-mca checkpoint (model only) at `output_path`.

    The torch_dist format reshards on load, so the checkpoint loads into any layout; `mca_args` (the layout
    asked for) is recorded. Launched with torchrun, the model is built in that layout across the ranks;
    in one process it is built with tp=pp=ep=1.
    """
    import torch.distributed as dist
    from transformers import AutoConfig, AutoTokenizer

    from llamafactory_mca import platform
    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.checkpoint import write_checkpoint

    output_path = os.path.normpath(output_path)
    check_output_dir(output_path, overwrite)
    if not os.path.isfile(os.path.join(model_name_or_path, "config.json")):
        raise CheckpointError(
            f"{model_name_or_path} is not a local Hugging Face model directory (no config.json). Fix: download it "
            "first (e.g. `huggingface-cli download NAME --local-dir DIR`) and pass DIR."
        )
    hf_config = AutoConfig.from_pretrained(model_name_or_path)
    bridge = bridge_for_config(hf_config, model_name_or_path)
    requested = mca_args or MegatronArguments()
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    build_args = requested if launched else MegatronArguments()
    if dtype is None:
        dtype = config_dtype(hf_config, torch.float32)
    tokenizer = None
    with contextlib.suppress(Exception):
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    was_initialized = dist.is_available() and dist.is_initialized()
    platform.init_parallel(build_args, seed=0)
    try:
        models = bridge.build_model(hf_config, build_args, dtype, wrap_with_ddp=False, init_weights=False)
        bridge.load_hf_weights(models, model_name_or_path)
        write_checkpoint(output_path, 0, models, mca_args=requested, hf_config=hf_config, tokenizer=tokenizer,
                         trainer_state={"global_step": 0}, save_rng=False)
    finally:
        if not was_initialized:
            platform.destroy_parallel()
    return output_path
