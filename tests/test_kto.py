"""stage: kto under Megatron against LLaMA-Factory's HF KTO path (CustomKTOTrainer on TRL), fp32, CPU.

Data: tests/data/tiny_kto.json (LLaMA-Factory's kto_tag format; the undesirable answers are other samples' answers).
One HF run (full fine-tuning; desirable and undesirable weights that differ, pref_ftx, reference = the initial
model) is the reference of the 1-process, TP=2 (+ sequence parallel) and PP=2 runs: per step, loss, kl and
LLaMA-Factory's reward / log-prob keys agree to a relative 1e-4 (absolute 1e-5 near zero: step 1's rewards and kl
are 0, policy == reference). logits/* are logged over non-padding positions only: not compared.
"""

from __future__ import annotations

import pytest
from lf_runs import make_models, make_recipe, train, training_history

pytestmark = pytest.mark.slow

STEPS = 4
KEYS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")
KTO = dict(stage="kto", dataset="tiny_kto", pref_beta=0.2, kto_chosen_weight=1.5, kto_rejected_weight=0.8,
           pref_ftx=0.2, max_steps=STEPS, learning_rate=2.0e-3, warmup_steps=0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_models(tmp_path_factory)["dense"]


@pytest.fixture(scope="module")
def hf_kto(model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_kto")
    return train(tmp, "hf_kto", make_recipe(model, str(tmp / "out"), **KTO), mca=False)


def assert_kto_parity(hf_dir: str, ours_dir: str) -> None:
    hf, ours = training_history(hf_dir), training_history(ours_dir)
    assert len(hf) == len(ours) == STEPS, (len(hf), len(ours))
    worst = 0.0
    for step, (a, b) in enumerate(zip(hf, ours)):
        for key in KEYS:
            assert (key in a) == (key in b), (step, key, a, b)  # a step without desirable samples logs no chosen keys
            if key not in a:
                continue
            diff = abs(a[key] - b[key])
            worst = max(worst, diff / abs(a[key]) if abs(a[key]) > 1e-4 else 0.0)
            assert diff <= 1e-4 * abs(a[key]) + 1e-5, (step, key, a[key], b[key])
        assert "logits/chosen" in b or "logits/rejected" in b
    assert any(h["kl"] > 0 for h in hf), "the KL estimate never left 0: the test would not see it"
    print(f"KTO parity {ours_dir}: losses HF {[h['loss'] for h in hf]} MCA {[h['loss'] for h in ours]}; "
          f"kl HF {[h['kl'] for h in hf]}; max rel diff {worst:.2e}")


def test_kto_single_process(model, hf_kto, tmp_path):
    out = train(tmp_path, "mca_kto", make_recipe(model, str(tmp_path / "out"), **KTO))
    assert_kto_parity(hf_kto, out)


@pytest.mark.parametrize("layout", [pytest.param(dict(pipeline_model_parallel_size=2), marks=pytest.mark.extended),
                                    dict(tensor_model_parallel_size=2, sequence_parallel=True)], ids=["pp2", "tp2sp"])
def test_kto_parallel(model, hf_kto, tmp_path, layout):
    out = train(tmp_path, "mca_kto_par", make_recipe(model, str(tmp_path / "out"), save_hf_model=False, **KTO,
                                                     **layout), nproc=2)
    assert_kto_parity(hf_kto, out)
