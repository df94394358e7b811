"""Qwen2-VL bridge on 2 gloo processes: a tiny locally built Qwen2-VL with images (one per row, different grids).

One `torchrun --nproc_per_node 2` launch (tests/vl_helpers.py) over dp2 (TP=1), tp2, tp2sp and pp2 (vision tower
on the first stage only): logits equal Hugging Face's Qwen2VLForConditionalGeneration (fp32, mRoPE positions
from HF's get_rope_index), parameter gradients (vision tower included) equal HF's (dp2, tp2), export is
bit-exact and save_hf_pretrained reloads to the same weights.
"""

from __future__ import annotations

import os

import pytest

from tests.workers import launch_worker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = ("dp2", "tp2", "tp2sp", "pp2")
TOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from tests.vl_helpers import make_tiny_qwen2_vl

    model = str(tmp_path_factory.mktemp("tiny_vl") / "qwen2_vl")
    make_tiny_qwen2_vl(model)
    return launch_worker("vl_helpers.py", ["--model", model, "--layouts", ",".join(LAYOUTS)],
                         tmp_path_factory.mktemp("results"), key=("layout",))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_vl_logits_parity(results, layout):
    diffs = []
    for rank_results in results:
        r = rank_results[layout]
        assert "error" not in r, r["error"]
        if "logits_max_abs_diff" in r:
            diffs.append(r["logits_max_abs_diff"])
            assert r["image_effect"] > 1e-3, r  # the image features really enter the language model
    assert diffs and max(diffs) <= TOL, diffs
    if layout == "pp2":  # the vision tower lives on the first stage only
        assert [results[rank][layout]["has_vision"] for rank in (0, 1)] == [True, False]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", ("dp2", "tp2"))
def test_vl_grads_match_hf(results, layout):
    r = results[0][layout]
    assert "error" not in r, r["error"]
    assert "grad_error" not in r, r["grad_error"]
    assert r["grad_max_rel_diff"] <= 1e-5, r


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_vl_round_trip_bit_exact(results, layout):
    r = results[0][layout]
    assert "error" not in r, r["error"]
    assert r["missing"] == [] and r["extra"] == [] and r["not_equal"] == [], r
    assert r["saved_shards"] > 1
    assert r["reload_not_equal"] == [], r


def test_qwen2_vl_registered():
    from llamafactory_mca.models.registry import bridge_for, mca_supported_model_types

    assert "qwen2_vl" in mca_supported_model_types()
    assert type(bridge_for("qwen2_vl")).__name__ == "Qwen2VLBridge"
