"""Megatron checkpoint -> Hugging Face (merge, LoRA merge) and Hugging Face -> Megatron checkpoint (convert).

  files.py        output directories, config / bridge / dtype of a checkpoint (shared by the others)
  merge.py        `merge_checkpoint`: a checkpoint of any layout -> HF safetensors, streamed unit by unit
  lora_merge.py   `merge_lora_checkpoint`: a LoRA checkpoint -> PEFT adapter, or base model + adapter merged
  convert.py      `convert_hf_to_megatron`: an HF model -> a checkpoint that loads into any layout
  commands.py     the argparse front-ends `merge_command`, `convert_command` (`python -m llamafactory_mca.export`)
  llamafactory_cli.py `export_from_llamafactory_args`: `llamafactory-cli export` of a Megatron checkpoint
The safetensors writer they share with the bridge's export is `models.safetensors_io.StreamingSafetensorsWriter`.
"""

from llamafactory_mca.checkpoint import MARKER_FILE
from llamafactory_mca.export.commands import convert_command, merge_command
from llamafactory_mca.export.convert import convert_hf_to_megatron
from llamafactory_mca.export.files import check_output_dir
from llamafactory_mca.export.llamafactory_cli import export_from_llamafactory_args
from llamafactory_mca.export.lora_merge import (
    adapter_from_checkpoint,
    is_lora_checkpoint,
    merge_lora_checkpoint,
    resolve_base_model,
)
from llamafactory_mca.export.merge import merge_checkpoint, single_process_parallel
from llamafactory_mca.models.model_state import unwrap_model
from llamafactory_mca.models.safetensors_io import StreamingSafetensorsWriter

__all__ = [
    "MARKER_FILE",
    "StreamingSafetensorsWriter",
    "adapter_from_checkpoint",
    "check_output_dir",
    "convert_command",
    "convert_hf_to_megatron",
    "export_from_llamafactory_args",
    "is_lora_checkpoint",
    "merge_checkpoint",
    "merge_command",
    "merge_lora_checkpoint",
    "resolve_base_model",
    "single_process_parallel",
    "unwrap_model",
]
