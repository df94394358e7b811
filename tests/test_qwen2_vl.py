"""Qwen2-VL and Qwen2.5-VL bridges on 2 gloo processes: tiny locally built models with images (one per row,
different grids; the Qwen2.5-VL one has windowed and full-attention vision blocks, gated vision MLP, RMSNorm and
tied word embeddings).

One `torchrun --nproc_per_node 2` launch per family (tests/vl_helpers.py, which picks the HF class and
get_rope_index from the model's `model_type`) over dp2 (TP=1), tp2, tp2sp and pp2 (vision tower on the first
stage only): logits equal Hugging Face's (fp32, mRoPE positions from HF's get_rope_index), parameter gradients
(vision tower included) equal HF's (dp2, tp2), export is bit-exact and save_hf_pretrained reloads to the same
weights.
"""

from __future__ import annotations

import pytest

from tests import vl_helpers

LAYOUTS = ("dp2", "tp2", "tp2sp", "pp2")
TOL = 1e-5


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def results(request, tmp_path_factory):
    family = request.param
    model = str(tmp_path_factory.mktemp(family) / family)
    {"qwen2_vl": vl_helpers.make_tiny_qwen2_vl, "qwen2_5_vl": vl_helpers.make_tiny_qwen2_5_vl}[family](model)
    return vl_helpers.launch_checks(model, LAYOUTS, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_vl_logits_parity(results, layout):
    vl_helpers.assert_logits_parity(results, layout, TOL)  # image features really enter the language model
    if layout == "pp2":  # the vision tower lives on the first stage only
        assert [results[rank][layout]["has_vision"] for rank in (0, 1)] == [True, False]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", ("dp2", "tp2"))
def test_vl_grads_match_hf(results, layout):
    vl_helpers.assert_grads_match(results[0][layout])


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_vl_round_trip_bit_exact(results, layout):
    vl_helpers.assert_round_trip(results[0][layout])


@pytest.mark.parametrize("model_type,bridge", [("qwen2_vl", "Qwen2VLBridge"), ("qwen2_5_vl", "Qwen2_5_VLBridge")])
def test_vl_bridges_registered(model_type, bridge):
    from llamafactory_mca.models.registry import bridge_for, mca_supported_model_types

    assert model_type in mca_supported_model_types()
    assert type(bridge_for(model_type)).__name__ == bridge


def test_qwen2_5_vl_rope_index_uses_video_seconds():
    """Videos: temporal positions step by tokens_per_second * second_per_grid_ts (HF's Qwen2.5-VL rule)."""
    import torch
    from transformers import Qwen2_5_VLConfig

    from llamafactory_mca.models.qwen2_5_vl import get_rope_index

    cfg = Qwen2_5_VLConfig(vision_config=dict(spatial_merge_size=2, tokens_per_second=2),
                           image_token_id=1000, video_token_id=999)
    ids = torch.tensor([[5, 999, 999, 6]])  # 2 frames of a 2x2 patch grid -> 1 merged token each
    grid = torch.tensor([[2, 2, 2]])
    one = get_rope_index(cfg, ids, video_grid_thw=grid)
    three = get_rope_index(cfg, ids, video_grid_thw=grid, second_per_grid_ts=torch.tensor([3.0]))
    assert one[0, 0].tolist() == [0, 1, 3, 2] and three[0, 0].tolist() == [0, 1, 7, 2], (one, three)
