"""Qwen3-VL bridge on 2 gloo processes: a tiny locally built model (4 text layers, 3 DeepStack maps added after
layers 0-2, interleaved mRoPE, learned vision position embeddings) with one image per row (different grids).

One `torchrun --nproc_per_node 2` launch (tests/vl_helpers.py) over dp2 (TP=1), tp2, tp2sp and pp2 (vision tower on
the first stage; layers 2-3 and DeepStack map 2 on the second, which receives the maps with the hidden states):
logits equal Hugging Face's Qwen3VLForConditionalGeneration (fp32, positions from HF's get_rope_index), parameter
gradients (vision tower and DeepStack mergers included) equal HF's (dp2, tp2), export is bit-exact and
save_hf_pretrained reloads with transformers to the same weights.
"""

from __future__ import annotations

import pytest
import torch

from tests.workers import launch_worker

LAYOUTS = ("dp2", "tp2", "tp2sp", "pp2")
TOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from tests import vl_helpers

    model = vl_helpers.make_tiny_qwen3_vl(str(tmp_path_factory.mktemp("qwen3_vl") / "qwen3_vl"))
    return launch_worker("vl_helpers.py", ["--model", model, "--layouts", ",".join(LAYOUTS)],
                         tmp_path_factory.mktemp("results"), key=("layout",))


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_qwen3_vl_logits_parity(results, layout):
    diffs = []
    for rank_results in results:
        r = rank_results[layout]
        assert "error" not in r, r["error"]
        if "logits_max_abs_diff" in r:
            diffs.append(r["logits_max_abs_diff"])
            assert r["image_effect"] > 1e-3, r  # the image features really enter the language model
            assert r["last_deepstack_effect"] > 1e-3, r  # and so does the DeepStack map of layer 2
    assert diffs and max(diffs) <= TOL, diffs
    if layout == "pp2":  # vision tower on stage 0; stage 1 (layers 2, 3) received [hidden ; 3 DeepStack maps]
        assert [results[rank][layout]["has_vision"] for rank in (0, 1)] == [True, False]
        assert results[1][layout]["received_rows"] % 4 == 0 and results[1][layout]["received_rows"] > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", ("dp2", "tp2"))
def test_qwen3_vl_grads_match_hf(results, layout):
    r = results[0][layout]
    assert "error" not in r, r["error"]
    assert "grad_error" not in r, r["grad_error"]
    assert r["grad_max_rel_diff"] <= 1e-5, r


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_qwen3_vl_round_trip_bit_exact(results, layout):
    r = results[0][layout]
    assert "error" not in r, r["error"]
    assert r["missing"] == [] and r["extra"] == [] and r["not_equal"] == [], r
    assert r["saved_shards"] > 1
    assert r["reload_not_equal"] == [], r


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
