"""Peak host memory of `llamafactory-mca merge` (and `convert`) for a model of a few GB.

    python benchmarks/merge_memory.py --workdir /tmp/merge_mem            # ~1.4B-param Qwen3, bf16 (~2.9 GB)
    python benchmarks/merge_memory.py --workdir /tmp/merge_mem --layers 28 --hidden 2560 --ffn 9728

1. writes a random Qwen3 model (bf16 safetensors, streamed tensor by tensor: never the whole model in memory);
2. `llamafactory-mca convert` -> a Megatron torch_dist checkpoint (one process; holds the model: not measured
   against the merge budget);
3. `llamafactory-mca merge` of that checkpoint, in a child process whose peak RSS (ru_maxrss) is reported;
4. checks the merged tensors equal the original ones bit for bit (streamed).

Prints one JSON line: model size, merge/convert peak RSS and wall time, the budget (model/4 + 2 GB), pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1024**3


def write_random_qwen3(path: str, hidden: int, layers: int, ffn: int, vocab: int, heads: int, kv_heads: int) -> int:
    """A random bf16 Qwen3 checkpoint, written one tensor at a time into ~1 GB shards; returns its bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=ffn, vocab_size=vocab,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
                         tie_word_embeddings=False, max_position_embeddings=4096, dtype="bfloat16")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    os.makedirs(path, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    shard: dict = {}
    size = total = 0
    files: list[tuple[str, list[str]]] = []

    def flush() -> None:
        nonlocal shard, size
        if shard:
            name = f"part-{len(files):05d}.safetensors"
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
            files.append((name, list(shard)))
            shard, size = {}, 0

    for name, shape in shapes.items():
        t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        if size + t.numel() * 2 > GB:
            flush()
        shard[name] = t
        size += t.numel() * 2
        total += t.numel() * 2
    flush()
    weight_map = {}
    for i, (tmp, names) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(os.path.join(path, tmp), os.path.join(path, final))
        weight_map.update({n: final for n in names})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config.save_pretrained(path)
    return total


def run_measured(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS in GB of the child and its children, wall seconds)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    start = time.time()
    code = (
        "import resource, subprocess, sys, json;"
        "p = subprocess.run(sys.argv[1:]);"
        "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss);"
        "sys.exit(p.returncode)"
    )
    proc = subprocess.run([sys.executable, "-c", code, *cmd], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-2000:] + proc.stderr[-4000:])
    peak_kb = int(next(line.split()[1] for line in proc.stdout.splitlines() if line.startswith("PEAK ")))
    return peak_kb * 1024 / GB, time.time() - start


def same_weights(a: str, b: str) -> bool:
    import torch
    from safetensors import safe_open

    def index(path: str) -> dict[str, str]:
        with open(os.path.join(path, "model.safetensors.index.json")) as f:
            return json.load(f)["weight_map"]

    ia, ib = index(a), index(b)
    if ia.keys() != ib.keys():
        return False
    for name in ia:
        with safe_open(os.path.join(a, ia[name]), "pt") as fa, safe_open(os.path.join(b, ib[name]), "pt") as fb:
            if not torch.equal(fa.get_tensor(name), fb.get_tensor(name)):
                return False
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/merge_memory")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--ffn", type=int, default=6144)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv_heads", type=int, default=8)
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    args = p.parse_args()

    hf, ckpt, merged = (os.path.join(args.workdir, d) for d in ("hf", "mcore", "merged"))
    shutil.rmtree(args.workdir, ignore_errors=True)
    t = time.time()
    model_bytes = write_random_qwen3(hf, args.hidden, args.layers, args.ffn, args.vocab, args.heads, args.kv_heads)
    write_s = time.time() - t
    cli = [sys.executable, "-m", "llamafactory_mca.cli"]
    convert_gb, convert_s = run_measured(cli + ["convert", "--model_name_or_path", hf, "--output_path", ckpt])
    merge_gb, merge_s = run_measured(cli + ["merge", "--checkpoint_path", ckpt, "--output_path", merged, "--bf16",
                                            "--max_shard_size", "1GB"])
    budget = (model_bytes / 4 + 2e9) / GB  # the bound: a quarter of the model + 2 GB (decimal)
    result = {
        "model_gb": round(model_bytes / GB, 3),
        "params_b": round(model_bytes / 2 / 1e9, 3),
        "merge_peak_rss_gb": round(merge_gb, 3),
        "merge_wall_s": round(merge_s, 1),
        "budget_gb": round(budget, 3),
        "within_budget": merge_gb < budget,
        "convert_peak_rss_gb": round(convert_gb, 3),
        "convert_wall_s": round(convert_s, 1),
        "write_random_model_s": round(write_s, 1),
        "bit_exact_round_trip": same_weights(hf, merged),
        "max_rss_this_process_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB, 3),
    }
    print(json.dumps(result))
    if not args.keep:
        shutil.rmtree(args.workdir, ignore_errors=True)
    return 0 if result["within_budget"] and result["bit_exact_round_trip"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
