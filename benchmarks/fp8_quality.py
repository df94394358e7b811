"""FP8 training quality (issue 18): our bf16 against `fp8: true` over a fine-tune-length run, from the same initial
weights on the same data, for a small dense model and a small MoE.

    python benchmarks/fp8_quality.py                      # q_dense and q_moe, 300 steps each side, 1 GPU
    python benchmarks/fp8_quality.py --model q_dense --sides ours,ours_fp8,ours_fp8_rowwise
    python benchmarks/fp8_quality.py --tiny               # CPU: tiny shapes, 6 steps, FP8 emulated (CI)
    python benchmarks/fp8_quality.py --plot benchmarks/results/quality/fp8_quality_q_dense.json   # the PNG again

The models are run.py's scenarios q_dense (Qwen3 ~0.35B) and q_moe (Qwen3-MoE ~0.5B, grouped-GEMM experts), built
as run.py builds every scenario (shapes.py, random weights, seed 0) with its generated pre-training corpus; the
sides are run.py's (`ours`, and `ours_fp8` ... from OURS_VARIANTS), each a `llamafactory-cli train` of run.py's
recipe with a fine-tune's schedule instead of the speed runs' constant one: learning rate 2e-4, cosine decay after a
linear warm-up of 10% of the steps, max_grad_norm 1. All sides of all models run at the same time on the one GPU:
this is a quality comparison, not a speed measurement (the step times in the JSON are of concurrent runs).

The verdict per model and FP8 side against `ours` (`compare_losses`): "final" is the mean loss of the last 10
steps; it passes when both sides logged every step, no loss is NaN or inf, neither side diverged (its final is
below the mean of its first 10 steps) and |final fp8 - final bf16| / final bf16 <= 1%. The largest per-step
relative difference (and its step) is reported too.

FP8 is checked before anything is built (kernels/fp8.py's `check_fp8_supported`: on a machine without a Hopper
GPU it stops with the reason and the fix). With --tiny the FP8 sides run on the `emulate` kernel (the same
quantization in fp32 arithmetic) on CPU, so the script's whole path stays tested without a GPU.

Writes benchmarks/results/quality/fp8_quality_<model>.json and .png (a subfolder: run.py's table reads every
JSON of benchmarks/results itself). Without matplotlib the JSON says the plot was skipped; --plot makes it later.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import math
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import run as bench  # noqa: E402

QUALITY_DIR = os.path.join(HERE, "results", "quality")
MODELS = ("q_dense", "q_moe")
LAST = 10  # "final" loss: the mean of this many last steps (and divergence: against the first as many)
TOLERANCE = 0.01  # final losses within 1% relative (issue 18)
SCHEDULE = dict(learning_rate=2.0e-4, lr_scheduler_type="cosine", max_grad_norm=1.0)
EMULATE = {"LLAMAFACTORY_MCA_FP8_KERNEL": "emulate"}


# ---------------------------------------------------------------------------------------------- verdict


def _finite(xs: list[float]) -> bool:
    return all(math.isfinite(x) for x in xs)


def compare_losses(base: list[float], fp8: list[float], steps: int, last: int = LAST,
                   tolerance: float = TOLERANCE) -> dict:
    """The verdict of one FP8 side's per-step losses against the bf16 side's (see the module docstring)."""
    out = dict(steps_expected=steps, steps_bf16=len(base), steps_fp8=len(fp8), final_steps_averaged=last,
               tolerance=tolerance)
    reasons = []
    if len(base) < steps or len(fp8) < steps:
        reasons.append(f"a side logged fewer than {steps} steps (bf16 {len(base)}, fp8 {len(fp8)})")
    for name, xs in (("bf16", base), ("fp8", fp8)):
        finite = _finite(xs)
        diverged = (not finite) or (len(xs) >= 2 * last and statistics.fmean(xs[-last:]) >= statistics.fmean(xs[:last]))
        out[f"nan_or_inf_{name}"] = not finite
        out[f"diverged_{name}"] = diverged
        if not finite:
            reasons.append(f"{name} has a NaN or inf loss")
        elif diverged:
            reasons.append(f"{name} diverged (mean of its last {last} steps not below its first {last})")
    n = min(len(base), len(fp8))
    if n >= last and _finite(base[:n]) and _finite(fp8[:n]):
        fb, ff = statistics.fmean(base[n - last:n]), statistics.fmean(fp8[n - last:n])
        rel = [abs(f - b) / max(abs(b), 1e-12) for b, f in zip(base[:n], fp8[:n])]
        worst = max(range(n), key=rel.__getitem__)
        out.update(final_bf16=fb, final_fp8=ff, final_rel_diff=(ff - fb) / fb, max_step_rel_diff=rel[worst],
                   max_step_rel_diff_at=worst + 1, mean_step_rel_diff=statistics.fmean(rel))
        if abs(ff - fb) / fb > tolerance:
            reasons.append(f"final losses differ by {abs(ff - fb) / fb * 100:.2f}% (> {tolerance * 100:.0f}%)")
    elif not reasons:
        reasons.append(f"fewer than {last} steps to compare")
    out["verdict"] = "fail" if reasons else "pass"
    out["reasons"] = reasons
    return out


# ---------------------------------------------------------------------------------------------- plot


def plot_curves(result: dict, png: str) -> str:
    """The loss curves of every side and each FP8 side's per-step relative difference to bf16, as a PNG; returns
    the PNG's path, or why there is none."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "skipped: matplotlib is not installed (make it later with --plot JSON)"
    sides = result["sides"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, gridspec_kw=dict(height_ratios=[2, 1]))
    for side, r in sides.items():
        xs = r.get("losses", [])
        top.plot(range(1, len(xs) + 1), xs, lw=1.0, label=result.get("labels", {}).get(side, side))
    top.set_ylabel("training loss")
    top.legend()
    top.grid(alpha=0.3)
    base = sides.get("ours", {}).get("losses", [])
    for side, cmp_ in result.get("comparisons", {}).items():
        xs = sides[side].get("losses", [])
        n = min(len(base), len(xs))
        bottom.plot(range(1, n + 1), [(f - b) / b * 100 for b, f in zip(base[:n], xs[:n])], lw=0.8,
                    label=f"{side}: final {_pct(cmp_.get('final_rel_diff'))}, {cmp_['verdict']}")
    bottom.axhspan(-TOLERANCE * 100, TOLERANCE * 100, color="green", alpha=0.1)
    bottom.axhline(0, color="black", lw=0.5)
    bottom.set_ylabel("(fp8 - bf16) / bf16, %")
    bottom.set_xlabel("optimizer step")
    bottom.legend(fontsize=8)
    bottom.grid(alpha=0.3)
    top.set_title(f"{result['model']}: {result.get('title', '')}\n{result.get('card', '')}, commit "
                  f"{str(result.get('commit', ''))[:8]}, lr {SCHEDULE['learning_rate']:g} cosine", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(png) or ".", exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _pct(v) -> str:
    return "-" if v is None else f"{v * 100:+.2f}%"


# ---------------------------------------------------------------------------------------------- running


def fp8_sides_checked(sides: list[str], tiny: bool) -> dict[str, str]:
    """{fp8 side: the FP8 kernel it runs on}; without --tiny, FP8 is checked on this machine first (raises
    ValueError with the reason and the fix, e.g. on a machine without a Hopper GPU)."""
    from llamafactory_mca.kernels.fp8 import check_fp8_supported, recipe_from_args
    from llamafactory_mca.recipe_checks import normalize_fp8_keys

    kernels = {}
    for side in sides:
        keys = dict(bench.OURS_VARIANTS.get(side[len("ours_"):], {})) if side.startswith("ours_") else {}
        if not keys.get("fp8"):
            continue
        normalize_fp8_keys(keys)
        if not tiny:
            check_fp8_supported(recipe_from_args(keys.get("fp8_format"), keys.get("fp8_recipe")))
        kernels[side] = "emulate" if tiny else "cuda"
    return kernels


def prepare_model(name: str, args, dinfo: dict) -> dict:
    """Model, data and the sides' recipes of one model, as run.py's run_scenario builds them."""
    sc = dict(bench.SCENARIOS[name])
    if args.tiny:
        sc.update(global_batch=2, seq=64, ours={k: v for k, v in sc["ours"].items()
                                                if k in ("moe_grouped_gemm", "moe_token_dispatcher_type")})
    sc["common"] = dict(sc.get("common", {}), **SCHEDULE, warmup_steps=max(1, args.steps // 10))
    work = os.path.join(args.workdir, name + ("_tiny" if args.tiny else ""))
    model_info, _ = bench.build_model(name, os.path.join(work, "model"), args.tiny, sc["seq"],
                                      "cuda" if dinfo["device"] == "cuda" else "cpu")
    n_words = 400 if args.tiny else 32000
    data_info = bench.build_data(os.path.join(work, "data"), int(args.steps * sc["global_batch"] * sc["seq"] * 1.3)
                                 + 4 * sc["seq"], n_words)
    common, ours, hf = bench.recipes(sc, os.path.join(work, "model"), os.path.join(work, "data"), work, args.steps,
                                     args.tiny)
    return dict(sc=sc, work=work, model=model_info, data=data_info, common=common, ours=ours, hf=hf)


def run_one(side: str, prep: dict, args, kernel: str | None) -> dict:
    rec = bench.side_recipe(side, prep["ours"], prep["hf"])
    r = bench.run_side(side, rec, prep["sc"], prep["work"], args.timeout, args.tiny,
                       EMULATE if kernel == "emulate" else None)
    ts = [x["t"] for x in next(iter(r.pop("_recs", {}).values()), [])]
    steps = [b - a for a, b in zip(ts[LAST:-1], ts[LAST + 1:])]
    keep = ("returncode", "wall_s", "losses", "error", "error_lines", "log_tail", "steps_recorded")
    out = {k: r[k] for k in keep if k in r}
    out["fp8_kernel"] = kernel
    out["step_s_median_concurrent"] = statistics.median(steps) if steps else None
    return out


def model_result(name: str, prep: dict, sides: dict[str, dict], kernels: dict[str, str], args, dinfo: dict) -> dict:
    """The JSON of one model: provenance, the sides' losses and the verdict of each FP8 side against `ours`."""
    base = sides.get("ours", {}).get("losses", [])
    last = min(LAST, max(1, args.steps // 3))  # a --tiny run's few steps: its last third
    comparisons = {s: compare_losses(base, r.get("losses", []), args.steps, last) for s, r in sides.items()
                   if s in kernels}
    result = dict(
        model=name, title=prep["sc"]["title"],
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **bench.provenance(),
        command=" ".join(["python", "benchmarks/fp8_quality.py"] + (args.argv or [])), **dinfo,
        versions=bench.versions(), model_info=prep["model"], data=prep["data"], seq=prep["sc"]["seq"],
        global_batch=prep["sc"]["global_batch"], steps=args.steps,
        schedule=dict(SCHEDULE, warmup_steps=prep["common"]["warmup_steps"]), tiny=args.tiny,
        labels={s: "bf16" if s == "ours" else f"{s} ({kernels.get(s, 'bf16')})" for s in sides},
        sides=sides, comparisons=comparisons,
        verdict="pass" if comparisons and all(c["verdict"] == "pass" for c in comparisons.values()) else "fail",
    )
    return result


def write_model(result: dict, out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"fp8_quality_{result['model']}{'_tiny' if result.get('tiny') else ''}")
    result["plot"] = plot_curves(result, stem + ".png")
    if result["plot"].endswith(".png"):
        result["plot"] = os.path.basename(result["plot"])
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1, default=str)
    return stem + ".json"


def report(result: dict) -> str:
    lines = [f"{result['model']}: {result['verdict']}"]
    for side, c in result["comparisons"].items():
        lines.append(f"  {side} vs bf16: final {c.get('final_fp8', float('nan')):.4f} vs {c.get('final_bf16', float('nan')):.4f}"
                     f" ({_pct(c.get('final_rel_diff'))}, mean of last {c['final_steps_averaged']}), max step diff "
                     f"{_pct(c.get('max_step_rel_diff'))} at step {c.get('max_step_rel_diff_at')}; {c['verdict']}"
                     + (f": {'; '.join(c['reasons'])}" if c["reasons"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", choices=MODELS, help=f"repeatable; default {', '.join(MODELS)}")
    ap.add_argument("--sides", default="ours,ours_fp8", help="ours first, then ours_<fp8 variant>s (run.py's OURS_VARIANTS)")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default 300; --tiny: 6)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU, FP8 emulated")
    ap.add_argument("--jobs", type=int, default=None, help="sides run at once (default: all; --tiny: 1)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out-dir", default=QUALITY_DIR)
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per side")
    ap.add_argument("--plot", default=None, metavar="JSON", help="only (re)draw the PNG of a written JSON")
    args = ap.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.plot:
        with open(args.plot) as f:
            result = json.load(f)
        print(plot_curves(result, args.plot[: -len(".json")] + ".png"))
        return [result]
    sides = args.sides.split(",")
    if sides[0] != "ours" or len(sides) < 2:
        raise SystemExit("--sides: start with ours (the bf16 side), then the FP8 sides, e.g. ours,ours_fp8")
    args.steps = args.steps or (6 if args.tiny else 300)
    if args.steps < 2 * LAST and not args.tiny:
        raise SystemExit(f"--steps: at least {2 * LAST} (final = mean of the last {LAST} steps)")
    kernels = fp8_sides_checked(sides, args.tiny)  # before anything is built
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="mca_fp8q_")
    dinfo = bench.device_info(args.tiny)
    preps = {name: prepare_model(name, args, dinfo) for name in args.model or MODELS}
    jobs = [(name, side) for name in preps for side in sides]
    with concurrent.futures.ThreadPoolExecutor(args.jobs or (1 if args.tiny else len(jobs))) as pool:
        futures = {job: pool.submit(run_one, job[1], preps[job[0]], args, kernels.get(job[1])) for job in jobs}
        done = {job: fut.result() for job, fut in futures.items()}
    out = []
    for name, prep in preps.items():
        result = model_result(name, prep, {side: done[name, side] for side in sides}, kernels, args, dinfo)
        bench.log(f"wrote {write_model(result, args.out_dir)}\n" + report(result))
        out.append(result)
    return out


if __name__ == "__main__":
    main()
