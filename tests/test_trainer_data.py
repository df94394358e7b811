"""Unit tests of the trainer's HF-Trainer semantics that need no model: sample order, sharding, label shift,
learning-rate schedules. Each is checked against the transformers / accelerate code it mirrors."""

from __future__ import annotations

import math

import pytest
import torch

from llamafactory_mca.training import data as mdata


@pytest.mark.parametrize("n,bs,procs,drop_last", [
    (16, 2, 2, False), (17, 2, 2, False), (17, 3, 2, False), (5, 4, 2, False), (3, 2, 4, False),
    (17, 3, 2, True), (10, 1, 1, False), (11, 4, 1, False), (23, 2, 3, False), (23, 2, 3, True),
])
def test_shard_batches_matches_accelerate(n, bs, procs, drop_last):
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler

    indices = torch.randperm(n, generator=torch.Generator().manual_seed(n)).tolist()
    for rank in range(procs):
        ours = mdata.shard_batches(indices, bs, procs, rank, drop_last)
        sampler = BatchSampler(indices, bs, drop_last)
        if procs == 1:
            theirs = list(sampler)
        else:
            theirs = list(BatchSamplerShard(sampler, num_processes=procs, process_index=rank, split_batches=False,
                                            even_batches=True))
        assert ours == theirs, (rank, ours, theirs)


@pytest.mark.parametrize("seed,epoch", [(42, 0), (42, 1), (7, 3)])
def test_epoch_order_matches_seedable_sampler(seed, epoch):
    from accelerate.data_loader import SeedableRandomSampler

    sampler = SeedableRandomSampler(data_source=range(37), data_seed=seed)
    sampler.set_epoch(epoch)
    assert mdata.epoch_indices(37, seed, epoch, shuffle=True) == list(sampler)
    assert mdata.epoch_indices(5, seed, epoch, shuffle=False) == [0, 1, 2, 3, 4]


def test_label_shift_and_hf_token_count():
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    labels = torch.tensor([[-100, -100, 7, 8, -100, -100], [9, 10, 11, 12, 13, 14]])
    attn = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    mb = mdata.to_microbatch({"input_ids": ids, "labels": labels, "attention_mask": attn}, pad_token_id=0)
    # targets are aligned with outputs: position t predicts token t+1
    assert mb.loss_mask.tolist() == [[0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]]
    assert mb.labels[0, 1:3].tolist() == [7, 8] and mb.labels[1, :5].tolist() == [10, 11, 12, 13, 14]
    # HF divides by labels != -100 before the shift (the 2nd row's first token counts too)
    assert int(mb.loss_denominator) == 8
    assert mb.num_input_tokens == 10
    padded = mdata.pad_microbatch(mb, 8, 3, pad_token_id=0)
    assert padded.tokens.shape == (3, 8) and padded.loss_mask.sum() == mb.loss_mask.sum()


def test_steps_per_epoch_like_hf():
    assert mdata.steps_per_epoch(8, 2) == 4
    assert mdata.steps_per_epoch(9, 2) == 5
    assert mdata.steps_per_epoch(1, 4) == 1


class _FakeOptimizer:
    def __init__(self) -> None:
        self.param_groups = [{"lr": 0.0, "weight_decay": 0.0}]


@pytest.mark.parametrize("name,warmup,min_lr_rate", [
    ("linear", 3, None), ("cosine", 2, None), ("constant", 0, None), ("constant_with_warmup", 4, None),
    ("cosine_with_min_lr", 2, 0.1), ("linear", 0, None),
])
def test_lr_schedule_matches_transformers(name, warmup, min_lr_rate):
    from types import SimpleNamespace

    from transformers import get_scheduler

    from llamafactory_mca.training import loop

    total, lr = 12, 1e-3
    kwargs = {"min_lr_rate": min_lr_rate} if min_lr_rate else {}
    args = SimpleNamespace(lr_scheduler_type=name, lr_scheduler_kwargs=kwargs, learning_rate=lr, weight_decay=0.0,
                           get_warmup_steps=lambda n: warmup)
    ours = loop._build_scheduler(_FakeOptimizer(), args, total)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    theirs = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total, scheduler_specific_kwargs=kwargs)
    for step in range(total):
        ours_lr = ours.optimizer.param_groups[0]["lr"]
        assert math.isclose(ours_lr, theirs.get_last_lr()[0], rel_tol=1e-9, abs_tol=1e-12), (step, ours_lr)
        ours.step(increment=1)
        opt.step()
        theirs.step()


def test_unsupported_lr_schedule_names_the_key():
    from types import SimpleNamespace

    from llamafactory_mca.args import McaArgumentError
    from llamafactory_mca.training import loop

    args = SimpleNamespace(lr_scheduler_type="polynomial", lr_scheduler_kwargs={}, learning_rate=1e-3,
                           weight_decay=0.0, get_warmup_steps=lambda n: 0)
    with pytest.raises(McaArgumentError, match="lr_scheduler_type"):
        loop._lr_schedule(args, 10)
