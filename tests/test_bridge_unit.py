"""Bridge pieces that need no process group: registry / hooks, config mapping, tables, attention."""

from __future__ import annotations

import pluggy
import pytest
import torch


@pytest.fixture
def fresh_hooks(monkeypatch):
    """A plugin manager holding only our model registry (independent of other entry points)."""
    from llamafactory_mca import hookspecs, plugins
    from llamafactory_mca.models import registry

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(registry)
    monkeypatch.setattr(plugins, "get_plugin_manager", lambda: pm)
    return pm


def _cfg(kind):
    from tests.tiny_models import tiny_config

    return tiny_config(kind)


@pytest.mark.parametrize("kind,cls", [("llama", "LlamaBridge"), ("qwen2", "Qwen2Bridge"), ("qwen3", "Qwen3Bridge"),
                                      ("qwen3_moe", "Qwen3MoeBridge"), ("mixtral", "MixtralBridge")])
def test_get_bridge(fresh_hooks, kind, cls):
    from llamafactory_mca.models import get_bridge

    assert type(get_bridge(_cfg(kind))).__name__ == cls


def test_get_bridge_unsupported_lists_types(fresh_hooks):
    from transformers import GPT2Config

    from llamafactory_mca.models import get_bridge

    with pytest.raises(ValueError) as err:
        get_bridge(GPT2Config())
    msg = str(err.value)
    assert "'gpt2'" in msg
    for t in ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral"):
        assert t in msg


def _llama_override():
    """(bridge class, plugin object): a third-party plugin whose bridge handles `llama`."""
    from llamafactory_mca.hookspecs import hookimpl
    from llamafactory_mca.models.llama import LlamaBridge

    class MyBridge(LlamaBridge):
        pass

    class Plugin:
        @hookimpl
        def mca_model_bridge(self, hf_config):
            return MyBridge() if hf_config.model_type == "llama" else None

    return MyBridge, Plugin()


def test_third_party_bridge_wins(fresh_hooks):
    from llamafactory_mca.models import get_bridge

    my_bridge, plugin = _llama_override()
    fresh_hooks.register(plugin)
    assert isinstance(get_bridge(_cfg("llama")), my_bridge)


def test_third_party_bridge_wins_when_registered_first():
    """The built-in bridges are `trylast`: the order plugins were registered in does not matter."""
    from llamafactory_mca import hookspecs
    from llamafactory_mca.models import registry

    my_bridge, plugin = _llama_override()
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(plugin)
    pm.register(registry)
    assert isinstance(pm.hook.mca_model_bridge(hf_config=_cfg("llama")), my_bridge)
    assert type(pm.hook.mca_model_bridge(hf_config=_cfg("qwen3"))).__name__ == "Qwen3Bridge"


def test_transformer_config_mapping():
    from llamafactory_mca.args import MegatronArguments
    from llamafactory_mca.models.registry import bridge_for

    hf = _cfg("qwen3_moe")
    args = MegatronArguments(tensor_model_parallel_size=2, expert_model_parallel_size=2, sequence_parallel=True,
                             recompute_granularity="full", bias_activation_fusion=True)
    cfg = bridge_for("qwen3_moe").transformer_config(hf, args, torch.bfloat16)
    assert cfg.num_layers == 4 and cfg.hidden_size == 64 and cfg.num_query_groups == 2 and cfg.kv_channels == 16
    assert cfg.qk_layernorm and not cfg.add_qkv_bias and cfg.normalization == "RMSNorm"
    assert cfg.num_moe_experts == 4 and cfg.moe_router_topk == 2 and cfg.moe_ffn_hidden_size == 32
    assert cfg.moe_router_pre_softmax is False  # norm_topk_prob=True
    assert cfg.tensor_model_parallel_size == 2 and cfg.expert_model_parallel_size == 2 and cfg.sequence_parallel
    assert cfg.bf16 and not cfg.fp16 and cfg.params_dtype == torch.bfloat16
    assert cfg.calculate_per_token_loss
    assert cfg.recompute_granularity == "full" and cfg.recompute_method == "uniform" and cfg.recompute_num_layers == 1
    if not torch.cuda.is_available():
        assert not cfg.bias_activation_fusion  # forced off without CUDA
    q2 = bridge_for("qwen2").transformer_config(_cfg("qwen2"), MegatronArguments())
    assert q2.add_qkv_bias and not q2.qk_layernorm


def test_tables_cover_hf_names(tmp_path):
    """Every tensor of each tiny HF checkpoint is named by exactly the family's table."""
    import re

    from safetensors import safe_open

    from llamafactory_mca.models.registry import bridge_for
    from tests.tiny_models import make_tiny_model

    for kind in ("llama", "qwen2", "qwen3", "qwen3_moe", "mixtral"):
        path = make_tiny_model(kind, str(tmp_path / kind))
        bridge = bridge_for(_cfg(kind).model_type)
        patterns = []
        for hf, _kind in bridge.table.values():
            for name in (hf if isinstance(hf, tuple) else (hf,)):
                patterns.append(re.compile(re.escape(name).replace(r"\{L\}", r"\d+").replace(r"\{E\}", r"\d+") + "$"))
        with safe_open(f"{path}/model.safetensors", "pt") as f:
            for key in f.keys():
                assert any(p.match(key) for p in patterns), (kind, key)


def test_sdpa_attention_matches_reference():
    """SDPAttention == explicit softmax attention, causal, GQA, with and without a padding mask."""
    import types

    from megatron.core.transformer.enums import AttnMaskType

    from llamafactory_mca.models.attention import SDPAttention

    torch.manual_seed(0)
    sq, b, nh, ng, d = 6, 2, 4, 2, 8
    attn = SDPAttention.__new__(SDPAttention)
    torch.nn.Module.__init__(attn)
    attn.num_heads, attn.num_groups, attn.hidden_size_per_partition = nh, ng, nh * d
    attn.softmax_scale, attn.dropout_p, attn.attn_mask_type = d ** -0.5, 0.0, AttnMaskType.causal
    q, k, v = torch.randn(sq, b, nh, d), torch.randn(sq, b, ng, d), torch.randn(sq, b, ng, d)
    pad = torch.zeros(b, 1, sq, sq, dtype=torch.bool)
    pad[1, ..., :2] = True  # sample 1: first two keys are padding

    def ref(mask):
        kk, vv = k.repeat_interleave(nh // ng, 2), v.repeat_interleave(nh // ng, 2)
        s = torch.einsum("qbhd,kbhd->bhqk", q, kk) * d ** -0.5
        allowed = torch.ones(sq, sq, dtype=torch.bool).tril()[None, None] & ~mask
        s = s.masked_fill(~allowed, float("-inf"))
        p = torch.nan_to_num(torch.softmax(s, -1))
        return torch.einsum("bhqk,kbhd->qbhd", p, vv).reshape(sq, b, nh * d)

    out = attn(q, k, v, None)
    assert torch.allclose(out, ref(torch.zeros_like(pad)), atol=1e-6)
    out = attn(q, k, v, pad)
    rows = torch.ones(sq, dtype=torch.bool)
    rows[:2] = False  # fully masked query rows of sample 1 are undefined
    assert torch.allclose(out[:, 0], ref(pad)[:, 0], atol=1e-6)
    assert torch.allclose(out[rows, 1], ref(pad)[rows, 1], atol=1e-6)
    assert torch.isfinite(out).all()
    _ = types


class DictSource:
    """A `param_mapping.TensorSource` over in-memory tensors (also used by test_qwen3_next)."""

    def __init__(self, tensors):
        self.tensors = tensors

    def shape(self, name):
        return list(self.tensors[name].shape)

    def read(self, name, dim=None, start=0, stop=None):
        t = self.tensors[name]
        if dim is None:
            return t
        stop = t.shape[dim] if stop is None else stop
        return t.narrow(dim, start, stop - start)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_split_kinds_round_trip(tp):
    """Every split kind: the TP shards read from HF tensors, concatenated in rank order, give them back."""
    from llamafactory_mca.models import param_mapping as pm

    g = torch.Generator().manual_seed(0)
    layout = pm.QkvLayout(head_dim=4, num_heads=8, num_groups=4)
    cfg = type("Cfg", (), {"vocab_size": 10})()
    cases = {
        pm.REPL: {"n": torch.randn(6, generator=g)},
        pm.COLUMN: {"w": torch.randn(8, 3, generator=g)},
        pm.ROW: {"w": torch.randn(3, 8, generator=g)},
        pm.GLU: {"gate": torch.randn(8, 3, generator=g), "up": torch.randn(8, 3, generator=g)},
        pm.QKV: {"q": torch.randn(32, 3, generator=g), "k": torch.randn(16, 3, generator=g),
                 "v": torch.randn(16, 3, generator=g)},
        pm.VOCAB: {"emb": torch.randn(10, 3, generator=g)},
    }
    for kind, tensors in cases.items():
        mapping = pm.mapping_for(kind)
        names = tuple(tensors)
        rows = 16 // tp if kind == pm.VOCAB else None  # the vocab padded to 16 rows
        shards = [mapping.local_shard(DictSource(tensors), names,
                                      pm.ShardContext(rank, tp, cfg, layout, local_rows=rows)) for rank in range(tp)]
        if mapping.gather_dim is None:
            assert all(torch.equal(s, shards[0]) for s in shards)
            full = shards[0]
        else:
            full = torch.cat(shards, dim=mapping.gather_dim)
        back = dict(mapping.to_hf(names, full, pm.ShardContext(0, tp, cfg, layout)))
        assert sorted(back) == sorted(tensors), kind
        for name, t in tensors.items():
            assert torch.equal(back[name], t), (kind, name)
        if kind == pm.QKV:  # megatron's fused layout: [q_g, k_g, v_g] per query group
            group0 = full[: layout.group_rows]
            assert torch.equal(group0[:8], tensors["q"][:8]) and torch.equal(group0[8:12], tensors["k"][:4])
            sizes = mapping.lora_slot_sizes(shards[0].shape[0], pm.ShardContext(0, tp, cfg, layout))
            assert sum(sizes) == shards[0].shape[0] and sizes == [32 // tp, 16 // tp, 16 // tp]
