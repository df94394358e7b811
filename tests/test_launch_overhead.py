"""Issue 22's launch-overhead options, on CPU: the fused RoPE computes megatron's formula and leaves the cases it
does not cover to megatron; `cuda_graph_impl: local` reaches megatron's config on a GPU and is refused on a CPU
(the GPU runs themselves: benchmarks/run.py `ours_graphs`, `ours_rope`)."""

from __future__ import annotations

import pytest
import torch

from llamafactory_mca.args import McaArgumentError
from llamafactory_mca.kernels import rope
from llamafactory_mca.models.transformer_config import cuda_graph_fields


def _inputs(dtype=torch.bfloat16, heads=2, dim=16):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(12, 1, heads, dim, generator=g).to(dtype)
    freqs = torch.rand(12, 1, 1, dim, generator=g) * 6
    return t, freqs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_reference_is_megatrons_unfused_formula(dtype):
    from megatron.core.models.common.embeddings import rope_utils

    original = getattr(rope_utils._apply_rotary_pos_emb_bshd, "original", rope_utils._apply_rotary_pos_emb_bshd)
    t, freqs = _inputs(dtype)
    assert torch.equal(rope.rope_reference(t, freqs), original(t, freqs))


def test_patched_rope_leaves_other_cases_to_megatron():
    calls = []

    def original(t, freqs, rotary_interleaved=False, multi_latent_attention=False, mscale=1.0):
        calls.append((rotary_interleaved, multi_latent_attention, mscale))
        return t

    apply = rope._patched(original)
    t, freqs = _inputs()
    apply(t, freqs)  # CPU tensor
    apply(t, freqs, rotary_interleaved=True)
    apply(t, freqs[..., :8])  # partial rotary
    apply(t, freqs, mscale=0.5)
    assert len(calls) == 4 and apply.original is original


def test_rope_fusion_is_not_installed_without_a_gpu():
    from llamafactory_mca.platform import on_gpu, rope_fusion_available

    if on_gpu():
        pytest.skip("GPU present: the kernel is checked and installed there")
    assert rope_fusion_available() is False


def test_cuda_graph_fields_on_gpu_and_refused_on_cpu():
    assert cuda_graph_fields("none", gpu=False) == {"cuda_graph_scope": []}
    assert cuda_graph_fields("local", gpu=True) == {"cuda_graph_impl": "local", "cuda_graph_scope": []}
    with pytest.raises(McaArgumentError) as err:
        cuda_graph_fields("local", gpu=False)
    assert "`cuda_graph_impl`" in str(err.value) and "Fix: set cuda_graph_impl: none" in str(err.value)


def test_graph_safe_rng_states_are_saved_as_tensors_and_restored_into_the_live_generators(tmp_path):
    from llamafactory_mca.checkpoint import restore_tracker_states, tracker_states_as_tensors

    gen = torch.Generator().manual_seed(1)  # a graph-safe tracker holds generators, a plain one state tensors
    live = {"model-parallel-rng": gen, "plain": torch.Generator().manual_seed(9).get_state()}
    torch.save(tracker_states_as_tensors(live), tmp_path / "rng.pth")
    want = torch.rand(3, generator=gen)  # what the stream draws next after the save
    saved = torch.load(tmp_path / "rng.pth", weights_only=True)  # what a resume reads
    restored = restore_tracker_states(live, saved)
    assert restored["model-parallel-rng"] is gen  # captured graphs keep pointing at the same generator
    assert torch.is_tensor(restored["plain"])
    assert torch.equal(torch.rand(3, generator=gen), want)
