"""Qwen3-VL bridge on 2 gloo processes: a tiny locally built model (4 text layers, 3 DeepStack maps added after
layers 0-2, interleaved mRoPE, learned vision position embeddings) with one image per row (different grids).

One `torchrun --nproc_per_node 2` launch (tests/vl_helpers.py) over dp2 (TP=1), tp2, tp2sp and pp2 (vision tower on
the first stage; layers 2-3 and DeepStack map 2 on the second, which receives the maps with the hidden states), and
dp2 / tp2sp / pp2 again with a video beside the images (one frame group per temporal step after a timestamp token):
logits equal Hugging Face's Qwen3VLForConditionalGeneration (fp32, positions from HF's get_rope_index), parameter
gradients (vision tower and DeepStack mergers included) equal HF's (dp2, tp2), export is bit-exact and
save_hf_pretrained reloads with transformers to the same weights.
"""

from __future__ import annotations

import pytest
import torch

from tests import vl_helpers

LAYOUTS = ("dp2", "tp2", "tp2sp", "pp2", "dp2video", "tp2spvideo", "pp2video")
TOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    model = vl_helpers.make_tiny_qwen3_vl(str(tmp_path_factory.mktemp("qwen3_vl") / "qwen3_vl"))
    return vl_helpers.launch_checks(model, LAYOUTS, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_qwen3_vl_logits_parity(results, layout):
    vl_helpers.assert_deepstack_parity(results, layout, TOL)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", ("dp2", "tp2"))
def test_qwen3_vl_grads_match_hf(results, layout):
    vl_helpers.assert_grads_match(results[0][layout])


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_qwen3_vl_round_trip_bit_exact(results, layout):
    vl_helpers.assert_round_trip(results[0][layout])


def test_qwen3_vl_bridge_registered():
    from llamafactory_mca.models.registry import bridge_for, mca_supported_model_types

    assert "qwen3_vl" in mca_supported_model_types()
    assert type(bridge_for("qwen3_vl")).__name__ == "Qwen3VLBridge"


def test_interleaved_mrope_matches_hf():
    """Our rotary angles equal Hugging Face's Qwen3VLTextRotaryEmbedding (interleaved T/H/W channels) exactly."""
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    from llamafactory_mca.models.qwen3_vl import interleaved_mrope_freqs

    cfg = Qwen3VLTextConfig(hidden_size=64, num_attention_heads=2, head_dim=32,
                            rope_parameters={"rope_type": "default", "mrope_section": [6, 5, 5],
                                             "mrope_interleaved": True, "rope_theta": 10000.0})
    hf = Qwen3VLTextRotaryEmbedding(cfg)
    pos = torch.stack([torch.arange(12), torch.arange(12) * 2 + 1, torch.arange(12) * 3 + 2]).view(3, 1, 12)
    pos = pos.expand(3, 2, 12).clone()
    pos[:, 1] += 5
    cos, sin = hf(torch.zeros(1, dtype=torch.float32), pos)  # [b, s, 2d]
    ours = interleaved_mrope_freqs(hf.inv_freq, pos, [6, 5, 5])  # [s, b, 1, 2d]
    assert torch.equal(ours[:, :, 0].transpose(0, 1).cos(), cos) and torch.equal(ours[:, :, 0].transpose(0, 1).sin(), sin)
    # interleaved, not chunked: channel 1 follows the height row, channel 2 the width row, channel 3 time again
    for channel, row in ((1, 1), (2, 2), (3, 0)):
        expected = (pos[row].float() * hf.inv_freq[channel]).t()
        assert torch.allclose(ours[:, :, 0, channel], expected, rtol=1e-6, atol=0), channel


# --------------------------------------------------------------------------------------------- sft end to end

STEPS = 4
VL_REL_TOL = 1e-6


def _recipe(model: str, out: str, **overrides) -> dict:
    from lf_runs import make_recipe

    return make_recipe(model, out, **{**dict(dataset="tiny_vl", template="qwen3_vl_nothink", cutoff_len=256,
                                              max_steps=STEPS), **overrides})


@pytest.fixture(scope="module")
def q3vl_train_model(tmp_path_factory):
    from tests.vl_helpers import make_tiny_vl_model

    return make_tiny_vl_model(str(tmp_path_factory.mktemp("tiny_q3vl") / "qwen3_vl"), family="qwen3_vl")


@pytest.fixture(scope="module")
def hf_q3vl(q3vl_train_model, tmp_path_factory):
    """The one Hugging Face reference run (batch 2 x accumulation 2; the vision tower and projector trained, so
    the DeepStack mergers' gradients come back from the language model)."""
    from tests.vl_helpers import train_vl

    tmp = tmp_path_factory.mktemp("hf_q3vl")
    return train_vl(tmp, "hf_q3vl", _recipe(q3vl_train_model, str(tmp / "out"), **UNFROZEN), mca=False)


UNFROZEN = dict(freeze_vision_tower=False, freeze_multi_modal_projector=False)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_qwen3_vl_sft_single_process_parity_and_export(q3vl_train_model, hf_q3vl, tmp_path):
    from lf_runs import assert_parity
    from transformers import Qwen3VLForConditionalGeneration

    from tests.vl_helpers import train_vl

    out = train_vl(tmp_path, "mca_q3vl", _recipe(q3vl_train_model, str(tmp_path / "out"), **UNFROZEN))
    assert_parity(hf_q3vl, out, expected=STEPS, rel_tol=VL_REL_TOL)
    ours = Qwen3VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32).state_dict()
    theirs = Qwen3VLForConditionalGeneration.from_pretrained(hf_q3vl, dtype=torch.float32).state_dict()
    init = Qwen3VLForConditionalGeneration.from_pretrained(q3vl_train_model, dtype=torch.float32).state_dict()
    assert ours.keys() == theirs.keys()
    deepstack = [k for k in ours if "deepstack_merger_list" in k]
    assert deepstack and any(not torch.equal(ours[k], init[k]) for k in deepstack)  # trained through DeepStack
    for k in ours:  # Adam turns fp32 loss noise into larger weight differences (as test_vl_train)
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-2, atol=2e-3, msg=k)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_qwen3_vl_sft_pp2_parity(q3vl_train_model, hf_q3vl, tmp_path):
    """PP=2 on the HF run's 2 x 2 split: layers 0-1 and DeepStack maps 0-1 on stage 0, layer 2 and map 2 on stage
    1 (the maps travel with the hidden states, their gradients come back the same way)."""
    from lf_runs import assert_parity

    from tests.vl_helpers import train_vl

    out = train_vl(tmp_path, "mca_q3vl_pp", _recipe(q3vl_train_model, str(tmp_path / "out"), save_hf_model=False,
                                                     pipeline_model_parallel_size=2, **UNFROZEN), nproc=2)
    assert_parity(hf_q3vl, out, expected=STEPS, rel_tol=VL_REL_TOL)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_qwen3_vl_video_sft_parity(q3vl_train_model, tmp_path):
    """Videos through LLaMA-Factory's Qwen3-VL plugin (tests/data/tiny_vl_video.json: 4-frame clips given as frame
    lists, timestamps between the frame groups): per-step losses match the HF path."""
    from lf_runs import assert_parity

    from tests.vl_helpers import train_vl

    def recipe(out, **ours):
        return _recipe(q3vl_train_model, str(tmp_path / out), dataset="tiny_vl_video", **UNFROZEN, **ours)

    hf = train_vl(tmp_path, "hf_q3vl_video", recipe("hf"), mca=False)  # save_hf_model is our key only
    out = train_vl(tmp_path, "mca_q3vl_video", recipe("out", save_hf_model=False))
    assert_parity(hf, out, expected=STEPS, rel_tol=VL_REL_TOL)
