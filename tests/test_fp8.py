"""FP8 training wiring (issue 18) on CPU: the keys and their refusals, which modules run in FP8, and that
parameters, checkpoints and exports do not change. The FP8 GEMMs run in the `emulate` kernel (the same
quantization in fp32 arithmetic); the CUDA kernels are checked on the GPU (`python -m llamafactory_mca.kernels.fp8`,
benchmarks/RESULTS.md "FP8")."""

from __future__ import annotations


import pytest
import torch

from llamafactory_mca.args import McaArgumentError, MegatronArguments, validate_megatron_args
from llamafactory_mca.recipe_checks import normalize_fp8_keys
from test_kernels import mpu  # noqa: F401  (the one-rank gloo + model-parallel fixture)


@pytest.mark.parametrize("value,fmt", [(True, "e4m3"), ("true", "e4m3"), ("e4m3", "e4m3"), ("hybrid", "hybrid"),
                                       ("HYBRID", "hybrid"), (False, None), (None, None), ("false", None)])
def test_fp8_spellings_become_fp8_format(value, fmt):
    recipe = {"fp8": value, "finetuning_type": "full"}
    normalize_fp8_keys(recipe)
    assert "fp8" not in recipe  # LLaMA-Factory's own FP8 path (accelerate) never sees it
    assert recipe.get("fp8_format") == fmt


@pytest.mark.parametrize("recipe,key,words", [
    ({"fp8": "e5m2"}, "fp8", "not an FP8 format"),
    ({"fp8": "hybrid", "fp8_format": "e4m3"}, "fp8_format", "contradicts"),
    ({"fp8": True, "fp8_backend": "te"}, "fp8_backend", "not used"),
    ({"fp8": True, "fp8_enable_fsdp_float8_all_gather": True}, "fp8_enable_fsdp_float8_all_gather", "FSDP"),
    ({"fp8": True, "finetuning_type": "lora"}, "fp8", "lora"),
])
def test_fp8_llamafactory_keys_refused_naming_key_and_fix(recipe, key, words):
    with pytest.raises(McaArgumentError) as err:
        normalize_fp8_keys(dict(recipe))
    assert f"`{key}`" in str(err.value) and words in str(err.value) and "Fix:" in str(err.value)


@pytest.mark.parametrize("kw,key,words", [
    (dict(fp8_recipe="tensorwise"), "fp8_recipe", "no effect without fp8"),
    (dict(fp8_format="e4m3", fp8_recipe="delayed"), "fp8_recipe", "not offered"),
    (dict(fp8_format="e4m3", fp8_recipe="mxfp8"), "fp8_recipe", "not offered"),
    (dict(fp8_format="hybrid", fp8_recipe="rowwise"), "fp8", "tensorwise only"),
    (dict(fp8_format="e4m3", transformer_impl="transformer_engine"), "fp8", "local layer spec"),
    (dict(fp8_format="e5m2"), "fp8", "not an FP8 format"),
])
def test_fp8_combinations_that_cannot_work_are_refused(kw, key, words):
    with pytest.raises(McaArgumentError) as err:
        validate_megatron_args(MegatronArguments(**kw), 1)
    assert f"`{key}`" in str(err.value) and words in str(err.value) and "Fix:" in str(err.value)


def test_fp8_accepted_combinations():
    for kw in (dict(fp8_format="e4m3"), dict(fp8_format="hybrid", fp8_recipe="tensorwise"),
               dict(fp8_format="e4m3", fp8_recipe="rowwise"), dict(fp8_format="e4m3", fp8_recipe="blockwise")):
        validate_megatron_args(MegatronArguments(**kw), 1)


def test_upstream_fp8_recipe_is_ours_and_fp8_param_refused():
    from llamafactory_mca.mcore_adapter_keys import translate_upstream_keys

    assert translate_upstream_keys({"fp8_recipe": "rowwise"}) == {"fp8_recipe": "rowwise"}
    with pytest.raises(McaArgumentError, match="`fp8_param`.*Fix:"):
        translate_upstream_keys({"fp8_param": True})


def test_fp8_refused_on_cpu_before_anything_is_built(monkeypatch):
    from llamafactory_mca.kernels.fp8 import Fp8Recipe, check_fp8_supported
    from llamafactory_mca.models import construction

    monkeypatch.delenv("LLAMAFACTORY_MCA_FP8_KERNEL", raising=False)
    with pytest.raises(ValueError) as err:
        check_fp8_supported(Fp8Recipe("rowwise"))
    assert "`fp8`" in str(err.value) and "no CUDA device" in str(err.value) and "Fix: remove fp8" in str(err.value)

    def must_not_build(*a, **k):
        raise AssertionError("a model chunk was built")

    monkeypatch.setattr(construction, "new_chunk", must_not_build)
    monkeypatch.setattr(construction.ModelState, "__init__", must_not_build)

    class Bridge:
        def padded_vocab_size(self, hf_config, tp):
            return 64

        def vocab_size(self, hf_config):
            return 64

        def transformer_config(self, *a):
            raise AssertionError("the TransformerConfig was built")

    from megatron.core import parallel_state as ps

    monkeypatch.setattr(ps, "get_tensor_model_parallel_world_size", lambda: 1)
    with pytest.raises(ValueError, match="`fp8`.*no CUDA device"):
        construction.build_model(Bridge(), None, MegatronArguments(fp8_format="e4m3"), device="cpu")
    # the meta device (planning, conversion) builds without the device check
    assert construction.fp8_recipe_checked(MegatronArguments(fp8_format="e4m3"), torch.device("meta")) is not None


# ---------------------------------------------------------------------------------------------- model wiring


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    from tiny_models import make_tiny_model

    root = tmp_path_factory.mktemp("fp8")
    return {kind: make_tiny_model(kind, str(root / kind)) for kind in ("qwen3", "qwen3_moe")}


def _build(model_dir: str, **fp8):
    from transformers import AutoConfig

    from llamafactory_mca.models.registry import bridge_for

    cfg = AutoConfig.from_pretrained(model_dir)
    bridge = bridge_for(cfg.model_type)
    models = bridge.build_model(cfg, MegatronArguments(**fp8), torch.float32, init_weights=False)
    bridge.load_hf_weights(models, model_dir)
    return bridge, cfg, models[0]


def _step(model, vocab: int):
    torch.manual_seed(0)
    ids = torch.randint(0, vocab, (2, 32))
    pos = torch.arange(32).expand(2, 32)
    logits = model(input_ids=ids, position_ids=pos, attention_mask=None)[..., :vocab]
    logits.float().logsumexp(-1).mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12))


EXPECTED = {"qwen3": ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"),
            "qwen3_moe": ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.experts")}


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_moe"])
def test_converted_modules_numbers_and_unchanged_state(mpu, tiny_dirs, monkeypatch, kind):
    monkeypatch.setenv("LLAMAFACTORY_MCA_FP8_KERNEL", "emulate")
    bridge, cfg, ref = _build(tiny_dirs[kind])
    _, _, model = _build(tiny_dirs[kind], fp8_format="e4m3")
    converted = sorted(n for n, m in model.named_modules() if getattr(m, "fp8_recipe", None) is not None)
    want = sorted(f"decoder.layers.{i}.{leaf}" for i in range(cfg.num_hidden_layers) for leaf in EXPECTED[kind])
    assert converted == want  # not the output layer, embedding, router or norms
    assert getattr(ref.decoder.layers[0].self_attention.linear_qkv, "fp8_recipe", None) is None

    # parameters, state dict (what checkpoints hold) and the HF export are those of the bf16/fp32 model
    assert [(n, p.dtype, p.shape) for n, p in model.named_parameters()] == \
           [(n, p.dtype, p.shape) for n, p in ref.named_parameters()]
    assert sorted(model.state_dict()) == sorted(ref.state_dict())
    assert sorted(model.sharded_state_dict()) == sorted(ref.sharded_state_dict())
    exported, want_export = dict(bridge.export_hf_state_dict([model])), dict(bridge.export_hf_state_dict([ref]))
    assert sorted(exported) == sorted(want_export)
    for name, t in exported.items():
        assert t.dtype == want_export[name].dtype and torch.equal(t, want_export[name]), name

    # FP8 numbers: e4m3 keeps 3 mantissa bits, so logits and gradients land within a few percent, not exactly
    logits_ref, grads_ref = _step(ref, cfg.vocab_size)
    logits, grads = _step(model, cfg.vocab_size)
    assert 0 < _rel(logits, logits_ref) < 0.15  # measured 0.078 (qwen3): 16 GEMMs of ~3.7% each; a wrong layout is ~1
    assert sorted(grads) == sorted(grads_ref)
    for leaf in ("linear_qkv.weight", "linear_proj.weight", "linear_fc1.weight", "weight1", "weight2"):
        names = [n for n in grads if n.endswith(leaf)]
        for n in names:
            # measured 0.06-0.11, experts of the first MoE layer 0.24 (FP8 noise flips a few top-k choices)
            assert 0 < _rel(grads[n], grads_ref[n]) < 0.3, (n, _rel(grads[n], grads_ref[n]))


def test_weight_gradient_goes_into_main_grad(mpu, tiny_dirs, monkeypatch):
    """gradient_accumulation_fusion: the FP8 wgrad is added into the fp32 main_grad, as megatron's own path."""
    monkeypatch.setenv("LLAMAFACTORY_MCA_FP8_KERNEL", "emulate")
    from llamafactory_mca.kernels.fp8 import Fp8ForwardImpl, Fp8Recipe

    torch.manual_seed(0)
    x = torch.randn(48, 2, 64)
    w = torch.nn.Parameter(torch.randn(32, 64) * 0.05)
    w.main_grad = torch.full((32, 64), 1.0)
    y = Fp8ForwardImpl(Fp8Recipe("tensorwise"))(x, w, None, True, False, False)
    g = torch.randn_like(y)
    y.backward(g)
    assert w.grad_added_to_main_grad
    want = 1.0 + g.reshape(-1, 32).t() @ x.reshape(-1, 64)
    assert _rel(w.main_grad, want) < 0.05 and _rel(y, x @ w.detach().t()) < 0.05


def test_blockwise_leaves_shapes_it_cannot_take_in_bf16(mpu, tiny_dirs, monkeypatch):
    """blockwise needs multiples of 128 per rank: the tiny model's 64-wide linears stay bf16, its experts FP8."""
    monkeypatch.setenv("LLAMAFACTORY_MCA_FP8_KERNEL", "emulate")
    _, _, model = _build(tiny_dirs["qwen3_moe"], fp8_format="e4m3", fp8_recipe="blockwise")
    converted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if getattr(m, "fp8_recipe", None) is not None}
    assert converted == {"experts"}


def test_fp8_weight_copy_is_renewed_after_an_optimizer_step():
    """The FP8 copy of a weight is reused within a step and renewed after `optimizer.step()`, also when the new
    values arrive through `.data` (as megatron's distributed optimizer writes them: no version bump)."""
    from llamafactory_mca.kernels.fp8 import E4M3, quantize_weight

    w = torch.nn.Parameter(torch.ones(16, 16))
    first = quantize_weight(w, E4M3, None)
    assert quantize_weight(w, E4M3, None)[0] is first[0]  # reused
    w.data.mul_(2.0)  # no version bump
    opt = torch.optim.SGD([w], lr=0.0)
    w.grad = torch.zeros_like(w)
    opt.step()
    q, inv = quantize_weight(w, E4M3, None)
    assert q is not first[0] and torch.equal(q.float() * inv, torch.full((16, 16), 2.0))


def test_casts_without_triton_are_the_eager_quantization():
    """Without a GPU the casts are `quantize_eager`'s (the Triton ones, kernels/fp8_cast.py, are checked against it
    on the GPU: `python -m llamafactory_mca.kernels.fp8`); wgrad's transposed, padded operands are made from the
    quantized tensors as before."""
    from llamafactory_mca.kernels import fp8

    fp8.reset_cast_choice()
    assert fp8.cast_backend() == "torch" and fp8.cast_reason() == "no Triton with a CUDA device"
    x = torch.randn(21, 48)
    q, inv, qt = fp8.quantize_with_t(x, fp8.E4M3)
    ref_q, ref_inv = fp8.quantize_eager(x, fp8.E4M3, None)
    assert qt is None and torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(inv, ref_inv)
    padded = fp8.transpose_padded(q)
    assert padded.shape == (48, 32) and padded.is_contiguous() and not padded[:, 21:].float().any()
    assert torch.equal(padded[:, :21].float(), q.float().t())
    qt, inv = fp8.quantize_rowwise_t(x, fp8.E4M3)
    ref_q, ref_inv = fp8.quantize_eager(torch.cat([x, x.new_zeros(11, 48)]).t(), fp8.E4M3, -1)
    assert qt.shape == (48, 32) and qt.is_contiguous() and torch.equal(qt.float(), ref_q.float())
    assert torch.equal(inv, ref_inv)


def test_tensor_and_sequence_parallel_fp8_matches_fp32(tmp_path, tiny_dirs):
    """TP=2 and TP=2 + SP on 2 gloo ranks: the FP8 linears' communication (SP all-gather, dgrad all-reduce /
    reduce-scatter) gives each rank the logits and weight gradients of the fp32 model within FP8 noise."""
    from workers import launch_worker

    per_rank = launch_worker("fp8_worker.py", ["--models", tiny_dirs["qwen3"], tiny_dirs["qwen3_moe"]], tmp_path,
                             key=("layout", "kind"))
    for rank, results in enumerate(per_rank):
        assert sorted(results) == [("tp2", "qwen3"), ("tp2_sp", "qwen3"), ("tp2_sp", "qwen3_moe")]
        for (layout, kind), r in results.items():
            assert "error" not in r, r.get("error")
            assert r["converted"] == sorted(leaf.rsplit(".", 1)[-1] for leaf in EXPECTED[kind]), r["converted"]
            assert 0 < r["logits_rel"] < 0.15, (rank, layout, kind, r["logits_rel"])
            assert r["grad_rel"] and all(0 < v < 0.3 for v in r["grad_rel"].values()), (rank, layout, kind, r["grad_rel"])
