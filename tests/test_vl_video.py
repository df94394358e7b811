"""Qwen2.5-VL videos on 2 gloo processes: a tiny locally built model, row 0 holding an image and a video of 2
temporal steps with second_per_grid_ts 1.5 (temporal positions step by tokens_per_second * 1.5), row 1 an image.

One `torchrun --nproc_per_node 2` launch (tests/vl_helpers.py) over dp2, tp2sp and pp2: logits equal Hugging Face's
Qwen2_5_VLForConditionalGeneration (fp32, positions from our training path's rope_fn, which passes the collator's
second_per_grid_ts), export is bit-exact. Qwen3-VL's videos run in tests/test_qwen3_vl.py.
"""

from __future__ import annotations

import pytest

from tests import vl_helpers

LAYOUTS = ("dp2video", "tp2spvideo", "pp2video")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    model = vl_helpers.make_tiny_qwen2_5_vl(str(tmp_path_factory.mktemp("qwen2_5_vl") / "qwen2_5_vl"))
    return vl_helpers.launch_checks(model, LAYOUTS, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_qwen2_5_vl_video_logits_and_round_trip(results, layout):
    vl_helpers.assert_logits_parity(results, layout, 1e-5)
    vl_helpers.assert_round_trip(results[0][layout])


def test_qwen2_5_vl_training_rope_takes_video_seconds():
    """The training path's positions (training.multimodal.rope_fn) use the collator's second_per_grid_ts."""
    import torch
    from transformers import Qwen2_5_VLConfig

    from llamafactory_mca.training.multimodal import rope_fn

    cfg = Qwen2_5_VLConfig(vision_config=dict(spatial_merge_size=2, tokens_per_second=2),
                           image_token_id=1000, video_token_id=999)
    ids = torch.tensor([[5, 999, 999, 6]])  # 2 frames of a 2x2 patch grid -> 1 merged token each
    grid = torch.tensor([[2, 2, 2]])
    fn = rope_fn(cfg)
    one = fn(ids, None, grid, None)
    three = fn(ids, None, grid, None, second_per_grid_ts=torch.tensor([3.0]))
    assert one[0, 0].tolist() == [0, 1, 3, 2] and three[0, 0].tolist() == [0, 1, 7, 2], (one, three)
