"""`loss_weighting`: the HF path's rule, and each value of the key.

LLaMA-Factory's HF path weights every label token of a global batch equally for text models and averages each
micro-batch's own mean loss for vision-language models (its trainers turn `model_accepts_loss_kwargs` off when a
processor is loaded; transformers does it for classes such as Qwen2.5-VL): there the curve depends on how the global
batch is split. The end-to-end tests train
a tiny Qwen2.5-VL (windowed and full-attention vision blocks, images of two sizes, answers of different lengths) at
lr 1e-3 through `llamafactory-cli train` on both backends and compare every step's loss to 1e-6 relative (fp32).
"""

from __future__ import annotations

import pytest
import torch

from llamafactory_mca.training.loss_weighting import (check_loss_weighting, hf_trainer_weighting,
                                                      resolve_loss_weighting, token_weights)

from test_vl_train import VL_REL_TOL


# ------------------------------------------------------------------------------------------------ unit


def test_hf_trainer_rule_per_model_class():
    from transformers import LlamaConfig, MixtralConfig, Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3Config, Qwen3MoeConfig

    for config in (LlamaConfig(), Qwen3Config(), Qwen3MoeConfig(), MixtralConfig(), Qwen2VLConfig()):
        assert hf_trainer_weighting(config) == "token", type(config).__name__  # the class accepts loss kwargs
    assert hf_trainer_weighting(Qwen2_5_VLConfig()) == "micro_batch"  # accepts_loss_kwargs = False
    # LLaMA-Factory's pt / sft trainers turn the kwargs off whenever a processor is loaded (every VL model)
    assert hf_trainer_weighting(Qwen2VLConfig(), has_processor=True) == "micro_batch"
    assert resolve_loss_weighting("auto", "sft", Qwen2VLConfig(), has_processor=True) == "micro_batch"
    assert resolve_loss_weighting("auto", "dpo", Qwen3Config()) == "micro_batch"
    assert resolve_loss_weighting("sample", "sft", Qwen3Config()) == "sample"


def test_refused_values_name_the_key():
    with pytest.raises(ValueError, match="loss_weighting: token has no meaning for stage dpo"):
        check_loss_weighting("token", "dpo")
    with pytest.raises(ValueError, match="loss_weighting: 'tokens' is not one of"):
        check_loss_weighting("tokens", "sft")
    for value in ("auto", "micro_batch", "sample"):
        check_loss_weighting(value, "dpo")


def _weighted_loss(per_token: torch.Tensor, mask: torch.Tensor, weighting: str, segments=None):
    weights, denominator = token_weights(mask, weighting, segments)
    return float((per_token * weights).sum()), denominator


def test_micro_batch_and_sample_weights():
    torch.manual_seed(0)
    ce = torch.rand(2, 6, dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 0, 0, 0]], dtype=torch.float64)
    total, denominator = _weighted_loss(ce, mask, "micro_batch")
    assert denominator == 1 and total == pytest.approx(float((ce * mask).sum() / mask.sum()), rel=1e-12)
    total, denominator = _weighted_loss(ce, mask, "sample")
    row_means = [(ce[i] * mask[i]).sum() / mask[i].sum() for i in range(2)]
    assert denominator == 2 and total == pytest.approx(float(sum(row_means)), rel=1e-12)
    # neat_packing: two samples packed in row 0 (segments 1 and 2), one in row 1; padding (segment 0) carries no loss
    segments = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 0, 0]])
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 1, 0, 0, 0, 0]], dtype=torch.float64)
    total, denominator = _weighted_loss(ce, mask, "sample", segments)
    expected = (ce[0, 1] + ce[0, 2]) / 2 + ce[0, 4] + (ce[1, 0] + ce[1, 1]) / 2
    assert denominator == 3 and total == pytest.approx(float(expected), rel=1e-12)
    # a filler micro-batch (no label) carries neither weight nor count
    weights, denominator = token_weights(torch.zeros(1, 4), "sample")
    assert denominator == 0 and not weights.any()


# ------------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def vl25_model(tmp_path_factory):
    from vl_helpers import make_tiny_vl_model

    return make_tiny_vl_model(str(tmp_path_factory.mktemp("tiny_vl25") / "qwen2_5_vl"), family="qwen2_5_vl")


def _vl_recipe(model: str, out: str, bs: int, ga: int, mca: bool = True, **overrides) -> dict:
    from test_vl_train import _recipe

    if mca:
        overrides["save_hf_model"] = False  # our key: the HF export is not compared here
    return _recipe(model, out, per_device_train_batch_size=bs, gradient_accumulation_steps=ga, **overrides)


@pytest.fixture(scope="module")
def hf_vl25(vl25_model, tmp_path_factory):
    """The HF path's curves for the two splits of the same 4 samples per step."""
    from vl_helpers import train_vl as _train

    tmp = tmp_path_factory.mktemp("hf_vl25_splits")
    return {(bs, ga): _train(tmp, f"hf_{bs}x{ga}", _vl_recipe(vl25_model, str(tmp / f"hf_{bs}x{ga}"), bs, ga, mca=False),
                             mca=False)
            for bs, ga in ((1, 4), (2, 2))}


def _rel(hf_dir: str, ours_dir: str) -> float:
    from lf_runs import losses

    hf, ours = losses(hf_dir), losses(ours_dir)
    assert len(hf) == len(ours) > 1, (hf, ours)
    rel = max(abs(a - b) / abs(a) for a, b in zip(hf, ours))
    print(f"HF {hf}\nMCA {ours}\nmax rel diff {rel:.2e}")
    return rel


def test_hf_path_depends_on_the_split(hf_vl25):
    """The premise: for Qwen2.5-VL the HF path's curve changes with the split of the global batch."""
    assert _rel(hf_vl25[(1, 4)], hf_vl25[(2, 2)]) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("bs,ga", [(1, 4), pytest.param(2, 2, marks=pytest.mark.extended)], ids=["1x4", "2x2"])
def test_vl_auto_weighting_follows_hf_per_split(vl25_model, hf_vl25, tmp_path, bs, ga):
    from vl_helpers import train_vl as _train

    out = _train(tmp_path, f"mca_{bs}x{ga}", _vl_recipe(vl25_model, str(tmp_path / "out"), bs, ga))
    assert _rel(hf_vl25[(bs, ga)], out) <= VL_REL_TOL


@pytest.mark.slow
@pytest.mark.parametrize("layout,split", [
    (dict(tensor_model_parallel_size=2, sequence_parallel=True), (2, 2)),
    pytest.param(dict(pipeline_model_parallel_size=2), (1, 4), marks=pytest.mark.extended),
    (dict(), (1, 2)),  # two processes, no model parallelism: DP=2, 2 micro-batches of 1 sample on each rank
], ids=["tp2sp", "pp2", "dp2"])
def test_vl_auto_weighting_parallel(vl25_model, hf_vl25, tmp_path, layout, split):
    """TP=2+SP and PP=2 on the HF split they reproduce; DP=2 (1 x 2 per rank) is the same four single-sample
    micro-batches as the HF path's 1 x 4."""
    from vl_helpers import train_vl as _train

    out = _train(tmp_path, "mca_par", _vl_recipe(vl25_model, str(tmp_path / "out"), *split, **layout), nproc=2)
    assert _rel(hf_vl25[(1, 4)] if not layout else hf_vl25[split], out) <= VL_REL_TOL


@pytest.mark.slow
def test_vl_sample_and_token_weighting(vl25_model, hf_vl25, tmp_path):
    """`sample` at 2 x 2 is the mean of the 4 samples' means: the HF path's 1 x 4 curve. `token` does not depend on
    the split (1 x 4 equals 2 x 2) and is not the HF path's micro-batch curve."""
    from vl_helpers import train_vl as _train

    sample = _train(tmp_path, "mca_sample", _vl_recipe(vl25_model, str(tmp_path / "sample"), 2, 2,
                                                        loss_weighting="sample"))
    assert _rel(hf_vl25[(1, 4)], sample) <= VL_REL_TOL
    token = {(bs, ga): _train(tmp_path, f"mca_token_{bs}x{ga}",
                              _vl_recipe(vl25_model, str(tmp_path / f"token_{bs}x{ga}"), bs, ga,
                                         loss_weighting="token"))
             for bs, ga in ((1, 4), (2, 2))}
    assert _rel(token[(1, 4)], token[(2, 2)]) <= VL_REL_TOL
    assert _rel(hf_vl25[(1, 4)], token[(1, 4)]) > 1e-4


@pytest.mark.slow
@pytest.mark.extended
def test_text_micro_batch_equals_sample_on_single_sample_micro_batches(tmp_path_factory, tmp_path):
    """`micro_batch` at 1 x 4 and `sample` at 4 x 1 both average the 4 samples' means (two code paths, one
    number); the text family's HF curve is token-weighted, which they are not."""
    from lf_runs import make_models, make_recipe, train

    model = make_models(tmp_path_factory)["dense"]
    runs = {}
    for name, bs, ga, extra in (("micro_batch", 1, 4, dict(loss_weighting="micro_batch")),
                                ("sample", 4, 1, dict(loss_weighting="sample")), ("auto", 1, 4, {})):
        recipe = make_recipe(model, str(tmp_path / name), per_device_train_batch_size=bs,
                             gradient_accumulation_steps=ga, max_steps=3, save_hf_model=False, **extra)
        runs[name] = train(tmp_path, name, recipe)
    assert _rel(runs["micro_batch"], runs["sample"]) <= VL_REL_TOL
    assert _rel(runs["auto"], runs["micro_batch"]) > 1e-4
