"""Qwen3-Next pieces (issue 15), single process: the gated delta rule against transformers' torch reference and
the two new split kinds (gated attention q_proj, conv1d over q|k|v) round-tripping bit-exactly over TP=1 and 2."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_bridge_unit import DictSource


def test_gated_delta_rule_matches_hf_torch_reference():
    from transformers.models.qwen3_next.modeling_qwen3_next import torch_chunk_gated_delta_rule

    from llamafactory_mca.kernels.linear_attention import gated_delta_rule, kernel_name

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 70, 4, 16), torch.randn(2, 70, 4, 16), torch.randn(2, 70, 4, 8)  # 70: two chunks
    g, beta = -torch.rand(2, 70, 4), torch.rand(2, 70, 4)
    ref, _ = torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, use_qk_l2norm_in_kernel=True)
    assert kernel_name(q.device) == "torch"
    torch.testing.assert_close(gated_delta_rule(q, k, v, g, beta), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("tp", [1, 2])
def test_gated_qkv_and_conv_sections_round_trip(tp):
    from llamafactory_mca.models.param_mapping import ConvSections, GatedFusedQKV, QkvLayout, ShardContext

    cfg = SimpleNamespace(linear_num_key_heads=2, linear_key_head_dim=16, linear_num_value_heads=4,
                          linear_value_head_dim=8)
    layout = QkvLayout(head_dim=16, num_heads=4, num_groups=2)
    src = DictSource({"q": torch.randn(128, 64), "k": torch.randn(32, 64), "v": torch.randn(32, 64),
                      "conv": torch.randn(96, 1, 4)})
    for mapping, names in ((GatedFusedQKV(), ("q", "k", "v")), (ConvSections(), ("conv",))):
        shards = [mapping.local_shard(src, names, ShardContext(r, tp, cfg, layout)) for r in range(tp)]
        back = dict(mapping.to_hf(names, torch.cat(shards), ShardContext(0, tp, cfg, layout)))
        for name in names:
            assert torch.equal(back[name], src.tensors[name]), (type(mapping).__name__, name)
    # megatron's gated layout per query group: [q heads, gate heads, k, v]; HF q_proj per head [q_h; gate_h]
    one = GatedFusedQKV().local_shard(src, ("q", "k", "v"), ShardContext(0, 1, cfg, layout))
    assert torch.equal(one[16:32], src.tensors["q"][32:48])  # group 0: q of head 1 follows q of head 0
    assert torch.equal(one[32:48], src.tensors["q"][16:32])  # then the gate of head 0
