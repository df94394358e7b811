"""Peak host memory per rank while streaming a Hugging Face checkpoint into a sharded Megatron model.

    python benchmarks/load_memory.py --make /tmp/llama-1b             # write a ~1.4 GB random llama (bf16)
    torchrun --nproc_per_node 2 benchmarks/load_memory.py --model /tmp/llama-1b --tp 2
    torchrun --nproc_per_node 4 benchmarks/load_memory.py --model /tmp/llama-1b --tp 2 --pp 2

Each rank prints: checkpoint size, its own shard size, and RSS (VmRSS / peak VmHWM, plus the sampled peak
of anonymous memory, i.e. excluding file pages of the memory-mapped safetensors) after imports, after
building the model and after loading. Streaming works when the per-rank peak stays near
baseline + shard size, far below the full checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import torch


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[k] = int(v.split()[0]) / 1024  # MiB
    return out


class AnonPeak(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak = 0.0
        self.stop = False

    def run(self):
        while not self.stop:
            self.peak = max(self.peak, _status().get("RssAnon", 0.0))
            time.sleep(0.02)


def make_model(path: str, hidden: int, inter: int, layers: int, vocab: int, heads: int, kv: int) -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    os.makedirs(path, exist_ok=True)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab,
                      num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False,
                      torch_dtype="bfloat16")
    cfg.save_pretrained(path)
    d = hidden // heads
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    weight_map, total, shard = {}, 0, 0
    files = []

    def write(tensors):
        nonlocal total, shard
        name = f"shard-{shard:05d}.safetensors"
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
        files.append(name)
        shard += 1

    write({"model.embed_tokens.weight": rnd(vocab, hidden), "model.norm.weight": torch.ones(hidden).bfloat16(),
           "lm_head.weight": rnd(vocab, hidden)})
    for i in range(layers):
        p = f"model.layers.{i}."
        write({
            p + "self_attn.q_proj.weight": rnd(heads * d, hidden),
            p + "self_attn.k_proj.weight": rnd(kv * d, hidden),
            p + "self_attn.v_proj.weight": rnd(kv * d, hidden),
            p + "self_attn.o_proj.weight": rnd(hidden, heads * d),
            p + "mlp.gate_proj.weight": rnd(inter, hidden),
            p + "mlp.up_proj.weight": rnd(inter, hidden),
            p + "mlp.down_proj.weight": rnd(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden).bfloat16(),
            p + "post_attention_layernorm.weight": torch.ones(hidden).bfloat16(),
        })
    n = len(files)
    renamed = {}
    for i, name in enumerate(files):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(path, name), os.path.join(path, final))
        renamed[name] = final
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}},
                  f, indent=1)
    print(f"wrote {path}: {total / 2**30:.2f} GiB in {n} shards")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--make")
    ap.add_argument("--model")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=5504)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    a = ap.parse_args()
    if a.make:
        make_model(a.make, a.hidden, a.inter, a.layers, a.vocab, heads=16, kv=8)
        return 0

    sampler = AnonPeak()
    sampler.start()
    torch.set_num_threads(1)
    from transformers import AutoConfig

    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models.registry import bridge_for
    from llamafactory_mca.platform import destroy_parallel, init_parallel

    args = MegatronArguments(tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp)
    init_parallel(args)
    rank = torch.distributed.get_rank()
    after_import = _status()
    hf_config = AutoConfig.from_pretrained(a.model)
    bridge = bridge_for(hf_config.model_type)
    t0 = time.time()
    models = bridge.build_model(hf_config, args, torch.bfloat16, init_weights=False)
    after_build = _status()
    t1 = time.time()
    bridge.load_hf_weights(models, a.model)
    t2 = time.time()
    after_load = _status()
    sampler.stop = True
    sampler.join()
    with open(os.path.join(a.model, "model.safetensors.index.json")) as f:
        total = json.load(f)["metadata"]["total_size"]
    shard = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    report = {
        "rank": rank, "tp": a.tp, "pp": a.pp, "checkpoint_MiB": round(total / 2**20),
        "shard_MiB": round(shard / 2**20),
        "rss_after_import_MiB": round(after_import["VmRSS"]),
        "rss_after_build_MiB": round(after_build["VmRSS"]),
        "rss_after_load_MiB": round(after_load["VmRSS"]),
        "peak_rss_MiB": round(after_load["VmHWM"]),
        "peak_anon_MiB": round(sampler.peak),
        "anon_after_load_MiB": round(after_load["RssAnon"]),
        "build_s": round(t1 - t0, 1), "load_s": round(t2 - t1, 1),
    }
    torch.distributed.barrier()
    print(json.dumps(report), flush=True)
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
