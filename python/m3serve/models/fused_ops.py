"""Triton kernels for the model's small per-token ops on CUDA: Gemma RMSNorm, and per-head
RMSNorm fused with partial NeoX RoPE. Their readable torch references are ``ops.GemmaRMSNorm``
and ``ops.PartialRope`` (tests/kernels/test_fused_ops.py compares them).

Why: in plain torch a Gemma RMSNorm is ~7 kernels (cast, square, mean, add, rsqrt, two
multiplies, cast) and a RoPE ~10 more (cos/sin from the positions, slices, products, concats),
each a launch of ~1-2 µs at decode batch sizes. M3's decode step (1 dense + 3 MSA layers) was a
CUDA graph of 599 kernels (e2e_serving.md, session 11 profile), and a graph launch costs host time
per node. Here a norm is one kernel and a head norm + RoPE one kernel, reading the input once.

Numerics follow the references step for step: float32 math, the norm's output rounded to the
activation dtype before the rotation (as ``rope.apply(norm(x))`` does), cos/sin of
``position · inv_freq`` in float32. Only the order of the mean's additions differs, so results
agree with the references to the activation dtype's rounding, not bit for bit.

Rows may be strided views (a q/k slice of a fused QKV output): [T, D] or [T, H, D], last dim
contiguous; outputs are contiguous. Imported lazily by ``ops`` on CUDA tensors only, so that the
CPU tests can set TRITON_INTERPRET before anything compiles.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# cos/sin through libdevice (__nv_cosf / __nv_sinf: full range reduction, as torch's) on the GPU:
# RoPE angles reach 1e6 radians at M3's 1M context. The CPU interpreter has no libdevice; its
# tl.cos is numpy's.
PRECISE_TRIG = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def _rmsnorm_kernel(
    x_ptr, w_ptr, out_ptr, n_rows, heads, stride_t, stride_h, eps,
    D: tl.constexpr, BLOCK_D: tl.constexpr, ROWS: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    t, h = rows // heads, rows % heads
    offs = tl.arange(0, BLOCK_D)
    ok = (rows < n_rows)[:, None] & (offs < D)[None, :]
    src = x_ptr + t.to(tl.int64)[:, None] * stride_t + h[:, None] * stride_h + offs[None, :]
    x = tl.load(src, mask=ok, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, 1) / D + eps)
    w = tl.load(w_ptr + offs, mask=offs < D, other=0.0).to(tl.float32)
    y = x * r[:, None] * (1.0 + w)[None, :]
    dst = out_ptr + rows.to(tl.int64)[:, None] * D + offs[None, :]
    tl.store(dst, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _norm_rope_kernel(
    x_ptr, w_ptr, pos_ptr, inv_ptr, out_ptr, n_rows, heads, stride_t, stride_h, eps,
    D: tl.constexpr, R: tl.constexpr, HALF_P: tl.constexpr, REST_P: tl.constexpr,
    ROWS: tl.constexpr,
):  # fmt: skip
    """Per row: y = RMSNorm(x)·(1 + w) rounded to the output dtype; then on y[:R] the NeoX
    rotation by position · inv_freq; y[R:] passes through."""
    HALF: tl.constexpr = R // 2
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    live = rows < n_rows
    t, h = rows // heads, rows % heads
    base = x_ptr + t.to(tl.int64)[:, None] * stride_t + h[:, None] * stride_h
    i = tl.arange(0, HALF_P)
    j = tl.arange(0, REST_P)
    oi = live[:, None] & (i < HALF)[None, :]
    oj = live[:, None] & (j < D - R)[None, :]
    # -- the row in three pieces: rotated halves x1, x2 and the pass-through rest x3 --
    x1 = tl.load(base + i[None, :], mask=oi, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + i[None, :], mask=oi, other=0.0).to(tl.float32)
    x3 = tl.load(base + R + j[None, :], mask=oj, other=0.0).to(tl.float32)
    r = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1) + tl.sum(x3 * x3, 1)) / D + eps)
    w1 = 1.0 + tl.load(w_ptr + i, mask=i < HALF, other=0.0).to(tl.float32)
    w2 = 1.0 + tl.load(w_ptr + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)
    w3 = 1.0 + tl.load(w_ptr + R + j, mask=j < D - R, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    y1 = (x1 * r[:, None] * w1[None, :]).to(dt).to(tl.float32)  # the norm's output dtype
    y2 = (x2 * r[:, None] * w2[None, :]).to(dt).to(tl.float32)
    y3 = (x3 * r[:, None] * w3[None, :]).to(dt)
    # -- RoPE: angle = position · inv_freq (float32), as PartialRope.cos_sin --
    pos = tl.load(pos_ptr + t, mask=live, other=0).to(tl.float32)
    ang = pos[:, None] * tl.load(inv_ptr + i, mask=i < HALF, other=0.0)[None, :]
    if PRECISE_TRIG:
        c, s = libdevice.cos(ang), libdevice.sin(ang)
    else:
        c, s = tl.cos(ang), tl.sin(ang)
    dst = out_ptr + rows.to(tl.int64)[:, None] * D
    tl.store(dst + i[None, :], (y1 * c - y2 * s).to(dt), mask=oi)
    tl.store(dst + HALF + i[None, :], (y2 * c + y1 * s).to(dt), mask=oi)
    tl.store(dst + R + j[None, :], y3, mask=oj)


def _rows_view(x: torch.Tensor) -> tuple[int, int, int, int]:
    """(rows, heads, token stride, head stride) of a [T, D] or [T, H, D] tensor."""
    assert x.dim() in (2, 3) and x.stride(-1) == 1, (
        f"x {tuple(x.shape)} must be [T, D] or [T, H, D] with the last dim contiguous"
    )
    if x.dim() == 2:
        return x.shape[0], 1, x.stride(0), 0
    return x.shape[0] * x.shape[1], x.shape[1], x.stride(0), x.stride(1)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma RMSNorm over the last dim (``ops.GemmaRMSNorm``), contiguous output in x's dtype."""
    d = x.shape[-1]
    assert weight.shape == (d,), f"weight {tuple(weight.shape)} != ({d},)"
    n, heads, st, sh = _rows_view(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    block = triton.next_power_of_2(d)
    rows = max(1, min(64, 4096 // block))  # ~4K elements per program
    warps = 8 if block >= 4096 else 4
    _rmsnorm_kernel[(triton.cdiv(n, rows),)](
        x, weight, out, n, heads, st, sh, eps, D=d, BLOCK_D=block, ROWS=rows, num_warps=warps
    )
    return out


def norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    rotary_dim: int,
) -> torch.Tensor:
    """``PartialRope.apply(GemmaRMSNorm(x), *cos_sin(positions))`` for x [T, H, D] in one kernel."""
    assert x.dim() == 3, f"x {tuple(x.shape)} must be [T, H, D]"
    t, _, d = x.shape
    assert weight.shape == (d,) and positions.shape == (t,), "weight [D], positions [T]"
    assert rotary_dim % 2 == 0 and 0 < rotary_dim <= d, f"rotary_dim {rotary_dim} vs D {d}"
    assert inv_freq.shape == (rotary_dim // 2,) and inv_freq.dtype == torch.float32
    n, heads, st, sh = _rows_view(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    rows = max(1, min(32, 2048 // triton.next_power_of_2(d)))
    _norm_rope_kernel[(triton.cdiv(n, rows),)](
        x, weight, positions, inv_freq, out, n, heads, st, sh, eps, D=d, R=rotary_dim,
        HALF_P=triton.next_power_of_2(rotary_dim // 2),
        REST_P=triton.next_power_of_2(max(d - rotary_dim, 1)), ROWS=rows, num_warps=4,
    )  # fmt: skip
    return out
