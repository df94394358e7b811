"""Packing (neat_packing as THD) and context parallelism for the VL families, through the training data path.

One `torchrun --nproc_per_node 2` launch per family (tests/vl_helpers.py `check_pack_cp`): the two rows of
`vl_helpers.make_inputs` (one image each; Qwen2.5-VL: row 0 also a video with second_per_grid_ts 1.5) go through
`training.data.to_microbatch` / `lay_out` as
* thd: one neat_packing row of both samples (per-sample mRoPE positions, images in order, THD attention);
* cp2: the padded rows split over 2 CP ranks (vision features merged before the split, mRoPE angles split alike);
* cp2thd: both.
Each layout's logits (gathered over CP, cut per sample) equal Hugging Face's on the unpacked rows within 1e-5
(fp32), and the summed sft loss equals HF's; the packed positions equal HF's rope index of the unpacked rows.

End to end (`USE_MCA=1 llamafactory-cli train` vs LLaMA-Factory's HF path, per step within 1e-4 relative, fp32):
Qwen2.5-VL video sft at CP=2; Qwen2-VL and Qwen3-VL neat_packing sft with images at 1 process and CP=2, Qwen2-VL
plain packing (extended tier). mRoPE
is relative within a sample (all three rows shift alike), so per-sample restarting positions and positions running
on through a packed row give the same loss under per-sample attention: the restart is checked on the positions
themselves (`positions_equal_unpacked`), the loss checks the images' order and the per-sample attention.
"""

from __future__ import annotations

import pytest

from tests import vl_helpers

LAYOUTS = ("thd", "cp2", "cp2thd")
# default tier: Qwen2.5-VL (the Qwen2-VL model class and data path, with a video and second_per_grid_ts), Qwen3.5 and
# Qwen3.5-MoE (gated delta-net layers: per-sample restarts, CP head exchange); Qwen2-VL (the same path without
# video) and Qwen3-VL (DeepStack maps split like the embeddings) in the extended one
FAMILIES = (pytest.param("qwen2_vl", marks=pytest.mark.extended), "qwen2_5_vl",
            pytest.param("qwen3_vl", marks=pytest.mark.extended), "qwen3_5", "qwen3_5_moe")


@pytest.fixture(scope="module", params=FAMILIES)
def results(request, tmp_path_factory):
    family = request.param
    builder = vl_helpers.FAMILIES[family][0]
    model = builder(str(tmp_path_factory.mktemp(family) / family))
    return family, vl_helpers.launch_checks(model, LAYOUTS, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_vl_packing_and_cp_match_unpacked_hf(results):
    family, per_rank = results
    for layout in LAYOUTS:
        for rank, rank_results in enumerate(per_rank):
            r = rank_results[layout]
            assert "error" not in r, (family, layout, r["error"])
            assert r["logits_max_abs_diff"] <= 1e-5, (family, layout, rank, r["logits_max_abs_diff"])
            assert abs(r["loss"] - r["hf_loss"]) <= 1e-5 * abs(r["hf_loss"]), (family, layout, r["loss"], r["hf_loss"])
            if layout.endswith("thd"):
                assert r["positions_equal_unpacked"], (family, layout)
        if layout.startswith("cp2"):  # each CP rank held half of the tokens
            assert per_rank[0][layout]["tokens_per_rank"] == per_rank[1][layout]["tokens_per_rank"]


# --------------------------------------------------------------------------------------------- sft end to end

STEPS = 4
VIDEO_REL_TOL = 1e-4


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_qwen2_5_vl_video_sft_cp2_matches_hf(tmp_path):
    """Qwen2.5-VL video sft through `USE_MCA=1 llamafactory-cli train` with LLaMA-Factory's video data
    (tests/data/tiny_vl_video.json, 4-frame clips; its qwen2_vl plugin gives second_per_grid_ts) under CP=2
    (2 processes) against LLaMA-Factory's HF path (1 process): per-step losses within 1e-4 relative (fp32)."""
    from lf_runs import assert_parity, make_recipe

    from tests.vl_helpers import make_tiny_vl_model, train_vl

    model = make_tiny_vl_model(str(tmp_path / "qwen2_5_vl"), family="qwen2_5_vl")

    def recipe(out, **ours):
        return make_recipe(model, str(tmp_path / out), dataset="tiny_vl_video", template="qwen2_vl", cutoff_len=256,
                           max_steps=STEPS, freeze_vision_tower=False, **ours)

    hf = train_vl(tmp_path, "hf_vl25_video", recipe("hf"), mca=False)
    out = train_vl(tmp_path, "mca_vl25_video_cp2", recipe("out", save_hf_model=False, context_parallel_size=2),
                   nproc=2)
    assert_parity(hf, out, expected=STEPS, rel_tol=VIDEO_REL_TOL)


@pytest.mark.slow
@pytest.mark.extended  # neat_packing + CP for VL in the default tier: test_vl_packing_and_cp_match_unpacked_hf
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("family,template,neat", [("qwen2_vl", "qwen2_vl", True), ("qwen2_vl", "qwen2_vl", False),
                                                  ("qwen3_vl", "qwen3_vl_nothink", True)],
                         ids=["qwen2_vl-neat_packing", "qwen2_vl-packing", "qwen3_vl-neat_packing"])
def test_vl_packing_sft_matches_hf(tmp_path, family, template, neat):
    """Packed sft with images (tests/data/tiny_vl.json) through `llamafactory-cli train` against LLaMA-Factory's
    HF path on the same packed rows: neat_packing (its collator's rope index per packed sub-sequence,
    block-diagonal attention) at 1 process and CP=2 (Qwen2-VL, Qwen3-VL with DeepStack); plain packing (one rope
    index per row, the samples of a row see each other) at 1 process. Per-step losses within 1e-4 relative (fp32)."""
    from lf_runs import assert_parity, make_recipe

    from tests.vl_helpers import make_tiny_vl_model, train_vl

    model = make_tiny_vl_model(str(tmp_path / family), family=family)

    def recipe(out, **ours):
        return make_recipe(model, str(tmp_path / out), dataset="tiny_vl", template=template, cutoff_len=256,
                           max_steps=STEPS, neat_packing=neat, packing=True, per_device_train_batch_size=1, **ours)

    hf = train_vl(tmp_path, "hf_vl_packed", recipe("hf"), mca=False)
    out = train_vl(tmp_path, "mca_vl_packed", recipe("out", save_hf_model=False))
    assert_parity(hf, out, expected=STEPS, rel_tol=VIDEO_REL_TOL)
    if neat:
        out = train_vl(tmp_path, "mca_vl_neat_cp2", recipe("out2", save_hf_model=False, context_parallel_size=2),
                       nproc=2)
        assert_parity(hf, out, expected=STEPS, rel_tol=VIDEO_REL_TOL)


# ------------------------------------------------------------------------------------------- unit (one process)


def test_packed_rope_positions_restart_per_sample():
    """neat_packing rows of four samples (two rows, images in the first and last, a text-only one between, padding)
    get, per sample, Hugging Face's rope index of that sample alone, the grids taken in order."""
    import torch
    from transformers import Qwen2VLConfig

    from llamafactory_mca.training.multimodal import packed_rope_positions, rope_fn

    cfg = Qwen2VLConfig(vision_config=dict(spatial_merge_size=2), image_token_id=1000, video_token_id=999,
                        vision_start_token_id=998)
    samples = [[5, 998] + [1000] * 4 + [6, 7], [8, 9, 10], [11, 998] + [1000] * 6 + [12]]
    grids = torch.tensor([[1, 4, 4], [1, 4, 6]])
    rows = [samples[0] + samples[1], samples[2] + [0, 0]]
    segs = [[1] * 8 + [2] * 3, [1] * 9 + [0, 0]]
    fn = rope_fn(cfg)
    got = packed_rope_positions(fn, torch.tensor(rows), torch.tensor(segs), grids)
    alone = [fn(torch.tensor([x]), grid, None, None)[:, 0] for x, grid in
             zip(samples, (grids[:1], None, grids[1:]))]
    assert torch.equal(got[:, 0, :8], alone[0]) and torch.equal(got[:, 0, 8:], alone[1])
    assert torch.equal(got[:, 1, :9], alone[2]) and got[:, 1, 9:].tolist() == [[0, 1]] * 3
    assert not torch.equal(alone[2][0], torch.arange(9))  # the image really has 2-D positions
