"""Unit tests of the trainer's HF-Trainer semantics that need no model: sample order, sharding, label shift.
Each is checked against the transformers / accelerate code it mirrors (learning-rate
schedules: tests/test_lr_schedule.py)."""

from __future__ import annotations

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


class _PidBuilder:
    """A step builder that records which process built each step."""

    def build(self, batches):
        import os

        return [mdata.MicroBatch(tokens=torch.tensor(idx), position_ids=torch.tensor([[0]]),
                                 labels=torch.tensor([[0]]), loss_mask=torch.ones(1, 1),
                                 loss_denominator=torch.tensor(1), num_input_tokens=1,
                                 extra={"pid": os.getpid()}) for idx in batches]


@pytest.mark.parametrize("workers", [0, 1, 2])
def test_prefetch_steps_keeps_order_and_builds_elsewhere(workers):
    """The prefetched steps are the steps in order, up to the first empty one; with workers they are built in
    other processes (off the training process' path), without workers in this one."""
    import os

    steps = [[[1, 2], [3]], [[4]], [[5, 6]], [], [[7]]]
    got = list(mdata.prefetch_steps(_PidBuilder(), steps, workers=workers))
    assert [[mb.tokens.tolist() for mb in mbs] for mbs in got] == [[[1, 2], [3]], [[4]], [[5, 6]]]
    pids = {mb.extra["pid"] for mbs in got for mb in mbs}
    assert (pids == {os.getpid()}) == (workers == 0), pids


def test_prefetch_steps_stops_early_without_error():
    """The loop may stop before the epoch ends (max_steps): leaving the generator half-read is fine."""
    feed = mdata.prefetch_steps(_PidBuilder(), [[[i]] for i in range(10)], workers=1)
    assert [mbs[0].tokens.tolist() for _, mbs in zip(range(3), feed)] == [[0], [1], [2]]
    feed.close()
