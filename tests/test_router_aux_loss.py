"""The HF-style router load-balancing loss (models/router_aux_loss.py) against transformers' own
`load_balancing_loss_func`, and the per-rank linear shares it adds under sequence / context parallelism."""

from __future__ import annotations

import pytest
import torch

from llamafactory_mca.models.router_aux_loss import load_balancing_loss, pooled_loss, router_statistics

E, K, B, S, LAYERS = 6, 2, 3, 7, 3


def _logits_and_mask():
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(B * S, E, generator=g, requires_grad=True) for _ in range(LAYERS)]
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, 5:] = 0  # right padding of unequal rows
    mask[2, 3:] = 0
    return logits, mask


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral"])
@pytest.mark.parametrize("masked", [True, False])
def test_matches_transformers_load_balancing_loss(family, masked):
    import importlib

    hf_loss = importlib.import_module(f"transformers.models.{family}.modeling_{family}").load_balancing_loss_func
    logits, mask = _logits_and_mask()
    mask = mask if masked else None
    ours = load_balancing_loss(logits, mask, K)
    theirs = hf_loss(tuple(logits), E, K, mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    g_ours = torch.autograd.grad(ours, logits)
    g_theirs = torch.autograd.grad(theirs, logits)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    if masked:  # padding changes the loss: the mask is really applied
        assert abs(float(load_balancing_loss(logits, None, K).detach()) - float(ours.detach())) > 1e-6


def test_token_shares_add_up_to_the_loss_and_its_gradient():
    """What a sequence-parallel rank adds (counts and N all-reduced, its own probabilities): the shares of the
    ranks sum to the pooled loss and their gradients to its gradient."""
    logits, mask = _logits_and_mask()
    full = load_balancing_loss(logits, mask, K)
    # [b, s] -> the router's [s, b] order, split along s into 2 "ranks" of unequal token counts
    order = [lg.reshape(B, S, E).transpose(0, 1) for lg in logits]
    m = mask.t()
    shards = [slice(0, 4), slice(4, S)]
    stats = [[router_statistics(lg[sl], m[sl], K) for lg in order] for sl in shards]
    counts = sum(c for rank in stats for c, _, _ in rank)
    sums = sum(p.detach() for rank in stats for _, p, _ in rank)
    tokens = sum(n for rank in stats for _, _, n in rank)
    assert float(tokens) == float(mask.sum()) * LAYERS
    torch.testing.assert_close(pooled_loss(counts, sums, tokens), full.detach())
    shares = [pooled_loss(counts, sum(p for _, p, _ in rank), tokens) for rank in stats]
    torch.testing.assert_close(sum(s.detach() for s in shares), full.detach())
    g_shares = torch.autograd.grad(sum(shares), logits)
    for a, b in zip(g_shares, torch.autograd.grad(full, logits)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_no_tokens_gives_zero():
    counts = torch.zeros(E)
    sums = torch.zeros(E, requires_grad=True)
    assert float(pooled_loss(counts, sums, torch.tensor(0.0))) == 0.0
