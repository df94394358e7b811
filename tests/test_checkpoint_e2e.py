"""End to end through `USE_MCA=1 llamafactory-cli train`: save_steps, kill, resume_from_checkpoint, merge."""

from __future__ import annotations

import os

import pytest

from lf_runs import log_records, make_models, make_recipe, train


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return make_models(tmp_path_factory)


def _losses(output_dir: str) -> dict[int, float]:
    return {r["current_steps"]: r["loss"] for r in log_records(output_dir) if "loss" in r}


@pytest.mark.slow
def test_resume_through_llamafactory_cli_is_bit_exact(models, tmp_path):
    from llamafactory_mca.checkpoint import checkpoint_info, list_checkpoints

    common = dict(max_steps=4, save_strategy="steps", save_steps=1, use_distributed_optimizer=True,
                  lr_scheduler_type="cosine", warmup_steps=1)
    full = train(tmp_path, "full", make_recipe(models["dense"], str(tmp_path / "full"), save_total_limit=3, **common),
                 nproc=2)
    # save_total_limit=3 deleted checkpoint-1; no temporary directory is left behind
    assert [s for s, _ in list_checkpoints(full)] == [2, 3, 4]
    assert not [n for n in os.listdir(full) if n.startswith(".")]
    ckpt2 = os.path.join(full, "checkpoint-2")
    info = checkpoint_info(ckpt2)
    assert info["step"] == 2 and info["has_optimizer"] and info["model_type"] == "qwen3"
    # as if the run had been killed after step 2: resume from its checkpoint
    resumed = train(tmp_path, "resumed", make_recipe(models["dense"], str(tmp_path / "resumed"),
                                                     resume_from_checkpoint=ckpt2, **common), nproc=2)
    a, b = _losses(full), _losses(resumed)
    assert set(b) == {3, 4}, b
    assert [b[3], b[4]] == [a[3], a[4]], (a, b)  # bit for bit
