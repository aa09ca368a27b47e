"""KV-block-major sparse prefill attention (MSA main branch): main kernel + log-sum-exp combine.

Algorithm (DESIGN.md, "Where the time goes"): instead of walking each query's k selected blocks
(16-row MMAs for a GQA group of 16, every popular block re-read by thousands of queries), walk
the selected blocks. The inverse index (sparse_prefill_plan.py) lists, per (KV head, block), the
(query, slot) pairs that chose it, cut into balanced work items of ≤ ITEM_Q pairs. One CTA per
work item:

    load the block's K and V once (page = block, HND cache: one contiguous [block, D] tile each)
    for every BLOCK_M-row tile of (query, head) rows of the item (BLOCK_M / GP queries × GP heads):
        S = Q·Kᵀ · scale, masked to key position <= query position and to the block's length
        P = exp2(S − rowmax);  O = P·V (unnormalised);  lse = rowmax + log2(rowsum)
        write O (bf16) and (lse, rowmax) (fp32) to the (query, slot, head) partial

A single block is a complete softmax for a (query, slot): no online rescaling in the main kernel.
The combine kernel then merges, per (query, head), the ≤ k partials of its valid slots by
log-sum-exp in slot order (deterministic whatever order the inverse index had); O_s / rowsum_s
weighted by 2^(lse_s − M) is O_s weighted by 2^(rowmax_s − M), so no partial is divided:

    M = max_s lse_s;  out = Σ_s 2^(rowmax_s − M) O_s / Σ_s 2^(lse_s − M)

Rows of a tile are query-major-then-head (row = q·GP + h, GP = next power of two ≥ group), so
the GQA group shares each K/V tile: a 64-row tile is 4 queries × 16 heads at M3's group 16, 64
queries × 1 head at group 1; padded heads (non-power-of-two groups) are masked.

The tile loop is software-pipelined by hand (PREFETCH): entries are loaded two tiles ahead and
query rows one tile ahead, so the dependent gather (entry → query row) is in flight during the
current tile's MMAs (H200, 64 q / 4 KV, 128K context, 8K chunk: run() 2.41 ms vs 2.87 ms).

Traffic floor of the design, per 8K chunk at 64 q heads, k = 16: partials are T·k·H_q·D bf16 =
2.1 GB written by the main kernel and read by the combine (the combine alone runs at ≈ 3.7 TB/s
on H200); the main kernel's MMAs are ≈ 0.53 TFLOP of useful work.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The CPU interpreter (triton 3.8) computes tl.dot on bf16 operands wrongly (raw bits); widen
# them to float32 there. Compiled code keeps bf16 tensor-core MMAs.
DOT_F32 = tl.constexpr(_INTERPRET)


@triton.jit
def mma(a, b):
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


def _configs(pairs: list[tuple[int, int]]) -> list[triton.Config]:
    # the interpreter would "benchmark" every config at numpy speed: one config there
    if _INTERPRET:
        pairs = pairs[:1]
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in pairs]


@triton.jit
def _rows_ok(in_item, hi, group: tl.constexpr):
    """Rows that are real (query, head) pairs: in the item, and not a padded head. ``group`` is
    a compile-time constant, so at a power-of-two group (GP == group) the head test vanishes."""
    if (group & (group - 1)) == 0:
        return in_item
    return in_item & (hi < group)


@triton.jit
def _gather_rows(q_ptr, q_pos_ptr, ent, in_item, hi, head, offs_d, group, stride_qt, stride_qh,
                 TOPK: tl.constexpr):  # fmt: skip
    """Query rows [BLOCK_M, D] and positions of a tile's (query, slot) entries."""
    t = ent // TOPK
    rmask = _rows_ok(in_item, hi, group)
    q = tl.load(
        q_ptr + t.to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=rmask[:, None],
        other=0.0,
    )
    pos = tl.load(q_pos_ptr + t, mask=in_item, other=-1)
    return q, pos


@triton.jit
def _tile(o_part_ptr, lse_part_ptr, q, pos, kt, v, ent, in_item, hi, head, key_pos, key_ok,
          offs_d, group, sm_scale_log2, stride_pe, stride_ph, stride_le, stride_lh):  # fmt: skip
    """One-block softmax of a tile against the resident K/V block; writes O, lse and m partials.

    A block wholly visible to every row of the tile (all of a query's blocks but its local one,
    unless it is the prompt's partial last block) skips the mask (H200, 128K, 64/4: run()
    2.35-2.40 ms vs 2.43-2.49 with the mask everywhere; sparse_prefill.md, session 9). O is
    stored unnormalised beside its row max, the scale rides the exp2's FFMA: 20 % fewer
    instructions a tile, run() 2.27 vs 2.32 ms (H200, session 16)."""
    # -- S = Q·Kᵀ, causal ∩ in-block mask where some key is hidden from some row --
    s = mma(q, kt)
    first_pos = tl.min(tl.where(in_item, pos, 2147483647))
    last_key = tl.max(tl.where(key_ok, key_pos, 2147483647))
    if last_key > first_pos:
        keep = (key_pos[None, :] <= pos[:, None]) & key_ok[None, :]
        s = tl.where(keep, s, float("-inf"))
    # the scale is positive, so it commutes with the max: one FFMA per score (s·c − m·c)
    m = tl.max(s, 1) * sm_scale_log2
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    p = tl.exp2(s * sm_scale_log2 - m_safe[:, None])
    l_sum = tl.sum(p, 1)
    # -- O = P·V left unnormalised (the combine divides once per query, not once per slot);
    #    lse = rowmax + log2(rowsum) and the rowmax itself (−inf both for a fully masked row) --
    o = mma(p.to(v.dtype), v)
    lse = tl.where(l_sum > 0, m_safe + tl.log2(tl.where(l_sum > 0, l_sum, 1.0)), float("-inf"))
    m_out = tl.where(l_sum > 0, m_safe, float("-inf"))
    # -- partials: O[(t, slot), head, :] and (lse, m)[(t, slot), head, 0:2], one 8-byte store --
    rmask = _rows_ok(in_item, hi, group)
    ent64 = ent.to(tl.int64)
    tl.store(
        o_part_ptr + ent64[:, None] * stride_pe + head[:, None] * stride_ph + offs_d[None, :],
        o.to(o_part_ptr.dtype.element_ty),
        mask=rmask[:, None],
    )
    two = tl.arange(0, 2)
    tl.store(
        lse_part_ptr + (ent64 * stride_le + head * stride_lh)[:, None] + two[None, :],
        tl.join(lse, m_out),
        mask=rmask[:, None],
    )


# Small on purpose: the tile shape (BLOCK_M, BLOCK_N = block, HEAD_DIM) is fixed by the plan, so
# only warps and pipeline depth are left; 8 warps suit 128-row tiles, 4 warps 64-row ones, and
# stages > 3 only add shared memory (the K/V tile is already resident for the whole item).
@triton.autotune(
    configs=_configs([(4, 2), (8, 2), (4, 3), (8, 3)]),
    key=["HEAD_DIM", "BLOCK_N", "group", "BLOCK_M", "ITEM_Q", "HOIST_KV", "PREFETCH"],
)
@triton.jit
def _block_major_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_part_ptr,
    lse_part_ptr,
    entries_ptr,
    row_ptr_ptr,
    item_ptr_ptr,
    work_row_ptr,
    work_start_ptr,
    q_pos_ptr,
    gb_page_ptr,
    gb_start_ptr,
    gb_len_ptr,
    num_blocks,
    n_rows,
    group: tl.constexpr,
    sm_scale_log2,
    stride_qt,
    stride_qh,
    stride_kp,
    stride_kh,
    stride_kn,
    stride_vp,
    stride_vh,
    stride_vn,
    stride_pe,
    stride_ph,
    stride_le,
    stride_lh,
    TOPK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    GP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    ITEM_Q: tl.constexpr,
    HOIST_KV: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    QPT: tl.constexpr = BLOCK_M // GP
    # -- which work item: (CSR row = KV head × global block, first entry) --
    w = tl.program_id(0)
    if w >= tl.load(item_ptr_ptr + n_rows):
        return
    row = tl.load(work_row_ptr + w)
    e0 = tl.load(work_start_ptr + w)
    e1 = tl.minimum(e0 + ITEM_Q, tl.load(row_ptr_ptr + row + 1))
    g = row // num_blocks
    gb = row - g * num_blocks
    page = tl.load(gb_page_ptr + gb).to(tl.int64)
    kv0 = tl.load(gb_start_ptr + gb)
    kv_len = tl.load(gb_len_ptr + gb)

    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_m = tl.arange(0, BLOCK_M)
    k_ptrs = (
        k_ptr + page * stride_kp + g * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None]
    )
    v_ptrs = (
        v_ptr + page * stride_vp + g * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]
    )
    key_ok = offs_n < kv_len
    # -- the KV block, once per item (rows past a partial last block read 0) --
    if HOIST_KV:
        kt = tl.load(k_ptrs, mask=key_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
    qi = offs_m // GP
    hi = offs_m % GP
    head = g * group + hi
    key_pos = kv0 + offs_n

    if PREFETCH:
        # -- software pipeline: entries two tiles ahead, query rows one tile ahead, so the
        #    dependent gathers (entry → query row) are in flight during this tile's MMAs --
        ent = tl.load(entries_ptr + e0 + qi, mask=(e0 + qi) < e1, other=0)
        q, pos = _gather_rows(q_ptr, q_pos_ptr, ent, (e0 + qi) < e1, hi, head, offs_d, group,
                              stride_qt, stride_qh, TOPK)  # fmt: skip
        ent_n = tl.load(entries_ptr + e0 + QPT + qi, mask=(e0 + QPT + qi) < e1, other=0)
        for q0 in range(e0, e1, QPT):
            in_n = (q0 + QPT + qi) < e1
            in_nn = (q0 + 2 * QPT + qi) < e1
            ent_nn = tl.load(entries_ptr + q0 + 2 * QPT + qi, mask=in_nn, other=0)
            q_n, pos_n = _gather_rows(q_ptr, q_pos_ptr, ent_n, in_n, hi, head, offs_d, group,
                                      stride_qt, stride_qh, TOPK)  # fmt: skip
            if not HOIST_KV:
                kt = tl.load(k_ptrs, mask=key_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
            _tile(o_part_ptr, lse_part_ptr, q, pos, kt, v, ent, (q0 + qi) < e1, hi, head,
                  key_pos, key_ok, offs_d, group, sm_scale_log2, stride_pe, stride_ph,
                  stride_le, stride_lh)  # fmt: skip
            ent = ent_n
            ent_n = ent_nn
            q = q_n
            pos = pos_n
    else:
        for q0 in range(e0, e1, QPT):
            # -- gather the tile's (query, slot) entries and their query rows --
            in_item = (q0 + qi) < e1
            ent = tl.load(entries_ptr + q0 + qi, mask=in_item, other=0)
            q, pos = _gather_rows(q_ptr, q_pos_ptr, ent, in_item, hi, head, offs_d, group,
                                  stride_qt, stride_qh, TOPK)  # fmt: skip
            if not HOIST_KV:
                kt = tl.load(k_ptrs, mask=key_ok[None, :], other=0.0)
                v = tl.load(v_ptrs, mask=key_ok[:, None], other=0.0)
            _tile(o_part_ptr, lse_part_ptr, q, pos, kt, v, ent, in_item, hi, head, key_pos,
                  key_ok, offs_d, group, sm_scale_log2, stride_pe, stride_ph, stride_le,
                  stride_lh)  # fmt: skip


@triton.jit
def _slot_term(o_part_ptr, lse_part_ptr, topk_ptr, s, g, t, tmask, rmask, local, head, offs_d,
               m_safe, stride_pe, stride_ph, stride_le, stride_lh, stride_tg, stride_tt,
               TOPK: tl.constexpr):  # fmt: skip
    """2^(m_s − m) · O_s for slot s of each row (0 where the slot is invalid): O_s is the slot's
    unnormalised P·V, m_s its row max (component 1 of the lse partials)."""
    bid = tl.load(topk_ptr + g * stride_tg + t * stride_tt + s, mask=tmask, other=-1)
    ok = rmask & (bid >= 0) & (bid <= local)
    e = (t * TOPK + s).to(tl.int64)
    m_s = tl.load(lse_part_ptr + 1 + e * stride_le + head * stride_lh, mask=ok, other=float("-inf"))
    o = tl.load(
        o_part_ptr + e[:, None] * stride_pe + head[:, None] * stride_ph + offs_d[None, :],
        mask=ok[:, None],
        other=0.0,
    ).to(tl.float32)
    return o * tl.exp2(m_s - m_safe)[:, None]


# One program per (QB queries, KV head), QB·GP rows: memory-bound, 4 warps suffice.
@triton.jit
def _combine_kernel(
    o_part_ptr,
    lse_part_ptr,
    topk_ptr,
    q_pos_ptr,
    out_ptr,
    lse_out_ptr,
    T,
    group,
    num_q_heads,
    stride_pe,
    stride_ph,
    stride_le,
    stride_lh,
    stride_tg,
    stride_tt,
    stride_ot,
    stride_oh,
    TOPK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    GP: tl.constexpr,
    QB: tl.constexpr,
    BLOCK_S: tl.constexpr,
    UNROLL: tl.constexpr,
    HAS_LSE: tl.constexpr,
):
    g = tl.program_id(1)
    offs_r = tl.arange(0, QB * GP)
    t = tl.program_id(0) * QB + offs_r // GP
    hi = offs_r % GP
    tmask = t < T
    rmask = tmask & (hi < group)
    head = g * group + hi
    local = tl.load(q_pos_ptr + t, mask=tmask, other=0) // BLOCK
    offs_d = tl.arange(0, HEAD_DIM)
    # -- pass 1: the max and the sum of 2^lse over the valid slots, all slots at once --
    offs_s = tl.arange(0, BLOCK_S)
    bid2 = tl.load(
        topk_ptr + g * stride_tg + t[None, :] * stride_tt + offs_s[:, None],
        mask=(offs_s[:, None] < TOPK) & tmask[None, :],
        other=-1,
    )
    ok2 = rmask[None, :] & (bid2 >= 0) & (bid2 <= local[None, :])
    e2 = (t[None, :] * TOPK + offs_s[:, None]).to(tl.int64)
    lse2 = tl.load(
        lse_part_ptr + e2 * stride_le + head[None, :] * stride_lh, mask=ok2, other=float("-inf")
    )
    m = tl.max(lse2, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    l_sum = tl.sum(tl.exp2(lse2 - m_safe[None, :]), 0)
    # -- pass 2: weighted sum of the partial outputs; no rescaling chain between slots, so
    #    (unrolled) the slot loads are independent and can all be in flight --
    acc = tl.zeros([QB * GP, HEAD_DIM], tl.float32)
    if UNROLL:
        for s in tl.static_range(TOPK):
            acc += _slot_term(o_part_ptr, lse_part_ptr, topk_ptr, s, g, t, tmask, rmask, local,
                              head, offs_d, m_safe, stride_pe, stride_ph, stride_le, stride_lh,
                              stride_tg, stride_tt, TOPK)  # fmt: skip
    else:
        for s in range(TOPK):
            acc += _slot_term(o_part_ptr, lse_part_ptr, topk_ptr, s, g, t, tmask, rmask, local,
                              head, offs_d, m_safe, stride_pe, stride_ph, stride_le, stride_lh,
                              stride_tg, stride_tt, TOPK)  # fmt: skip
    out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    t64 = t.to(tl.int64)
    tl.store(
        out_ptr + t64[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=rmask[:, None],
    )
    if HAS_LSE:
        lse_nat = tl.where(
            l_sum > 0,
            (m + tl.log2(tl.where(l_sum > 0, l_sum, 1.0))) * 0.6931471805599453,
            float("-inf"),
        )
        tl.store(lse_out_ptr + t64 * num_q_heads + head, lse_nat, mask=rmask)


def launch_block_major(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    o_part: torch.Tensor,
    lse_part: torch.Tensor,
    entries: torch.Tensor,
    row_ptr: torch.Tensor,
    item_ptr: torch.Tensor,
    work_row: torch.Tensor,
    work_start: torch.Tensor,
    q_pos: torch.Tensor,
    gb_page: torch.Tensor,
    gb_start: torch.Tensor,
    gb_len: torch.Tensor,
    num_blocks: int,
    topk: int,
    sm_scale: float,
    block_m: int,
    item_q: int,
    hoist_kv: bool,
    prefetch: bool = True,
) -> None:
    """Main kernel: one CTA per work item (grid = the plan's worst-case item count)."""
    _, hq, d = q.shape
    _, hkv, block, _ = k_cache.shape
    group = hq // hkv
    gp = triton.next_power_of_2(group)
    assert block_m % gp == 0 and block_m >= 16, (
        f"BLOCK_M={block_m} must be ≥ 16 and hold whole GQA groups (GP={gp})"
    )
    assert item_q % (block_m // gp) == 0, (
        f"ITEM_Q={item_q} must be a multiple of queries per tile {block_m // gp}"
    )
    assert o_part.stride(-1) == 1 and o_part.shape[-2:] == (hq, d), (
        f"o_part {tuple(o_part.shape)} must be [T*k, {hq}, {d}], last dim contiguous"
    )
    assert lse_part.dim() == 3 and lse_part.shape[-1] == 2 and lse_part.stride(-1) == 1, (
        f"lse_part {tuple(lse_part.shape)} must be [T*k, {hq}, 2] ((lse, m) pairs, contiguous)"
    )
    grid = (work_row.numel(),)
    if grid[0] == 0:
        return
    _block_major_kernel[grid](
        q,
        k_cache,
        v_cache,
        o_part,
        lse_part,
        entries,
        row_ptr,
        item_ptr,
        work_row,
        work_start,
        q_pos,
        gb_page,
        gb_start,
        gb_len,
        num_blocks,
        hkv * num_blocks,
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
        o_part.stride(0),
        o_part.stride(1),
        lse_part.stride(0),
        lse_part.stride(1),
        TOPK=topk,
        HEAD_DIM=d,
        BLOCK_N=block,
        GP=gp,
        BLOCK_M=block_m,
        ITEM_Q=item_q,
        HOIST_KV=hoist_kv,
        PREFETCH=prefetch,
    )


def launch_combine(
    o_part: torch.Tensor,
    lse_part: torch.Tensor,
    topk_ids: torch.Tensor,
    q_pos: torch.Tensor,
    out: torch.Tensor,
    lse_out: torch.Tensor | None,
    num_kv_heads: int,
    block: int,
    unroll: bool = True,
) -> None:
    """Combine kernel: grid (T, H_kv); out [T, Hq, D] in any float dtype, last dim contiguous."""
    t, hq, d = out.shape
    group = hq // num_kv_heads
    topk = topk_ids.shape[-1]
    assert out.stride(2) == 1, "out must be contiguous in head_dim"
    assert lse_part.dim() == 3 and lse_part.shape[-1] == 2 and lse_part.stride(-1) == 1, (
        f"lse_part {tuple(lse_part.shape)} must be [T*k, {hq}, 2] ((lse, m) pairs, contiguous)"
    )
    if lse_out is not None:
        assert lse_out.shape == (t, hq) and lse_out.is_contiguous(), (
            "lse_out must be a contiguous [T, Hq]"
        )
    if t == 0:
        return
    gp = triton.next_power_of_2(group)
    # the interpreter pays per op, not per element: many queries per program there
    qb = 64 if _INTERPRET else max(1, 32 // gp)
    _combine_kernel[(triton.cdiv(t, qb), num_kv_heads)](
        o_part,
        lse_part,
        topk_ids,
        q_pos,
        out,
        lse_out if lse_out is not None else lse_part,
        t,
        group,
        hq,
        o_part.stride(0),
        o_part.stride(1),
        lse_part.stride(0),
        lse_part.stride(1),
        topk_ids.stride(0),
        topk_ids.stride(1),
        out.stride(0),
        out.stride(1),
        TOPK=topk,
        HEAD_DIM=d,
        BLOCK=block,
        GP=gp,
        QB=qb,
        BLOCK_S=triton.next_power_of_2(topk),
        UNROLL=unroll,
        HAS_LSE=lse_out is not None,
        num_warps=4,
    )
