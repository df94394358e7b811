"""HF <-> Megatron bridge on 2 gloo processes: logits parity and bit-exact round trips, every family x layout.

One `torchrun --nproc_per_node 2` launch runs all combinations (see tests/dist_helpers.py); the tests below
read its per-rank results. Layouts: dp2 (TP=1), tp2 (odd vocab padded), tp2sp (+ sequence parallel), pp2,
vpp2 (4 layers, pp=2, vpp=2), ep2 (MoE only).
"""

from __future__ import annotations


import pytest

from tests.dist_helpers import LAYOUTS, MOE_KINDS, assert_logits_parity, assert_round_trip, run_bridge_checks
from tests.tiny_models import KINDS

RUN_LAYOUTS = ("dp2", "tp2", "tp2sp", "pp2", "vpp2", "ep2")
TOL = 1e-5

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_bridge_checks(tmp_path_factory, KINDS, RUN_LAYOUTS)


CASES = [(layout, kind) for layout in RUN_LAYOUTS for kind in KINDS if layout != "ep2" or kind in MOE_KINDS]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout,kind", CASES)
def test_logits_parity(results, layout, kind):
    assert_logits_parity(results, layout, kind, TOL)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout,kind", CASES)
def test_round_trip_bit_exact(results, layout, kind):
    assert_round_trip(results, layout, kind)


def test_layouts_known():
    assert set(RUN_LAYOUTS) <= set(LAYOUTS)
