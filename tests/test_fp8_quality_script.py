"""Keeps benchmarks/fp8_quality.py (issue 18's 300-step FP8 quality runs) honest without a GPU: its verdict on
recorded loss lists, the JSON (and PNG where matplotlib is installed) it writes, FP8 refused on a CPU machine
before anything is built, and (slow) the whole tiny path on CPU with the FP8 sides on the `emulate` kernel."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO, worktree_env

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import fp8_quality as quality  # noqa: E402


def _curve(n: int, end: float, wiggle: float = 0.0) -> list[float]:
    """A falling loss curve from 10.4 to `end`, with an alternating wiggle of relative size `wiggle`."""
    return [(10.4 + (end - 10.4) * i / (n - 1)) * (1 + wiggle * (-1) ** i) for i in range(n)]


def test_verdict_on_recorded_losses():
    base = _curve(300, 6.0)
    ok = quality.compare_losses(base, _curve(300, 6.03, wiggle=0.004), 300)
    assert ok["verdict"] == "pass" and ok["reasons"] == [], ok
    assert ok["final_bf16"] == pytest.approx(sum(base[-10:]) / 10)
    assert 0 < ok["final_rel_diff"] < 0.01 and ok["final_steps_averaged"] == 10
    assert ok["max_step_rel_diff"] == pytest.approx(max(abs(f - b) / b for b, f in
                                                       zip(base, _curve(300, 6.03, wiggle=0.004))))
    assert 1 <= ok["max_step_rel_diff_at"] <= 300 and not ok["diverged_fp8"] and not ok["nan_or_inf_fp8"]

    off = quality.compare_losses(base, _curve(300, 6.2), 300)  # 3.25% apart at the end
    assert off["verdict"] == "fail" and "final losses differ by 3.25%" in off["reasons"][0], off

    nan = quality.compare_losses(base, _curve(299, 6.0) + [math.nan], 300)
    assert nan["verdict"] == "fail" and nan["nan_or_inf_fp8"] and "NaN" in " ".join(nan["reasons"]), nan

    up = quality.compare_losses(base, list(reversed(_curve(300, 6.0))), 300)  # loss rose from 6 to 10.4
    assert up["verdict"] == "fail" and up["diverged_fp8"] and "diverged" in " ".join(up["reasons"]), up

    short = quality.compare_losses(base, _curve(120, 7.0), 300)  # the fp8 side died at step 120
    assert short["verdict"] == "fail" and "fewer than 300 steps" in short["reasons"][0], short


def test_result_json_and_plot_written(tmp_path):
    steps = 30
    sides = {"ours": dict(returncode=0, losses=_curve(steps, 6.0)),
             "ours_fp8": dict(returncode=0, losses=_curve(steps, 6.02, wiggle=0.002), fp8_kernel="cuda")}
    prep = dict(sc=dict(title="t", seq=2048, global_batch=4), model={}, data={}, common=dict(warmup_steps=3))
    args = SimpleNamespace(steps=steps, tiny=False, argv=["--model", "q_dense"])
    result = quality.model_result("q_dense", prep, sides, {"ours_fp8": "cuda"}, args, dict(device="cuda", card="H200"))
    assert result["verdict"] == "pass" and result["comparisons"]["ours_fp8"]["verdict"] == "pass"
    assert result["schedule"] == dict(quality.SCHEDULE, warmup_steps=3)
    assert result["labels"] == {"ours": "bf16", "ours_fp8": "ours_fp8 (cuda)"}
    path = quality.write_model(result, str(tmp_path))
    assert path == str(tmp_path / "fp8_quality_q_dense.json")
    data = json.loads((tmp_path / "fp8_quality_q_dense.json").read_text())
    assert data["sides"]["ours_fp8"]["losses"] == sides["ours_fp8"]["losses"]
    assert data["comparisons"]["ours_fp8"]["final_rel_diff"] == pytest.approx(result["comparisons"]["ours_fp8"]["final_rel_diff"])
    if importlib.util.find_spec("matplotlib") is None:
        assert data["plot"].startswith("skipped: matplotlib"), data["plot"]
    else:
        assert data["plot"] == "fp8_quality_q_dense.png"
        assert (tmp_path / "fp8_quality_q_dense.png").read_bytes()[:4] == b"\x89PNG"
    assert "q_dense: pass" in quality.report(result)


def test_fp8_refused_on_cpu_before_anything_is_built(tmp_path, monkeypatch):
    monkeypatch.delenv("LLAMAFACTORY_MCA_FP8_KERNEL", raising=False)
    work = tmp_path / "work"
    with pytest.raises(ValueError) as err:
        quality.main(["--model", "q_dense", "--steps", "20", "--workdir", str(work), "--out-dir", str(tmp_path)])
    msg = str(err.value)
    assert "`fp8`" in msg and "no CUDA device" in msg and "Fix: remove fp8" in msg, msg
    assert not work.exists() and list(tmp_path.iterdir()) == []
    # --tiny runs the FP8 sides on the emulate kernel instead; the bf16 side needs no check
    assert quality.fp8_sides_checked(["ours", "ours_fp8", "ours_fp8_rowwise"], tiny=True) == {
        "ours_fp8": "emulate", "ours_fp8_rowwise": "emulate"}
    assert quality.fp8_sides_checked(["ours", "ours_allgather"], tiny=False) == {}
    with pytest.raises(SystemExit, match="start with ours"):
        quality.main(["--sides", "ours_fp8,ours", "--tiny"])


@pytest.mark.slow
@pytest.mark.extended
@pytest.mark.timeout(1200)
def test_fp8_quality_tiny_on_cpu(tmp_path):
    """The whole path: tiny dense model, bf16 (fp32 on CPU) and FP8 (emulated) sides through llamafactory-cli."""
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "fp8_quality.py"), "--tiny", "--model", "q_dense",
           "--workdir", str(tmp_path / "work"), "--out-dir", str(tmp_path / "out"), "--timeout", "500"]
    r = subprocess.run(cmd, env=worktree_env(), cwd=REPO, capture_output=True, text=True, timeout=1100)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads((tmp_path / "out" / "fp8_quality_q_dense_tiny.json").read_text())
    for side in ("ours", "ours_fp8"):
        res = data["sides"][side]
        assert res["returncode"] == 0, (side, res.get("error_lines"), res.get("log_tail", "")[-2000:])
        assert len(res["losses"]) == 6 and all(0 < x < 20 for x in res["losses"]), res["losses"]
    assert data["sides"]["ours_fp8"]["fp8_kernel"] == "emulate" and data["schedule"]["lr_scheduler_type"] == "cosine"
    cmp_ = data["comparisons"]["ours_fp8"]
    assert cmp_["final_steps_averaged"] == 2 and cmp_["max_step_rel_diff"] < 0.05, cmp_
