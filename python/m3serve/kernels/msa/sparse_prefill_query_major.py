"""Query-major sparse prefill attention: the comparison point for the KV-block-major kernel.

Algorithm: one CTA per (query, KV head). Its rows are the GQA group's heads (padded to ≥ 16 for
the MMA); it walks the query's k selected blocks with an online softmax (FlashAttention-2
recurrence in base 2) and writes the output directly, no partials. This is the layout of
SGLang 0.5.23's in-tree prefill kernel at one query per selection: each selected block is
re-read once per query that chose it and every MMA is only GP ≥ 16 rows tall, which is what
the block-major form removes. Uses the same plan metadata (query positions, global blocks).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sparse_prefill_triton import _configs, mma


# Rows are only 16 tall: 4 warps; stages 2/3 overlap the next block's K/V load with this one's MMAs.
@triton.autotune(
    configs=_configs([(4, 2), (4, 3), (8, 2)]), key=["HEAD_DIM", "BLOCK_N", "BLOCK_H", "TOPK"]
)
@triton.jit
def _query_major_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    topk_ptr,
    q_pos_ptr,
    q_gb0_ptr,
    gb_page_ptr,
    gb_start_ptr,
    gb_len_ptr,
    group,
    sm_scale_log2,
    stride_qt,
    stride_qh,
    stride_kp,
    stride_kh,
    stride_kn,
    stride_vp,
    stride_vh,
    stride_vn,
    stride_ot,
    stride_oh,
    stride_tg,
    stride_tt,
    TOPK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0)
    g = tl.program_id(1)
    pos = tl.load(q_pos_ptr + t)
    gb0 = tl.load(q_gb0_ptr + t)
    local = pos // BLOCK_N
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    hmask = offs_h < group
    head = g * group + offs_h
    q = tl.load(
        q_ptr + t.to(tl.int64) * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=hmask[:, None],
        other=0.0,
    )
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)
    for s in range(TOPK):
        # -- next selected block (invalid slots are skipped by masking every key) --
        bid = tl.load(topk_ptr + g * stride_tg + t * stride_tt + s)
        ok = (bid >= 0) & (bid <= local)
        gb = gb0 + tl.where(ok, bid, 0)
        page = tl.load(gb_page_ptr + gb).to(tl.int64)
        kv0 = tl.load(gb_start_ptr + gb)
        key_ok = (offs_n < tl.load(gb_len_ptr + gb)) & ((kv0 + offs_n) <= pos) & ok
        kt = tl.load(
            k_ptr
            + page * stride_kp
            + g * stride_kh
            + offs_n[None, :] * stride_kn
            + offs_d[:, None],
            mask=key_ok[None, :],
            other=0.0,
        )
        v = tl.load(
            v_ptr
            + page * stride_vp
            + g * stride_vh
            + offs_n[:, None] * stride_vn
            + offs_d[None, :],
            mask=key_ok[:, None],
            other=0.0,
        )
        # -- online softmax update --
        sc = mma(q, kt) * sm_scale_log2
        sc = tl.where(key_ok[None, :], sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(sc - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v)
        m = m_new
    out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    tl.store(
        out_ptr + t.to(tl.int64) * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=hmask[:, None],
    )


def launch_query_major(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor,
    q_pos: torch.Tensor,
    q_gb0: torch.Tensor,
    gb_page: torch.Tensor,
    gb_start: torch.Tensor,
    gb_len: torch.Tensor,
    sm_scale: float,
) -> None:
    """Grid (T, H_kv). Shapes as in sparse_prefill.py; asserts are done by the wrapper."""
    t, hq, d = q.shape
    hkv, block = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    if t == 0:
        return
    _query_major_kernel[(t, hkv)](
        q,
        k_cache,
        v_cache,
        out,
        topk_ids,
        q_pos,
        q_gb0,
        gb_page,
        gb_start,
        gb_len,
        group,
        sm_scale * 1.4426950408889634,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        out.stride(0),
        out.stride(1),
        topk_ids.stride(0),
        topk_ids.stride(1),
        TOPK=topk_ids.shape[-1],
        HEAD_DIM=d,
        BLOCK_N=block,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
    )
