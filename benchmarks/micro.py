"""Micro-benchmark: one training step (fwd + bwd + AdamW, bf16, batch 1) of megatron-core's GPTModel with the
TE-less layer spec (SDPA core attention, our grouped experts) against the Hugging Face model, same shapes,
same GPU, same process. No LLaMA-Factory, no data pipeline: this isolates the model + optimizer step so
that the gaps show before the full harness (benchmarks/run.py) runs.

    python benchmarks/micro.py --scenario s1 --out $OUT          # dense Qwen3 ~1.1B, seq 4096
    python benchmarks/micro.py --scenario s3 --out $OUT          # Qwen3-30B-A3B-shaped MoE, 4 layers
    python benchmarks/micro.py --scenario s1 --tiny --steps 2    # CPU smoke test (tiny shapes, fp32)

HF side: fp32 master weights under bf16 autocast and fused AdamW, as LLaMA-Factory's HF path trains a full
fine-tune with `bf16: true`. Megatron side: bf16 weights, megatron DDP (fp32 grad buffer) and the megatron
distributed optimizer (fp32 main weights), as our trainer does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from shapes import SCENARIO_SHAPES, flops_per_token, hf_config_for  # noqa: E402


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------------ timing


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_steps(step_fn, warmup: int, steps: int, dev) -> dict:
    for _ in range(warmup):
        step_fn()
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step_fn()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    times.sort()
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else 0.0
    return {"step_s_median": times[len(times) // 2], "step_s_min": times[0], "peak_gib": peak}


def profile_steps(step_fn, dev, path: str, n: int = 2, rows: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(n):
            step_fn()
        _sync(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)
    with open(path, "w") as f:
        f.write(table)
    return table


# ------------------------------------------------------------------------------------------------ HF side


def build_hf(cfg, dev, dtype):
    from transformers import AutoModelForCausalLM

    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(dev):  # initialise on the GPU: a CPU init of billions of parameters takes minutes
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.train()
    model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev.type == "cuda")
    return model, opt


def hf_step_fn(model, opt, batch, dev, dtype):
    ids, labels = batch

    def step():
        ac = torch.autocast(dev.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
        with ac:
            out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


# ------------------------------------------------------------------------------------------------ megatron


def init_megatron(dev):
    import torch.distributed as dist

    import llamafactory_mca.platform as platform

    platform.setup_platform()
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29517")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=0, world_size=1)
    from megatron.core import parallel_state, tensor_parallel

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    platform.setup_platform()
    tensor_parallel.model_parallel_cuda_manual_seed(0)


def mcore_config(hf, dtype, dev, **over):
    from megatron.core.transformer.transformer_config import TransformerConfig

    moe = getattr(hf, "num_experts", None)
    kw = dict(
        num_layers=hf.num_hidden_layers,
        hidden_size=hf.hidden_size,
        num_attention_heads=hf.num_attention_heads,
        num_query_groups=hf.num_key_value_heads,
        kv_channels=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        ffn_hidden_size=hf.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=hf.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        qk_layernorm=hf.model_type.startswith("qwen3"),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bf16=dtype == torch.bfloat16,
        params_dtype=dtype,
        use_cpu_initialization=dev.type != "cuda",
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
    )
    if moe:
        kw.update(
            num_moe_experts=hf.num_experts,
            moe_router_topk=hf.num_experts_per_tok,
            moe_ffn_hidden_size=hf.moe_intermediate_size,
            moe_router_load_balancing_type="aux_loss",
            moe_aux_loss_coeff=hf.router_aux_loss_coef,
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=True,
            moe_router_dtype="fp32",
        )
    kw.update(over)
    return TransformerConfig(**kw)


def build_mcore(hf, dev, dtype, fast=False, ce=True, **over):
    """megatron GPTModel with models/spec.py's layer spec (what our backend builds); `fast` swaps in
    llamafactory_mca.kernels (fused RMSNorm, grouped experts with fused SwiGLU, Triton CE, fused AdamW,
    sync-free grad-norm) and turns on the SwiGLU fusion."""
    from types import SimpleNamespace

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    import llamafactory_mca.models.spec as spec_mod

    if fast:
        over = dict(dict(bias_activation_fusion=True), **over)
    cfg = mcore_config(hf, dtype, dev, **over)
    saved = (spec_mod.RMSNorm, spec_mod.TorchGroupedMLP)
    if fast:
        from llamafactory_mca.kernels.experts import TorchGroupedMLP
        from llamafactory_mca.kernels.norm import FusedRMSNorm
        from llamafactory_mca.kernels.optim import install_fast_multi_tensor

        spec_mod.RMSNorm, spec_mod.TorchGroupedMLP = FusedRMSNorm, TorchGroupedMLP
        install_fast_multi_tensor()
    try:
        spec = spec_mod.block_spec(cfg, SimpleNamespace(attention_backend="auto", transformer_impl="auto"),
                                   qk_layernorm=cfg.qk_layernorm)
    finally:
        spec_mod.RMSNorm, spec_mod.TorchGroupedMLP = saved
    torch.manual_seed(0)
    model = GPTModel(
        config=cfg,
        transformer_layer_spec=spec,
        vocab_size=hf.vocab_size,
        max_sequence_length=hf.max_position_embeddings,
        share_embeddings_and_output_weights=hf.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(getattr(hf, "rope_theta", None) or hf.rope_parameters["rope_theta"]),
    )
    if fast and ce:
        from llamafactory_mca.kernels.cross_entropy import patch_language_model_loss

        patch_language_model_loss(model)
    model.to(dev)
    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=True
    )
    model = DistributedDataParallel(config=cfg, ddp_config=ddp_cfg, module=model)
    opt = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam", lr=1e-5, bf16=dtype == torch.bfloat16, params_dtype=dtype,
            use_distributed_optimizer=True, clip_grad=1.0,
        ),
        [model],
    )
    if fast:
        from llamafactory_mca.kernels.optim import use_fused_adamw

        use_fused_adamw(opt)
    return model, opt


def mcore_step_fn(model, opt, batch, dev):
    ids, labels = batch
    pos = torch.arange(ids.shape[1], device=dev).unsqueeze(0)

    def step():
        model.zero_grad_buffer()
        opt.zero_grad()
        loss = model(ids, pos, None, labels=labels)
        loss = loss.float().mean()
        loss.backward()
        model.finish_grad_sync()
        opt.step()

    return step


# ------------------------------------------------------------------------------------------------ kernels


def check_grouped_gemm(dev, out_dir) -> dict:
    """GPU correctness of grouped_mm (fresh random inputs, fp64 reference) + a timing vs the loop."""
    from llamafactory_mca.kernels import grouped_gemm as gg

    res = {
        "F.grouped_mm": hasattr(F, "grouped_mm"),
        "torch._grouped_mm": hasattr(torch, "_grouped_mm"),
        "backend": None,
    }
    if dev.type != "cuda":
        return res
    torch.manual_seed(1)
    E, K, N = 16, 256, 384
    counts = torch.randint(0, 200, (E,))
    counts[3] = 0
    counts[7] = 0
    T = int(counts.sum())
    x = torch.randn(T, K, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(E, K, N, device=dev, dtype=torch.bfloat16, requires_grad=True)
    offs = gg.offsets_from_counts(counts, dev)
    res["backend"] = gg.backend_for(x, w)
    y = gg.grouped_mm(x, w, offs)
    dy = torch.randn_like(y)
    y.backward(dy)
    xr = x.detach().double().requires_grad_()
    wr = w.detach().double().requires_grad_()
    ref = gg.grouped_mm_reference(xr, wr, counts.tolist())
    ref.backward(dy.double())

    def rel(a, b):
        return float((a.double() - b).norm() / b.norm())

    res["rel_err_y"] = rel(y, ref)
    res["rel_err_dx"] = rel(x.grad, xr.grad)
    res["rel_err_dw"] = rel(w.grad, wr.grad)
    res["dw_empty_zero"] = bool((w.grad[3] == 0).all() and (w.grad[7] == 0).all())
    res["kernel_zeroes_empty_groups"] = gg._kernel_zeroes_empty_groups(dev)
    res["nan"] = bool(torch.isnan(y).any() or torch.isnan(x.grad).any() or torch.isnan(w.grad).any())

    # MoE-sized timing: 4096 tokens * top-8 over 128 experts, H 2048, 2F 1536 (Qwen3-30B-A3B fc1)
    E, H, F2 = 128, 2048, 1536
    T = 4096 * 8
    probs = torch.full((E,), 1.0 / E)
    counts = torch.distributions.Multinomial(T, probs).sample().long()
    offs = gg.offsets_from_counts(counts, dev)
    x = torch.randn(T, H, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(E, H, F2, device=dev, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(T, F2, device=dev, dtype=torch.bfloat16)
    for backend in ("torch", "loop"):
        def fb():
            y = gg.grouped_mm(x, w, offs, backend=backend, empty_groups=False)
            y.backward(dy)
        for _ in range(3):
            fb()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            fb()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / 10
        res[f"fc1_fwd_bwd_ms_{backend}"] = dt * 1e3
        res[f"fc1_fwd_bwd_tflops_{backend}"] = 3 * 2 * T * H * F2 / dt / 1e12
    return res


def bench_rmsnorm(dev) -> dict:
    """fwd+bwd of RMSNorm on [4096, 2048] bf16: torch.nn.RMSNorm (megatron's WrappedTorchNorm), the HF
    Qwen3RMSNorm formula, and torch.compile of the HF formula."""
    if dev.type != "cuda":
        return {}
    H = 2048
    x = torch.randn(4096, H, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn_like(x)
    tn = torch.nn.RMSNorm(H, eps=1e-6).to(dev, torch.bfloat16)
    wt = torch.ones(H, device=dev, dtype=torch.bfloat16, requires_grad=True)

    def hf(x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return wt * xf.to(x.dtype)

    comp = torch.compile(hf)
    out = {}
    for name, fn in (("torch.nn.RMSNorm", tn), ("hf_eager", hf), ("hf_compiled", comp)):
        for _ in range(3):
            fn(x).backward(g)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            fn(x).backward(g)
        torch.cuda.synchronize()
        out[name + "_us"] = (time.perf_counter() - t0) / 50 * 1e6
    return out


# ------------------------------------------------------------------------------------------------ main


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", default="s1", choices=sorted(SCENARIO_SHAPES))
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, CPU fp32 (smoke test)")
    ap.add_argument("--variants", default="spec,fast", help="megatron variants: spec,fast,fast_noce,seqmlp")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--profile", action="store_true", help="torch profiler summary of the last megatron variant")
    ap.add_argument("--profile-hf", action="store_true")
    ap.add_argument("--kernels", action="store_true", help="grouped GEMM + RMSNorm checks first")
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/micro"))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    seq = 64 if args.tiny else args.seq
    hf_cfg = hf_config_for(args.scenario, tiny=args.tiny, layers=args.layers, seq=seq)
    results = {"scenario": args.scenario, "seq": seq, "torch": torch.__version__, "device": str(dev)}
    if dev.type == "cuda":
        results["card"] = torch.cuda.get_device_name(dev)
    import transformers

    results["transformers"] = transformers.__version__
    fpt = flops_per_token(hf_cfg, seq)
    results["flops_per_token"] = fpt
    if args.kernels:
        results["grouped_gemm"] = check_grouped_gemm(dev, args.out)
        log("grouped_gemm", json.dumps(results["grouped_gemm"]))
        results["rmsnorm"] = bench_rmsnorm(dev)
        log("rmsnorm", json.dumps(results["rmsnorm"]))

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, hf_cfg.vocab_size, (1, seq), generator=g).to(dev)
    batch = (ids, ids.clone())
    peak_tflops = 989.0

    def report(name, r):
        tps = seq / r["step_s_median"]
        r["tokens_per_s"] = tps
        r["mfu"] = tps * fpt / (peak_tflops * 1e12) if dev.type == "cuda" else 0.0
        results[name] = r
        log(f"{name:28s} step {r['step_s_median']*1e3:8.1f} ms  {tps:9.0f} tok/s  MFU {r['mfu']*100:5.1f}%  "
            f"peak {r['peak_gib']:6.2f} GiB")

    if not args.no_hf:
        model, opt = build_hf(hf_cfg, dev, dtype)
        step = hf_step_fn(model, opt, batch, dev, dtype)
        report("hf", time_steps(step, args.warmup, args.steps, dev))
        if args.profile_hf:
            profile_steps(step, dev, os.path.join(args.out, f"profile_{args.scenario}_hf.txt"))
        del model, opt, step
        torch.cuda.empty_cache() if dev.type == "cuda" else None

    init_megatron(dev)
    variants = {
        "spec": dict(fast=False),
        "fast": dict(fast=True),
        "fast_noce": dict(fast=True, ce=False),
        "seqmlp": dict(fast=False, moe_grouped_gemm=False),
    }
    for v in args.variants.split(","):
        try:
            model, opt = build_mcore(hf_cfg, dev, dtype, **variants[v])
            step = mcore_step_fn(model, opt, batch, dev)
            report(f"mcore_{v}", time_steps(step, args.warmup, args.steps, dev))
            if args.profile and v == args.variants.split(",")[-1]:
                t = profile_steps(step, dev, os.path.join(args.out, f"profile_{args.scenario}_mcore_{v}.txt"))
                log(t[:3000])
            del model, opt, step
            if dev.type == "cuda":
                torch.cuda.empty_cache()
        except Exception as e:  # keep the other variants' numbers
            import traceback

            traceback.print_exc()
            results[f"mcore_{v}"] = {"error": repr(e)[:500]}
    if "hf" in results:
        for k, r in list(results.items()):
            if k.startswith("mcore_") and "tokens_per_s" in r:
                r["ratio_vs_hf"] = r["tokens_per_s"] / results["hf"]["tokens_per_s"]
                log(f"{k}: {r['ratio_vs_hf']:.3f}x HF tokens/s, peak {r['peak_gib']:.2f} vs {results['hf']['peak_gib']:.2f} GiB")
    with open(os.path.join(args.out, f"micro_{args.scenario}.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    return results


if __name__ == "__main__":
    main()
