"""Context-parallel core attention (models/attention.py) against a dense masked reference, forward and gradients,
on CPU in one process: every CP rank's `SDPAttention` runs on its load-balanced rows, the K/V all-gather is
simulated by the full sequence (rank-major, as `gather_sequence` returns it), and the ranks' outputs and the
gradients of a loss over all of them must equal one causal attention over the whole sequence."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llamafactory_mca.kernels import prefix_attention
from llamafactory_mca.models import attention as attn_mod
from llamafactory_mca.models.attention import SDPAttention, lower_right_causal
from llamafactory_mca.models.packing import cp_indices


class _Group:
    def __init__(self, size: int, rank: int):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def _core(heads: int, groups: int, head_dim: int) -> SDPAttention:
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=1, hidden_size=heads * head_dim, num_attention_heads=heads,
                            num_query_groups=groups, kv_channels=head_dim, attention_dropout=0.0)
    return SDPAttention(cfg, 1, AttnMaskType.causal, "self", pg_collection=SimpleNamespace(tp=_Group(1, 0)))


def _dense_reference(q, k, v, seg_lens):
    """[s, b, h, d] inputs; block-diagonal causal attention over the sub-sequences, repeated K/V heads."""
    rep = q.shape[2] // k.shape[2]
    qb, kb, vb = (x.permute(1, 2, 0, 3) for x in (q, k, v))
    kb, vb = kb.repeat_interleave(rep, dim=1), vb.repeat_interleave(rep, dim=1)
    pos = torch.arange(q.shape[0])
    seg = torch.repeat_interleave(torch.arange(len(seg_lens)), torch.tensor(seg_lens))
    allowed = (seg[:, None] == seg[None, :]) & (pos[:, None] >= pos[None, :])
    out = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed)
    return out.permute(2, 0, 1, 3).reshape(q.shape[0], q.shape[1], -1)


@pytest.mark.parametrize("cp,seg_lens,split", [(2, [32], False), (3, [24], False), (2, [8, 16], False),
                                              (3, [24], True), (2, [8, 16], True)])
def test_cp_attention_matches_dense(monkeypatch, cp, seg_lens, split):
    """split: the far chunks through the two-call log-sum-exp merge (`split_lower_right_causal`, torch's CPU
    flash kernel standing in for cuDNN), as CUDA runs them; else SDPA with the lower-right bias (CPU's path)."""
    if split:
        monkeypatch.setattr(prefix_attention, "split_kernel", lambda q: "cpu")
    torch.manual_seed(0)
    s, b, heads, groups, d = sum(seg_lens), 1, 4, 2, 8
    q, k, v = (torch.randn(s, b, n, d, dtype=torch.float64, requires_grad=True) for n in (heads, groups, groups))
    thd = len(seg_lens) > 1
    packed = None
    if thd:
        from megatron.core.packed_seq_params import PackedSeqParams

        cu = torch.tensor([0] + list(torch.tensor(seg_lens).cumsum(0)), dtype=torch.int32)
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu)
    rank_idx = [cp_indices(seg_lens, cp, r) for r in range(cp)]
    # the gathered [s, b, g, 2d] keys/values: every rank's local rows, rank-major (what gather_sequence returns)
    gathered = torch.cat([torch.cat([k, v], dim=-1)[idx] for idx in rank_idx])
    monkeypatch.setattr(attn_mod, "gather_sequence", lambda x, group: gathered)

    core = _core(heads, groups, d).double()
    outs = []
    for rank, idx in enumerate(rank_idx):
        core.cp_group = _Group(cp, rank)
        ql, kl, vl = q[idx], k[idx], v[idx]
        if thd:
            ql, kl, vl = ql.squeeze(1), kl.squeeze(1), vl.squeeze(1)
        o = core(ql, kl, vl, None, packed_seq_params=packed)
        outs.append((idx, o.reshape(len(idx), b, heads * d)))
    out = torch.zeros(s, b, heads * d, dtype=torch.float64).index_copy(0, torch.cat([i for i, _ in outs]),
                                                                         torch.cat([o for _, o in outs]))
    ref = _dense_reference(q, k, v, seg_lens)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)

    weight = torch.randn_like(ref)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=0, atol=1e-12)


_SHAPES = [(4, 12, 4, 2), (5, 6, 2, 2), (3, 16, 6, 1)]


def _lower_right(impl: str, q, k, v, scale: float):
    if impl == "split":
        return prefix_attention.split_lower_right_causal(q, k, v, scale, kernel="cpu")
    return lower_right_causal(q, k, v, scale=scale)


@pytest.mark.parametrize("impl,lq,lk,heads,groups",
                         [("sdpa", *shape) for shape in _SHAPES + [(5, 5, 2, 2)]]
                         + [("split", *shape) for shape in _SHAPES])
def test_lower_right_causal_matches_masked_sdpa(impl, lq, lk, heads, groups):
    """sdpa: `lower_right_causal` (CPU: SDPA with the lower-right bias); split: the two-call log-sum-exp merge
    with torch's CPU flash kernel, as CUDA runs it with cuDNN."""
    torch.manual_seed(1)
    q = torch.randn(2, heads, lq, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, groups, lk, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = _lower_right(impl, q, k, v, 0.3)
    rep = heads // groups
    allowed = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)  # query i sees keys 0 .. lk - lq + i
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=allowed, scale=0.3)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=0, atol=1e-12)


def _attention_with_lse(q, k, v, scale, allowed=None):
    """Math reference: softmax attention [b, h, lq, d] and the natural log-sum-exp of the scaled scores."""
    scores = (q @ k.transpose(-1, -2)) * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    return torch.softmax(scores, dim=-1) @ v, lse


def test_merge_partials_equals_softmax_over_all_keys():
    torch.manual_seed(2)
    q = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    k, v = torch.randn(2, 3, 11, 8, dtype=torch.float64), torch.randn(2, 3, 11, 8, dtype=torch.float64)
    allowed = torch.ones(5, 11, dtype=torch.bool).tril(6)
    want, want_lse = _attention_with_lse(q, k, v, 0.4, allowed)
    out_a, lse_a = _attention_with_lse(q, k[:, :, :6], v[:, :, :6], 0.4)
    out_b, lse_b = _attention_with_lse(q, k[:, :, 6:], v[:, :, 6:], 0.4, allowed[:, 6:])
    out, lse = prefix_attention.merge_partials(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-13)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=1e-13)
    # a block whose log-sum-exp is 40 below the other's contributes nothing (no overflow, no NaN)
    out, lse = prefix_attention.merge_partials(out_a, lse_a + 40, out_b, lse_b)
    torch.testing.assert_close(out, out_a, rtol=0, atol=1e-12)


def test_split_kernel_choice_and_self_check_on_cpu():
    q = torch.randn(1, 2, 4, 8)
    assert prefix_attention.split_kernel(q) is None  # CPU keeps SDPA with the bias
    assert prefix_attention.reference_error("cpu", torch.device("cpu"), torch.float32) < 1e-5
    with pytest.raises(ValueError, match="needs more keys"):
        prefix_attention.split_lower_right_causal(q, q[:, :1], q[:, :1], kernel="cpu")
