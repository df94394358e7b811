"""context_parallel_size: 2 through `USE_MCA=1 llamafactory-cli train`, against LLaMA-Factory's HF path.

Each microbatch is split for its CP rank after the label shift (causal load balancing, `models.packing.cp_split`);
the token count of the loss stays on CP rank 0, so the token-weighted loss and megatron's gradient scaling over
the data-parallel group with CP equal the HF Trainer's. 2 processes = 1 data-parallel rank x CP 2, the same global
batch as the 1-process HF run; per-step losses in trainer_log.jsonl agree to a relative 1e-4.
"""

from __future__ import annotations

import json

import pytest
import torch
from lf_runs import assert_parity, make_dpo_data, make_models, make_recipe, train

from llamafactory_mca.args import (
    McaArgumentError,
    MegatronArguments,
    validate_megatron_args,
)
from llamafactory_mca.training import data as mdata


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory)


@pytest.mark.slow
def test_cp2_sft_parity(models, tmp_path):
    hf = train(tmp_path, "hf", make_recipe(models["dense"], str(tmp_path / "hf")), mca=False)
    ours = train(tmp_path, "mca_cp2", make_recipe(models["dense"], str(tmp_path / "out"), context_parallel_size=2,
                                                  save_hf_model=False), nproc=2)
    assert_parity(hf, ours)
    with open(f"{ours}/trainer_log.jsonl") as f:
        first = json.loads(f.readline())
    assert first["current_steps"] == 1


@pytest.mark.slow
@pytest.mark.extended
def test_cp2_dpo_parity(models, tmp_path):
    """DPO: sequence log-probs summed over the CP group (autograd-aware), each pair's loss counted once."""
    from test_dpo import SIGMOID, _dpo, assert_dpo_parity

    data = make_dpo_data(str(tmp_path / "dpo_data"))
    hf = train(tmp_path, "hf_dpo", _dpo(models, data, str(tmp_path / "hf"), **SIGMOID), mca=False)
    ours = train(tmp_path, "mca_dpo_cp2", _dpo(models, data, str(tmp_path / "out"), context_parallel_size=2,
                                               save_hf_model=False, **SIGMOID), nproc=2)
    assert_dpo_parity(hf, ours)


# ------------------------------------------------------------------------------------------- unit


def test_seq_multiple_is_the_packing_one():
    from llamafactory_mca.models import packing

    assert not hasattr(mdata, "seq_multiple")  # one implementation
    layout = mdata.SeqLayout(tp=2, cp=2, sequence_parallel=True)
    # local length s / cp must divide by tp under SP: s multiple of lcm(2*cp, cp*tp)
    assert layout.multiple == packing.seq_multiple(2, 2, True) == 4
    assert mdata.SeqLayout(tp=4, cp=2, sequence_parallel=True).multiple == 8
    assert mdata.SeqLayout(tp=4, cp=1, sequence_parallel=True).multiple == 4
    assert mdata.SeqLayout(tp=4, cp=2, sequence_parallel=False).multiple == 4


def test_cp_split_of_a_microbatch_keeps_counts_on_rank0():
    features = {"input_ids": torch.arange(10).view(1, 10), "attention_mask": torch.ones(1, 10, dtype=torch.long),
                "labels": torch.tensor([[-100, -100, 2, 3, 4, 5, 6, 7, 8, 9]])}
    mb = mdata.to_microbatch(features, 0)
    parts = [mdata.lay_out([mb], mdata.SeqLayout(cp=2, cp_rank=r), 0, False, 1)[0] for r in (0, 1)]
    assert [p.seq_length for p in parts] == [6, 6] and parts[0].schedule_seq_length == 12
    # rank 0: chunks 0 and 3 of 4 (length 3 each), rank 1: chunks 1 and 2
    assert parts[0].tokens.tolist() == [[0, 1, 2, 9, 0, 0]] and parts[1].tokens.tolist() == [[3, 4, 5, 6, 7, 8]]
    assert int(parts[0].loss_denominator) == 8 and int(parts[1].loss_denominator) == 0
    assert parts[0].num_samples == 1 and parts[1].num_samples == 0
    # the shifted labels travel with their tokens: together they hold every target once
    assert float(parts[0].loss_mask.sum() + parts[1].loss_mask.sum()) == float(mb.loss_mask.sum()) == 8


def test_local_attention_with_cp_is_refused():
    with pytest.raises(McaArgumentError, match="attention_backend.*Fix: set attention_backend: auto"):
        validate_megatron_args(MegatronArguments(context_parallel_size=2, attention_backend="local"), 2)
    validate_megatron_args(MegatronArguments(context_parallel_size=2), 2)


def test_cp_with_qwen2_vl_is_accepted(tmp_path):
    """VL models run under CP (vision features merged before the split: tests/test_vl_packing_cp.py); a layout
    that does not fit the model is still refused for it."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl",
                                                      "text_config": {"num_hidden_layers": 2}}))
    validate_megatron_args(MegatronArguments(context_parallel_size=2), 2, str(tmp_path))
    with pytest.raises(McaArgumentError, match="pipeline_model_parallel_size"):
        validate_megatron_args(MegatronArguments(context_parallel_size=2, pipeline_model_parallel_size=4), 8,
                               str(tmp_path))
    validate_megatron_args(MegatronArguments(), 2, str(tmp_path))
