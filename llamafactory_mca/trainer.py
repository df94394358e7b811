"""Entry point of the Megatron trainer for stages pt / sft; the implementation lives in `llamafactory_mca.training`.

`run_stage(mca_args, model_args, data_args, training_args, finetuning_args, generating_args, callbacks)` is what
`workflows.py` returns for both stages.
"""

from __future__ import annotations

from typing import Any


def run_stage(mca_args: dict[type, Any], model_args: Any, data_args: Any, training_args: Any, finetuning_args: Any,
              generating_args: Any, callbacks: list) -> None:
    from llamafactory_mca.training.loop import run_stage as _run_stage

    _run_stage(mca_args, model_args, data_args, training_args, finetuning_args, generating_args, callbacks)
