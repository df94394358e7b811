"""Vision-language preference training (stages dpo, kto, rm) through `USE_MCA=1 llamafactory-cli train` against
LLaMA-Factory's HF path, fp32, CPU: the tiny Qwen2-VL of tests/vl_helpers.py, LLaMA-Factory's multimodal
preference data (tests/data/tiny_vl_dpo.json: sharegpt ranking rows with one image each, rejected = another
sample's answer; tests/data/tiny_vl_kto.json: the same prompts, every other answer another sample's, kto_tag
false). Per step the logged numbers agree to 1e-4 relative (measured: losses and log-probs ~1e-7; rewards and kl,
differences of nearly equal log-probs, up to ~2e-5).

The preference stages build their micro-batches with sft's code (`data.to_microbatch`: pixel values / grids in
`model_inputs`, mRoPE positions from Hugging Face's get_rope_index) and pass them as sft does (`loop.model_kwargs`).
Before that fix they fed the model the text tokens only: the image placeholder tokens then embed as plain tokens and
the log-probs differ from the HF path's (measured on the dpo run: loss 6e-4, logps 1e-3 relative, so the parity
tests fail; `test_pair_forward_gets_vision_inputs` checks the inputs directly).

The HF kto reference needs tests/hf_conv3d_shim's second patch: LLaMA-Factory 0.9.5's KTO trainer passes the model
neither the collator's mRoPE positions nor `mm_token_type_ids`, which transformers 5's Qwen2-VL requires; the shim
derives them from the input ids as the processor does.
"""

from __future__ import annotations

import pytest
import torch

from tests.vl_helpers import make_tiny_vl_model, train_vl

STEPS = 3
DPO_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected")
KTO_KEYS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def _recipe(model: str, out: str, **overrides) -> dict:
    from lf_runs import make_recipe

    recipe = make_recipe(model, out, stage="dpo", dataset="tiny_vl_dpo", template="qwen2_vl", cutoff_len=256,
                         max_steps=STEPS, learning_rate=5.0e-4, pref_beta=0.1, pref_loss="sigmoid",
                         dpo_label_smoothing=0.1, pref_ftx=0.2, warmup_steps=0)
    recipe.update(overrides)
    return recipe


@pytest.fixture(scope="module")
def vl_model(tmp_path_factory):
    return make_tiny_vl_model(str(tmp_path_factory.mktemp("tiny_vl_pref") / "qwen2_vl"))


def assert_preference_parity(hf_dir: str, ours_dir: str, keys: tuple) -> None:
    """Every logged step of both runs agrees on `keys` to 1e-4 relative (1e-5 absolute near zero: step 1's rewards
    are 0, policy == reference); a key a step lacks (kto: no desirable sample) lacks on both sides."""
    from lf_runs import training_history

    hf, ours = training_history(hf_dir), training_history(ours_dir)
    assert len(hf) == len(ours) == STEPS, (len(hf), len(ours))
    worst = 0.0
    for step, (a, b) in enumerate(zip(hf, ours)):
        for key in keys:
            assert (key in a) == (key in b), (step, key, a, b)
            if key not in a:
                continue
            diff = abs(a[key] - b[key])
            worst = max(worst, diff / abs(a[key]) if abs(a[key]) > 1e-4 else 0.0)
            assert diff <= 1e-4 * abs(a[key]) + 1e-5, (step, key, a[key], b[key])
    print(f"VL preference parity {ours_dir}: losses HF {[h['loss'] for h in hf]} MCA {[h['loss'] for h in ours]}; "
          f"max rel diff {worst:.2e}")


@pytest.fixture(scope="module")
def hf_dpo(vl_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_vl_dpo")
    return train_vl(tmp, "hf_vl_dpo", _recipe(vl_model, str(tmp / "out")), mca=False)


@pytest.mark.slow
def test_vl_dpo_parity(vl_model, hf_dpo, tmp_path):
    """dpo (sigmoid + label smoothing + pref_ftx, reference log-probs precomputed) on image pairs, 1 process:
    per step loss, rewards and log-probs match the HF path's."""
    ours = train_vl(tmp_path, "mca_vl_dpo", _recipe(vl_model, str(tmp_path / "out"), save_hf_model=False))
    assert_preference_parity(hf_dpo, ours, DPO_KEYS)


@pytest.mark.slow
@pytest.mark.extended  # the single-process run above is the default tier's check of the same data path
@pytest.mark.parametrize("layout", [dict(pipeline_model_parallel_size=2),
                                    dict(tensor_model_parallel_size=2, sequence_parallel=True),
                                    dict(context_parallel_size=2)], ids=["pp2", "tp2sp", "cp2"])
def test_vl_dpo_parallel_parity(vl_model, hf_dpo, tmp_path, layout):
    """The HF run's split (2 x 2) under PP=2 (vision tower on the first stage), TP=2 + SP, CP=2 (the full row
    embedded, the vision features merged before the split): the same per-step numbers."""
    ours = train_vl(tmp_path, "mca_vl_dpo_par", _recipe(vl_model, str(tmp_path / "out"), save_hf_model=False,
                                                        **layout), nproc=2)
    assert_preference_parity(hf_dpo, ours, DPO_KEYS)


STAGES = {  # stage: (recipe overrides, compared keys)
    "rm": (dict(stage="rm", learning_rate=1.0e-3), ("loss",)),
    "kto": (dict(stage="kto", dataset="tiny_vl_kto", pref_beta=0.2, kto_chosen_weight=1.5, kto_rejected_weight=0.8,
                 pref_ftx=0.2, learning_rate=2.0e-3), KTO_KEYS),
}


@pytest.fixture(scope="module")
def stage_runs(vl_model, tmp_path_factory) -> dict:
    """stage -> (model, HF run's output_dir), made when first asked for. rm's model is the tiny Qwen2-VL with a
    seeded value head (`lf_runs.add_seeded_value_head`)."""
    import shutil

    from lf_runs import add_seeded_value_head

    runs: dict = {}

    def get(stage: str) -> tuple[str, str]:
        if stage not in runs:
            tmp = tmp_path_factory.mktemp(f"hf_vl_{stage}")
            model = vl_model
            if stage == "rm":
                model = add_seeded_value_head(shutil.copytree(vl_model, str(tmp / "qwen2_vl_rm")))
            runs[stage] = model, train_vl(tmp, f"hf_vl_{stage}", _recipe(model, str(tmp / "out"), **STAGES[stage][0]),
                                          mca=False)
        return runs[stage]

    return get


@pytest.mark.slow
@pytest.mark.extended  # the same data path and forward step as dpo (PairBatches, preference.forward_step)
@pytest.mark.parametrize("layout", [dict(), dict(pipeline_model_parallel_size=2)], ids=["1proc", "pp2"])
@pytest.mark.parametrize("stage", ["rm", "kto"])
def test_vl_rm_kto_parity(stage_runs, tmp_path, stage, layout):
    """rm on image pairs (TRL's value head on Qwen2VLForConditionalGeneration on the HF side) and kto on image
    samples (the KL rows carry their sample's images, as the HF path's KL forward does), 1 process and PP=2: the
    logged numbers per step match the HF path's."""
    model, hf = stage_runs(stage)
    overrides, keys = STAGES[stage]
    nproc = 2 if layout else 1
    ours = train_vl(tmp_path, f"mca_vl_{stage}", _recipe(model, str(tmp_path / "out"), save_hf_model=False,
                                                         **overrides, **layout), nproc=nproc)
    assert_preference_parity(hf, ours, keys)


def test_pair_forward_gets_vision_inputs():
    """The preference forward step hands the model the micro-batch's pixel values, grids and [3, b, s] mRoPE
    positions (the bug: tokens and 1-D positions only), built by PairBatches from a pairwise collated batch."""
    from llamafactory_mca.training import data as mdata
    from llamafactory_mca.training.preference import PairBatches, forward_step

    n, s = 2, 8
    ids = torch.randint(0, 50, (2 * n, s))
    ids[:, 1] = 7  # one image token a row
    grid = torch.tensor([[1, 2, 2]] * (2 * n))
    features = {"input_ids": ids, "attention_mask": torch.ones(2 * n, s, dtype=torch.long), "labels": ids.clone(),
                "pixel_values": torch.randn(16, 12), "image_grid_thw": grid}
    seen = {}

    def rope(input_ids, image_grid_thw, video_grid_thw, attention_mask, second_per_grid_ts=None):
        seen["rope_grid"] = image_grid_thw
        return torch.arange(input_ids.shape[1]).expand(3, *input_ids.shape) + 100

    batches = PairBatches(list(range(n)), lambda rows: features, 0, mdata.SeqLayout(), uniform_shapes=False,
                          micro_batch_size=n, rope_fn=rope)
    (mb,) = batches.build([[0, 1]])

    class Recorder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, tokens, position_ids, attention_mask, **kwargs):
            seen.update(tokens=tokens, position_ids=position_ids, **kwargs)
            return torch.zeros(*tokens.shape, 3)

    forward_step(lambda mb, out: out, iter([mb]), Recorder())
    assert torch.equal(seen["rope_grid"], grid)
    assert seen["position_ids"].shape == (3, 2 * n, s) and int(seen["position_ids"].min()) == 100
    assert torch.equal(seen["pixel_values"], features["pixel_values"])
    assert torch.equal(seen["image_grid_thw"], grid)


def test_kto_rows_carry_vision_inputs():
    """kto's stacked batch (targets, then KL rows) carries the target batch's vision inputs twice, in row order:
    a KL row holds its own sample's prompt and images (LLaMA-Factory's feedback data)."""
    from llamafactory_mca.training.kto import TargetAndKLRows

    n, s = 2, 6
    pixels, grid = torch.randn(8, 12), torch.tensor([[1, 2, 2], [1, 2, 2]])

    def collator(features):
        rows = torch.randint(0, 50, (n, s))
        return {"input_ids": rows, "attention_mask": torch.ones(n, s, dtype=torch.long), "labels": rows,
                "kl_input_ids": rows[:, :4], "kl_attention_mask": torch.ones(n, 4, dtype=torch.long),
                "kl_labels": rows[:, :4], "kto_tags": torch.tensor([True, False]),
                "pixel_values": pixels, "image_grid_thw": grid}

    batch = TargetAndKLRows(collator, 0)([{}, {}])
    assert batch["input_ids"].shape == (2 * n, s)
    assert torch.equal(batch["pixel_values"], torch.cat([pixels, pixels]))
    assert torch.equal(batch["image_grid_thw"], torch.cat([grid, grid]))
