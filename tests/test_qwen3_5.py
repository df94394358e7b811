"""Qwen3.5 (`qwen3_5`) and Qwen3.5-MoE (`qwen3_5_moe`), issue 15: vision-language models on Qwen3-Next's hybrid
decoder (tests/vl_helpers.py `make_tiny_qwen3_5`: 4 layers linear / full / linear / full, 2 delta-net key heads of
2 value heads, gated attention with partial rotary in interleaved mRoPE sections, 2 vision blocks without DeepStack;
dense with tied embeddings, MoE with 4 experts top-2 and a gated shared expert, fused experts as transformers
stores them).

One `torchrun --nproc_per_node 2` launch per family (tests/vl_helpers.py) with one image per row (and a video
beside the images where the layout name ends in `video`): logits equal Hugging Face's
Qwen3_5(Moe)ForConditionalGeneration (fp32, positions from HF's get_rope_index) for one process per model copy
(dp2), TP=2 (dense), TP=2 + SP, PP=2 (vision tower on stage 0 only, a linear- and a full-attention layer on each
stage) and EP=2 (MoE); parameter gradients equal HF's (dp2; dense tp2); the export is bit-exact and
save_hf_pretrained reloads with transformers to the same weights. Unit tests: registration, config mapping, table
coverage, the refusals before launch. Extended: sft through `USE_MCA=1 llamafactory-cli train` against
LLaMA-Factory's HF path with images, and the merged checkpoint loaded by the family's transformers class.
"""

from __future__ import annotations

import json

import pytest

from tests import vl_helpers

LAYOUTS = {"qwen3_5": ("dp2", "tp2", "tp2sp", "pp2", "dp2video", "pp2video"),
           "qwen3_5_moe": ("dp2", "tp2sp", "pp2", "ep2", "ep2video")}
TOL = 1e-5
# the delta-net gate path (in_proj_a, dt_bias, A_log) has near-zero gradients: fp32 rounding is a larger share of
# them than of the other tensors' (tests/test_qwen3_next.py says the same of Qwen3-Next)
GRAD_REL_TOL = 1e-4


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """family -> per-rank results of its one launch (`vl_helpers.launch_checks` over LAYOUTS[family]), launched
    when first asked for."""
    done: dict = {}

    def get(family: str) -> list:
        if family not in done:
            model = vl_helpers.FAMILIES[family][0](str(tmp_path_factory.mktemp(family) / family))
            done[family] = vl_helpers.launch_checks(model, LAYOUTS[family], tmp_path_factory)
        return done[family]

    return get


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("family,layout", [(f, layout) for f, layouts in LAYOUTS.items() for layout in layouts])
def test_logits_and_round_trip(launched, family, layout):
    """Logits within TOL of HF's where the images change them (under PP the vision tower lives on stage 0 only);
    the export is bit-exact and reloads with transformers."""
    results = launched(family)
    vl_helpers.assert_logits_parity(results, layout, TOL)
    if layout.startswith("pp2"):
        assert [results[rank][layout]["has_vision"] for rank in (0, 1)] == [True, False]
    vl_helpers.assert_round_trip(results[0][layout])


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("family,layout", [("qwen3_5", "dp2"), ("qwen3_5", "tp2"), ("qwen3_5_moe", "dp2")])
def test_grads_match_hf(launched, family, layout):
    r = launched(family)[0][layout]
    assert "error" not in r, r["error"]
    assert "grad_error" not in r, r["grad_error"]
    assert r["grad_max_rel_diff"] <= GRAD_REL_TOL, r


# ------------------------------------------------------------------------------------ config, table, refusals


def tiny_config(moe: bool = False):
    import transformers

    prefix = "Qwen3_5Moe" if moe else "Qwen3_5"
    return getattr(transformers, prefix + "Config")(
        text_config=vl_helpers.qwen3_5_text(moe), vision_config=vl_helpers.QWEN3_5_VISION, image_token_id=1000,
        video_token_id=999, vision_start_token_id=998, vision_end_token_id=997, tie_word_embeddings=not moe)


@pytest.mark.parametrize("moe", [False, True])
def test_registered_and_transformer_config(moe):
    """The hybrid fields, the mRoPE sections on the partial rotary channels, no DeepStack; MoE: every layer MoE with
    the gated shared expert and renormalised top-k."""
    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models.registry import bridge_for, mca_supported_model_types

    kind = "qwen3_5_moe" if moe else "qwen3_5"
    assert kind in mca_supported_model_types()
    hf = tiny_config(moe)
    bridge = bridge_for(kind)
    assert type(bridge).__name__ == ("Qwen3_5MoeBridge" if moe else "Qwen3_5Bridge")
    cfg = bridge.transformer_config(hf, MegatronArguments())
    assert cfg.attention_output_gate and cfg.qk_layernorm and not cfg.add_qkv_bias
    assert (cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim,
            cfg.linear_value_head_dim) == (2, 4, 16, 8)
    assert cfg.mrope_section == [2, 1, 1] and bridge.rotary_percent(hf) == 0.5
    assert bridge.tied_embeddings(hf) is (not moe)
    if moe:
        assert cfg.num_moe_experts == 4 and cfg.moe_layer_freq == 1 and cfg.moe_ffn_hidden_size == 24
        assert cfg.moe_shared_expert_intermediate_size == 40 and cfg.moe_shared_expert_gate
        assert not cfg.moe_router_pre_softmax  # top-k renormalised
        assert bridge.expert_writer(hf).layout == "memory"  # transformers loads qwen3_5_moe experts unconverted
    else:
        assert not cfg.num_moe_experts and cfg.ffn_hidden_size == 96


@pytest.mark.parametrize("moe", [False, True])
def test_released_shapes(moe):
    """transformers' default configs (the released 9B-class dense / 35B-A3B shapes: head_dim 256, a quarter of it
    rotary, 16 delta-net key heads; no mrope_section, so transformers' default [11, 11, 10]) map, and the launcher
    takes TP=4 where the key / value heads split (dense: 4) and refuses it naming the key where not (MoE: 2)."""
    import transformers

    from llamafactory_mca.args import MegatronArguments, McaArgumentError, check_layout_against_model
    from llamafactory_mca.models.registry import bridge_for

    hf = getattr(transformers, "Qwen3_5MoeConfig" if moe else "Qwen3_5Config")()
    bridge = bridge_for(hf.model_type)
    cfg = bridge.transformer_config(hf, MegatronArguments())
    assert cfg.mrope_section == [11, 11, 10] and bridge.rotary_percent(hf) == 0.25 and cfg.kv_channels == 256
    assert cfg.linear_num_key_heads == 16 and bool(cfg.num_moe_experts) is moe
    tp4 = MegatronArguments(tensor_model_parallel_size=4)
    if moe:
        with pytest.raises(McaArgumentError, match="`tensor_model_parallel_size`.*key/value heads.*Fix:"):
            check_layout_against_model(tp4, hf.to_dict())
    else:
        check_layout_against_model(tp4, hf.to_dict())


@pytest.mark.parametrize("moe", [False, True])
def test_table_covers_checkpoint(moe, tmp_path):
    """Every tensor of the tiny checkpoint has a table entry (fused experts through their per-expert views)."""
    from llamafactory_mca.models.registry import bridge_for

    path = (vl_helpers.make_tiny_qwen3_5_moe if moe else vl_helpers.make_tiny_qwen3_5)(str(tmp_path / "m"))
    bridge = bridge_for("qwen3_5_moe" if moe else "qwen3_5")
    reader = bridge.reader(path)
    names = {h for hf, _ in bridge.table.values() for h in (hf if isinstance(hf, tuple) else (hf,))}
    expected = set()
    for name in names:
        filled = [name.replace("{L}", str(i)) for i in range(4)]
        expected |= {f.replace("{E}", str(e)) for f in filled for e in range(4)}
    try:
        stored = set(reader.weight_map)
        present = {n for n in expected if n in reader}
        visual = {n for n in stored if n.startswith("model.visual.")}
        fused = {n for n in stored if n.endswith(("experts.gate_up_proj", "experts.down_proj"))}
        assert stored - visual - fused <= present, sorted(stored - visual - fused - present)
        assert bool(fused) is moe
    finally:
        reader.close()


def _write_config(tmp_path, moe: bool = False) -> str:
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(moe).to_dict()))
    return str(tmp_path)


@pytest.mark.parametrize("layout,key", [
    (dict(tensor_model_parallel_size=4), "tensor_model_parallel_size"),  # 2 linear-attention key heads
    (dict(context_parallel_size=4), "context_parallel_size"),  # tp x cp must divide the 2 key heads
    (dict(transformer_impl="transformer_engine"), "transformer_impl"),
])
def test_layout_refused_before_launch(layout, key):
    """The launcher's check of config.json (text_config) against the layout names the key and the fix."""
    from llamafactory_mca.args import MegatronArguments, McaArgumentError, check_layout_against_model

    config = tiny_config().to_dict()
    config["text_config"]["num_attention_heads"] = config["text_config"]["num_key_value_heads"] = 8
    with pytest.raises(McaArgumentError, match=f"`{key}`.*Fix:"):
        check_layout_against_model(MegatronArguments(**layout), config)


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("keys", [dict(neat_packing=True), dict(packing=True), dict(context_parallel_size=2)])
def test_packing_and_cp_pass_the_checks(tmp_path, moe, keys):
    """Packing and context parallelism run through the delta-net layers (tests/test_vl_packing_cp.py checks them)."""
    from llamafactory_mca.args import MegatronArguments, check_layout_against_model
    from llamafactory_mca.recipe_checks import check_llamafactory_keys

    path = _write_config(tmp_path, moe)
    check_llamafactory_keys(dict(model_name_or_path=path, stage="sft", finetuning_type="full", **keys))
    config = json.loads((tmp_path / "config.json").read_text())
    check_layout_against_model(MegatronArguments(context_parallel_size=keys.get("context_parallel_size", 1)), config)


def test_lora_refused_before_launch(tmp_path):
    """LoRA: refused for every vision-language family (`finetuning_type`)."""
    from types import SimpleNamespace

    from llamafactory_mca.arg_hooks import check_model_family
    from llamafactory_mca.args import McaArgumentError

    path = _write_config(tmp_path)
    with pytest.raises(McaArgumentError, match="`finetuning_type`.*Fix:"):
        check_model_family(SimpleNamespace(model_name_or_path=path), None, "lora")


def test_attention_bias_refused():
    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models.registry import bridge_for

    hf = tiny_config()
    hf.text_config.attention_bias = True
    with pytest.raises(ValueError, match="attention_bias.*Fix:"):
        bridge_for("qwen3_5").transformer_config(hf, MegatronArguments())


# --------------------------------------------------------------------------------------------- sft end to end

STEPS = 4
SFT_REL_TOL = 1e-4  # the bound


def _sft_recipe(model: str, out: str, **ours) -> dict:
    from lf_runs import make_recipe

    return make_recipe(model, out, **{**dict(dataset="tiny_vl", template="qwen3_5_nothink", cutoff_len=256,
                                             max_steps=STEPS, freeze_vision_tower=False,
                                             freeze_multi_modal_projector=False), **ours})


def _sft_parity_and_merge(tmp_path, family: str, layouts: dict) -> None:
    """LLaMA-Factory's multimodal sft (tests/data/tiny_vl.json; vision tower and projector trained) through
    `USE_MCA=1 llamafactory-cli train` under each of `layouts` (name -> (processes, megatron keys)): per-step
    losses match LLaMA-Factory's HF path; the first layout's megatron checkpoint, merged by `llamafactory-mca
    merge`, loads in the family's transformers class with no missing or unexpected keys and equals that run's own
    Hugging Face export; the trained weights are close to the HF run's."""
    import os

    import torch
    import transformers
    from lf_runs import assert_parity, merge

    model = vl_helpers.make_tiny_vl_model(str(tmp_path / "tiny"), family=family)
    hf_cls = getattr(transformers, vl_helpers.FAMILIES[family][1])
    hf = vl_helpers.train_vl(tmp_path, f"hf_{family}", _sft_recipe(model, str(tmp_path / "hf")), mca=False)
    outs = {}
    for i, (name, (nproc, keys)) in enumerate(layouts.items()):
        save = dict(save_strategy="steps", save_steps=STEPS) if i == 0 else dict(save_hf_model=False)
        outs[name] = vl_helpers.train_vl(tmp_path, f"mca_{family}_{name}",
                                         _sft_recipe(model, str(tmp_path / name), **save, **keys), nproc=nproc)
        assert_parity(hf, outs[name], expected=STEPS, rel_tol=SFT_REL_TOL)
    first = outs[next(iter(layouts))]
    merged = merge(os.path.join(first, f"checkpoint-{STEPS}"), str(tmp_path / "merged"), "--fp32")
    loaded, info = hf_cls.from_pretrained(merged, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours = loaded.state_dict()
    export = hf_cls.from_pretrained(first, dtype=torch.float32).state_dict()
    theirs = hf_cls.from_pretrained(hf, dtype=torch.float32).state_dict()
    init = hf_cls.from_pretrained(model, dtype=torch.float32).state_dict()
    assert ours.keys() == theirs.keys() == export.keys()
    trained = [k for k in ours if "linear_attn" in k or "visual" in k]
    assert trained and all(not torch.equal(ours[k], init[k]) for k in trained if not k.endswith("A_log"))
    for k in ours:
        assert torch.equal(ours[k], export[k]), k
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-2, atol=2e-3, msg=k)  # Adam amplifies fp32 noise


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.timeout(3600)
def test_qwen3_5_sft_parity_and_merge(tmp_path):
    """TP=2 + SP (the merge of its checkpoint at TP=1 reassembles the sectioned projections), one process, and PP=2
    (vision tower, a linear- and a full-attention layer on stage 0; the tied output layer on stage 1)."""
    _sft_parity_and_merge(tmp_path, "qwen3_5", {
        "tp2sp": (2, dict(tensor_model_parallel_size=2, sequence_parallel=True)), "one": (1, {}),
        "pp2": (2, dict(pipeline_model_parallel_size=2, moe_token_dispatcher_type="allgather"))})


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.timeout(3600)
def test_qwen3_5_moe_sft_parity_and_merge(tmp_path):
    """TP=2 (+ SP) x EP=2 on 2 processes (experts not split by TP: expert_tensor_parallel_size 1), so that data
    parallelism stays 1 and the micro-batches are the HF run's (VL losses are weighted per micro-batch); the merge
    of its checkpoint gathers the experts and fuses them in transformers' layout. Then PP=2 with the allgather
    dispatcher (which Qwen3-VL-MoE refuses under PP for its DeepStack p2p shapes; Qwen3.5 has none)."""
    _sft_parity_and_merge(tmp_path, "qwen3_5_moe", {
        "tp2ep2": (2, dict(tensor_model_parallel_size=2, sequence_parallel=True, expert_model_parallel_size=2,
                           expert_tensor_parallel_size=1)),
        "pp2": (2, dict(pipeline_model_parallel_size=2, moe_token_dispatcher_type="allgather"))})


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_qwen3_5_video_sft_parity(tmp_path, family):
    """Videos through LLaMA-Factory's Qwen3-VL plugin (the qwen3_5 templates use it; tests/data/tiny_vl_video.json:
    4-frame clips, timestamps between the frame groups), one process: per-step losses match the HF path."""
    from lf_runs import assert_parity

    model = vl_helpers.make_tiny_vl_model(str(tmp_path / "tiny"), family=family)
    hf = vl_helpers.train_vl(tmp_path, "hf_video", _sft_recipe(model, str(tmp_path / "hf"), dataset="tiny_vl_video"),
                             mca=False)
    out = vl_helpers.train_vl(tmp_path, "mca_video", _sft_recipe(model, str(tmp_path / "out"), dataset="tiny_vl_video",
                                                                 save_hf_model=False))
    assert_parity(hf, out, expected=STEPS, rel_tol=SFT_REL_TOL)


def test_allgather_under_pp_only_refused_with_deepstack():
    """The allgather dispatcher cannot take p2p shapes that vary per micro-batch: refused under PP for Qwen3-VL-MoE
    (DeepStack maps travel between stages), accepted for Qwen3.5-MoE (no DeepStack, fixed shapes)."""
    from transformers import Qwen3VLMoeConfig

    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models.registry import bridge_for

    args = MegatronArguments(pipeline_model_parallel_size=2, moe_token_dispatcher_type="allgather")
    bridge_for("qwen3_5_moe").transformer_config(tiny_config(moe=True), args)
    vl_moe = vl_helpers.qwen3_vl_config(Qwen3VLMoeConfig, moe_intermediate_size=48, num_experts=4,
                                        num_experts_per_tok=2)
    with pytest.raises(ValueError, match="`moe_token_dispatcher_type`.*Fix:"):
        bridge_for("qwen3_vl_moe").transformer_config(vl_moe, args)
