"""Multi-process CPU checks of the Qwen2-VL / Qwen2.5-VL bridges, run under torchrun (2 gloo ranks).

    torchrun --nproc_per_node 2 tests/vl_helpers.py --model DIR --out OUT --layouts dp2,tp2,tp2sp,pp2

Per layout: build the megatron model (vision tower on the first stage), stream the HF weights in, compare
logits with HF's Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration (picked by the model's
`model_type`, FAMILIES) on a batch with one image per row (different grids), fp32; export back to HF (bit-exact)
and save_hf_pretrained (reloads with transformers to the same weights).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from tests.workers import compare_with_hf_checkpoint, run_cases

LAYOUTS = {
    "dp2": dict(),
    "tp2": dict(tensor_model_parallel_size=2),
    "tp2sp": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "pp2": dict(pipeline_model_parallel_size=2),
    "ep2": dict(expert_model_parallel_size=2),  # MoE families
    # the same with a video in row 0 (make_inputs(video=True)); logits and round trip only
    "dp2video": dict(),
    "tp2spvideo": dict(tensor_model_parallel_size=2, sequence_parallel=True),
    "pp2video": dict(pipeline_model_parallel_size=2),
    "ep2video": dict(expert_model_parallel_size=2),
    # packing / context parallelism through the training data path (check_pack_cp): the two rows of make_inputs
    # packed into one neat_packing row (THD) and / or split over 2 CP ranks; logits vs HF on the unpacked rows
    "thd": dict(),
    "cp2": dict(context_parallel_size=2),
    "cp2thd": dict(context_parallel_size=2),
}
PACK_CP_LAYOUTS = ("thd", "cp2", "cp2thd")


def layout_args(hf_config, layout: str) -> dict:
    """The MegatronArguments of `layout`; MoE models under PP use the alltoall dispatcher (their DeepStack p2p
    shapes vary per micro-batch, which allgather refuses: qwen3_vl.Qwen3VLBridge.transformer_config)."""
    args = dict(LAYOUTS[layout])
    if getattr(hf_config.text_config, "num_experts", None) and args.get("pipeline_model_parallel_size", 1) > 1:
        args["moe_token_dispatcher_type"] = "alltoall"
    return args


def in_hf_layout(grads: dict, hf_model) -> dict:
    """Exported gradients with fused expert tensors turned into the HF model's in-memory layout (the export
    writes the released checkpoints' transposed one where the shapes allow: models/qwen3_vl_moe.py)."""
    out = {}
    for name, g in grads.items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            target = hf_model.get_parameter(name).shape
            if g.shape != target:
                g = g.transpose(1, 2)
        out[name] = g
    return out


def make_tiny_qwen2_vl(path: str, seed: int = 0) -> str:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(seed)
    config = Qwen2VLConfig(
        text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=1001, rms_norm_eps=1e-6, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                          "rope_theta": 10000.0}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=1000, video_token_id=999, vision_start_token_id=998, vision_end_token_id=997,
        tie_word_embeddings=False,
    )
    model = Qwen2VLForConditionalGeneration(config)
    return _perturb_and_save(model, path)


def _perturb_and_save(model, path: str) -> str:
    """Move norms and biases off their init values (ones / zeros would hide mapping mistakes), then save."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return path


def make_tiny_qwen2_5_vl(path: str, seed: int = 0) -> str:
    """Tiny Qwen2.5-VL: 2 vision blocks (block 0 windowed, 1 full attention; 16-pixel windows = 2x2 merged
    tokens, so the [4, 6] grid really splits into windows), tied word embeddings (exercises the tied path)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128, vocab_size=1001, rms_norm_eps=1e-6, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                          "rope_theta": 10000.0}),
        vision_config=dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           window_size=16, fullatt_block_indexes=[1], tokens_per_second=2),
        image_token_id=1000, video_token_id=999, vision_start_token_id=998, vision_end_token_id=997,
        tie_word_embeddings=True,
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    return _perturb_and_save(model, path)


def qwen3_vl_config(config_cls, **text) -> object:
    """The tiny Qwen3-VL(-MoE) config: 4 text layers with 3 DeepStack maps (after layers 0, 1, 2: under PP=2 the
    maps reach both stages), interleaved mRoPE over 8 rotary channels (head_dim 16), 3 vision blocks with a 4 x 4
    table of learned position embeddings (interpolated to each grid); `text`: extra text-config fields."""
    return config_cls(
        text_config=dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, intermediate_size=128, vocab_size=1001, rms_norm_eps=1e-6,
                         max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True,
                                          "rope_theta": 10000.0}, **text),
        vision_config=dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2,
                           patch_size=4, spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                           num_position_embeddings=16, deepstack_visual_indexes=[0, 1, 2]),
        image_token_id=1000, video_token_id=999, vision_start_token_id=998, vision_end_token_id=997,
        tie_word_embeddings=False,
    )


def make_tiny_qwen3_vl(path: str, seed: int = 0) -> str:
    """Tiny Qwen3-VL (`qwen3_vl_config`)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(qwen3_vl_config(Qwen3VLConfig))
    return _perturb_and_save(model, path)


def make_tiny_qwen3_vl_moe(path: str, seed: int = 0) -> str:
    """Tiny Qwen3-VL-MoE: the tiny Qwen3-VL with 4 experts (top 2, 48 channels) in every text layer, its fused
    expert tensors stored as the released checkpoints hold them (`store_experts_as_released`; transformers'
    save_pretrained writes its in-memory layout), routers and experts drawn at random (`randomize_experts`)."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(seed)
    config = qwen3_vl_config(Qwen3VLMoeConfig, moe_intermediate_size=48, num_experts=4, num_experts_per_tok=2)
    model = Qwen3VLMoeForConditionalGeneration(config)
    randomize_experts(model)
    _perturb_and_save(model, path)
    store_experts_as_released(path)
    return path


def randomize_experts(model) -> None:
    """Draw the routers and experts of a MoE model at random (HF initialises routers to zeros: every expert
    choice would be a tie)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight") or ".mlp.experts." in name:
                p.copy_(torch.randn_like(p) * 0.2)


def store_experts_as_released(path: str) -> None:
    """Rewrite the fused expert tensors of a transformers-saved MoE model as the released Qwen3-VL-MoE checkpoints
    hold them (transposed: gate_up_proj [E, H, 2F], down_proj [E, F, H])."""
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    hub = {k: (t.transpose(1, 2).contiguous() if k.endswith(("experts.gate_up_proj", "experts.down_proj")) else t)
           for k, t in tensors.items()}
    save_file(hub, file, metadata={"format": "pt"})


def qwen3_5_text(moe: bool = False, **fields) -> dict:
    """The tiny Qwen3.5(-MoE) text config: 4 hybrid layers (linear, full, linear, full: under PP=2 one of each on
    both stages), 2 delta-net key heads of 2 value heads each, gated attention with head_dim 16 and partial rotary
    (8 of 16 channels) in interleaved mRoPE sections [2, 1, 1]; `moe`: 4 experts (top 2) of 24 channels and a gated
    shared expert of 40 in every layer; `fields`: overrides."""
    text = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                intermediate_size=96, vocab_size=1001, rms_norm_eps=1e-6, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True,
                                 "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
                layer_types=["linear_attention", "full_attention"] * 2)
    if moe:
        text.update(moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=4, num_experts_per_tok=2)
        del text["intermediate_size"]
    return dict(text, **fields)


QWEN3_5_VISION = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=16)


def make_tiny_qwen3_5(path: str, seed: int = 0, moe: bool = False) -> str:
    """Tiny Qwen3.5 (`qwen3_5_text`; dense: tied word embeddings, as the small released models) or Qwen3.5-MoE
    (`moe`: untied, routers and experts drawn at random, fused experts in transformers' own layout, which the
    released checkpoints hold too); 2 vision blocks without DeepStack."""
    import transformers

    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    torch.manual_seed(seed)
    prefix = "Qwen3_5Moe" if moe else "Qwen3_5"
    config = getattr(transformers, prefix + "Config")(
        text_config=qwen3_5_text(moe), vision_config=QWEN3_5_VISION, image_token_id=1000, video_token_id=999,
        vision_start_token_id=998, vision_end_token_id=997, tie_word_embeddings=not moe)
    model = getattr(transformers, prefix + "ForConditionalGeneration")(config)
    if moe:
        randomize_experts(model)
    return _perturb_and_save(model, path)


def make_tiny_qwen3_5_moe(path: str, seed: int = 0) -> str:
    """Tiny Qwen3.5-MoE (`make_tiny_qwen3_5`)."""
    return make_tiny_qwen3_5(path, seed, moe=True)


FAMILIES = {  # --family: (tiny model builder, HF class name, module with get_rope_index)
    "qwen2_vl": (make_tiny_qwen2_vl, "Qwen2VLForConditionalGeneration", "llamafactory_mca.models.qwen2_vl"),
    "qwen2_5_vl": (make_tiny_qwen2_5_vl, "Qwen2_5_VLForConditionalGeneration",
                   "llamafactory_mca.models.qwen2_5_vl"),
    "qwen3_vl": (make_tiny_qwen3_vl, "Qwen3VLForConditionalGeneration", "llamafactory_mca.models.qwen3_vl"),
    "qwen3_vl_moe": (make_tiny_qwen3_vl_moe, "Qwen3VLMoeForConditionalGeneration", "llamafactory_mca.models.qwen3_vl"),
    "qwen3_5": (make_tiny_qwen3_5, "Qwen3_5ForConditionalGeneration", "llamafactory_mca.models.qwen3_vl"),
    "qwen3_5_moe": (make_tiny_qwen3_5_moe, "Qwen3_5MoeForConditionalGeneration", "llamafactory_mca.models.qwen3_vl"),
}


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIM = os.path.join(REPO, "tests", "hf_conv3d_shim")


def make_tiny_vl_model(path: str, family: str = "qwen2_vl") -> str:
    """Tiny Qwen2-VL (family "qwen2_vl"), Qwen2.5-VL ("qwen2_5_vl"), Qwen3-VL ("qwen3_vl": 4 text layers,
    DeepStack after layers 0-2) or Qwen3-VL-MoE ("qwen3_vl_moe": the same with 4 experts per layer) + tokenizer + processor, all built offline (seeded), for LLaMA-Factory runs."""
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    from make_tiny_model import _corpus
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    import transformers
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = "What is in the image? Describe the picture. red green blue yellow square circle white background"
    tok.train_from_iterator(_corpus() + [words], trainer=trainers.BpeTrainer(
        vocab_size=480, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=special[1:], model_max_length=4096, padding_side="right",
                                   clean_up_tokenization_spaces=False)
    ids = {t: fast.convert_tokens_to_ids(t) for t in special}
    pixels = dict(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=64 * 64)
    text = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=512, rms_norm_eps=1e-6, max_position_embeddings=1024,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    video_processor = Qwen2VLVideoProcessor(**pixels)
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
        names = ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor")
    elif family == "qwen2_5_vl":  # block 0 windowed (16-pixel windows), block 1 full attention; gated MLP
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=16,
                      fullatt_block_indexes=[1])
        names = ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor")
    elif family in ("qwen3_vl", "qwen3_vl_moe"):
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        vision = dict(depth=3, hidden_size=32, out_hidden_size=64, intermediate_size=48, num_heads=2, patch_size=4,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=16,
                      deepstack_visual_indexes=[0, 1, 2])
        text.update(num_hidden_layers=4, head_dim=16)
        text["rope_parameters"] = dict(text["rope_parameters"], mrope_interleaved=True)
        video_processor = Qwen3VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                                size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64 * 4})
        names = ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "Qwen3VLProcessor")
        if family == "qwen3_vl_moe":  # 4 experts (top 2) of 48 channels in every layer
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)
            names = ("Qwen3VLMoeConfig", "Qwen3VLMoeForConditionalGeneration", "Qwen3VLProcessor")
    elif family in ("qwen3_5", "qwen3_5_moe"):  # the hybrid text model of `qwen3_5_text`, no DeepStack
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        vision = dict(QWEN3_5_VISION)
        text = qwen3_5_text(family == "qwen3_5_moe", vocab_size=512, max_position_embeddings=1024,
                            eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
        video_processor = Qwen3VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                                size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64 * 4})
        prefix = "Qwen3_5Moe" if family == "qwen3_5_moe" else "Qwen3_5"
        names = (prefix + "Config", prefix + "ForConditionalGeneration", "Qwen3VLProcessor")
    else:
        raise ValueError(family)
    config_cls, model_cls, processor_cls = (getattr(transformers, n) for n in names)
    processor = processor_cls(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=fast,
                              video_processor=video_processor)
    config = config_cls(
        text_config=text, vision_config=vision,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=family == "qwen3_5", eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    torch.manual_seed(0)
    model = model_cls(config)
    if family in ("qwen3_vl_moe", "qwen3_5_moe"):
        randomize_experts(model)
    model.save_pretrained(path)
    if family == "qwen3_vl_moe":
        store_experts_as_released(path)
    processor.save_pretrained(path)
    return path


def train_vl(tmp_path, name: str, recipe: dict, nproc: int = 1, mca: bool = True) -> str:
    """`lf_runs.train`; the Hugging Face reference run (mca=False) with tests/hf_conv3d_shim on PYTHONPATH."""
    import lf_runs

    if mca:
        return lf_runs.train(tmp_path, name, recipe, nproc=nproc, mca=True)
    original = lf_runs.clean_env

    def with_shim(**extra):
        extra["PYTHONPATH"] = SHIM + os.pathsep + extra.get("PYTHONPATH", REPO)
        return original(**extra)

    lf_runs.clean_env = with_shim
    try:
        return lf_runs.train(tmp_path, name, recipe, nproc=nproc, mca=False)
    finally:
        lf_runs.clean_env = original


def make_inputs(hf_config, seed: int = 7, video: bool = False) -> dict:
    """Two rows, one image each ([1, 4, 4] and [1, 4, 6] patch grids -> 4 and 6 image tokens), right padding.
    `video`: row 0 also holds a video of 2 temporal steps of a [4, 4] grid (4 tokens per step), laid out as the
    family's processor does: Qwen3-VL one <vision_start> frame <vision_end> group per step after a timestamp
    token, the others one group; Qwen2.5-VL with second_per_grid_ts 1.5."""
    g = torch.Generator().manual_seed(seed)
    grids = torch.tensor([[1, 4, 4], [1, 4, 6]])
    vc = hf_config.vision_config
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    pixel_values = torch.randn(int(grids.prod(-1).sum()), patch_dim, generator=g)
    merge = vc.spatial_merge_size ** 2
    vs, ve = hf_config.vision_start_token_id, hf_config.vision_end_token_id
    rows = []
    for i, grid in enumerate(grids):
        n_img = int(grid.prod()) // merge
        pre = torch.randint(0, 990, (3 + i,), generator=g).tolist()
        post = torch.randint(0, 990, (5,), generator=g).tolist()
        rows.append(pre + [vs] + [hf_config.image_token_id] * n_img + [ve] + post)
    out = {}
    if video:
        vgrid = torch.tensor([[2, 4, 4]])
        per_step = 16 // merge
        if hf_config.model_type.startswith(("qwen3_vl", "qwen3_5")):
            for step in range(2):
                rows[0] += [900 + step, vs] + [hf_config.video_token_id] * per_step + [ve]
        else:
            rows[0] += [vs] + [hf_config.video_token_id] * (2 * per_step) + [ve]
        rows[0] += torch.randint(0, 990, (3,), generator=g).tolist()
        out = dict(pixel_values_videos=torch.randn(2 * 16, patch_dim, generator=g), video_grid_thw=vgrid)
        if hf_config.model_type == "qwen2_5_vl":
            out["second_per_grid_ts"] = torch.tensor([1.5])
    s = -(-max(len(r) for r in rows) // 4) * 4  # divisible by tp under sequence parallelism
    input_ids = torch.tensor([r + [0] * (s - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (s - len(r)) for r in rows])
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, image_grid_thw=grids,
                **out)


VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


def forward(models, inputs, position_ids, keep_local: list | None = None,
            info: dict | None = None) -> torch.Tensor | None:
    """Forward through pipeline stages with plain p2p; full-vocab logits on the last stage. `info` gets the rows
    of the tensor a later stage received (`received_rows`)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    pp = ps.get_pipeline_model_parallel_world_size()
    pp_rank = ps.get_pipeline_model_parallel_rank()
    tp = ps.get_tensor_model_parallel_world_size()
    group_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
    model = models[0]
    config = model.config
    if pp_rank > 0:  # the shape first: Qwen3-VL stages send their DeepStack maps along (rows beyond the sequence)
        shape = torch.empty(3, dtype=torch.long)
        dist.recv(shape, src=group_ranks[pp_rank - 1])
        buf = torch.empty(shape.tolist(), dtype=config.params_dtype)
        if info is not None:
            info["received_rows"] = int(shape[0])
        dist.recv(buf, src=group_ranks[pp_rank - 1])
        model.set_input_tensor(buf)
    else:
        model.set_input_tensor(None)
    extra = {}
    if pp_rank == 0:
        extra = {k: inputs[k] for k in VISION_KEYS if k in inputs}
    y = model(input_ids=inputs["input_ids"], position_ids=position_ids, attention_mask=None, **extra)
    if pp_rank < pp - 1:
        dist.send(torch.tensor(y.shape, dtype=torch.long), dst=group_ranks[pp_rank + 1])
        dist.send(y.contiguous(), dst=group_ranks[pp_rank + 1])
        return None
    if keep_local is not None:
        keep_local.append(y)
    if tp > 1:
        parts = [torch.empty_like(y) for _ in range(tp)]
        dist.all_gather(parts, y.contiguous(), group=ps.get_tensor_model_parallel_group())
        y = torch.cat(parts, dim=-1)
    return y


def packed_features(inputs: dict) -> dict:
    """The rows of `inputs` as one LLaMA-Factory neat_packing row: samples back to back, the attention mask
    holding their indices 1, 2 (0 = padding: 4 tokens), the images in order; sft labels (the first 3 tokens of
    each sample are its prompt: -100)."""
    real = inputs["attention_mask"].bool()
    ids, seg, labels = [], [], []
    for i in range(real.shape[0]):
        row = inputs["input_ids"][i][real[i]].tolist()
        ids += row
        seg += [i + 1] * len(row)
        labels += [-100] * 3 + row[3:]
    ids, seg, labels = ids + [0] * 4, seg + [0] * 4, labels + [-100] * 4
    out = {k: inputs[k] for k in VISION_KEYS + ("second_per_grid_ts",) if k in inputs}
    return dict(out, input_ids=torch.tensor([ids]), attention_mask=torch.tensor([seg]), labels=torch.tensor([labels]))


def unpacked_features(inputs: dict) -> dict:
    """`inputs` with sft labels as `packed_features` gives them (prompt: the first 3 tokens of each row)."""
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels[:, :3] = -100
    return dict(inputs, labels=labels)


def check_pack_cp(model_dir: str, layout: str, work: str) -> dict:
    """Logits and loss of the training data path (training/data: to_microbatch, lay_out with neat_packing THD
    and / or CP 2, the model's kwargs) against Hugging Face on the unpacked rows, each sample alone (fp32).

    The CP ranks' logits are gathered and put back in full-sequence order (`packing.cp_indices`); THD samples
    are cut out of the packed row by its cu_seqlens."""
    import torch.distributed as dist
    import transformers
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models.packing import cp_indices
    from llamafactory_mca.models.registry import bridge_for
    from llamafactory_mca.training import data as mdata
    from llamafactory_mca.training.loop import model_kwargs
    from llamafactory_mca.training.multimodal import rope_fn

    hf_config = AutoConfig.from_pretrained(model_dir)
    bridge = bridge_for(hf_config.model_type)
    models = bridge.build_model(hf_config, MegatronArguments(**LAYOUTS[layout]), torch.float32, init_weights=False)
    bridge.load_hf_weights(models, model_dir)
    models[0].eval()
    inputs = make_inputs(hf_config, video=hf_config.model_type == "qwen2_5_vl")
    thd = layout.endswith("thd")
    cp, cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
    features = packed_features(inputs) if thd else unpacked_features(inputs)
    mb = mdata.to_microbatch(features, 0, segments=thd, rope_fn=rope_fn(hf_config))
    full_positions = mb.position_ids.clone()
    [mb] = mdata.lay_out([mb], mdata.SeqLayout(cp=cp, cp_rank=cp_rank, thd=thd), 0, False, 1)
    with torch.no_grad():
        local = models[0](mb.tokens, mb.position_ids, None, **model_kwargs(mb, torch.device("cpu")))  # [b, s/cp, V]
        per_token = models[0](mb.tokens, mb.position_ids, None, labels=mb.labels,
                              **model_kwargs(mb, torch.device("cpu")))
    loss = (per_token.float() * mb.loss_mask).sum()
    p = mb.packed_seq_params
    lens = (p.cu_seqlens_q_padded[1:] - p.cu_seqlens_q_padded[:-1]).tolist() if thd else [mb.schedule_seq_length]
    if cp > 1:
        parts = [torch.empty_like(local) for _ in range(cp)]
        dist.all_gather(parts, local.contiguous(), group=ps.get_context_parallel_group())
        full = torch.empty(local.shape[0], sum(lens), local.shape[-1])
        for r, part in enumerate(parts):
            full[:, cp_indices(lens, cp, r)] = part
        dist.all_reduce(loss, group=ps.get_context_parallel_group())
    else:
        full = local
    V = hf_config.text_config.vocab_size
    if thd:  # cut each sample out of the packed row
        starts, reals = p.cu_seqlens_q_padded.tolist(), (p.cu_seqlens_q[1:] - p.cu_seqlens_q[:-1]).tolist()
        samples = [full[0, a:a + n, :V] for a, n in zip(starts, reals[:2])]
    else:
        real = inputs["attention_mask"].bool()
        samples = [full[i, : int(real[i].sum()), :V] for i in range(2)]
    hf = getattr(transformers, FAMILIES[hf_config.model_type][1]).from_pretrained(model_dir, dtype=torch.float32)
    hf.eval()
    ref_features = unpacked_features(inputs)
    mm = (inputs["input_ids"] == hf_config.image_token_id).int() \
        + 2 * (inputs["input_ids"] == hf_config.video_token_id).int()
    with torch.no_grad():
        out = hf(**{k: v for k, v in ref_features.items() if k != "labels"}, mm_token_type_ids=mm)
    real = inputs["attention_mask"].bool()
    refs = [out.logits[i, : int(real[i].sum())] for i in range(2)]
    shifted = torch.cat([ref_features["labels"][:, 1:], torch.full((2, 1), -100)], 1)
    ref_loss = torch.nn.functional.cross_entropy(out.logits.reshape(-1, V), shifted.reshape(-1), reduction="sum")
    res = {"layout": layout, "tokens_per_rank": int(mb.tokens.shape[-1]),
           "logits_max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(samples, refs)),
           "loss": float(loss), "hf_loss": float(ref_loss), "positions": full_positions.tolist()}
    if thd:  # every sample's positions restart at 0 as if unpacked (HF's rope index of the padded rows)
        hf_pos = rope_fn(hf_config)(inputs["input_ids"], inputs["image_grid_thw"], inputs.get("video_grid_thw"),
                                    inputs["attention_mask"], second_per_grid_ts=inputs.get("second_per_grid_ts"))
        got = [full_positions[:, 0, a:a + n] for a, n in zip((0, reals[0]), reals[:2])]  # the packed row
        res["positions_equal_unpacked"] = all(
            torch.equal(g, hf_pos[:, i, : int(real[i].sum())]) for i, g in enumerate(got))
    return res


def check(model_dir: str, layout: str, work: str) -> dict:
    if layout in PACK_CP_LAYOUTS:
        return check_pack_cp(model_dir, layout, work)
    import torch.distributed as dist
    import transformers
    from transformers import AutoConfig

    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models.registry import bridge_for
    from llamafactory_mca.training.multimodal import internal_hf_name, rope_fn

    res: dict = {"layout": layout}
    hf_config = AutoConfig.from_pretrained(model_dir)
    _, hf_cls_name, _ = FAMILIES[hf_config.model_type]
    HFModel = getattr(transformers, hf_cls_name)
    bridge = bridge_for(hf_config.model_type)
    mca_args = MegatronArguments(**layout_args(hf_config, layout))
    models = bridge.build_model(hf_config, mca_args, torch.float32, init_weights=False)
    bridge.load_hf_weights(models, model_dir)
    for m in models:
        m.eval()
    res["has_vision"] = models[0].vision_model is not None
    video = layout.endswith("video")
    inputs = make_inputs(hf_config, video=video)
    position_ids = rope_fn(hf_config)(inputs["input_ids"], inputs["image_grid_thw"], inputs.get("video_grid_thw"),
                                      inputs["attention_mask"], second_per_grid_ts=inputs.get("second_per_grid_ts"))
    backward = layout in ("dp2", "tp2")  # pipeline backward needs the schedule; covered by the trainer tests
    V = hf_config.text_config.vocab_size
    real = inputs["attention_mask"].bool()
    labels = torch.cat([inputs["input_ids"][:, 1:], torch.full((real.shape[0], 1), -100)], 1)
    labels = labels.masked_fill(~torch.cat([real[:, 1:], torch.zeros_like(real[:, :1])], 1), -100)
    ce = torch.nn.functional.cross_entropy
    with torch.set_grad_enabled(backward):
        local = []
        logits = forward(models, inputs, position_ids, keep_local=local, info=res)
        if backward:  # vocab-parallel loss on this rank's logits (the TP gather above has no autograd)
            from megatron.core import tensor_parallel

            per_token = tensor_parallel.vocab_parallel_cross_entropy(
                local[0].transpose(0, 1).contiguous(), labels.clamp(min=0).transpose(0, 1).contiguous())
            (per_token.transpose(0, 1) * (labels != -100)).sum().backward()
    if logits is not None:
        hf = HFModel.from_pretrained(model_dir, dtype=torch.float32)
        hf.eval()
        mm = (inputs["input_ids"] == hf_config.image_token_id).int() \
            + 2 * (inputs["input_ids"] == hf_config.video_token_id).int()
        with torch.set_grad_enabled(backward):
            ref = hf(**inputs, mm_token_type_ids=mm).logits
            if backward:
                ce(ref.reshape(-1, V), labels.reshape(-1), reduction="sum").backward()
        res["logits_max_abs_diff"] = float((logits.detach()[..., :V] - ref.detach())[real].abs().max())
        with torch.no_grad():  # the image really enters: without pixels the logits differ
            plain = hf(input_ids=inputs["input_ids"]).logits
        res["image_effect"] = float((plain - ref.detach())[real].abs().max())
        mergers = getattr(hf.model.visual, "deepstack_merger_list", None)
        if mergers is not None:  # Qwen3-VL: the last DeepStack map really enters (after layer K-1)
            with torch.no_grad():
                mergers[-1].linear_fc2.weight.zero_()
                mergers[-1].linear_fc2.bias.zero_()
                without = hf(**inputs, mm_token_type_ids=mm).logits
            res["last_deepstack_effect"] = float((without - ref.detach())[real].abs().max())
    if backward:
        from tests.seq_helpers import _compare_grads, _grads_hf_named

        if ps_tp_size() > 1:  # what megatron's finalize_model_grads sums over TP: q/k norms (Qwen3-VL)
            _sum_qk_norm_grads(models)
        grads = _grads_hf_named(bridge, models)
        if dist.get_rank() == 0:
            res.update(_compare_grads(in_hf_layout({internal_hf_name(k): v for k, v in grads.items()}, hf), hf))

    exported = dict(bridge.export_hf_state_dict(models))
    if dist.get_rank() == 0:
        res.update(compare_with_hf_checkpoint(model_dir, exported))
    out_dir = os.path.join(work, f"{hf_config.model_type}-{layout}")
    bridge.save_hf_pretrained(models, out_dir, max_shard_size="100KB")
    if dist.get_rank() == 0:
        sd = HFModel.from_pretrained(out_dir, dtype=torch.float32).state_dict()
        ref_sd = HFModel.from_pretrained(model_dir, dtype=torch.float32).state_dict()
        res["saved_shards"] = len([f for f in os.listdir(out_dir) if f.endswith(".safetensors")])
        res["reload_not_equal"] = sorted(k for k in ref_sd if k not in sd or not torch.equal(ref_sd[k], sd[k]))
    return res


def ps_tp_size() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_world_size()


def _sum_qk_norm_grads(models) -> None:
    """Sum the q/k RMSNorm gradients over TP ranks (each rank holds the heads of its shard)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    for m in models:
        for name, p in m.named_parameters():
            if ("q_layernorm" in name or "k_layernorm" in name) and p.grad is not None:
                dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())


def launch_checks(model: str, layouts, tmp_path_factory) -> list:
    """Run `check` under torchrun (2 ranks) for `layouts` on `model`; per rank {layout: result}."""
    from tests.workers import launch_worker

    return launch_worker("vl_helpers.py", ["--model", model, "--layouts", ",".join(layouts)],
                         tmp_path_factory.mktemp("results"), key=("layout",))


def assert_logits_parity(results: list, layout: str, tol: float = 1e-5, effects: tuple = ("image_effect",)) -> None:
    """On every rank holding logits: no error, each of `effects` (inputs that must change the logits) > 1e-3, and
    the logits within `tol` of HF's."""
    diffs = []
    for rank_results in results:
        r = rank_results[layout]
        assert "error" not in r, r["error"]
        if "logits_max_abs_diff" in r:
            diffs.append(r["logits_max_abs_diff"])
            for effect in effects:
                assert r[effect] > 1e-3, (effect, r)
    assert diffs and max(diffs) <= tol, diffs


def assert_deepstack_parity(results: list, layout: str, tol: float = 1e-5) -> None:
    """Qwen3-VL(-MoE): `assert_logits_parity` with the image and the last DeepStack map (after layer 2) both
    changing the logits; under PP the vision tower is on stage 0 only and stage 1 (layers 2, 3) received
    [hidden ; 3 DeepStack maps] (rows a multiple of 4)."""
    assert_logits_parity(results, layout, tol, effects=("image_effect", "last_deepstack_effect"))
    if layout.startswith("pp2"):
        assert [results[rank][layout]["has_vision"] for rank in (0, 1)] == [True, False]
        assert results[1][layout]["received_rows"] % 4 == 0 and results[1][layout]["received_rows"] > 0


def assert_grads_match(r: dict) -> None:
    """The layout's parameter gradients equal HF's to 1e-5 relative."""
    assert "error" not in r, r["error"]
    assert "grad_error" not in r, r["grad_error"]
    assert r["grad_max_rel_diff"] <= 1e-5, r


def assert_round_trip(r: dict) -> None:
    """Export is bit-exact and save_hf_pretrained (several shards) reloads with transformers to the same weights."""
    assert "error" not in r, r["error"]
    assert r["missing"] == [] and r["extra"] == [] and r["not_equal"] == [], r
    assert r["saved_shards"] > 1
    assert r["reload_not_equal"] == [], r


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--layouts", required=True)
    a = p.parse_args(argv)
    cases = [(layout, a.model) for layout in a.layouts.split(",")]
    return run_cases(a.out, cases, check, LAYOUTS, lambda _model, layout: {"layout": layout})


if __name__ == "__main__":
    sys.exit(main())
