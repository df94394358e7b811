"""The learning-rate schedule: the Hugging Face Trainer's, step for step, driving megatron's optimizer.

`lr_scheduler_type`, `lr_scheduler_kwargs`, `warmup_steps` / `warmup_ratio` mean what they mean for the HF Trainer
under LLaMA-Factory: the factor of each step comes from transformers' own `get_scheduler` (after LLaMA-Factory's
`create_custom_scheduler` has filled in its defaults, e.g. warmup_stable_decay's stable/decay split), and a
megatron `OptimizerParamScheduler` applies it, so the scheduler state saved in checkpoints keeps its format.
The module imports torch and megatron only inside functions: `SCHEDULES` is read by the launcher's checks.
"""

from __future__ import annotations

from typing import Any, Callable

# every `lr_scheduler_type` of transformers' SchedulerType that a training run without evaluation metrics can use
SCHEDULES = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "cosine_with_min_lr",
    "cosine_warmup_with_min_lr",
    "warmup_stable_decay",
)
# the schedules that need evaluation metrics to step, with the reason
REFUSED = {
    "reduce_lr_on_plateau": "it steps on evaluation metrics, which the Megatron loop does not feed to the scheduler",
    "greedy": "it steps on evaluation metrics, which the Megatron loop does not feed to the scheduler",
}


def schedule_name(training_args: Any) -> str:
    """`lr_scheduler_type` as a plain string (HF stores a SchedulerType enum)."""
    return str(getattr(training_args.lr_scheduler_type, "value", training_args.lr_scheduler_type))


def hf_lr_factor(training_args: Any, max_steps: int) -> Callable[[int], float]:
    """The HF Trainer's LR factor per step (LR of step k = learning_rate * factor(k)), for `max_steps` updates.

    Built with LLaMA-Factory's `create_custom_scheduler` (its defaults for warmup_stable_decay) and transformers'
    `get_scheduler` on a one-parameter stand-in optimizer, exactly as the HF Trainer calls them."""
    import torch
    from transformers.optimization import get_scheduler

    name = schedule_name(training_args)
    if name not in SCHEDULES:
        from llamafactory_mca.args import McaArgumentError

        why = REFUSED.get(name, "it is not a schedule of transformers' get_scheduler")
        raise McaArgumentError(f"`lr_scheduler_type`: '{name}' cannot be used by the Megatron backend ({why}). "
                               f"Fix: use one of {', '.join(SCHEDULES)}.")
    from llamafactory.train.trainer_utils import create_custom_scheduler

    create_custom_scheduler(training_args, max_steps)  # fills LLaMA-Factory's own scheduler kwargs defaults
    # the schedules with absolute values (polynomial's lr_end, cosine_with_min_lr's min_lr) read the optimizer's lr
    stand_in = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=training_args.learning_rate)
    scheduler = get_scheduler(
        name,
        optimizer=stand_in,
        num_warmup_steps=training_args.get_warmup_steps(max_steps),
        num_training_steps=max_steps,
        scheduler_specific_kwargs=dict(training_args.lr_scheduler_kwargs or {}),
    )
    return scheduler.lr_lambdas[0]


def build_scheduler(optimizer: Any, training_args: Any, max_steps: int) -> Any:
    """megatron's OptimizerParamScheduler around `optimizer`, giving each step the HF Trainer's learning rate
    (weight decay constant at `weight_decay`). Step with `scheduler.step(increment=1)` after each update."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    factor = hf_lr_factor(training_args, max_steps)

    class HFScheduleParamScheduler(OptimizerParamScheduler):
        """megatron's scheduler whose LR per step is the HF schedule's (state_dict unchanged)."""

        def get_lr(self, param_group: dict) -> float:
            return param_group.get("max_lr", self.max_lr) * factor(self.num_steps)

    return HFScheduleParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=training_args.learning_rate,
        min_lr=0.0,
        lr_warmup_steps=0,
        lr_decay_steps=max(max_steps, 1),
        lr_decay_style="constant",
        start_wd=training_args.weight_decay,
        end_wd=training_args.weight_decay,
        wd_incr_steps=max(max_steps, 1),
        wd_incr_style="constant",
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
