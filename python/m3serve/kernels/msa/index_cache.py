"""Paged index-K cache writes (bf16, or FP8 e4m3 with a per-token float32 scale) in Triton.

Algorithm: one program stores TOKENS rows of index_k (after norm + RoPE) at their flat slots
``page * block + offset`` of the cache [num_pages, block, d]. FP8 quantizes per token on write:
scale = amax / 448 (1 for an all-zero row), q = clamp(x / scale) → e4m3 (round to nearest even),
exactly ``reference.quantize_index_k_fp8``. Negative slots (padding tokens) are skipped.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import reference as ref
from .topk import use_triton

FP8_E4M3_MAX = ref.FP8_E4M3_MAX


@triton.jit
def _round_to_e4m3(v):
    """Round float32 v (|v| ≤ 448) to the nearest e4m3 value, ties to even, still as float32.

    The cast to e4m3 then only meets representable values, so it is exact on every backend
    (the Triton interpreter's own float→e4m3 rounding is wrong when a round-up carries into the
    exponent). Step = 2^(e − 3) for the 3 mantissa bits, e ≥ −6 (subnormals share 2^−9);
    ties-to-even through the 1.5·2^23 magic add, exact in float32 for |v / step| < 2^22.
    """
    a = tl.abs(v)
    e = tl.maximum(((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, -6)
    step = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)
    magic = 12582912.0  # 1.5 * 2**23
    r = ((a / step + magic) - magic) * step
    return tl.where(v < 0, -r, r)


@triton.jit
def _store_index_k_kernel(
    x_ptr,  # [T, D] index_k
    slot_ptr,  # [T] flat slots (int32/int64)
    cache_ptr,  # [num_pages, BLOCK, D]
    scale_ptr,  # [num_pages, BLOCK] float32 (FP8 only)
    n_tokens,
    stride_xt,
    stride_cp,
    stride_cb,
    stride_sp,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    TOKENS: tl.constexpr,
    IS_FP8: tl.constexpr,
    ROUND_IN_SOFTWARE: tl.constexpr,
):
    # -- tokens of this program and their (page, offset) --
    tok = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
    slot = tl.load(slot_ptr + tok, mask=tok < n_tokens, other=-1).to(tl.int64)
    ok = (tok < n_tokens) & (slot >= 0)
    page = slot // BLOCK
    off = slot % BLOCK
    d = tl.arange(0, D)
    x = tl.load(x_ptr + tok[:, None].to(tl.int64) * stride_xt + d[None, :], mask=ok[:, None])
    dst = cache_ptr + page[:, None] * stride_cp + off[:, None] * stride_cb + d[None, :]
    if IS_FP8:
        # -- per-token scale, then round-to-nearest-even e4m3 --
        xf = x.to(tl.float32)
        amax = tl.max(tl.abs(xf), axis=1)
        # IEEE-rounded divisions: Triton's `/` is approximate on GPUs, torch's (the reference) is not
        scale = tl.where(amax > 0, tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)), 1.0)
        xs = tl.math.div_rn(xf, tl.broadcast_to(scale[:, None], xf.shape))
        xs = tl.minimum(tl.maximum(xs, -448.0), 448.0)
        if ROUND_IN_SOFTWARE:  # the interpreter's float→e4m3 cast mis-rounds; GPUs round RNE
            xs = _round_to_e4m3(xs)
        q = xs
        tl.store(dst, q.to(cache_ptr.dtype.element_ty), mask=ok[:, None])
        tl.store(scale_ptr + page * stride_sp + off, scale, mask=ok)
    else:
        tl.store(dst, x.to(cache_ptr.dtype.element_ty), mask=ok[:, None])


def store_index_k(
    cache: torch.Tensor,
    scale: torch.Tensor | None,
    index_k: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Write index_k [T, d] into the paged index-K cache [num_pages, block, d] at flat ``slots`` [T].

    bf16 cache: a cast. float8_e4m3fn cache: per-token quantization with ``scale``
    [num_pages, block] float32 written alongside. Negative slots are skipped. CUDA-graph safe.
    """
    assert cache.dim() == 3, f"cache must be [num_pages, block, d], got {tuple(cache.shape)}"
    num_pages, block, d = cache.shape
    assert index_k.dim() == 2 and index_k.shape[1] == d, (
        f"index_k must be [T, {d}], got {tuple(index_k.shape)}"
    )
    assert slots.dim() == 1 and slots.shape[0] == index_k.shape[0], (
        f"slots must be [T] with T = {index_k.shape[0]}, got {tuple(slots.shape)}"
    )
    assert slots.dtype in (torch.int32, torch.int64), (
        f"slots must be int32/int64, got {slots.dtype}"
    )
    assert cache.dtype in (torch.bfloat16, torch.float16, torch.float8_e4m3fn), (
        f"cache dtype must be bf16/fp16/float8_e4m3fn, got {cache.dtype}"
    )
    is_fp8 = cache.dtype == torch.float8_e4m3fn
    if is_fp8:
        assert scale is not None, "an FP8 index-K cache needs its per-token scale tensor"
        assert scale.shape == (num_pages, block) and scale.dtype == torch.float32, (
            f"scale must be [{num_pages}, {block}] float32, got {tuple(scale.shape)} {scale.dtype}"
        )
        assert scale.stride(1) == 1, "scale rows must be contiguous"
    assert cache.stride(2) == 1, "cache last dim must be contiguous"
    assert triton.next_power_of_2(d) == d and triton.next_power_of_2(block) == block, (
        f"d ({d}) and block ({block}) must be powers of two"
    )
    if not use_triton(cache):
        keep = slots >= 0
        ref.ref_store_index_k(cache, scale, index_k[keep], slots[keep])
        return
    if index_k.stride(1) != 1:
        index_k = index_k.contiguous()
    n = index_k.shape[0]
    if n == 0:
        return
    tokens = 16
    _store_index_k_kernel[(triton.cdiv(n, tokens),)](
        index_k,
        slots.contiguous(),
        cache,
        scale if is_fp8 else cache,
        n,
        index_k.stride(0),
        cache.stride(0),
        cache.stride(1),
        scale.stride(0) if is_fp8 else 0,
        D=d,
        BLOCK=block,
        TOKENS=tokens,
        IS_FP8=is_fp8,
        ROUND_IN_SOFTWARE=os.environ.get("TRITON_INTERPRET", "0") == "1",
        num_warps=4,
    )
