"""The published Megatron recipes (examples/megatron/*.yaml) run as benchmark scenarios (issue 9).

A recipe scenario of run.py (`recipe=` in its SCENARIOS entry) takes the example YAML as it is and changes only
what a run on this machine must change:
- the model: built locally with the recipe model's real shape (shapes.py) and random weights, and a word-level
  tokenizer (plus a Qwen2-VL processor for the VL recipe);
- the data: generated SFT samples (alpaca format; sharegpt with one 512x512 image each for the VL recipe),
  every one longer than cutoff_len, so LLaMA-Factory cuts each to exactly cutoff_len tokens and a step's
  token count is global batch x cutoff_len on both sides;
- the Megatron layout, divided down to the lent GPUs (`scale`); the global batch stays the recipe's;
- steps (max_steps), logging every step, one checkpoint at the last step (`save_only_model`: the weights, which
  `llamafactory-mca merge` then turns into a Hugging Face model that transformers loads).
The HF side runs the same recipe without the Megatron keys, with FSDP full_shard over all GPUs.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# the Megatron layout keys a tiny (1 process, CPU) run resets
_LAYOUT_KEYS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size",
                "context_parallel_size", "virtual_pipeline_model_parallel_size")
VL_SPECIALS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")


def megatron_keys() -> set[str]:
    """Every key our backend adds to a LLaMA-Factory recipe (the HF side drops them)."""
    import dataclasses

    from llamafactory_mca.args import MegatronArguments

    return {f.name for f in dataclasses.fields(MegatronArguments)}


def load_recipe(sc: dict) -> dict:
    with open(os.path.join(ROOT, sc["recipe"])) as f:
        return yaml.safe_load(f)


# ---------------------------------------------------------------------------------------------- building


def build(name: str, sc: dict, work: str, tiny: bool, steps: int, dinfo: dict) -> tuple[dict, object, dict]:
    """Model + tokenizer (+ processor) under work/model, data under work/data. Returns (model info, the config
    whose language model the FLOP count uses, data info)."""
    import torch
    from run import build_tokenizer
    from shapes import hf_config_for, total_params

    model_dir, data_dir = os.path.join(work, "model"), os.path.join(work, "data")
    os.makedirs(model_dir, exist_ok=True)
    vl = sc.get("vl", False)
    n_words = 400 if tiny else 32000
    tok = build_tokenizer(model_dir, n_words, extra_specials=VL_SPECIALS if vl else ())
    ids = {t: tok.convert_tokens_to_ids(t) for t in VL_SPECIALS}
    cfg = hf_config_for(name, tiny=tiny, seq=sc["seq"], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        vision_token_ids=dict(vision_start_token_id=ids["<|vision_start|>"],
                                              vision_end_token_id=ids["<|vision_end|>"],
                                              image_token_id=ids["<|image_pad|>"],
                                              video_token_id=ids["<|video_pad|>"]) if vl else None)
    torch.manual_seed(0)
    dtype = torch.float32 if tiny else torch.bfloat16
    device = "cuda" if dinfo["device"] == "cuda" else "cpu"
    if vl:
        from transformers import AutoModelForImageTextToText as Auto
    else:
        from transformers import AutoModelForCausalLM as Auto
    t0 = time.time()
    with torch.device(device):
        model = Auto.from_config(cfg, dtype=dtype)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    if vl:
        _save_vl_processor(model_dir, tok, tiny)
    text_cfg = cfg.get_text_config()
    info = dict(model_type=cfg.model_type, params=n_params, text_params=total_params(text_cfg),
                layers=text_cfg.num_hidden_layers, hidden=text_cfg.hidden_size, vocab=text_cfg.vocab_size,
                build_s=round(time.time() - t0, 1))
    n_samples = steps * sc["global_batch"] + 8
    data = build_sft_data(data_dir, n_samples, sc["seq"], n_words, vl=vl, image_side=56 if tiny else 512)
    return info, text_cfg, data


def _save_vl_processor(model_dir: str, tok, tiny: bool) -> None:
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    pixels = dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)
    Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tok,
                     video_processor=Qwen2VLVideoProcessor(**pixels)).save_pretrained(model_dir)


def build_sft_data(out_dir: str, n_samples: int, cutoff: int, n_words: int, vl: bool, image_side: int,
                   seed: int = 0) -> dict:
    """SFT samples longer than cutoff (prompt ~cutoff/4 words, answer ~1.2 cutoff words), so LLaMA-Factory's
    truncation keeps the whole prompt and cuts every sample to cutoff_len tokens; VL samples start with one
    image (a few distinct noise images, image_side pixels square)."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(n_words)]
    os.makedirs(out_dir, exist_ok=True)
    images = []
    if vl:
        import numpy as np
        from PIL import Image

        os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
        nrng = np.random.default_rng(seed)
        for i in range(8):
            images.append(f"images/{i:02d}.png")
            Image.fromarray(nrng.integers(0, 256, (image_side, image_side, 3), dtype=np.uint8)).save(
                os.path.join(out_dir, images[-1]))
    samples = []
    for i in range(n_samples):
        prompt = " ".join(rng.choices(words, k=max(4, cutoff // 4)))
        answer = " ".join(rng.choices(words, k=int(cutoff * 1.2)))
        if vl:
            samples.append({"messages": [{"role": "user", "content": "<image>" + prompt},
                                         {"role": "assistant", "content": answer}], "images": [images[i % len(images)]]})
        else:
            samples.append({"instruction": prompt, "input": "", "output": answer})
    with open(os.path.join(out_dir, "bench_sft.json"), "w") as f:
        json.dump(samples, f)
    info = {"file_name": "bench_sft.json"}
    if vl:
        info.update(formatting="sharegpt", columns={"messages": "messages", "images": "images"},
                    tags={"role_tag": "role", "content_tag": "content", "user_tag": "user",
                          "assistant_tag": "assistant"})
    with open(os.path.join(out_dir, "dataset_info.json"), "w") as f:
        json.dump({"bench_sft": info}, f)
    return dict(samples=n_samples, images=len(images), image_side=image_side if vl else None)


# ---------------------------------------------------------------------------------------------- recipes


def recipe_pair(sc: dict, work: str, steps: int, tiny: bool) -> tuple[dict, dict, dict]:
    """(common keys, ours, HF) from the example recipe; see the module docstring for what changes."""
    base = load_recipe(sc)
    mkeys = megatron_keys()
    common = {k: v for k, v in base.items() if k not in mkeys}
    common.pop("num_train_epochs", None)  # max_steps decides
    common.pop("gradient_accumulation_steps", None)  # per side, for the same global batch
    common.update(
        model_name_or_path=os.path.join(work, "model"), dataset="bench_sft", dataset_dir=os.path.join(work, "data"),
        overwrite_cache=True, overwrite_output_dir=True, max_steps=steps, logging_steps=1, save_steps=steps,
        save_only_model=True, report_to="none", plot_loss=False, ddp_timeout=3600, seed=42,
        preprocessing_num_workers=1 if tiny else 8,
    )
    if tiny:
        common.update(cutoff_len=sc["seq"], bf16=False, image_max_pixels=56 * 56)
    ours = dict(common, output_dir=os.path.join(work, "out_ours"))
    ours.update({k: v for k, v in base.items() if k in mkeys})
    ours.update(sc.get("scale", {}))
    ours.update(sc.get("ours_extra", {}))
    hf = dict(common, output_dir=os.path.join(work, "out_hf"), save_strategy="no", **sc.get("hf", {}))
    if tiny:
        for k in _LAYOUT_KEYS:
            ours.pop(k, None)
        ours["sequence_parallel"] = False
        for k in [k for k in hf if k.startswith("fsdp")]:
            hf.pop(k)
    n = sc["gpus"]
    mp = 1
    for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
        mp *= ours.get(k) or 1
    for side, dp in ((ours, n // mp), (hf, n)):
        if sc["global_batch"] % (dp * side["per_device_train_batch_size"]):
            raise ValueError(f"global batch {sc['global_batch']} not divisible by data-parallel size {dp}")
        side["gradient_accumulation_steps"] = sc["global_batch"] // (dp * side["per_device_train_batch_size"])
    return common, ours, hf


# ---------------------------------------------------------------------------------------------- merge + load


def merge_and_load(sc: dict, work: str, ours: dict, tiny: bool) -> dict:
    """`llamafactory-mca merge` of ours' last checkpoint, then transformers loads the result: same tensor names
    and shapes as the model we started from, no missing/unexpected keys, frozen tensors (VL: the vision tower)
    unchanged and trained ones changed."""
    import torch
    from safetensors import safe_open

    ckpt = os.path.join(ours["output_dir"], f"checkpoint-{ours['max_steps']}")
    merged = os.path.join(work, "merged")
    out = dict(checkpoint=os.path.basename(ckpt), ok=False)
    if not os.path.isdir(ckpt):
        out["error"] = f"{ckpt} was not written"
        return out
    t0 = time.time()
    cmd = [sys.executable, "-m", "llamafactory_mca.cli", "merge", "--checkpoint_path", ckpt, "--output_path", merged,
           "--overwrite_output_dir"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    out.update(merge_s=round(time.time() - t0, 1), merge_returncode=r.returncode)
    if r.returncode != 0:
        out["error"] = (r.stdout + r.stderr)[-2000:]
        return out
    if sc.get("vl"):  # the image processor travels with the checkpoint into the merged model
        out["processor_saved"] = os.path.isfile(os.path.join(merged, "processor_config.json")) or os.path.isfile(
            os.path.join(merged, "preprocessor_config.json"))
    out["merged_gib"] = round(sum(os.path.getsize(os.path.join(merged, f)) for f in os.listdir(merged)) / 2**30, 2)

    def tensors(d: str) -> dict:
        found = {}
        for fn in sorted(os.listdir(d)):
            if fn.endswith(".safetensors"):
                with safe_open(os.path.join(d, fn), "pt") as f:
                    for k in f.keys():
                        found[k] = (os.path.join(d, fn), list(f.get_slice(k).get_shape()))
        return found

    before, after = tensors(os.path.join(work, "model")), tensors(merged)
    out["same_tensor_names"] = sorted(before) == sorted(after)

    def read(where: dict, key: str) -> torch.Tensor:
        with safe_open(where[key][0], "pt") as f:
            return f.get_tensor(key)

    # shapes from the headers; values only for a few tensors: a trained one per kind, the frozen vision tower
    shapes_ok = all(before[k][1] == after[k][1] for k in before if k in after)
    changed, frozen_same = {}, None
    for k in sorted(before):
        if k not in after:
            continue
        if "visual" in k and k.endswith(("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "merger.mlp.0.weight")):
            frozen_same = (frozen_same is not False) and torch.equal(read(before, k), read(after, k))
        elif k.endswith(("layers.0.self_attn.q_proj.weight", "embed_tokens.weight", "layers.0.mlp.experts.gate_up_proj",
                         "layers.0.mlp.experts.0.gate_proj.weight")):
            changed[k] = float((read(before, k).float() != read(after, k).float()).float().mean())
    out.update(same_shapes=bool(shapes_ok), changed_fraction={k: round(v, 6) for k, v in list(changed.items())[:4]},
               vision_tower_unchanged=frozen_same)

    t0 = time.time()
    if sc.get("vl"):
        from transformers import AutoModelForImageTextToText as Auto
    else:
        from transformers import AutoModelForCausalLM as Auto
    model, info = Auto.from_pretrained(merged, dtype=torch.float32 if tiny else torch.bfloat16,
                                       output_loading_info=True)
    out.update(load_s=round(time.time() - t0, 1), loaded_class=type(model).__name__,
               loaded_params=sum(p.numel() for p in model.parameters()),
               missing_keys=len(info.get("missing_keys", [])), unexpected_keys=len(info.get("unexpected_keys", [])))
    del model
    out["ok"] = bool(out["same_tensor_names"] and shapes_ok and not out["missing_keys"] and not out["unexpected_keys"]
                     and changed and all(v > 0 for v in changed.values()) and frozen_same is not False
                     and out.get("processor_saved", True))
    return out
