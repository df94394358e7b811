"""megatron-core DistributedDataParallel around the model chunks, as the training loop uses them."""

from __future__ import annotations

from typing import Any, Sequence

import torch


def wrap_ddp(mca_args: Any, models: Sequence[torch.nn.Module], ddp_config: Any = None) -> list:
    """megatron-core DDP around each model chunk (gradient buckets only for the first chunk), configured from
    our Megatron arguments unless `ddp_config` is given (the chunk's `ModelState` is found through the wrapper:
    `models.model_state.model_state`)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    if ddp_config is None:
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=mca_args.accumulate_allreduce_grads_in_fp32,
            overlap_grad_reduce=mca_args.overlap_grad_reduce,
            overlap_param_gather=mca_args.overlap_param_gather,
            use_distributed_optimizer=mca_args.use_distributed_optimizer,
            check_for_nan_in_grad=bool(getattr(mca_args, "check_for_nan_in_loss_and_grad", False)),
            average_in_collective=False,  # the loss is token-weighted over all ranks: sum, do not average
            bucket_size=getattr(mca_args, "ddp_bucket_size", None),
        )
    wrapped = []
    for i, model in enumerate(models):
        ddp = DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model,
                                      disable_bucketing=i > 0)
        wrapped.append(ddp)
    return wrapped
