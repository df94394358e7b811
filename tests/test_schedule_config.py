"""The pipeline p2p settings `training/loop.configure_schedule` gives megatron's schedules (no processes needed)."""

from __future__ import annotations

from types import SimpleNamespace as NS

import torch


def _chunks(n: int) -> list:
    config = NS()  # one TransformerConfig shared by every chunk, as in the trainer
    return [NS(config=config) for _ in range(n)]


def test_batched_pipeline_p2p_only_without_virtual_stages(monkeypatch):
    """On NCCL, batched p2p for a plain pipeline; off for interleaved (VPP) chunks, where with two pipeline
    ranks the batch's send to the previous stage meets the peer's receive from its previous stage (measured on
    2 x H200: PP=2 x VPP losses off HF's from step 1). No device sync after the p2p in either case."""
    from llamafactory_mca import platform
    from llamafactory_mca.training.loop import configure_schedule

    monkeypatch.setattr(platform, "dist_backend", lambda: "nccl")
    ddp = NS(no_sync=None, start_grad_sync=None, start_param_sync=None)
    m = NS(overlap_grad_reduce=False, overlap_param_gather=False)
    opt = NS(scale_loss=None)
    plain = configure_schedule(_chunks(1), [ddp], opt, m, torch.bfloat16)
    assert plain.batch_p2p_comm is True and plain.batch_p2p_sync is False and plain.overlap_p2p_comm is False
    vpp = configure_schedule(_chunks(2), [ddp, ddp], opt, m, torch.bfloat16)
    assert vpp.batch_p2p_comm is False and vpp.batch_p2p_sync is False
    monkeypatch.setattr(platform, "dist_backend", lambda: "gloo")
    assert configure_schedule(_chunks(1), [ddp], opt, m, torch.bfloat16).batch_p2p_comm is False
