"""Learning rate per step: ours (megatron's scheduler driven by `training.lr_schedule`) equals what the Hugging Face
Trainer under LLaMA-Factory gives, for every `lr_scheduler_type`, with warmup and `lr_scheduler_kwargs`."""

from __future__ import annotations

import math

import pytest
import torch

from llamafactory_mca.training.lr_schedule import REFUSED, SCHEDULES, build_scheduler

TOTAL, LR = 23, 1e-3

CASES = [
    ("linear", dict(warmup_steps=3), {}),
    ("linear", dict(), {}),
    ("cosine", dict(warmup_ratio=0.1), {}),
    ("cosine", dict(warmup_steps=2), {"num_cycles": 0.3}),
    ("cosine_with_restarts", dict(warmup_steps=2), {"num_cycles": 3}),
    ("polynomial", dict(warmup_steps=4), {"power": 2.0, "lr_end": 1e-5}),
    ("constant", dict(warmup_steps=5), {}),  # HF's constant has no warmup
    ("constant_with_warmup", dict(warmup_steps=4), {}),
    ("inverse_sqrt", dict(warmup_steps=3), {}),
    ("inverse_sqrt", dict(warmup_steps=3), {"timescale": 7}),
    ("cosine_with_min_lr", dict(warmup_steps=2), {"min_lr_rate": 0.1}),
    ("cosine_with_min_lr", dict(warmup_steps=2), {"min_lr": 2e-4}),
    ("cosine_warmup_with_min_lr", dict(warmup_ratio=0.2), {"min_lr_rate": 0.05}),
    ("warmup_stable_decay", dict(warmup_steps=3), {}),  # LLaMA-Factory's 1/3 stable default
    ("warmup_stable_decay", dict(warmup_ratio=0.1), {"num_stable_steps": 8, "num_decay_steps": 9,
                                                     "decay_type": "cosine", "min_lr_ratio": 0.1}),
]


def _training_args(tmp_path, name, warmup, kwargs):
    from llamafactory.hparams import TrainingArguments

    return TrainingArguments(output_dir=str(tmp_path), learning_rate=LR, lr_scheduler_type=name,
                             lr_scheduler_kwargs=dict(kwargs), weight_decay=0.01, report_to="none", **warmup)


def _hf_trainer_lrs(tmp_path, name, warmup, kwargs) -> list[float]:
    """The HF Trainer's own scheduler, as LLaMA-Factory's trainers create it (create_custom_scheduler first)."""
    from llamafactory.train.trainer_utils import create_custom_scheduler
    from transformers import Trainer

    args = _training_args(tmp_path / "hf", name, warmup, kwargs)
    trainer = Trainer(model=torch.nn.Linear(2, 2), args=args)
    create_custom_scheduler(trainer.args, TOTAL)
    trainer.create_optimizer_and_scheduler(num_training_steps=TOTAL)
    lrs = []
    for _ in range(TOTAL):
        lrs.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    return lrs


class _MegatronLikeOptimizer:
    """What megatron's scheduler touches: param_groups (two groups, as megatron's with/without weight decay)."""

    def __init__(self) -> None:
        self.param_groups = [{"lr": 0.0, "weight_decay": 0.0}, {"lr": 0.0, "weight_decay": 0.0, "wd_mult": 0.0}]


@pytest.mark.parametrize("name,warmup,kwargs", CASES)
def test_lr_per_step_equals_hf_trainer(tmp_path, name, warmup, kwargs):
    theirs = _hf_trainer_lrs(tmp_path, name, warmup, kwargs)
    args = _training_args(tmp_path / "ours", name, warmup, kwargs)
    optimizer = _MegatronLikeOptimizer()
    ours = build_scheduler(optimizer, args, TOTAL)
    resumed_at = TOTAL // 2
    for step in range(TOTAL):
        if step == resumed_at:  # a resumed run: a fresh scheduler loading the saved state
            state = ours.state_dict()
            optimizer = _MegatronLikeOptimizer()
            ours = build_scheduler(optimizer, _training_args(tmp_path / "ours2", name, warmup, kwargs), TOTAL)
            ours.load_state_dict(state)
        lr = optimizer.param_groups[0]["lr"]
        assert math.isclose(lr, theirs[step], rel_tol=1e-12, abs_tol=1e-15), (name, step, lr, theirs[step])
        assert optimizer.param_groups[1]["lr"] == lr
        assert optimizer.param_groups[0]["weight_decay"] == 0.01 and optimizer.param_groups[1]["weight_decay"] == 0.0
        ours.step(increment=1)
    assert len({round(x, 15) for x in theirs}) > 1 or name == "constant"  # the cases exercise a real schedule


def test_every_training_schedule_of_transformers_is_covered():
    from transformers.trainer_utils import SchedulerType

    names = {s.value for s in SchedulerType}
    assert names == set(SCHEDULES) | set(REFUSED)
    assert set(SCHEDULES) == {name for name, _, _ in CASES}


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_metric_driven_schedules_are_refused_naming_the_key(tmp_path, name):
    from llamafactory_mca.args import McaArgumentError

    args = _training_args(tmp_path, name, dict(eval_strategy="steps", eval_steps=5), {})  # HF needs evaluation
    with pytest.raises(McaArgumentError, match=r"`lr_scheduler_type`: '.*' cannot be used .*Fix: use one of"):
        build_scheduler(_MegatronLikeOptimizer(), args, 10)
