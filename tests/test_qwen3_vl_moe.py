"""Qwen3-VL-MoE bridge: a tiny locally built model (the tiny Qwen3-VL's shapes, 4 experts top-2 in each of the 4
text layers, fused expert tensors stored transposed as the released checkpoints hold them).

One `torchrun --nproc_per_node 2` launch (tests/vl_helpers.py) over dp2 (TP=1, one process per model copy), tp2sp,
pp2 (layers 0-1 and DeepStack maps 0-1 on stage 0, layers 2-3 and map 2 on stage 1, alltoall dispatcher) and ep2
(2 experts per rank), and dp2 / pp2 / ep2 with a video beside the images: logits equal Hugging Face's
Qwen3VLMoeForConditionalGeneration (fp32, positions from HF's get_rope_index), dp2 gradients (experts, router,
vision tower) equal HF's, the export is bit-exact (fused tensors rebuilt from the per-expert ones) and
save_hf_pretrained reloads with transformers to the same weights. Single-process: the fused-tensor reader in
both layouts, the merge of a megatron checkpoint, and one LLaMA-Factory sft pair.
"""

from __future__ import annotations

import pytest
import torch

from tests import vl_helpers

LAYOUTS = ("dp2", "tp2sp", "pp2", "ep2", "dp2video", "pp2video", "ep2video")
TOL = 1e-5


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    return vl_helpers.make_tiny_qwen3_vl_moe(str(tmp_path_factory.mktemp("qwen3_vl_moe") / "qwen3_vl_moe"))


@pytest.fixture(scope="module")
def results(tiny_moe, tmp_path_factory):
    return vl_helpers.launch_checks(tiny_moe, LAYOUTS, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_qwen3_vl_moe_logits_parity(results, layout):
    vl_helpers.assert_deepstack_parity(results, layout, TOL)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_qwen3_vl_moe_grads_match_hf(results):
    vl_helpers.assert_grads_match(results[0]["dp2"])


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_qwen3_vl_moe_round_trip_bit_exact(results, layout):
    vl_helpers.assert_round_trip(results[0][layout])


def test_fused_expert_reader_both_layouts(tiny_moe, tmp_path):
    """The registered bridge's reader: its per-expert views equal transformers' loaded experts whether the file
    holds the released (transposed) layout or the one transformers' save_pretrained writes; a layer whose shapes
    fit neither is refused."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    from llamafactory_mca.models.qwen3_vl_moe import FusedExpertReader, fused_layout
    from llamafactory_mca.models.registry import bridge_for, mca_supported_model_types

    hf = Qwen3VLMoeForConditionalGeneration.from_pretrained(tiny_moe, dtype=torch.float32)
    experts = hf.model.language_model.layers[1].mlp.experts  # gate_up [E, 2F, H], down [E, H, F]
    memory_dir = tmp_path / "memory"
    hf.save_pretrained(memory_dir)
    prefix = "model.language_model.layers.1.mlp.experts"
    for path, layout in ((tiny_moe, "hub"), (str(memory_dir), "memory")):
        reader = bridge_for("qwen3_vl_moe").reader(path)
        assert isinstance(reader, FusedExpertReader) and "qwen3_vl_moe" in mca_supported_model_types()
        assert reader.layout_of(prefix) == layout
        assert f"{prefix}.3.up_proj.weight" in reader
        for e in range(4):
            assert torch.equal(reader.read(f"{prefix}.{e}.gate_proj.weight"), experts.gate_up_proj[e, :48])
            assert torch.equal(reader.read(f"{prefix}.{e}.up_proj.weight", 0, 24, 48), experts.gate_up_proj[e, 72:])
            assert torch.equal(reader.read(f"{prefix}.{e}.down_proj.weight", 1, 8, 16), experts.down_proj[e][:, 8:16])
        assert reader.shape(f"{prefix}.0.gate_proj.weight") == [48, 64]
        assert reader.shape(f"{prefix}.0.down_proj.weight") == [64, 48]
        reader.close()
    with pytest.raises(ValueError, match="fit neither"):
        fused_layout([4, 64, 96], [4, 64, 64])


def test_fused_expert_writer_round_trip():
    """Per-expert pieces in any order give nothing until the last one, then the fused tensor in the released
    layout (memory layout where H == 2F, which transformers could not tell from it); a repeated piece restarts."""
    from llamafactory_mca.models.qwen3_vl_moe import FusedExpertWriter

    g = torch.Generator().manual_seed(0)
    p = "model.language_model.layers.0.mlp.experts"
    for hidden, ffn, hub in ((64, 48, True), (64, 32, False)):
        gate, up, down = (torch.randn(3, ffn, hidden, generator=g), torch.randn(3, ffn, hidden, generator=g),
                          torch.randn(3, hidden, ffn, generator=g))
        writer = FusedExpertWriter(3)
        [(name, same)] = writer.add("model.language_model.norm.weight", gate[0])
        assert name == "model.language_model.norm.weight" and torch.equal(same, gate[0])
        assert writer.add(f"{p}.0.gate_proj.weight", gate[0]) == []
        writer.add(f"{p}.0.gate_proj.weight", gate[0])  # a new pass
        out = []
        for e in (2, 0, 1):
            out += writer.add(f"{p}.{e}.down_proj.weight", down[e])
            out += writer.add(f"{p}.{e}.up_proj.weight", up[e])
            if e:
                out += writer.add(f"{p}.{e}.gate_proj.weight", gate[e])
        names = [n for n, _ in out]
        assert names == [f"{p}.down_proj", f"{p}.gate_up_proj"] and not writer.pending
        fused_down, fused_gate_up = (t for _, t in out)
        memory_gate_up = torch.cat([gate, up], 1)
        assert torch.equal(fused_gate_up, memory_gate_up.transpose(1, 2) if hub else memory_gate_up)
        assert torch.equal(fused_down, down.transpose(1, 2) if hub else down)


# --------------------------------------------------------------------------------------------- sft end to end

STEPS = 4
SFT_REL_TOL = 1e-6  # measured: 8e-8 (the issue asks 1e-4)


@pytest.mark.slow
@pytest.mark.extended  # CI: this family's logits, gradients and round trips above; qwen3_vl's sft and merge in CI
@pytest.mark.timeout(1800)
def test_qwen3_vl_moe_sft_parity_export_and_merge(tmp_path):
    """LLaMA-Factory's multimodal sft (tests/data/tiny_vl.json; vision tower and projector trained) through
    `USE_MCA=1 llamafactory-cli train` in one process: per-step losses match LLaMA-Factory's HF path, the saved HF
    model and the merge of the megatron checkpoint load with Qwen3VLMoeForConditionalGeneration to the same trained
    weights, close to the HF run's, in the released checkpoints' fused expert layout."""
    import os

    from lf_runs import assert_parity, make_recipe
    from safetensors import safe_open
    from transformers import Qwen3VLMoeForConditionalGeneration

    from llamafactory_mca.export import merge_checkpoint

    model = vl_helpers.make_tiny_vl_model(str(tmp_path / "tiny"), family="qwen3_vl_moe")

    def recipe(out, **ours):
        return make_recipe(model, str(tmp_path / out), dataset="tiny_vl", template="qwen3_vl_nothink", cutoff_len=256,
                           max_steps=STEPS, freeze_vision_tower=False, freeze_multi_modal_projector=False, **ours)

    hf = vl_helpers.train_vl(tmp_path, "hf_q3vlmoe", recipe("hf"), mca=False)
    out = vl_helpers.train_vl(tmp_path, "mca_q3vlmoe", recipe("out", save_strategy="steps", save_steps=STEPS))
    assert_parity(hf, out, expected=STEPS, rel_tol=SFT_REL_TOL)
    merged = merge_checkpoint(os.path.join(out, f"checkpoint-{STEPS}"), str(tmp_path / "merged"))

    def load(path):
        return Qwen3VLMoeForConditionalGeneration.from_pretrained(path, dtype=torch.float32).state_dict()

    ours, theirs, init, from_merge = load(out), load(hf), load(model), load(merged)
    assert ours.keys() == theirs.keys() == from_merge.keys()
    experts = [k for k in ours if k.endswith("experts.gate_up_proj")]
    assert experts and all(not torch.equal(ours[k], init[k]) for k in experts)  # the experts were trained
    for k in ours:
        assert torch.equal(ours[k], from_merge[k]), k
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-2, atol=2e-3, msg=k)  # Adam amplifies fp32 noise
    with safe_open(os.path.join(merged, "model.safetensors"), "pt") as f:  # [E, H, 2F]: the released layout
        assert f.get_slice("model.language_model.layers.0.mlp.experts.gate_up_proj").get_shape() == [4, 64, 96]
