"""CPU correctness of llamafactory_mca.kernels against float64 references (the GPU path is checked by
benchmarks/micro.py on the lent GPUs)."""

from __future__ import annotations

import os

import pytest
import torch

from llamafactory_mca.kernels.grouped_gemm import grouped_mm, grouped_mm_reference


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 7, 0], [4, 4, 4, 4], [1, 9, 0, 3]])
@pytest.mark.parametrize("backend", ["loop", "auto"])
def test_grouped_mm_matches_reference(counts, backend):
    g = torch.Generator().manual_seed(sum(counts) * 7 + len(backend))
    E, K, N, T = len(counts), 16, 24, sum(counts)
    x = torch.randn(T, K, generator=g, dtype=torch.float64).float().requires_grad_()
    w = torch.randn(E, K, N, generator=g, dtype=torch.float64).float().requires_grad_()
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    y = grouped_mm(x, w, offs, backend=None if backend == "auto" else backend)
    ref_x = x.detach().double().requires_grad_()
    ref_w = w.detach().double().requires_grad_()
    ref = grouped_mm_reference(ref_x, ref_w, counts)
    assert _rel(y, ref) < 1e-6
    dy = torch.randn(T, N, generator=g, dtype=torch.float64)
    y.backward(dy.float())
    ref.backward(dy)
    assert _rel(x.grad, ref_x.grad) < 1e-6
    for e, c in enumerate(counts):
        if c == 0:
            assert torch.equal(w.grad[e], torch.zeros_like(w.grad[e]))  # exact zero for an empty expert
    assert _rel(w.grad, ref_w.grad) < 1e-6


def test_grouped_mm_bf16_torch_kernel_on_cpu_when_available():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    counts = [8, 0, 16, 8]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 16, generator=g).bfloat16().requires_grad_()
    w = torch.randn(4, 16, 32, generator=g).bfloat16().requires_grad_()
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    try:
        y = grouped_mm(x, w, offs, backend="torch")
        y.backward(torch.randn_like(y))
    except RuntimeError as e:  # CPU kernels of _grouped_mm differ between torch versions
        pytest.skip(f"torch._grouped_mm has no usable CPU kernel here: {e}")
    ref = grouped_mm_reference(x.detach(), w.detach(), counts)
    assert _rel(y, ref) < 1e-2
    assert torch.equal(w.grad[1].float(), torch.zeros(16, 32))


def test_hf_layout_round_trip():
    from llamafactory_mca.kernels.experts import grouped_to_hf_weights, hf_to_grouped_weights

    E, F, H = 3, 8, 6
    gate_up = torch.randn(E, 2 * F, H)
    down = torch.randn(E, H, F)
    w1, w2 = hf_to_grouped_weights(gate_up, down)
    assert w1.shape == (H, E * 2 * F) and w2.shape == (E * F, H)
    # documented layout
    for e in range(E):
        assert torch.equal(w1.view(E, H, 2 * F)[e], gate_up[e].t())
        assert torch.equal(w2.view(E, F, H)[e], down[e].t())
    gu2, d2 = grouped_to_hf_weights(w1, w2, E, H)
    assert torch.equal(gu2, gate_up) and torch.equal(d2, down)
    # expert tensor parallelism: the shards put back together give the same HF tensors
    shards = [hf_to_grouped_weights(gate_up, down, r, 2) for r in range(2)]
    gu3, d3 = grouped_to_hf_weights([s[0] for s in shards], [s[1] for s in shards], E, H)
    assert torch.equal(gu3, gate_up) and torch.equal(d3, down)


@pytest.fixture(scope="module")
def mpu():
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.transformer.moe import moe_layer, token_dispatcher  # noqa: F401  (patched below)

    import llamafactory_mca.platform as platform

    platform.setup_platform()  # CPU: megatron's torch.cuda calls; everywhere: the TE-less MoE fix
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29000 + os.getpid() % 1000))
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _moe_config(E: int, H: int, F: int, **kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=1, hidden_size=H, num_attention_heads=2, ffn_hidden_size=4 * H, moe_ffn_hidden_size=F,
        num_moe_experts=E, moe_router_topk=2, gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, use_cpu_initialization=True, params_dtype=torch.float32, **kw,
    )


def test_torch_grouped_mlp_matches_hf_experts(mpu):
    """TorchGroupedMLP on permuted tokens == HF Qwen3-MoE experts (gate_up_proj / down_proj) per token."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from llamafactory_mca.kernels.experts import TorchGroupedMLP, grouped_to_hf_weights

    E, H, F = 4, 16, 8
    torch.manual_seed(0)
    mlp = TorchGroupedMLP(E, _moe_config(E, H, F), pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    with torch.no_grad():
        mlp.weight1.normal_()
        mlp.weight2.normal_()
    counts = torch.tensor([5, 0, 3, 4])
    T = int(counts.sum())
    x = torch.randn(T, H, requires_grad=True)
    probs = torch.rand(T)
    out, bias = mlp(x, counts, probs)
    assert bias is None and out.shape == (T, H)

    gate_up, down = grouped_to_hf_weights(mlp.weight1.detach(), mlp.weight2.detach(), E, H)
    ref, start = [], 0
    for e, c in enumerate(counts.tolist()):
        xe = x.detach()[start:start + c].double()
        gate, up = (xe @ gate_up[e].double().t()).chunk(2, dim=-1)
        h = torch.nn.functional.silu(gate) * up
        ref.append((h @ down[e].double().t()) * probs[start:start + c, None].double())
        start += c
    ref = torch.cat(ref)
    assert _rel(out, ref) < 1e-5
    out.sum().backward()
    assert x.grad is not None and mlp.weight1.grad is not None
    # expert 1 had no token: its slice of the weight gradients is exactly zero
    assert torch.equal(mlp.weight1.grad.view(E, H, -1)[1], torch.zeros(H, 2 * F))
    assert torch.equal(mlp.weight2.grad.view(E, F, H)[1], torch.zeros(F, H))


def test_torch_grouped_mlp_no_tokens(mpu):
    from megatron.core.process_groups_config import ProcessGroupCollection

    from llamafactory_mca.kernels.experts import TorchGroupedMLP

    E, H, F = 2, 8, 8
    mlp = TorchGroupedMLP(E, _moe_config(E, H, F), pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    x = torch.randn(0, H, requires_grad=True)
    out, _ = mlp(x, torch.tensor([0, 0]), torch.rand(0))
    assert out.shape == (0, H)
    out.sum().backward()
    assert mlp.weight1.grad is not None and float(mlp.weight1.grad.abs().sum()) == 0.0


def test_moe_layer_with_torch_grouped_mlp_matches_sequential(mpu):
    """Whole MoELayer (router, alltoall dispatcher, experts): TorchGroupedMLP == SequentialMLP with the same
    expert weights, so the spec swap changes speed only."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from llamafactory_mca.kernels.experts import TorchGroupedMLP

    E, H, F = 4, 16, 8
    cfg = _moe_config(E, H, F, moe_token_dispatcher_type="alltoall", moe_aux_loss_coeff=0.0)
    pgs = ProcessGroupCollection.use_mpu_process_groups()
    seq_spec = get_moe_module_spec(use_te=False, num_experts=E, moe_grouped_gemm=False)
    grp_spec = get_moe_module_spec(use_te=False, num_experts=E, moe_grouped_gemm=True)
    grp_spec.submodules.experts = ModuleSpec(module=TorchGroupedMLP)
    torch.manual_seed(1)
    seq = build_module(seq_spec, config=cfg, pg_collection=pgs)
    grp = build_module(grp_spec, config=cfg, pg_collection=pgs)
    assert isinstance(grp.experts, TorchGroupedMLP)
    with torch.no_grad():
        grp.router.weight.copy_(seq.router.weight)
        w1 = grp.experts.weight1.view(E, H, 2 * F)
        w2 = grp.experts.weight2.view(E, F, H)
        for e, expert in enumerate(seq.experts.local_experts):
            w1[e].copy_(expert.linear_fc1.weight.t())
            w2[e].copy_(expert.linear_fc2.weight.t())
    x = torch.randn(6, 2, H)
    y_seq, _ = seq(x)
    y_grp, _ = grp(x)
    assert _rel(y_grp, y_seq) < 1e-5


@pytest.mark.parametrize("inplace", [True, False])
def test_cross_entropy_matches_reference(inplace):
    from llamafactory_mca.kernels.cross_entropy import vocab_parallel_cross_entropy

    g = torch.Generator().manual_seed(5)
    s, b, v = 7, 3, 50
    logits = (torch.randn(s, b, v, generator=g) * 3).requires_grad_()
    target = torch.randint(0, v, (s, b), generator=g)
    target[0, 0] = -100  # ignored position: finite, masked by the caller
    ref_logits = logits.detach().double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(ref_logits.view(-1, v), target.view(-1).clamp_min(0),
                                            reduction="none").view(s, b)
    x = logits.clone()  # inplace backward overwrites its input buffer: give it a non-leaf
    loss = vocab_parallel_cross_entropy(x, target, None, inplace_backward=inplace)
    assert torch.isfinite(loss).all()
    keep = target >= 0
    assert _rel(loss[keep], ref[keep]) < 1e-6
    w = torch.rand(s, b, generator=g) * keep
    (loss * w).sum().backward()
    (ref * w.double()).sum().backward()
    assert _rel(logits.grad, ref_logits.grad) < 1e-6


def test_cross_entropy_triton_interpreter():
    """The Triton kernels themselves, run by Triton's CPU interpreter where Triton is installed."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = r'''
import torch, llamafactory_mca.kernels.cross_entropy as ce
ce._use_triton = lambda x: True
g = torch.Generator().manual_seed(0)
x = (torch.randn(5, 9000, generator=g) * 2).requires_grad_()
t = torch.randint(0, 9000, (5,), generator=g)
l = ce.vocab_parallel_cross_entropy(x.clone(), t, None)
ref_x = x.detach().double().requires_grad_()
ref = torch.nn.functional.cross_entropy(ref_x, t, reduction="none")
assert (l.double() - ref).abs().max() < 1e-4, (l, ref)
w = torch.rand(5, generator=g)
(l * w).sum().backward(); (ref * w.double()).sum().backward()
assert (x.grad.double() - ref_x.grad).abs().max() < 1e-5
print("ok")
'''
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "ok" not in r.stdout:
        if "interpret" in r.stderr.lower() and "not supported" in r.stderr.lower():
            pytest.skip("this Triton build has no interpreter")
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_fast_multi_tensor_matches_megatron_local():
    from megatron.core import utils as mutils

    from llamafactory_mca.kernels.optim import fast_multi_tensor_l2norm, fast_multi_tensor_scale

    ts = [torch.randn(5, 3), torch.randn(7), torch.randn(2, 2, 2)]
    ref, _ = mutils.local_multi_tensor_l2_norm(0, None, [ts], False) if torch.cuda.is_available() else (
        torch.norm(torch.stack([t.norm() for t in ts])).view(1), None)
    got, _ = fast_multi_tensor_l2norm(0, None, [ts], False)
    assert torch.allclose(got.cpu(), ref.cpu().float(), rtol=1e-6)
    dst = [torch.empty_like(t) for t in ts]
    fast_multi_tensor_scale(0, None, [ts, dst], 0.5)
    assert all(torch.equal(d, t * 0.5) for d, t in zip(dst, ts))
    same = [t.clone() for t in ts]
    fast_multi_tensor_scale(0, None, [same, same], 2.0)
    assert all(torch.equal(d, t * 2.0) for d, t in zip(same, ts))


def test_fused_adamw_walks_chained_optimizers():
    """Under EP megatron chains a dense and an expert optimizer; its `.optimizer` then asserts (seen on 4 H200s)."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import ChainedOptimizer, FP32Optimizer

    from llamafactory_mca.kernels.optim import _torch_optimizers, use_fused_adamw
    from llamafactory_mca.platform import setup_platform

    setup_platform()  # megatron's optimizer module asks torch.cuda for the device
    config = OptimizerConfig(optimizer="adam", lr=1e-3)
    inner = [torch.optim.AdamW([torch.nn.Parameter(torch.ones(2))]) for _ in range(2)]
    chained = ChainedOptimizer([FP32Optimizer(opt, config, lambda o: None) for opt in inner])
    assert list(_torch_optimizers(chained)) == inner
    assert use_fused_adamw(chained) == 0  # CPU parameters: the fused CUDA kernel is not used


def test_wgrad_accumulation_adds_into_main_grad_and_stays_off_without_cuda():
    """kernels/wgrad.py: main_grad += dY^T @ X in place (megatron's fused weight-gradient entry points, with
    3-D [s, b, h] activations as megatron passes them); on a machine without CUDA nothing is installed and
    megatron keeps gradient_accumulation_fusion off."""
    from llamafactory_mca.kernels import wgrad

    torch.manual_seed(0)
    x, dy = torch.randn(5, 2, 6), torch.randn(5, 2, 3)
    main_grad = torch.randn(3, 6)
    want = main_grad + dy.reshape(-1, 3).t() @ x.reshape(-1, 6)
    ptr = main_grad.data_ptr()
    wgrad.wgrad_gemm_accum_fp32(x, dy, main_grad)
    assert main_grad.data_ptr() == ptr
    torch.testing.assert_close(main_grad, want)
    half = main_grad.bfloat16()
    wgrad.wgrad_gemm_accum_fp16(x.bfloat16(), dy.bfloat16(), half)
    torch.testing.assert_close(half.float(), want + dy.reshape(-1, 3).t() @ x.reshape(-1, 6), rtol=2e-2, atol=2e-1)
    if not torch.cuda.is_available():
        from megatron.core.tensor_parallel import layers

        assert wgrad.install_wgrad_accumulation() is False
        assert not getattr(layers, "_grad_accum_fusion_available", False)


@pytest.mark.parametrize("tokens,experts,topk", [(37, 8, 2), (64, 16, 4), (5, 4, 4)])
def test_sync_free_permute_equals_megatron(tokens, experts, topk):
    """kernels.permute.permute gives megatron's permute results bit for bit (tokens, probs, indices), and the
    gradients flow the same way."""
    from megatron.core.transformer.moe import moe_utils

    from llamafactory_mca.kernels import permute as kp

    g = torch.Generator().manual_seed(tokens)
    scores = torch.randn(tokens, experts, generator=g)
    top = scores.topk(topk, dim=-1).indices
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool).scatter_(1, top, True)
    probs = torch.softmax(scores, -1) * routing_map
    x = torch.randn(tokens, 6, generator=g)
    results = []
    for fn in (moe_utils.permute, kp.permute):
        xi, pi = x.clone().requires_grad_(), probs.clone().requires_grad_()
        out, p_out, idx = fn(xi, routing_map, probs=pi, num_out_tokens=tokens * topk)
        (out * torch.arange(out.numel()).view_as(out)).sum().backward()
        (p_out * torch.arange(p_out.numel())).sum().backward()
        results.append((out, p_out, idx, xi.grad, pi.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    # a host-side count (the allgather dispatcher's) takes the sync-free path too; a device count would not
    out, _, idx = kp.permute(x, routing_map, num_out_tokens=torch.tensor(tokens * topk))
    assert torch.equal(idx, results[0][2]) and torch.equal(out, results[0][0])


def test_chunk_sort_on_device_equals_megatron():
    """The alltoall dispatcher's permutation 2 (chunks of (rank, local expert) sorted by local expert): the
    device-side row permutation equals megatron's split + cat; identity orders return the input itself."""
    from megatron.core.transformer.moe import moe_utils

    from llamafactory_mca.kernels import permute as kp

    ep, local = 3, 4
    sizes = torch.tensor([3, 0, 2, 5, 1, 1, 0, 4, 2, 2, 3, 1])
    x = torch.randn(int(sizes.sum()), 5)
    probs = torch.rand(int(sizes.sum()))
    chunks = torch.arange(ep * local)
    for order in (chunks.reshape(-1, local).T.ravel(), chunks.reshape(local, -1).T.ravel()):
        ref, ref_p = moe_utils.sort_chunks_by_idxs(x, sizes, order, probs=probs)
        src = kp.chunk_sort_rows(sizes, order, x.shape[0])
        assert torch.equal(x.index_select(0, src), ref) and torch.equal(probs.index_select(0, src), ref_p)
        out, out_p = kp.sort_chunks_by_idxs(x, sizes, order, probs=probs)
        assert torch.equal(out, ref) and torch.equal(out_p, ref_p)
    same, same_p = kp.sort_chunks_by_idxs(x, sizes, torch.arange(12), probs=probs)
    assert same is x and same_p is probs
    # the gather-only row permutation gives index_select's values and gradients
    src = kp.chunk_sort_rows(sizes, chunks.reshape(-1, local).T.ravel(), x.shape[0])
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = torch.randn(x.shape)
    (kp.permute_rows(a, src) * w).sum().backward()
    (b.index_select(0, src) * w).sum().backward()
    assert torch.equal(kp.permute_rows(x, src), x.index_select(0, src)) and torch.equal(a.grad, b.grad)


def test_grad_accum_triton_interpreter():
    """kernels/grad_accum.py's Triton kernel (main_grad fp32 += bf16 grad), run by Triton's CPU interpreter:
    bit-equal to torch's add_ on a size that is not a multiple of the block."""
    import subprocess
    import sys

    pytest.importorskip("triton")
    code = r'''
import torch
from llamafactory_mca.kernels.grad_accum import triton_accumulate_
g = torch.Generator().manual_seed(0)
acc = torch.randn(2 * 4096 + 33, generator=g)
grad = torch.randn(2 * 4096 + 33, generator=g).bfloat16()
want = acc.clone().add_(grad)
triton_accumulate_(acc, grad)
assert torch.equal(acc, want)
print("ok")
'''
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_grouped_mm_weight_grad_goes_into_main_grad():
    """With a megatron DDP-style `main_grad` on the parameter, the grouped GEMM's backward adds dw into it and
    marks the parameter, so a DDP hook that honours `grad_added_to_main_grad` (as megatron's does) adds
    nothing: after two micro-batches main_grad = start + dw1 + dw2, as with the hook's own addition."""
    from llamafactory_mca.kernels.grad_accum import accumulate_

    g = torch.Generator().manual_seed(5)
    E, K, N, counts = 3, 8, 12, [4, 0, 6]
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    weight = torch.nn.Parameter(torch.randn(K, E * N, generator=g))  # the TorchGroupedMLP memory trick
    start = torch.randn(K, E * N, generator=g)
    weight.main_grad, weight.grad_added_to_main_grad = start.clone(), False
    xs = [torch.randn(sum(counts), K, generator=g) for _ in range(2)]
    dys = [torch.randn(sum(counts), N, generator=g) for _ in range(2)]
    for x, dy in zip(xs, dys):
        y = grouped_mm(x, weight.view(E, K, N), offs, backend="loop", main_grad_param=weight)
        y.backward(dy)
        if not weight.grad_added_to_main_grad:  # megatron's DDP hook
            weight.main_grad.add_(weight.grad)
        weight.grad = None
    assert weight.grad_added_to_main_grad
    want = start.clone()
    for x, dy in zip(xs, dys):
        ref_w = weight.detach().view(E, K, N).double().requires_grad_()
        grouped_mm_reference(x.double(), ref_w, counts).backward(dy.double())
        want += ref_w.grad.view(K, E * N).float()
    assert _rel(weight.main_grad, want) < 1e-6
    acc = torch.zeros(7)
    with pytest.raises(ValueError, match="elements"):
        accumulate_(acc, torch.zeros(6))
