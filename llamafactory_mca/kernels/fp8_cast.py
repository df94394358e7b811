"""FP8 casts in one Triton kernel per operand (issue 18): the quantization in front of every FP8 GEMM without the
eager path's ~7 kernels and fp32 temporaries of whole activations.

- `cast_rowwise(t)`: one scale per row of a [M, K] tensor whose rows are contiguous; one kernel reads each block
  of rows twice (amax, then scale + cast; the second read comes from L2).
- `cast_scaled(t, amax, ...)`: scale + cast of a [R, C] tensor given its amax (one value, or one per row), in 2D
  tiles for any strides, so the rowwise scaling of a transposed operand (x^T, dy^T of wgrad, read from the
  row-major tensor without a transposed copy) is one kernel too; it can write the transposed result beside the
  plain one (tensorwise: the FP8 copy for forward / dgrad and the one for wgrad in one pass), and zero-pads the
  reduction axis of wgrad's operands to the multiple of 16 `torch._scaled_mm` needs.
- the amax in front of `cast_scaled`: `torch.linalg.vector_norm(t, inf)` (one reduction, no temporary).

Numbers: the same as `kernels/fp8.quantize_eager` (scale = fmax / max(amax, eps) in fp32, q = clamp(t * scale)
rounded to the FP8 dtype, inverse scale returned); `self_check` compares them on the GPU before kernels/fp8.py uses
them (once per process), as every kernel of this package is checked on the device before use.
"""

from __future__ import annotations

from typing import Optional

import torch

_EPS = 1e-12


def triton_available() -> bool:
    try:
        import triton
        import triton.language as tl

        if not (hasattr(triton, "jit") and hasattr(tl, "clamp")):
            return False
    except Exception:  # noqa: BLE001 - not installed, or no GPU backend
        return False
    return torch.cuda.is_available()


_KERNELS: dict = {}


def _kernels() -> dict:
    """The Triton kernels, compiled on first use (importing this module needs no Triton)."""
    if _KERNELS:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def row_amax_cast(x_ptr, q_ptr, inv_ptr, M, K, stride_m, FMAX: tl.constexpr, EPS: tl.constexpr,
                      BM: tl.constexpr, BK: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        in_rows = rows < M
        amax = tl.zeros([BM], dtype=tl.float32)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            mask = in_rows[:, None] & (cols < K)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_m + cols[None, :], mask=mask, other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
        scale = FMAX / tl.maximum(amax, EPS)
        tl.store(inv_ptr + rows, 1.0 / scale, mask=in_rows)
        for k0 in range(0, K, BK):
            cols = k0 + tl.arange(0, BK)
            mask = in_rows[:, None] & (cols < K)[None, :]
            x = tl.load(x_ptr + rows[:, None] * stride_m + cols[None, :], mask=mask, other=0.0)
            q = tl.clamp(x.to(tl.float32) * scale[:, None], -FMAX, FMAX)
            tl.store(q_ptr + rows[:, None] * K + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def scaled_cast(x_ptr, amax_ptr, q_ptr, qt_ptr, inv_ptr, R, C, R_PAD, C_PAD, stride_r, stride_c, amax_stride,
                    FMAX: tl.constexpr, EPS: tl.constexpr, WRITE_Q: tl.constexpr, WRITE_T: tl.constexpr,
                    BR: tl.constexpr, BC: tl.constexpr):
        pid_c = tl.program_id(1)
        rows = tl.program_id(0) * BR + tl.arange(0, BR)
        cols = pid_c * BC + tl.arange(0, BC)
        in_r, in_c = rows < R, cols < C
        x = tl.load(x_ptr + rows[:, None] * stride_r + cols[None, :] * stride_c,
                    mask=in_r[:, None] & in_c[None, :], other=0.0)
        amax = tl.load(amax_ptr + rows * amax_stride, mask=in_r, other=1.0).to(tl.float32)
        scale = FMAX / tl.maximum(amax, EPS)
        q = tl.clamp(x.to(tl.float32) * scale[:, None], -FMAX, FMAX).to(q_ptr.dtype.element_ty)
        if WRITE_Q:  # q [R, C_PAD]: columns C..C_PAD zero
            tl.store(q_ptr + rows[:, None] * C_PAD + cols[None, :], q, mask=in_r[:, None] & (cols < C_PAD)[None, :])
        if WRITE_T:  # q^T [C, R_PAD]: columns R..R_PAD zero
            tl.store(qt_ptr + cols[None, :] * R_PAD + rows[:, None], q, mask=(rows < R_PAD)[:, None] & in_c[None, :])
        # one inverse scale per row (amax_stride 1) or the tensor's one (amax_stride 0: row 0 writes it)
        tl.store(inv_ptr + rows * amax_stride, 1.0 / scale, mask=in_r & (pid_c == 0) & ((amax_stride != 0) | (rows == 0)))

    _KERNELS.update(row_amax_cast=row_amax_cast, scaled_cast=scaled_cast, cdiv=triton.cdiv)
    return _KERNELS


def _fmax(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def cast_rowwise(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q [M, K] in `dtype`, inverse scales [M, 1] fp32) of a 2D tensor with contiguous rows, one scale per row."""
    k = _kernels()
    m, n = t.shape
    q = torch.empty((m, n), dtype=dtype, device=t.device)
    inv = torch.empty((m, 1), dtype=torch.float32, device=t.device)
    bk = min(1024, max(16, 1 << (n - 1).bit_length()))
    bm = max(1, 4096 // bk)
    k["row_amax_cast"][(k["cdiv"](m, bm),)](t, q, inv, m, n, t.stride(0), FMAX=_fmax(dtype), EPS=_EPS, BM=bm, BK=bk,
                                            num_warps=4)
    return q, inv


def amax(t: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """max |t| (over `dim`, or all of t) in one reduction kernel, no |t| temporary."""
    return torch.linalg.vector_norm(t, float("inf"), dim=dim)


def cast_scaled(t: torch.Tensor, amax_: torch.Tensor, dtype: torch.dtype, plain: bool = True,
                transposed: bool = False, pad_cols: int = 1, pad_rows: int = 1
                ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor]:
    """Scale + cast of a 2D tensor `t` [R, C] (any strides) by fmax / amax_ (one element, or R: one per row):
    (q [R, C padded to pad_cols] or None, q^T [C, R padded to pad_rows] or None, inverse scale(s): [R, 1], or
    a scalar for one amax). Padding is zeros."""
    k = _kernels()
    r, c = t.shape
    r_pad, c_pad = -(-r // pad_rows) * pad_rows, -(-c // pad_cols) * pad_cols
    per_row = amax_.numel() != 1
    q = torch.empty((r, c_pad), dtype=dtype, device=t.device) if plain else None
    qt = torch.empty((c, r_pad), dtype=dtype, device=t.device) if transposed else None
    inv = torch.empty((r, 1) if per_row else (), dtype=torch.float32, device=t.device)
    br, bc = 64, 64
    grid = (k["cdiv"](max(r_pad if transposed else r, 1), br), k["cdiv"](max(c_pad if plain else c, 1), bc))
    dummy = q if q is not None else qt
    k["scaled_cast"][grid](t, amax_.reshape(-1), dummy if q is None else q, dummy if qt is None else qt, inv, r, c,
                           r_pad, c_pad, t.stride(0), t.stride(1), 1 if per_row else 0, FMAX=_fmax(dtype), EPS=_EPS,
                           WRITE_Q=plain, WRITE_T=transposed, BR=br, BC=bc, num_warps=4)
    return q, qt, inv


def cast_tensorwise(t: torch.Tensor, dtype: torch.dtype, transposed: bool = False, pad: int = 16):
    """One scale for the 2D tensor t: (q, q^T with its rows' axis zero-padded to `pad` or None, inverse scale)."""
    return cast_scaled(t, amax(t), dtype, plain=True, transposed=transposed, pad_rows=pad)


def cast_rowwise_t(t: torch.Tensor, dtype: torch.dtype, pad: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Rowwise scaling of t^T for a row-major t [M, K] (one scale per column of t, over its M rows), written as
    a contiguous [K, M padded to `pad`]: wgrad's operands, without a transposed bf16 copy."""
    q, _, inv = cast_scaled(t.t(), amax(t, dim=0), dtype, pad_cols=pad)
    return q, inv


def self_check(device: str = "cuda") -> Optional[str]:
    """None when every cast here matches `kernels/fp8.quantize_eager` on this device (each FP8 value within one
    rounding step of the eager one, inverse scales to fp32 rounding), else the reason."""
    from llamafactory_mca.kernels.fp8 import E4M3, E5M2, quantize_eager

    g = torch.Generator(device=device).manual_seed(0)
    x = (torch.randn(203, 328, device=device, generator=g) * torch.rand(203, 1, device=device, generator=g) * 5).bfloat16()
    x[7] = 0  # an all-zero row

    def close(a, a_inv, b, b_inv) -> bool:
        # one step of the format: 3 (e4m3) / 2 (e5m2) mantissa bits, and the smallest subnormal near zero
        step, tiny = (0.125, 2.0**-9) if b.dtype == E4M3 else (0.25, 2.0**-16)
        ok_scale = torch.allclose(torch.as_tensor(a_inv).float(), torch.as_tensor(b_inv).float(), rtol=1e-6, atol=0)
        return ok_scale and bool(((a.float() - b.float()).abs() <= step * b.float().abs() + tiny).all())

    try:
        for dtype in (E4M3, E5M2):
            q, inv = cast_rowwise(x, dtype)
            if not close(q, inv, *quantize_eager(x, dtype, -1)):
                return f"cast_rowwise ({dtype}) differs from the eager quantization"
            q, qt, inv = cast_tensorwise(x, dtype, transposed=True)
            ref_q, ref_inv = quantize_eager(x, dtype, None)
            pad = torch.zeros(328, 208 - 203, dtype=torch.float32, device=device)
            if not (close(q, inv, ref_q, ref_inv) and torch.equal(qt.float(), torch.cat([q.float().t(), pad], 1))):
                return f"cast_tensorwise ({dtype}) differs from the eager quantization"
        qt, inv = cast_rowwise_t(x, E4M3)
        ref_q, ref_inv = quantize_eager(x.t(), E4M3, -1)
        if qt.shape != (328, 208) or qt[:, 203:].float().abs().sum() != 0 or not close(qt[:, :203], inv, ref_q, ref_inv):
            return "cast_rowwise_t differs from the eager quantization"
    except Exception as err:  # noqa: BLE001 - Triton missing a feature here, or a compile error
        return f"{type(err).__name__}: {str(err)[:200]}"
    return None
