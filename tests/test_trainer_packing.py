"""`packing` / `neat_packing` for sft through `USE_MCA=1 llamafactory-cli train`.

neat_packing: LLaMA-Factory packs several samples per row and marks them in the attention mask (1, 2, 3 ... per
sample, 0 = padding); its HF path attends block-diagonally (4-D mask, transformers sdpa). Ours turns each row into
THD packed sequences (`PackedSeqParams`, one causal attention per sample, RoPE restarting per sample), so every
sample attends only to itself. Per-step losses agree with LLaMA-Factory's HF neat_packing run to a relative 1e-4:
1 process, TP=2 with sequence parallelism, and CP=2 (each packed sample split for its CP rank). That packed
samples give the logits of each sample run alone is checked at model level in tests/test_packing.py.

Plain `packing: true` (no neat_packing) keeps LLaMA-Factory's cross-contamination and runs as before.
"""

from __future__ import annotations

import math

import pytest
import torch
from lf_runs import assert_parity, losses, make_models, make_recipe, train

from llamafactory_mca.training import data as mdata

pytestmark_slow = pytest.mark.slow
NEAT = dict(neat_packing=True, cutoff_len=64, per_device_train_batch_size=1, gradient_accumulation_steps=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory)


@pytest.fixture(scope="module")
def hf_neat(models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_neat")
    return train(tmp, "hf_neat", make_recipe(models["dense"], str(tmp / "out"), **NEAT), mca=False)


@pytest.mark.slow
@pytest.mark.extended  # the same HF run is matched at TP=2+SP and CP=2 below
def test_neat_packing_parity_single_process(models, hf_neat, tmp_path):
    ours = train(tmp_path, "mca_neat", make_recipe(models["dense"], str(tmp_path / "out"), save_hf_model=False,
                                                   **NEAT))
    assert_parity(hf_neat, ours)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [dict(tensor_model_parallel_size=2, sequence_parallel=True),
                                    dict(context_parallel_size=2)], ids=["tp2sp", "cp2"])
def test_neat_packing_parity_parallel(models, hf_neat, tmp_path, layout):
    ours = train(tmp_path, "mca_neat_par", make_recipe(models["dense"], str(tmp_path / "out"), save_hf_model=False,
                                                       **NEAT, **layout), nproc=2)
    assert_parity(hf_neat, ours)


@pytest.mark.slow
def test_plain_packing_still_runs(models, tmp_path):
    ours = train(tmp_path, "mca_pack", make_recipe(models["dense"], str(tmp_path / "out"), packing=True,
                                                   cutoff_len=64, save_hf_model=False))
    values = losses(ours)
    assert len(values) == 5 and all(math.isfinite(v) for v in values)


# ------------------------------------------------------------------------------------------- unit


def _neat_features():
    # two rows of LLaMA-Factory neat_packing output: samples 1, 2 (, 3) and padding 0
    mask = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 2, 2, 2, 3, 3, 3]])
    ids = torch.arange(16).view(2, 8) + 10
    labels = torch.tensor([[-100, 11, 12, -100, -100, 15, 16, -100], [-100, 19, -100, 21, 22, -100, 24, 25]])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_neat_packing_becomes_thd():
    mb = mdata.to_microbatch(_neat_features(), 0, segments=True)
    assert mb.segment_ids.tolist()[0] == [1, 1, 1, 2, 2, 2, 2, 0]
    (out,) = mdata.lay_out([mb], mdata.SeqLayout(thd=True), 0, False, 1)
    p = out.packed_seq_params
    assert p.qkv_format == "thd" and p.cu_seqlens_q_padded.tolist() == [0, 3, 7, 9, 12, 15]
    assert out.tokens.tolist() == [[10, 11, 12, 13, 14, 15, 16, 18, 19, 20, 21, 22, 23, 24, 25]]
    # shifted targets stay with their tokens; the padding token of row 0 is gone
    assert out.loss_mask.sum() == mb.loss_mask.sum() and int(out.loss_denominator) == 9
    assert out.schedule_seq_length == 15 and out.batch_size == 1


def test_neat_packing_alignment_and_pipeline_shapes():
    mb = mdata.to_microbatch(_neat_features(), 0, segments=True)
    layout = mdata.SeqLayout(tp=2, cp=2, sequence_parallel=True, thd=True, cp_rank=1)
    a, b = mdata.lay_out([mb, mdata.to_microbatch({k: v[:1] for k, v in _neat_features().items()}, 0,
                                                  segments=True)], layout, 0, True, 1)
    for out in (a, b):
        cu = out.packed_seq_params.cu_seqlens_q_padded
        assert all(int(n) % 4 == 0 for n in cu[1:] - cu[:-1])  # each sample a multiple of 2*cp
        assert out.schedule_seq_length % 4 == 0  # local length (T / cp) divisible by tp
        assert out.seq_length * 2 == out.schedule_seq_length  # this CP rank's half
    assert a.schedule_seq_length == b.schedule_seq_length  # uniform p2p shapes under PP
    assert int(a.loss_denominator) == 0  # counted on CP rank 0 only
