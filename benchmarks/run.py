"""Our Megatron backend against LLaMA-Factory's own Hugging Face path: the same recipe, twice, in one invocation.

    python benchmarks/run.py --scenario s1                 # dense Qwen3 ~1.1B, 1 GPU, seq 4096
    python benchmarks/run.py --scenario s3                 # Qwen3-30B-A3B-shaped MoE (4 layers), 1 GPU
    python benchmarks/run.py --scenario s3x4               # the MoE with 8 layers, 4 GPUs (ours EP=4, HF FSDP)
    python benchmarks/run.py --scenario s2                 # Llama-3-8B, 4 GPUs (ours TP2 + dist. opt., HF FSDP)
    python benchmarks/run.py --scenario s3x2 --scenario s2x2 --scenario s4x2      # the 2-GPU scenarios
    python benchmarks/run.py --scenario r_moe2 --scenario r_vl2                   # the recipes on 2 GPUs
    python benchmarks/run.py --scenario s1 --sides ours,hf,hf_liger,hf_bf16       # + HF in pure bf16 (info)
    python benchmarks/run.py --scenario dsv3               # DeepSeek-V3 (MLA) at Moonlight-16B-A3B widths, 6 layers, 1 GPU
    python benchmarks/run.py --scenario s1 --tiny          # CPU smoke run (tests/test_benchmark_script.py)
    python benchmarks/run.py --scenario q_dense --sides ours,ours_fp8   # FP8 speed on the quality-run models; their
                                                           # 300-step losses: benchmarks/fp8_quality.py (issue 18)

For each scenario it builds, in a temporary folder, a model with the real architecture and size and random
weights (benchmarks/shapes.py; vocab 151936 / 128256), a word-level tokenizer, and a generated pre-training
corpus of realistic document lengths (log-normal, 16..16384 words, Zipf word frequencies); then runs
`llamafactory-cli train <recipe>` with USE_MCA=1 (ours) and without (LLaMA-Factory's HF Trainer; FSDP where
the scenario has several GPUs). Both recipes share every key (model, data, stage pt with packing into
cutoff_len blocks, bf16, lr, steps, global batch, no activation recompute on either side); each side adds only
its own launch keys (Megatron parallelism / HF FSDP), and gradient_accumulation_steps is set per side so that
the global batch is the same (see README "Global batch size").

Sides (--sides): `ours`; `hf`, LLaMA-Factory's HF path as it is (fp32 master weights under bf16 autocast);
`hf_liger`, the same with `enable_liger_kernel: true` (liger-kernel's fused linear cross entropy, RMSNorm,
SwiGLU, RoPE); `hf_bf16`, an information side with `pure_bf16: true` (no fp32 master weights: faster, less
exact). Ours is reported against the faster of `hf` and `hf_liger` (the "best HF"); `ours_<variant>` runs ours
with the keys of OURS_VARIANTS added (e.g. `ours_allgather`: the other MoE token dispatcher), for comparisons.
Every side's per-step training losses are read from its trainer_log.jsonl (`<side>.losses`); the JSON and
RESULTS.md give the largest relative difference of ours against each HF side over the steps both logged.

Measurement: benchmarks/_hook/sitecustomize.py (put on PYTHONPATH) records, after every optimizer step of
either backend, a synchronised timestamp and the peak GPU memory of each rank. Warm-up steps are excluded:
throughput = tokens of the measured steps / their wall time. Tokens per step = global batch x cutoff_len
(pre-training blocks are always full). MFU = model FLOPs per token (shapes.flops_per_token: 6 x active matmul
weights incl. LM head + causal attention) x tokens/s / (GPUs x bf16 dense peak of the card).

Writes benchmarks/results/<scenario>.json and regenerates the table in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from shapes import flops_per_token, hf_config_for, peak_tflops, total_params  # noqa: E402

RESULTS_DIR = os.path.join(HERE, "results")
RESULTS_MD = os.path.join(HERE, "RESULTS.md")

# ---------------------------------------------------------------------------------------------- scenarios


def fsdp(*layer_classes: str, **config) -> dict:
    """The HF side's launch keys: FSDP full_shard, one unit per instance of the named layer classes."""
    return dict(fsdp="full_shard auto_wrap", fsdp_config=dict(transformer_layer_cls_to_wrap=list(layer_classes), **config))


def expert_parallel(ep: int, dispatcher: str) -> dict:
    """Our launch keys for the MoE scenarios on several GPUs: EP, grouped-GEMM experts, distributed optimizer."""
    return dict(expert_model_parallel_size=ep, moe_grouped_gemm=True, moe_token_dispatcher_type=dispatcher,
                use_distributed_optimizer=True, overlap_grad_reduce=True)


# global_batch: sequences per optimizer step, the same on both sides.
SCENARIOS = {
    "s1": dict(
        title="dense Qwen3 ~1.1B, 1 GPU", gpus=1, global_batch=8, seq=4096,
        ours={},
        hf={},
        target=dict(ratio=1.5, mfu=0.45, mem="<=hf"),  # issue 22 (the rows before it: ratio 1.15)
    ),
    "s2": dict(
        title="dense Llama-3-8B, 4 GPUs", gpus=4, global_batch=16, seq=4096,
        # an 8B model needs no tensor parallelism on a 141 GiB card: data parallel over 4 with the distributed
        # optimizer (ZeRO-1) and both overlaps; without TE, TP's collectives cannot overlap compute
        ours=dict(use_distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True),
        # an 80 GiB card does not hold 8B bf16 weights + fp32 grads + activations unsharded: TP=2 + SP there
        ours_below_gib=(100, dict(tensor_model_parallel_size=2, sequence_parallel=True, use_distributed_optimizer=True,
                                  overlap_grad_reduce=True, overlap_param_gather=True)),
        hf=fsdp("LlamaDecoderLayer"),
        target=dict(ratio=1.2, mfu=0.45),
    ),
    "s3": dict(
        title="MoE Qwen3-30B-A3B-shaped, 4 layers, 1 GPU", gpus=1, global_batch=8, seq=4096,
        ours=dict(moe_grouped_gemm=True, moe_token_dispatcher_type="alltoall"),
        hf={},
        target=dict(ratio=2.3),  # issue 22 (the rows before it: 1.1)
    ),
    "s3x4": dict(
        title="MoE Qwen3-30B-A3B-shaped, 8 layers, 4 GPUs", gpus=4, global_batch=16, seq=4096,
        ours=expert_parallel(4, "alltoall"),
        hf=fsdp("Qwen3MoeDecoderLayer"),
        target=dict(ratio=3.0, mem="<hf"),
    ),
    "s3x2": dict(
        title="MoE Qwen3-30B-A3B-shaped, 8 layers, 2 GPUs", gpus=2, global_batch=8, seq=4096,
        # allgather: 1.12x the alltoall dispatcher's tokens/s at EP=2, same losses (RESULTS.md, issue 22 runs;
        # the row of 2026-11-30 ran alltoall as "ours" and allgather as the side ours_allgather)
        ours=expert_parallel(2, "allgather"),
        hf=fsdp("Qwen3MoeDecoderLayer"),
        target=dict(ratio=2.0, mem="<hf"),
    ),
    "s2x2": dict(
        title="dense Llama-3-8B, 2 GPUs", gpus=2, global_batch=8, seq=4096,
        # as s2: ZeRO-1 over the data-parallel ranks, no tensor parallelism on a 141 GiB card
        ours=dict(use_distributed_optimizer=True, overlap_grad_reduce=True, overlap_param_gather=True),
        hf=fsdp("LlamaDecoderLayer"),
        target=dict(ratio=1.25, mfu=0.45),
    ),
    "s4x2": dict(
        title="dense Llama-3-8B, 32k tokens per sample, 2 GPUs (ours CP=2)", gpus=2, global_batch=2, seq=32768,
        # 32k tokens of an 8B model do not fit without activation recompute on either side: HF uses
        # LLaMA-Factory's default gradient checkpointing, ours megatron's full recompute, one layer a unit
        common=dict(disable_gradient_checkpointing=False),
        # both overlaps, as examples/megatron/llama3_8b_full.yaml (the recipe a user runs): the gradient
        # reduce-scatter over the 2 CP ranks (770 ms exposed in ee89da3's row) runs in buckets during the last
        # micro-batch's backward, the parameter all-gather during the next step's forward
        ours=dict(context_parallel_size=2, use_distributed_optimizer=True, overlap_grad_reduce=True,
                  overlap_param_gather=True, recompute_granularity="full", recompute_method="uniform",
                  recompute_num_layers=1),
        hf=fsdp("LlamaDecoderLayer"),
        target=dict(ratio=1.3),
    ),
    "dsv3": dict(
        title="DeepSeek-V3 (MLA) at Moonlight-16B-A3B widths, 6 layers, 1 GPU", gpus=1, global_batch=8, seq=4096,
        # as s3: grouped-GEMM experts; MLA's core attention is torch SDPA (qk head 192, v head 128)
        ours=dict(moe_grouped_gemm=True, moe_token_dispatcher_type="alltoall"),
        hf={},
        target={},  # issue 14 asks for the row, with no speed target
    ),
    "q3next": dict(
        title="hybrid Qwen3-Next-80B-A3B widths, 4 layers (3 gated delta-net, 1 gated attention), 128 experts, 1 GPU",
        gpus=1, global_batch=8, seq=4096,
        # as s3: grouped-GEMM experts. The delta rule: ours on fla's chunk kernel where `fla` imports (checked
        # against the torch reference first, kernels/linear_attention.py), HF's Qwen3NextGatedDeltaNet on fla and
        # causal-conv1d where they import (torch otherwise): `versions` in the JSON records which are installed
        ours=dict(moe_grouped_gemm=True, moe_token_dispatcher_type="alltoall"),
        hf={},
        target={},  # issue 15 asks for the row, with no speed target
    ),
    # issue 9: the published recipes, scaled from 8 GPUs to 4 (benchmarks/recipes.py); no speed target there
    "r_moe": dict(
        title="recipe qwen3_moe_full.yaml on 4 GPUs (24 of 48 layers, PP=2 x EP=2)", gpus=4, global_batch=16,
        seq=4096, recipe="examples/megatron/qwen3_moe_full.yaml",
        scale=dict(pipeline_model_parallel_size=2, expert_model_parallel_size=2),
        # the final HF export of 31 GB repeats what the merge of the last checkpoint measures: skipped for time
        ours_extra=dict(save_hf_model=False),
        hf=fsdp("Qwen3MoeDecoderLayer"),
        target=dict(ratio=None, merged=True),
    ),
    "r_vl": dict(
        title="recipe qwen2_vl_full.yaml on 4 GPUs (Qwen2-VL-7B, TP=2 x PP=2, SP)", gpus=4, global_batch=8, seq=2048,
        recipe="examples/megatron/qwen2_vl_full.yaml", vl=True, scale=dict(tensor_model_parallel_size=2),
        # one FSDP unit per dtype: LLaMA-Factory upcasts trainable params to fp32, the frozen vision tower
        # (blocks, patch embedding, merger) stays bf16, and FSDP1 flattens each unit into one tensor
        hf=fsdp("Qwen2VLDecoderLayer", "Qwen2VLVisionBlock", "PatchEmbed", "PatchMerger", use_orig_params=True),
        target=dict(ratio=None, merged=True),
    ),
}
# issue 18: the FP8 quality runs' small models (benchmarks/fp8_quality.py: 300 steps of ours vs ours_fp8, a
# fine-tune's schedule); here, as any scenario, a speed comparison (`--sides ours,ours_fp8`)
SCENARIOS["q_dense"] = dict(
    title="dense Qwen3 ~0.35B (Qwen3-0.6B widths, 20 layers), 1 GPU", gpus=1, global_batch=4, seq=2048,
    ours={}, hf={}, target={})
SCENARIOS["q_moe"] = dict(
    title="MoE Qwen3 ~0.5B (hidden 1024, 8 layers, 32 experts top-4), 1 GPU", gpus=1, global_batch=4, seq=2048,
    ours=dict(moe_grouped_gemm=True, moe_token_dispatcher_type="alltoall"), hf={}, target={})
# issue 22: the recipes on the lent 2-GPU kind, as r_moe / r_vl otherwise. The MoE recipe keeps pipeline
# parallelism and full recompute; with EP=1 a stage of 6 layers holds all 128 experts, the expert weights a stage
# of 12 layers at EP=2 holds on 8 GPUs, so 12 of the 48 layers (shapes.py)
SCENARIOS["r_moe2"] = dict(
    SCENARIOS["r_moe"], title="recipe qwen3_moe_full.yaml on 2 GPUs (12 of 48 layers, PP=2, EP=1)", gpus=2,
    scale=dict(pipeline_model_parallel_size=2, expert_model_parallel_size=1), target=dict(ratio=1.5, merged=True))
SCENARIOS["r_vl2"] = dict(
    SCENARIOS["r_vl"], title="recipe qwen2_vl_full.yaml on 2 GPUs (Qwen2-VL-7B, TP=2, SP)", gpus=2,
    scale=dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=1),
    ours_extra=dict(save_hf_model=False),  # the merge of the last checkpoint is what is checked
    target=dict(ratio=1.3, merged=True))

# the HF sides: LLaMA-Factory's own path as it is, with Liger kernels, and in pure bf16 (information only)
HF_SIDES = {"hf": {}, "hf_liger": dict(enable_liger_kernel=True), "hf_bf16": dict(pure_bf16=True)}
BASELINES = ("hf", "hf_liger")  # ours is reported against the faster of these
# `ours_<name>` sides: ours with these keys added, for comparisons in one invocation
OURS_VARIANTS = {
    "allgather": dict(moe_token_dispatcher_type="allgather"),
    "alltoall": dict(moe_token_dispatcher_type="alltoall"),
    "fp8": dict(fp8=True),  # issue 18: FP8 GEMMs (e4m3, tensorwise), RESULTS.md "FP8"
    "fp8_rowwise": dict(fp8=True, fp8_recipe="rowwise"),
    "graphs": dict(cuda_graph_impl="local"),  # issue 22: megatron's local CUDA graphs of each transformer layer
    "unfused_rope": dict(apply_rope_fusion=False),  # issue 22: megatron's unfused RoPE (before our kernel)
}


def log(*a):
    print("[bench]", *a, flush=True)


# ---------------------------------------------------------------------------------------------- building


def build_tokenizer(out_dir: str, n_words: int, extra_specials: tuple = ()):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra_specials])}
    for i in range(n_words):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>", *extra_specials], model_max_length=131072,
    )
    fast.save_pretrained(out_dir)
    return fast


def build_model(scenario: str, out_dir: str, tiny: bool, seq: int, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    n_words = 400 if tiny else 32000
    tok = build_tokenizer(out_dir, n_words)
    cfg = hf_config_for(scenario, tiny=tiny, seq=seq, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    dtype = torch.float32 if tiny else torch.bfloat16
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(out_dir)
    info = dict(model_type=cfg.model_type, params=total_params(cfg), layers=cfg.num_hidden_layers,
                hidden=cfg.hidden_size, vocab=cfg.vocab_size)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return info, cfg


def build_data(out_dir: str, n_tokens: int, n_words: int, seed: int = 0) -> dict:
    """A pre-training corpus with realistic document lengths: log-normal (median ~1100 words), clipped to
    [16, 16384]; word ids Zipf-distributed. One word = one token with the word-level tokenizer."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) ** 1.1 for i in range(n_words)]
    cum = []
    acc = 0.0
    for w in weights:
        acc += w
        cum.append(acc)
    words = [f"w{i}" for i in range(n_words)]
    docs, total, lengths = [], 0, []
    while total < n_tokens:
        n = int(min(16384, max(16, rng.lognormvariate(7.0, 1.0))))
        docs.append({"text": " ".join(rng.choices(words, cum_weights=cum, k=n))})
        lengths.append(n)
        total += n + 1  # + eos
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "bench_pt.json"), "w") as f:
        json.dump(docs, f)
    with open(os.path.join(out_dir, "dataset_info.json"), "w") as f:
        json.dump({"bench_pt": {"file_name": "bench_pt.json", "columns": {"prompt": "text"}}}, f)
    lengths.sort()
    return dict(documents=len(docs), tokens=total, median_len=lengths[len(lengths) // 2], max_len=lengths[-1])


# ---------------------------------------------------------------------------------------------- recipes


def _yaml(d: dict) -> str:
    lines = []
    for k, v in d.items():
        lines.append(f"{k}: {json.dumps(v)}")  # JSON scalars / flow collections are valid YAML
    return "\n".join(lines) + "\n"


def recipes(sc: dict, model_dir: str, data_dir: str, work: str, steps: int, tiny: bool) -> tuple[dict, dict, dict]:
    common = dict(
        model_name_or_path=model_dir, stage="pt", do_train=True, finetuning_type="full",
        dataset="bench_pt", dataset_dir=data_dir, template="default", cutoff_len=sc["seq"],
        overwrite_cache=True, preprocessing_num_workers=1 if tiny else 8,
        logging_steps=1, save_strategy="no", save_steps=1000000, report_to="none", plot_loss=False,
        overwrite_output_dir=True, per_device_train_batch_size=1, learning_rate=1.0e-5,
        lr_scheduler_type="constant", warmup_steps=0, max_steps=steps, bf16=not tiny,
        disable_gradient_checkpointing=True, flash_attn="sdpa", ddp_timeout=3600, seed=42,
    )
    common.update(sc.get("common", {}))
    ours = dict(common, output_dir=os.path.join(work, "out_ours"), save_hf_model=False, **sc["ours"])
    hf = dict(common, output_dir=os.path.join(work, "out_hf"), **sc["hf"])
    n = sc["gpus"]
    tp = ours.get("tensor_model_parallel_size", 1) * ours.get("pipeline_model_parallel_size", 1) * ours.get(
        "context_parallel_size", 1)
    dp_ours, dp_hf = n // tp, n
    for side, dp in ((ours, dp_ours), (hf, dp_hf)):
        if sc["global_batch"] % dp:
            raise ValueError(f"global batch {sc['global_batch']} not divisible by data-parallel size {dp}")
        side["gradient_accumulation_steps"] = sc["global_batch"] // dp
    return common, ours, hf


# ---------------------------------------------------------------------------------------------- running


def _env(extra: dict, trace: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("USE_MCA", "LLAMAFACTORY_MCA_ACTIVE", "FORCE_TORCHRUN",
                                                          "NPROC_PER_NODE", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.path.join(HERE, "_hook") + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["MCA_BENCH_TRACE"] = trace
    env["DISABLE_VERSION_CHECK"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    env.update(extra)
    return env


def run_side(name: str, recipe: dict, sc: dict, work: str, timeout: int, tiny: bool, probe: dict | None = None) -> dict:
    """Run one side through `llamafactory-cli train`; `probe`: MCA_BENCH_* switches of the step probe
    (_hook/sitecustomize.py), e.g. the step to profile and the step after which to leave."""
    path = os.path.join(work, f"recipe_{name}.yaml")
    with open(path, "w") as f:
        f.write(_yaml(recipe))
    trace = os.path.join(work, f"trace_{name}")
    for fn in os.listdir(work):
        if fn.startswith(f"trace_{name}."):
            os.remove(os.path.join(work, fn))
    extra = {"NPROC_PER_NODE": str(sc["gpus"]), **{k: str(v) for k, v in (probe or {}).items()}}
    if os.path.exists(trace + ".profile.json"):
        os.remove(trace + ".profile.json")
    if name.startswith("ours"):
        extra["USE_MCA"] = "1"
    elif sc["gpus"] > 1:
        extra["FORCE_TORCHRUN"] = "1"
    if tiny and name.startswith("hf"):
        # CPU smoke runs only: LLaMA-Factory 0.9.5 refuses Conv3D (Qwen2-VL) under torch 2.9 for a GPU speed
        # regression; the tests' start-up shim lifts that guard (it is chained after the probe)
        extra["PYTHONPATH"] = os.pathsep.join([os.path.join(HERE, "_hook"), os.path.join(ROOT, "tests", "hf_conv3d_shim"),
                                               os.environ.get("PYTHONPATH", "")])
    if not tiny:
        extra.setdefault("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(
            str(i) for i in range(sc["gpus"]))))
    cli = shutil.which("llamafactory-cli") or "llamafactory-cli"
    cmd = [cli, "train", path]
    shown = " ".join(f"{k}={v}" for k, v in extra.items() if not k.startswith(("CUDA_", "MCA_BENCH"))) + " " + " ".join(
        shlex.quote(c) for c in ["llamafactory-cli", "train", os.path.basename(path)])
    log(f"{name}: {shown}")
    logf = os.path.join(work, f"log_{name}.txt")
    t0 = time.time()
    with open(logf, "w") as lf:
        try:
            rc = subprocess.run(cmd, env=_env(extra, trace), stdout=lf, stderr=subprocess.STDOUT, cwd=work,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.time() - t0
    with open(logf, errors="replace") as lf:
        tail = lf.read()[-4000:]
    res = dict(command=shown, recipe=recipe, returncode=rc, wall_s=round(wall, 1))
    traces = sorted(fn for fn in os.listdir(work) if fn.startswith(f"trace_{name}.rank"))
    recs = {}
    for fn in traces:
        with open(os.path.join(work, fn)) as f:
            recs[fn] = [json.loads(line) for line in f if line.strip()]
    res["trace_ranks"] = len(recs)
    res["steps_recorded"] = max((len(v) for v in recs.values()), default=0)
    if rc != 0 or not recs:
        res["error"] = "run failed" if rc != 0 else "no optimizer step recorded"
        with open(logf, errors="replace") as lf:
            errs = [ln.rstrip() for ln in lf if "Error" in ln or "error:" in ln][:8]
        res["log_tail"] = tail
        res["error_lines"] = errs
        log(f"{name}: FAILED rc={rc}; error lines:\n" + "\n".join(errs))
    res["_recs"] = recs
    res["losses"] = logged_losses(recipe["output_dir"])
    if os.path.exists(trace + ".profile.json"):
        with open(trace + ".profile.json") as f:
            res["profile"] = json.load(f)
    return res


def logged_losses(output_dir: str) -> list[float]:
    """The per-step training losses a side logged (LLaMA-Factory's trainer_log.jsonl, logging_steps 1), in step
    order; steps without a loss (evaluation lines) are skipped."""
    path = os.path.join(output_dir, "trainer_log.jsonl")
    if not os.path.isfile(path):
        return []
    by_step = {}
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("loss") is not None and rec.get("current_steps") is not None:
                by_step[int(rec["current_steps"])] = float(rec["loss"])
    return [by_step[k] for k in sorted(by_step)]


def max_rel_diff(a: list[float], b: list[float]) -> float | None:
    """Largest |a - b| / |b| over the steps both sides logged (None when they share none)."""
    n = min(len(a), len(b))
    if n == 0:
        return None
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a[:n], b[:n]))


def side_recipe(side: str, ours: dict, hf: dict) -> dict:
    """The recipe of one side: `ours`, `ours_<variant>` (OURS_VARIANTS), or an HF side (HF_SIDES); each writes
    its own output_dir."""
    if side == "ours":
        return ours
    if side.startswith("ours_"):
        variant = side[len("ours_"):]
        if variant not in OURS_VARIANTS:
            raise ValueError(f"--sides: unknown side '{side}'; ours variants: {', '.join(sorted(OURS_VARIANTS))}")
        base, keys = ours, OURS_VARIANTS[variant]
    elif side in HF_SIDES:
        base, keys = hf, HF_SIDES[side]
    else:
        raise ValueError(f"--sides: unknown side '{side}'; use ours, ours_<variant> or one of {', '.join(HF_SIDES)}")
    if side == "hf":
        return hf
    return dict(base, **keys, output_dir=os.path.join(os.path.dirname(base["output_dir"]), "out_" + side))


def summarize(res: dict, warmup: int, measured: int, tokens_per_step: int, fpt: float, n_gpus: int,
              peak: float) -> None:
    """Throughput over steps warmup..warmup+measured-1 (later steps, e.g. the profiled one, are left out)."""
    recs = {k: v[: warmup + measured] for k, v in res.pop("_recs", {}).items()}
    if not recs:
        return
    r0 = recs.get("trace_ours.rank0.jsonl") or recs.get("trace_hf.rank0.jsonl") or next(iter(recs.values()))
    ts = [r["t"] for r in r0]
    if len(ts) < warmup + 2:
        res.setdefault("error", f"only {len(ts)} steps recorded, need warm-up {warmup} + 2")
        return
    steps = [b - a for a, b in zip(ts[warmup - 1:-1], ts[warmup:])] if warmup >= 1 else [
        b - a for a, b in zip(ts[:-1], ts[1:])]
    elapsed = sum(steps)
    tps = len(steps) * tokens_per_step / elapsed
    peaks = [max((r.get("peak_alloc", 0) for r in v), default=0) for v in recs.values()]
    reserved = [max((r.get("peak_reserved", 0) for r in v), default=0) for v in recs.values()]
    res.update(
        measured_steps=len(steps), warmup_steps=warmup,
        step_time_s=dict(median=statistics.median(steps), mean=elapsed / len(steps), min=min(steps), max=max(steps)),
        tokens_per_step=tokens_per_step, tokens_per_s=tps, tokens_per_s_per_gpu=tps / n_gpus,
        mfu=(tps * fpt / (n_gpus * peak * 1e12)) if peak else None,
        peak_mem_gib=max(peaks) / 2**30, peak_mem_gib_per_rank=[p / 2**30 for p in peaks],
        peak_reserved_gib=max(reserved) / 2**30,
    )


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return ""


def provenance() -> dict:
    """The commit measured and whether the tree had changes: MCA_BENCH_COMMIT / MCA_BENCH_DIRTY where set (a
    device copy of the tree has no .git), else git's answer."""
    in_git = bool(_git("rev-parse", "HEAD"))
    return dict(commit=os.environ.get("MCA_BENCH_COMMIT") or _git("rev-parse", "HEAD") or "unknown",
                dirty=os.environ.get("MCA_BENCH_DIRTY") or (bool(_git("status", "--porcelain")) if in_git else None))


def device_info(tiny: bool) -> dict:
    import torch

    if not tiny and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        return dict(device="cuda", card=name, gpus_visible=torch.cuda.device_count(), torch=torch.__version__,
                    cuda=torch.version.cuda, card_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    return dict(device="cpu", card="cpu", gpus_visible=0, torch=torch.__version__)


def versions() -> dict:
    out = {}
    for mod in ("transformers", "llamafactory", "megatron.core", "accelerate", "llamafactory_mca",
                "fla", "causal_conv1d"):  # the last two: the delta-net fast paths (q3next)
        try:
            m = __import__(mod, fromlist=["__version__"])
            out[mod] = getattr(m, "__version__", "?")
        except Exception as e:
            out[mod] = f"not importable: {type(e).__name__}"
    return out


def run_scenario(name: str, args) -> dict:
    sc = dict(SCENARIOS[name])
    tiny = args.tiny
    dinfo = device_info(tiny)
    below = sc.pop("ours_below_gib", None)
    if below and dinfo["device"] == "cuda" and dinfo["card_gib"] < below[0]:
        sc["ours"] = below[1]
    if tiny:
        sc.update(gpus=1, global_batch=2, seq=64, ours={k: v for k, v in sc.get("ours", {}).items()
                                                         if k in ("moe_grouped_gemm", "moe_token_dispatcher_type")},
                  hf={})
    work = os.path.join(args.workdir, name + ("_tiny" if tiny else ""))
    os.makedirs(work, exist_ok=True)
    t0 = time.time()
    # steps: warm-up + measured + one profiled step (not measured); then every side leaves at once
    steps = args.warmup + args.steps + 1
    profiled = args.warmup + args.steps
    if sc.get("recipe"):
        import recipes as rc

        model_info, cfg, data_info = rc.build(name, sc, work, tiny, steps, dinfo)
        common, ours, hf = rc.recipe_pair(sc, work, steps, tiny)
        tokens_per_step = sc["global_batch"] * sc["seq"]  # every generated sample is cut to cutoff_len
    else:
        model_info, cfg = build_model(name, os.path.join(work, "model"), tiny, sc["seq"],
                                      "cuda" if dinfo["device"] == "cuda" else "cpu")
        n_tokens = int(steps * sc["global_batch"] * sc["seq"] * 1.3) + 4 * sc["seq"]
        data_info = build_data(os.path.join(work, "data"), n_tokens, 400 if tiny else 32000)
        common, ours, hf = recipes(sc, os.path.join(work, "model"), os.path.join(work, "data"), work, steps, tiny)
        tokens_per_step = sc["global_batch"] * sc["seq"]  # pre-training blocks are always full
    log(f"{name}: built model ({model_info['params']/1e9:.2f}B params) and data ({data_info}) in {time.time()-t0:.0f}s")
    fpt = flops_per_token(cfg, sc["seq"])
    pk = peak_tflops(dinfo["card"]) if dinfo["device"] == "cuda" else 0.0
    result = dict(
        scenario=name, title=sc["title"], date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **provenance(), command=" ".join(["python", "benchmarks/run.py"] + sys.argv[1:]),
        **dinfo, gpus=sc["gpus"], versions=versions(), model=model_info, data=data_info, seq=sc["seq"],
        global_batch=sc["global_batch"], flops_per_token=fpt, peak_bf16_tflops=pk, recipe_common=common,
        target=sc["target"], tiny=tiny, profiled_step=profiled,
    )
    sides = (args.sides or ("ours,hf" if tiny else "ours,hf,hf_liger")).split(",")
    for side in sides:
        rec = side_recipe(side, ours, hf)
        probe = {"MCA_BENCH_PROFILE_STEP": profiled}
        if not (side == "ours" and sc.get("recipe")):  # the recipe's checkpoint is written after the last step
            probe["MCA_BENCH_EXIT_AFTER"] = profiled
        r = run_side(side, rec, sc, work, args.timeout, tiny, probe)
        summarize(r, args.warmup, args.steps, tokens_per_step, fpt, sc["gpus"], pk)
        result[side] = r
        # the sides so far, in case a device call's time runs out before the scenario ends
        with open(os.path.join(args.results_dir, f"{name}{'_tiny' if tiny else ''}.partial.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        if "tokens_per_s" in r:
            log(f"{side}: {r['tokens_per_s']:.0f} tok/s, step {r['step_time_s']['median']:.3f}s, "
                f"peak {r['peak_mem_gib']:.2f} GiB" + (f", MFU {r['mfu']*100:.1f}%" if r.get("mfu") else ""))
        if r.get("profile"):
            log(f"{side} profile (step {profiled}): " + json.dumps({k: v for k, v in r["profile"].items()
                                                                    if k != "top_kernels"}))
        if side == "ours" and sc.get("recipe") and r.get("returncode") == 0:
            result["merge"] = rc.merge_and_load(sc, work, ours, tiny)
            log(f"merge: {json.dumps(result['merge'])}")
    compare_sides(result, sides, args.warmup + args.steps)
    o = result.get("ours", {})
    best = [result[b] for b in BASELINES if "tokens_per_s" in result.get(b, {})]
    h = max(best, key=lambda r: r["tokens_per_s"]) if best else {}
    if "tokens_per_s" in o and "tokens_per_s" in h:
        result["baseline"] = next(b for b in BASELINES if result.get(b) is h)
        result["ratio_tokens_per_s"] = o["tokens_per_s"] / h["tokens_per_s"]
        result["ratio_peak_mem"] = o["peak_mem_gib"] / h["peak_mem_gib"] if h["peak_mem_gib"] else None
        t = sc["target"]
        met = t.get("ratio") is None or result["ratio_tokens_per_s"] >= t["ratio"]
        if t.get("mem") == "<=hf":
            met = met and o["peak_mem_gib"] <= h["peak_mem_gib"]
        if t.get("mem") == "<hf":
            met = met and o["peak_mem_gib"] < h["peak_mem_gib"]
        if t.get("mfu"):
            met = met and (o.get("mfu") or 0) >= t["mfu"]
        if t.get("merged"):
            met = met and bool(result.get("merge", {}).get("ok"))
        result["target_met"] = bool(met)
        log(f"{name}: ours/{result['baseline']} tokens/s = {result['ratio_tokens_per_s']:.3f}x, peak mem ratio "
            f"{_fmt(result['ratio_peak_mem'], '{:.3f}')}; target {'met' if met else 'MISSED'}")
    if not args.keep:
        for sub in ["model", "merged"] + [side_recipe(s_, ours, hf)["output_dir"] for s_ in sides]:
            shutil.rmtree(os.path.join(work, sub), ignore_errors=True)
    return result


def compare_sides(result: dict, sides: list[str], n_steps: int) -> None:
    """Per-side losses cut to the steps before the profiled one; ours' largest relative loss difference
    against every other side (`loss_max_rel_diff`: {side: value}) and each side's speed relative to ours."""
    ours = result.get("ours", {})
    for side in sides:
        r = result.get(side, {})
        r["losses"] = r.get("losses", [])[:n_steps]
    diffs = {s_: max_rel_diff(ours.get("losses", []), result[s_]["losses"]) for s_ in sides if s_ != "ours"}
    result["loss_max_rel_diff"] = {k: v for k, v in diffs.items() if v is not None}
    if "tokens_per_s" in ours:
        result["tokens_per_s_vs_ours"] = {s_: result[s_]["tokens_per_s"] / ours["tokens_per_s"] for s_ in sides
                                          if "tokens_per_s" in result.get(s_, {})}
    if result["loss_max_rel_diff"]:
        log("loss max rel. diff of ours vs " + ", ".join(f"{k}: {v:.2e}" for k, v in result["loss_max_rel_diff"].items()))


# ---------------------------------------------------------------------------------------------- reporting


def _fmt(v, f="{:.0f}"):
    return "-" if v is None else f.format(v)


def _met_cell(r: dict) -> str:
    """The table's "target met" cell; a recipe scenario without a speed target tells the merge there."""
    if not r.get("target"):
        return "no target"
    if r.get("target", {}).get("merged") and r.get("target", {}).get("ratio") is None:
        return "merged + loaded" if r.get("merge", {}).get("ok") else "**not merged**"
    failed = any(r.get(s_, {}).get("error") for s_ in ("ours", *BASELINES))
    cell = {True: "yes", False: "**no**"}.get(r.get("target_met"), "failed" if failed else "n/a")
    if r.get("target", {}).get("merged"):
        cell += ", merged + loaded" if r.get("merge", {}).get("ok") else ", **not merged**"
    return cell


def _loss_cell(r: dict) -> str:
    """Largest relative loss difference of ours against the reported HF side (old results: not recorded)."""
    diffs = r.get("loss_max_rel_diff") or {}
    side = r.get("baseline", "hf")
    if side not in diffs:
        return "-"
    return f"{diffs[side] * 100:.2f}% ({r.get('ours', {}).get('measured_steps', 0) + r.get('ours', {}).get('warmup_steps', 0)} steps)"


def write_results_md(results_dir: str, md_path: str) -> None:
    rows = []
    for fn in sorted(os.listdir(results_dir)) if os.path.isdir(results_dir) else []:
        if not fn.endswith(".json") or fn.endswith(".partial.json"):
            continue
        with open(os.path.join(results_dir, fn)) as f:
            r = json.load(f)
        o = r.get("ours", {})
        h = r.get(r.get("baseline", "hf"), {})
        rows.append("| {sc} | {card} x{g} | {ot} | {ht} | {lt} | {bt} | {ratio} | {om} | {hm} | {op} | {hp} | {os_} | {hs} | {loss} | {met} | {date} | {commit} |".format(
            sc=f"{r['scenario']}: {r.get('title', '')}", card=r.get("card"), g=r.get("gpus"),
            ot=_fmt(o.get("tokens_per_s")), ht=_fmt(r.get("hf", {}).get("tokens_per_s")),
            lt=_fmt(r.get("hf_liger", {}).get("tokens_per_s")), bt=_fmt(r.get("hf_bf16", {}).get("tokens_per_s")),
            ratio=_fmt(r.get("ratio_tokens_per_s"), "{:.2f}x") + (f" ({r['baseline']})" if r.get("baseline") else ""),
            om=_fmt(o.get("mfu") and o["mfu"] * 100, "{:.1f}%"), hm=_fmt(h.get("mfu") and h["mfu"] * 100, "{:.1f}%"),
            op=_fmt(o.get("peak_mem_gib"), "{:.1f}"), hp=_fmt(h.get("peak_mem_gib"), "{:.1f}"),
            os_=_fmt(o.get("step_time_s", {}).get("median"), "{:.3f}"),
            hs=_fmt(h.get("step_time_s", {}).get("median"), "{:.3f}"),
            loss=_loss_cell(r), met=_met_cell(r),
            date=r.get("date", "")[:10], commit=(r.get("commit") or "")[:8] + ("+dirty" if r.get("dirty") in (True, "1", "true") else ""),
        ))
    table = "\n".join([
        "<!-- results:begin (generated by benchmarks/run.py from benchmarks/results/*.json) -->",
        "| scenario | card | ours tok/s | HF tok/s | HF+Liger tok/s | HF pure bf16 tok/s (info) | ours / best HF | ours MFU "
        "| best HF MFU | ours peak GiB | best HF peak GiB | ours step s | best HF step s | loss max rel. diff "
        "| target met | date | commit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "<!-- results:end -->",
    ])
    text = ""
    if os.path.exists(md_path):
        with open(md_path) as f:
            text = f.read()
    if "<!-- results:begin" in text and "<!-- results:end -->" in text:
        a = text.index("<!-- results:begin")
        b = text.index("<!-- results:end -->") + len("<!-- results:end -->")
        text = text[:a] + table + text[b:]
    else:
        text = "# Benchmark results\n\nGenerated by `python benchmarks/run.py`; see its docstring for the method.\n\n" + table + "\n" + text
    with open(md_path, "w") as f:
        f.write(text)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), help="repeatable; default s1")
    ap.add_argument("--steps", type=int, default=5, help="measured optimizer steps")
    ap.add_argument("--warmup", type=int, default=3, help="optimizer steps excluded from the numbers")
    ap.add_argument("--sides", default=None, help="comma-separated: ours, ours_<variant>, hf, hf_liger, hf_bf16; "
                    "default ours,hf,hf_liger (--tiny: ours,hf: Liger and pure bf16 need a GPU)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU, fp32 (keeps the script working)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--results-dir", default=RESULTS_DIR)
    ap.add_argument("--results-md", default=RESULTS_MD)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per side")
    ap.add_argument("--keep", action="store_true", help="keep the generated model")
    args = ap.parse_args(argv)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="mca_bench_")
    os.makedirs(args.results_dir, exist_ok=True)
    out = []
    for name in args.scenario or ["s1"]:
        res = run_scenario(name, args)
        fn = os.path.join(args.results_dir, f"{name}{'_tiny' if args.tiny else ''}.json")
        with open(fn, "w") as f:
            json.dump(res, f, indent=1, default=str)
        if os.path.exists(fn[: -len(".json")] + ".partial.json"):
            os.remove(fn[: -len(".json")] + ".partial.json")
        log(f"wrote {fn}")
        out.append(res)
    write_results_md(args.results_dir, args.results_md)
    return out


if __name__ == "__main__":
    main()
