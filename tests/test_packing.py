"""Sequence packing: packed rows give, per token, the logits of each sample run alone (no cross-contamination).

One `torchrun --nproc_per_node 2` launch (tests/seq_helpers.py) over layouts dp2 (TP=1), tp2 and tp2sp (sequence
parallel), for two rows of packed samples in LLaMA-Factory's neat_packing form (segment ids 1, 2, 3 ..., 0 =
padding, position ids restarting per sample):
* mask: megatron's boolean block-diagonal causal mask (`block_causal_attention_mask`) as attention_mask;
* thd: `pack_thd` -> one [1, T] row + `PackedSeqParams` (cu_seqlens; no s x s mask), RoPE restarting per
  sample; also the summed loss equals the sum of the per-sample HF losses. The hybrid qwen3_next (gated delta-net
  layers whose convolution and recurrence restart at each sample) runs in thd mode only.
The reference is Hugging Face run on every sample alone (fp32).
"""

from __future__ import annotations

import pytest
import torch

from tests.seq_helpers import assert_logits_match, launch

KINDS = ("llama", "qwen3", "qwen3_moe", "qwen3_next")
LAYOUTS = ("dp2", "tp2", "tp2sp")
MODES = ("mask", "thd")
# qwen3_next's delta-net layers restart per THD sample; a block-diagonal mask reaches only its attention layers
CASES = [(layout, kind, mode) for layout in LAYOUTS for kind in KINDS for mode in MODES
         if not (kind == "qwen3_next" and mode == "mask")]
TOL = 1e-5


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return launch(CASES, tmp_path_factory, KINDS)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout,kind,mode", CASES)
def test_packed_logits_equal_unpacked(results, layout, kind, mode):
    assert_logits_match(results, (layout, kind, mode), TOL)


# ------------------------------------------------------------------------------------------- unit (one process)


def test_segment_ids():
    from llamafactory_mca.models.packing import segment_ids_from_attention_mask, segment_ids_from_position_ids

    mask = torch.tensor([[1, 1, 2, 2, 2, 0]])
    assert torch.equal(segment_ids_from_attention_mask(mask), mask)
    pos = torch.tensor([[0, 1, 0, 1, 2, 0]])
    assert segment_ids_from_position_ids(pos).tolist() == [[1, 1, 2, 2, 2, 3]]
    assert segment_ids_from_position_ids(pos, (mask != 0).long()).tolist() == [[1, 1, 2, 2, 2, 0]]
    mrope = pos.unsqueeze(0).expand(3, -1, -1)
    assert segment_ids_from_position_ids(mrope).tolist() == [[1, 1, 2, 2, 2, 3]]


def test_block_causal_mask_matches_llamafactory():
    from llamafactory.data.collator import prepare_4d_attention_mask

    from llamafactory_mca.models.packing import block_causal_attention_mask

    seg = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 2, 2, 3, 0, 0]])
    ours = block_causal_attention_mask(seg)  # True = masked
    theirs = prepare_4d_attention_mask(seg, torch.float32) == 0  # True = attend
    eye = torch.eye(6, dtype=torch.bool)
    pad = (seg == 0)[:, None, :, None]
    # identical except that padding rows attend to themselves (no NaN rows)
    assert torch.equal(~ours & ~(pad & eye), theirs)
    assert not ours.all(-1).any()


def test_pack_thd_round_trip():
    from llamafactory_mca.models.packing import mask_segment_ends, pack_thd, unpack_thd

    seg = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 0]])
    ids = torch.arange(12).view(2, 6) + 100
    labels = ids + 1000
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 0]])
    packed, params, index = pack_thd({"input_ids": ids, "labels": labels, "position_ids": pos,
                                      "attention_mask": seg}, seg, seg_multiple=4, total_multiple=8)
    assert "attention_mask" not in packed
    assert params.qkv_format == "thd"
    assert params.cu_seqlens_q_padded.tolist() == [0, 4, 8, 16]
    assert params.cu_seqlens_q.tolist() == [0, 3, 5, 10]
    assert params.max_seqlen_q == 8
    assert packed["input_ids"].tolist() == [[100, 101, 102, 0, 103, 104, 0, 0,
                                             106, 107, 108, 109, 110, 0, 0, 0]]
    assert packed["labels"][0, 3].item() == -100
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7]]
    back = unpack_thd(packed["input_ids"][0], index, 2, 6, fill=-1)
    assert torch.equal(back[seg != 0], ids[seg != 0])
    assert mask_segment_ends(torch.ones(2, 6), seg).tolist() == [[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 0, 0]]


def test_sdpa_thd_matches_block_mask():
    """THD (one SDPA per sample) == dense attention with the block-diagonal causal mask, GQA included."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from llamafactory_mca.models.attention import SDPAttention

    attn = SDPAttention.__new__(SDPAttention)
    torch.nn.Module.__init__(attn)
    attn.num_heads, attn.num_groups, attn.hidden_size_per_partition = 4, 2, 32
    attn.softmax_scale, attn.dropout_p, attn.attn_mask_type, attn.cp_group = 0.3, 0.0, AttnMaskType.causal, None
    torch.manual_seed(0)
    t = 11
    q, k, v = torch.randn(t, 4, 8), torch.randn(t, 2, 8), torch.randn(t, 2, 8)
    cu = torch.tensor([0, 3, 9, 11], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=6, max_seqlen_kv=6)
    out = attn(q, k, v, None, packed_seq_params=params)
    seg = torch.tensor([1] * 3 + [2] * 6 + [3] * 2)
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.permute(1, 0, 2), k.repeat_interleave(2, 1).permute(1, 0, 2), v.repeat_interleave(2, 1).permute(1, 0, 2),
        attn_mask=allowed, scale=0.3).permute(1, 0, 2).reshape(t, 32)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)

