"""Merge (Megatron checkpoint -> HF) from TP / PP+VPP / EP layouts, convert (HF -> Megatron), and the export
entry points: `llamafactory-mca merge`, `scripts/megatron_merge.py`, `llamafactory-cli export`."""

from __future__ import annotations

import os
import sys

import pytest

from conftest import REPO, run_checked
from lf_runs import merge

WORKER = os.path.join(REPO, "tests", "merge_worker.py")


def megatron_run(hf: str, out: str, *layout: str, steps: int = 2, lr: float = 1e-3) -> str:
    run_checked([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER,
          "--hf", hf, "--out", out, "--steps", str(steps), "--lr", str(lr), *layout])
    return os.path.join(out, f"checkpoint-{steps}")


def merge_cli(ckpt: str, out: str, *flags: str) -> None:
    merge(ckpt, out, *flags, timeout=300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")

    def make(kind: str) -> str:
        if kind in ("qwen3", "qwen3_moe"):  # with a tokenizer: the session's shared models
            from lf_runs import make_models

            return make_models(tmp_path_factory)["moe" if kind == "qwen3_moe" else "dense"]
        path = str(root / kind)
        if not os.path.isdir(path):
            from tiny_models import make_tiny_model

            make_tiny_model(kind, path)
        return path

    return make


def hf_logits(path: str, tokens):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def safetensors_of(path: str) -> dict:
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, layout",
    [
        pytest.param("qwen3", ("--tp", "2"), marks=pytest.mark.extended),  # tp2-tied-padded-vocab is a superset
        ("qwen3", ("--pp", "2", "--vpp", "2")),
        ("qwen3_moe", ("--ep", "2")),
        ("llama_tied", ("--tp", "2")),  # tied embeddings, odd vocab padded under TP
    ],
    ids=["tp2", "pp2-vpp2", "ep2-moe", "tp2-tied-padded-vocab"],
)
def test_merged_weights_give_the_megatron_logits(tiny, tmp_path, kind, layout):
    import torch

    hf = tiny(kind)
    ckpt = megatron_run(hf, str(tmp_path / "run"), *layout)
    merged = str(tmp_path / "hf")
    merge_cli(ckpt, merged, "--fp32", "--max_shard_size", "100KB")  # several shards + index
    ref = torch.load(os.path.join(str(tmp_path / "run"), "reference.pt"))
    logits = hf_logits(merged, ref["tokens"])
    torch.testing.assert_close(logits, ref["logits"], rtol=1e-5, atol=1e-5)
    # training moved the weights; the merged model has exactly the original's tensor names and shapes
    orig, new = safetensors_of(hf), safetensors_of(merged)
    assert orig.keys() == new.keys()
    assert all(orig[k].shape == new[k].shape for k in orig)
    assert any(not torch.equal(orig[k], new[k]) for k in orig)
    assert os.path.isfile(os.path.join(merged, "model.safetensors.index.json"))
    if kind == "qwen3":
        assert os.path.isfile(os.path.join(merged, "tokenizer_config.json"))


@pytest.mark.slow
@pytest.mark.parametrize("kind, layout", [("qwen3_moe", ("--ep", "2")),
                                          pytest.param("llama_tied", ("--tp", "2"), marks=pytest.mark.extended)],
                         ids=["ep2-moe", "tp2-tied-padded-vocab"])
def test_learning_rate_zero_round_trips_bit_for_bit(tiny, tmp_path, kind, layout):
    import torch

    hf = tiny(kind)
    ckpt = megatron_run(hf, str(tmp_path / "run"), *layout, steps=1, lr=0.0)
    merged = str(tmp_path / "hf")
    run_checked([sys.executable, os.path.join(REPO, "scripts", "megatron_merge.py"), "--checkpoint_path", ckpt,
          "--output_path", merged])  # default dtype: the config's (fp32 here)
    orig, new = safetensors_of(hf), safetensors_of(merged)
    assert orig.keys() == new.keys()
    bad = [k for k in orig if orig[k].dtype != new[k].dtype or not torch.equal(orig[k], new[k])]
    assert not bad, bad[:5]
    # --bf16 casts
    merge_cli(ckpt, str(tmp_path / "hf16"), "--bf16")
    assert all(t.dtype == torch.bfloat16 for t in safetensors_of(str(tmp_path / "hf16")).values())


@pytest.mark.slow
def test_resume_odd_vocab_tp2_to_tp1(tiny, tmp_path):
    """Vocab 1001 is padded to the same rows at every TP size (1024), so a TP=2 checkpoint (model and distributed
    optimizer) loads at TP=1 exactly and the model computes the same logits."""
    import torch

    from test_checkpoint_resume import read_all_tensors

    hf = tiny("llama")  # untied: embedding and output layer are both vocab-padded
    ckpt = megatron_run(hf, str(tmp_path / "tp2"), "--tp", "2", steps=2)
    assert read_all_tensors(ckpt)["embedding.word_embeddings.weight"].shape[0] == 1024
    resaved = str(tmp_path / "resaved")
    run_checked([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", WORKER, "--hf", hf,
          "--out", str(tmp_path / "tp1"), "--steps", "2", "--resume", ckpt, "--resave", resaved])  # tp=1, dp=2
    a, b = read_all_tensors(ckpt), read_all_tensors(os.path.join(resaved, "checkpoint-2"))
    assert a.keys() == b.keys() and any(k.startswith("optimizer.") for k in a)
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]
    ref = torch.load(os.path.join(str(tmp_path / "tp2"), "reference.pt"))
    got = torch.load(os.path.join(str(tmp_path / "tp1"), "reference.pt"))
    assert torch.equal(ref["tokens"], got["tokens"])
    torch.testing.assert_close(got["logits"], ref["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_convert_then_merge_and_llamafactory_export(tiny, tmp_path):
    import torch

    hf = tiny("qwen3")
    ckpt = str(tmp_path / "mcore")
    run_checked([sys.executable, "-m", "llamafactory_mca.cli", "convert", "--model_name_or_path", hf, "--output_path", ckpt,
          "--tensor_model_parallel_size", "2"])
    from llamafactory_mca.checkpoint import checkpoint_info, read_mca_args

    assert checkpoint_info(ckpt)["has_optimizer"] is False
    assert read_mca_args(ckpt)["tensor_model_parallel_size"] == 2
    export_dir = str(tmp_path / "exported")
    cfg = tmp_path / "export.yaml"
    cfg.write_text(f"model_name_or_path: {ckpt}\nexport_dir: {export_dir}\ntemplate: qwen\n")
    run_checked(["llamafactory-cli", "export", str(cfg)], USE_MCA="1")
    orig, new = safetensors_of(hf), safetensors_of(export_dir)
    assert orig.keys() == new.keys() and all(torch.equal(orig[k], new[k]) for k in orig)
    # the command-line list form (no recipe file)
    listed = str(tmp_path / "exported_list")
    run_checked(["llamafactory-cli", "export", "--model_name_or_path", ckpt, f"--export_dir={listed}", "--template", "qwen"],
         USE_MCA="1")
    new = safetensors_of(listed)
    assert orig.keys() == new.keys() and all(torch.equal(orig[k], new[k]) for k in orig)


def test_merge_errors(tiny, tmp_path):
    from llamafactory_mca.checkpoint import CheckpointError
    from llamafactory_mca.export import merge_checkpoint, merge_command

    hf = tiny("qwen3")
    with pytest.raises(CheckpointError, match="Hugging Face model"):
        merge_checkpoint(hf, str(tmp_path / "out"))
    # unsupported model family: the marker is there, the bridge is not
    from test_checkpoint_resume import _fake_checkpoint

    fake = _fake_checkpoint(tmp_path / "checkpoint-1", model_type="gpt2")
    with pytest.raises(CheckpointError) as err:
        merge_checkpoint(fake, str(tmp_path / "out"))
    assert "gpt2" in str(err.value) and fake in str(err.value)
    # an output directory that holds something
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(CheckpointError, match="not empty"):
        merge_checkpoint(fake, str(busy))
    assert merge_command(["--checkpoint_path", str(tmp_path / "nowhere"), "--output_path", str(tmp_path / "o")]) == 1


def test_wrap_export_recognises_checkpoints_in_every_argument_form(tmp_path, monkeypatch):
    """`llamafactory-cli export` arguments as a recipe dict, `--key value`, `--key=value` and `key=value` lists."""
    import llamafactory_mca.export as export
    from llamafactory_mca.launch import export_args_dict, wrap_export
    from test_checkpoint_resume import _fake_checkpoint

    ckpt = _fake_checkpoint(tmp_path / "checkpoint-1")
    merged, upstream = [], []
    monkeypatch.setattr(export, "export_from_llamafactory_args", lambda args: merged.append(args))
    export_model = wrap_export(lambda args=None: upstream.append(args))
    forms = [
        {"model_name_or_path": ckpt, "export_dir": "out", "export_size": 2},
        ["--model_name_or_path", ckpt, "--export_dir", "out", "--export_size", "2"],
        [f"--model_name_or_path={ckpt}", "--export_dir=out", "--export_size=2"],
        [f"model_name_or_path={ckpt}", "export_dir=out", "export_size=2"],
    ]
    for args in forms:
        export_model(args)
    assert upstream == []
    assert [(a["model_name_or_path"], a["export_dir"], str(a["export_size"])) for a in merged] == [(ckpt, "out", "2")] * 4
    # anything that is not a Megatron checkpoint goes to LLaMA-Factory's own export, untouched
    plain = ["--model_name_or_path", str(tmp_path), "--export_dir", "out"]
    export_model(plain)
    assert upstream == [plain] and len(merged) == 4
    assert export_args_dict(["--flag", "--k", "v"]) == {"flag": True, "k": "v"}
