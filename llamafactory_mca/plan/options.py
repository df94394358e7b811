"""The recipe keys of `plan_only` (torch-free: the launching process reads them before torchrun)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PlanArguments:
    """`USE_MCA=1 llamafactory-cli train recipe.yaml plan_only=true`: print `llamafactory-mca plan` for this recipe
    on the launch's GPUs (NNODES x NPROC_PER_NODE, else the GPUs of this machine) and exit before torchrun starts;
    exit code 0 when it fits, 1 when it does not."""

    plan_only: bool = False
    plan_gpu_memory: str = "80GiB"  # memory of one GPU, as `plan --gpu-memory`
    plan_search: bool = False  # also rank every layout of these GPUs that fits, as `plan --search`
