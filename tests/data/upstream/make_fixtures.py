"""Make the tiny upstream checkpoints in this directory by running ROLL's mcore_adapter from its public source.

Not run in CI (the outputs are committed). Needs the ROLL source tree (github.com/alibaba/ROLL) on disk: its
`mcore_adapter/src` directory goes on PYTHONPATH for the upstream steps only (never pip-install `mcore-adapter`:
the package of that name on the index is not ROLL's). Run from the repository root:

    python tests/data/upstream/make_fixtures.py /path/to/ROLL

1. hf_qwen3/, hf_qwen3_moe/: tiny random Hugging Face models (bf16, 2 layers, vocab 64, a word-level tokenizer),
   the weights the checkpoints below were converted from.
2. qwen3_legacy_tp2_pp2/, qwen3_moe_legacy_ep2/: what LLaMA-Factory's scripts/megatron_merge.py writes for a path
   without mca_config.json (`convert_checkpoint_to_mca` with transformer_impl "transformer_engine", bf16), i.e.
   the legacy format with Transformer Engine names (`linear_qkv.layer_norm_weight`) and, for MoE with
   moe_grouped_gemm (no TE here), GroupedMLP `experts.weight1/weight2`; tp=2 x pp=2 and ep=2.
3. qwen3_dist_tp2/: `McaGPTModel.save_pretrained(ckpt_format="torch_dist")` of a model loaded by
   `AutoModel.from_pretrained(hf, TrainingArguments(tensor_model_parallel_size=2, transformer_impl="local"))`
   in a 2-process gloo run on CPU (llamafactory_mca.platform's CPU patches applied), i.e. what USE_MCA training
   with ckpt_format: torch_dist saves as model weights.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))

CONVERT = r'''
import sys
sys.path.insert(0, sys.argv[7])
from llamafactory_mca.platform import setup_platform
from mcore_adapter.models.converter.post_converter import convert_checkpoint_to_mca
from mcore_adapter.training_args import DistributingParallelArguments
setup_platform()  # megatron's model_parallel_cuda_manual_seed on CPU
src, dst, tp, pp, ep, gg = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1"
# exactly LLaMA-Factory scripts/megatron_merge.py `convert` for a path without mca_config.json
dist_args = DistributingParallelArguments(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
    expert_model_parallel_size=ep, virtual_pipeline_model_parallel_size=None, moe_grouped_gemm=gg,
    transformer_impl="transformer_engine")
convert_checkpoint_to_mca(src, dst, dist_args, bf16=True, fp16=False)
'''

DIST_SAVE = r'''
import sys
sys.path.insert(0, sys.argv[4])
from llamafactory_mca.platform import setup_platform
import megatron.core.dist_checkpointing.strategies.filesystem_async  # noqa: F401 - patched below
import megatron.core.dist_checkpointing.strategies.torch  # noqa: F401
from mcore_adapter.models import AutoModel
from mcore_adapter.training_args import TrainingArguments
setup_platform()
if __name__ == "__main__":
    hf, out, tp = sys.argv[1], sys.argv[2], int(sys.argv[3])
    args = TrainingArguments(output_dir=out + ".unused", tensor_model_parallel_size=tp, transformer_impl="local",
                             bf16=True, seed=42, ckpt_format="torch_dist", use_cpu=True, ddp_backend="gloo")
    models = AutoModel.from_pretrained(hf, args)
    setup_platform()
    models.save_pretrained(out, ckpt_format="torch_dist")
    import torch.distributed as dist
    if dist.get_rank() == 0:
        from transformers import AutoTokenizer
        AutoTokenizer.from_pretrained(hf).save_pretrained(out)
    dist.barrier()
'''


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"] + [f"w{i}" for i in range(60)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="[UNK]")


def make_hf(moe: bool, out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3MoeConfig

    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  eos_token_id=2, pad_token_id=0, bos_token_id=None)
    config = (Qwen3MoeConfig(intermediate_size=64, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                             norm_topk_prob=True, **common) if moe else Qwen3Config(intermediate_size=64, **common))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # non-trivial norms: mapping mistakes show up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.to(torch.bfloat16).save_pretrained(out)
    tokenizer().save_pretrained(out)


def main(roll: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.path.join(roll, "mcore_adapter", "src"))
    with tempfile.TemporaryDirectory() as tmp:
        for moe in (False, True):
            make_hf(moe, os.path.join(tmp, "hf_qwen3_moe" if moe else "hf_qwen3"))
        jobs = [("hf_qwen3", "qwen3_legacy_tp2_pp2", "2", "2", "1", "0"),
                ("hf_qwen3_moe", "qwen3_moe_legacy_ep2", "1", "1", "2", "1")]
        for src, dst, tp, pp, ep, gg in jobs:
            subprocess.run([sys.executable, "-c", CONVERT, os.path.join(tmp, src), os.path.join(tmp, dst), tp, pp, ep,
                            gg, REPO], env=env, check=True, cwd=tmp)
        script = os.path.join(tmp, "dist_save.py")
        with open(script, "w", encoding="utf-8") as f:
            f.write(DIST_SAVE)
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
                        os.path.join(tmp, "hf_qwen3"), os.path.join(tmp, "qwen3_dist_tp2"), "2", REPO],
                       env=env, check=True, cwd=tmp)
        for name in ("hf_qwen3", "hf_qwen3_moe", "qwen3_legacy_tp2_pp2", "qwen3_moe_legacy_ep2", "qwen3_dist_tp2"):
            shutil.rmtree(os.path.join(HERE, name), ignore_errors=True)
            shutil.copytree(os.path.join(tmp, name), os.path.join(HERE, name),
                            ignore=shutil.ignore_patterns("generation_config.json"))


if __name__ == "__main__":
    main(sys.argv[1])
