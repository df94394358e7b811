"""Context parallelism without Transformer Engine (`SDPAttention` all-gathers K/V over the CP group; qwen3_next's
gated delta-net layers exchange key-head groups for whole sequences: models/cp_head_exchange.py).

One `torchrun --nproc_per_node 2` launch (tests/seq_helpers.py), context_parallel_size=2, fp32 on CPU:
* sbhd: a [2, 16] batch split with `cp_split` (causal load balancing: chunks r and 2*cp-1-r) -> logits equal
  Hugging Face's on the whole batch, and the parameter gradients of the summed token loss, summed over the CP
  group, equal Hugging Face's;
* thd: packed samples (`pack_thd`, every sample padded to a multiple of 2*cp, split per sample) -> per-token
  logits equal HF run on each sample alone; loss and gradients as well.
"""

from __future__ import annotations

import pytest

from tests.seq_helpers import assert_logits_match, launch

KINDS = ("llama", "qwen3", "qwen3_moe", "qwen3_next")  # qwen3_next: its delta-net layers exchange heads over CP
MODES = ("sbhd", "thd")
CASES = [("cp2", kind, mode) for kind in KINDS for mode in MODES]
TOL = 1e-5
GRAD_REL_TOL = 1e-5  # max |grad diff| / max |HF grad| per tensor
# qwen3_next: fp32 rounding through the delta-net recurrence's backward, largest on the gate path's small gradients
# (A_log 1.6e-4 at cp2 thd; 4.8e-5 on embed_tokens already with one process, no CP); an exchange that puts tokens or
# heads in the wrong place is off by 3.5 and more (checked)
GRAD_REL_TOL_KIND = {"qwen3_next": 1e-3}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch(CASES, tmp_path_factory, KINDS)


@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout,kind,mode", CASES)
def test_cp_logits_parity(results, layout, kind, mode):
    for r in assert_logits_match(results, (layout, kind, mode), TOL):
        if mode != "thd":
            assert r["local_tokens"] == 8, r  # each CP rank really held half of the sequence


@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout,kind,mode", CASES)
def test_cp_grads_match_hf(results, layout, kind, mode):
    r = results[0][(layout, kind, mode)]
    assert "error" not in r, r["error"]
    assert "grad_error" not in r, r["grad_error"]
    assert r["grad_max_rel_diff"] <= GRAD_REL_TOL_KIND.get(kind, GRAD_REL_TOL), (r["grad_worst_rel"], r)


def test_cp_split_layout():
    import torch

    from llamafactory_mca.models.packing import cp_indices, cp_split

    # megatron's get_batch_on_this_cp_rank: cp=2, 8 tokens -> rank 0 [0,1,6,7], rank 1 [2,3,4,5]
    assert cp_indices([8], 2, 0).tolist() == [0, 1, 6, 7]
    assert cp_indices([8], 2, 1).tolist() == [2, 3, 4, 5]
    # per sample under THD
    assert cp_indices([4, 8], 2, 1).tolist() == [1, 2, 6, 7, 8, 9]
    x = torch.arange(16).view(2, 8)
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    out = cp_split({"input_ids": x, "attention_mask": mask, "n": 3}, 2, 1)
    assert out["input_ids"].tolist() == [[2, 3, 4, 5], [10, 11, 12, 13]]
    assert out["attention_mask"].shape == (2, 1, 4, 8) and out["n"] == 3
    with pytest.raises(ValueError, match="multiple of 2\\*cp"):
        cp_indices([6], 2, 0)


def test_sdpa_cp_layout_matches_dense():
    """The piecewise causal attention of one CP rank equals rows of the full causal attention (single process:
    the gathered keys are simulated by the full sequence)."""
    import torch

    from llamafactory_mca.models.attention import _layout
    from llamafactory_mca.models.packing import cp_indices

    torch.manual_seed(0)
    s, cp = 12, 3
    q, k, v = (torch.randn(1, 2, s, 8) for _ in range(3))
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    for rank in range(cp):
        idx = cp_indices([s], cp, rank)
        layout = _layout([s], cp, rank, q.device)
        # the rank-major gather of every rank's local keys, put back in order by the layout's permutation
        gathered = torch.cat([k[:, :, cp_indices([s], cp, r)] for r in range(cp)], dim=2)
        assert torch.equal(gathered.index_select(2, layout.perm), k)
        ql = q[:, :, idx]
        outs = []
        for p in layout.pieces:
            qi = ql[:, :, p.local_start: p.local_start + p.length]
            end = p.seg_start + p.offset + p.length
            mask = torch.ones(p.length, end - p.seg_start, dtype=torch.bool).tril(p.offset)
            outs.append(torch.nn.functional.scaled_dot_product_attention(qi, k[:, :, :end], v[:, :, :end],
                                                                         attn_mask=mask))
        torch.testing.assert_close(torch.cat(outs, 2), full[:, :, idx], rtol=0, atol=1e-6)
