"""Inverse index for KV-block-major sparse prefill: block → the (query, slot) pairs that chose it.

The selection ``topk_ids`` [G, T, k] is query-major (each query lists its k blocks). The main
kernel wants the transpose: for every (KV head g, selected KV block) the list of queries that
chose it, so one KV block is loaded once and run against all of them in 64/128-row MMA tiles.

Two halves, FlashInfer-style:

- host, once per forward step (``build_host_metadata``, called by ``SparsePrefillPlan``): per-query
  position and global-block base, per global block its physical page, first position and length,
  and worst-case sizes for every device buffer below;
- device, once per layer (``build_inverse_index``), no host sync, fixed buffers only:

  1. count:     rows[g, gb] += 1 for every valid (g, t, slot) — CSR row = (KV head, global block),
                global block gb = first block of t's request + logical block id;
  2. scan:      row_ptr = exclusive prefix sum of the counts (CSR offsets);
                items per row = ceil(count / ITEM_Q), item_ptr = its prefix sum;
  3. fill:      entries[row_ptr[row] + slot-in-row] = t * k + slot; the slot-in-row comes from an
                atomic decrement of the count, which leaves the counts at zero for the next layer
                (no memset per layer);
  4. work list: one work item per ITEM_Q entries of a row (row, first entry). Every item is the
                same amount of work (one KV block × ≤ ITEM_Q queries), so a block chosen by all
                8K queries is split over many CTAs and an unpopular one takes one: the balanced
                list the main kernel's grid walks.

A slot is valid iff 0 <= id <= pos_t // block (selected ∩ causal is non-empty exactly then);
ids must be distinct within a (g, t) row, as MSA's top-k guarantees.
The order of entries within a row depends on atomic timing; the outputs do not (each
(query, slot) partial is written to its own place and merged in slot order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass
class HostMetadata:
    """Per-step metadata computed on the host from the ragged batch description."""

    num_queries: int
    num_blocks: int  # global blocks: Σ_r ceil(seq_len_r / block)
    q_pos: torch.Tensor  # [T] int32 absolute position of each query
    q_gb0: torch.Tensor  # [T] int32 global id of logical block 0 of the query's request
    gb_page: torch.Tensor  # [NB] int32 physical page of each global block
    gb_start: torch.Tensor  # [NB] int32 first token position of the block
    gb_len: torch.Tensor  # [NB] int32 valid tokens in the block (partial last block < block)


def build_host_metadata(
    cu_q: torch.Tensor,
    prefix_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    page_table: torch.Tensor,
    block: int,
    device: torch.device,
) -> HostMetadata:
    """Host side of plan(): one copy of the small metadata to the host, then vector math."""
    cu = cu_q.detach().to("cpu", torch.int64)
    prefix = prefix_lens.detach().to("cpu", torch.int64)
    seq = seq_lens.detach().to("cpu", torch.int64)
    batch = seq.numel()
    assert cu.numel() == batch + 1, (
        f"cu_q has {cu.numel()} entries, expected batch + 1 = {batch + 1}"
    )
    assert prefix.numel() == batch, f"prefix_lens has {prefix.numel()} entries, expected {batch}"
    q_lens = cu[1:] - cu[:-1]
    assert bool((q_lens >= 0).all()), "cu_q must be non-decreasing"
    assert bool((prefix + q_lens == seq).all()), "seq_lens must equal prefix_lens + query lengths"
    nblk = (seq + block - 1) // block
    assert page_table.shape[0] >= batch and (
        batch == 0 or page_table.shape[1] >= int(nblk.max())
    ), (
        f"page_table {tuple(page_table.shape)} must cover {batch} requests × {int(nblk.max())} blocks"
    )
    cu_blocks = torch.zeros(batch + 1, dtype=torch.int64)
    cu_blocks[1:] = nblk.cumsum(0)
    total_q = int(cu[-1])
    req_of_q = torch.repeat_interleave(torch.arange(batch), q_lens)
    q_pos = prefix[req_of_q] + (torch.arange(total_q) - cu[:-1][req_of_q])
    q_gb0 = cu_blocks[:-1][req_of_q]
    num_blocks = int(cu_blocks[-1])
    req_of_b = torch.repeat_interleave(torch.arange(batch), nblk)
    logical = torch.arange(num_blocks) - cu_blocks[:-1][req_of_b]
    pt = page_table.detach().to("cpu", torch.int64)
    gb_page = pt[req_of_b, logical]
    gb_start = logical * block
    gb_len = torch.clamp(seq[req_of_b] - gb_start, max=block)

    def dev(x: torch.Tensor) -> torch.Tensor:
        return x.to(torch.int32).to(device, non_blocking=True)

    return HostMetadata(
        total_q, num_blocks, dev(q_pos), dev(q_gb0), dev(gb_page), dev(gb_start), dev(gb_len)
    )


@triton.jit
def _slots(
    topk_ptr,
    q_pos_ptr,
    q_gb0_ptr,
    T,
    num_blocks,
    stride_tg,
    stride_tt,
    TOPK: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BQ: tl.constexpr,
):
    """[BQ, BLOCK_S] tile of (query, slot): validity and CSR row (0 where invalid)."""
    g = tl.program_id(1)
    t = tl.program_id(0) * BQ + tl.arange(0, BQ)[:, None]
    s = tl.arange(0, BLOCK_S)[None, :]
    tmask = t < T
    ids = tl.load(topk_ptr + g * stride_tg + t * stride_tt + s, mask=tmask & (s < TOPK), other=-1)
    local = tl.load(q_pos_ptr + t, mask=tmask, other=0) // BLOCK
    valid = (ids >= 0) & (ids <= local)
    rows = g * num_blocks + tl.load(q_gb0_ptr + t, mask=tmask, other=0) + ids
    return t, s, valid, tl.where(valid, rows, 0)


@triton.jit
def _count_kernel(
    topk_ptr,
    q_pos_ptr,
    q_gb0_ptr,
    counts_ptr,
    T,
    num_blocks,
    stride_tg,
    stride_tt,
    TOPK: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BQ: tl.constexpr,
):
    # -- one program per (BQ queries, KV head): bump the CSR row of every valid slot --
    _t, _s, valid, rows = _slots(
        topk_ptr,
        q_pos_ptr,
        q_gb0_ptr,
        T,
        num_blocks,
        stride_tg,
        stride_tt,
        TOPK,
        BLOCK,
        BLOCK_S,
        BQ,
    )
    tl.atomic_add(counts_ptr + rows, 1, mask=valid)


@triton.jit
def _fill_kernel(
    topk_ptr,
    q_pos_ptr,
    q_gb0_ptr,
    counts_ptr,
    row_ptr_ptr,
    entries_ptr,
    T,
    num_blocks,
    stride_tg,
    stride_tt,
    TOPK: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BQ: tl.constexpr,
):
    # -- same walk as _count_kernel; the decrement hands out distinct places and re-zeroes --
    t, s, valid, rows = _slots(
        topk_ptr,
        q_pos_ptr,
        q_gb0_ptr,
        T,
        num_blocks,
        stride_tg,
        stride_tt,
        TOPK,
        BLOCK,
        BLOCK_S,
        BQ,
    )
    old = tl.atomic_add(counts_ptr + rows, -1, mask=valid)
    start = tl.load(row_ptr_ptr + rows, mask=valid, other=0)
    tl.store(entries_ptr + start + old - 1, t * TOPK + s, mask=valid)


@triton.jit
def _work_list_kernel(
    row_ptr_ptr,
    item_ptr_ptr,
    work_row_ptr,
    work_start_ptr,
    ITEM_Q: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    # -- one program per CSR row: its items are (row, first entry) every ITEM_Q entries --
    row = tl.program_id(0)
    first = tl.load(item_ptr_ptr + row)
    n_items = tl.load(item_ptr_ptr + row + 1) - first
    e0 = tl.load(row_ptr_ptr + row)
    for i0 in range(0, n_items, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        m = i < n_items
        tl.store(work_row_ptr + first + i, row + 0 * i, mask=m)
        tl.store(work_start_ptr + first + i, e0 + i * ITEM_Q, mask=m)


@triton.jit
def _offsets_kernel(
    counts_ptr,
    row_ptr_ptr,
    item_ptr_ptr,
    work_row_ptr,
    work_start_ptr,
    nrows,
    ITEM_Q: tl.constexpr,
    CHUNK: tl.constexpr,
):
    # -- one program, steps 2 and 4 in one launch: CSR offsets (prefix sum of the counts) and
    #    work-item offsets (prefix sum of ceil(count / ITEM_Q)), CHUNK rows at a time with the
    #    running totals carried, then the chunk's work items (row, first entry) --
    e_carry = tl.full([], 0, tl.int32)
    i_carry = tl.full([], 0, tl.int32)
    tl.store(row_ptr_ptr, e_carry)
    tl.store(item_ptr_ptr, i_carry)
    for c0 in range(0, nrows, CHUNK):
        r = c0 + tl.arange(0, CHUNK)
        m = r < nrows
        cnt = tl.load(counts_ptr + r, mask=m, other=0)
        its = (cnt + (ITEM_Q - 1)) // ITEM_Q
        e_end = tl.cumsum(cnt, 0) + e_carry  # inclusive: row r's entries end here
        i_end = tl.cumsum(its, 0) + i_carry
        tl.store(row_ptr_ptr + 1 + r, e_end, mask=m)
        tl.store(item_ptr_ptr + 1 + r, i_end, mask=m)
        e0 = e_end - cnt
        i0 = i_end - its
        for j in range(0, tl.max(its, 0)):
            ok = m & (j < its)
            tl.store(work_row_ptr + i0 + j, r, mask=ok)
            tl.store(work_start_ptr + i0 + j, e0 + j * ITEM_Q, mask=ok)
        e_carry += tl.sum(cnt, 0)
        i_carry += tl.sum(its, 0)


def max_work_items(
    num_kv_heads: int, num_queries: int, num_blocks: int, topk: int, item_q: int
) -> int:
    """Worst case Σ_rows ceil(n_row / ITEM_Q): each non-empty row adds < 1 item of rounding."""
    entries = num_kv_heads * num_queries * topk
    return entries // item_q + min(num_kv_heads * num_blocks, entries)


def build_inverse_index(
    topk_ids: torch.Tensor,
    meta: HostMetadata,
    block: int,
    item_q: int,
    counts: torch.Tensor,
    row_ptr: torch.Tensor,
    item_ptr: torch.Tensor,
    entries: torch.Tensor,
    work_row: torch.Tensor,
    work_start: torch.Tensor,
    fused_offsets: bool = False,
) -> None:
    """Device side (per layer): fills row_ptr, item_ptr, entries, work_row, work_start in place.

    ``counts`` [G*NB] must be zero on entry and is zero again on exit. ``fused_offsets``: the
    two prefix sums and the work list in one single-program launch (_offsets_kernel; 3 launches
    a layer instead of 7), not yet timed on a GPU against the default.
    """
    g, t, k = topk_ids.shape
    assert topk_ids.dtype == torch.int32, f"topk_ids must be int32, got {topk_ids.dtype}"
    assert topk_ids.stride(2) == 1, "topk_ids must be contiguous in its last (slot) dim"
    assert t == meta.num_queries, f"topk_ids has {t} queries, the plan {meta.num_queries}"
    nrows = g * meta.num_blocks
    assert (
        counts.numel() == nrows and row_ptr.numel() == nrows + 1 and item_ptr.numel() == nrows + 1
    )
    if t == 0 or nrows == 0:
        row_ptr.zero_()
        item_ptr.zero_()
        return
    block_s = max(triton.next_power_of_2(k), 2)
    bq = 64
    grid = (triton.cdiv(t, bq), g)
    # -- 1. count --
    _count_kernel[grid](
        topk_ids,
        meta.q_pos,
        meta.q_gb0,
        counts,
        t,
        meta.num_blocks,
        topk_ids.stride(0),
        topk_ids.stride(1),
        TOPK=k,
        BLOCK=block,
        BLOCK_S=block_s,
        BQ=bq,
    )
    if fused_offsets:  # -- 2 + 4 in one launch, then 3 --
        _offsets_kernel[(1,)](
            counts, row_ptr, item_ptr, work_row, work_start, nrows, ITEM_Q=item_q, CHUNK=2048,
            num_warps=8,
        )  # fmt: skip
        _fill_kernel[grid](
            topk_ids, meta.q_pos, meta.q_gb0, counts, row_ptr, entries, t, meta.num_blocks,
            topk_ids.stride(0), topk_ids.stride(1), TOPK=k, BLOCK=block, BLOCK_S=block_s, BQ=bq,
        )  # fmt: skip
        return
    # -- 2. scan: CSR offsets and per-row work-item offsets --
    torch.cumsum(counts, 0, dtype=torch.int32, out=row_ptr[1:])
    torch.cumsum(
        torch.div(counts + (item_q - 1), item_q, rounding_mode="floor"),
        0,
        dtype=torch.int32,
        out=item_ptr[1:],
    )
    # -- 3. fill (and re-zero the counts) --
    _fill_kernel[grid](
        topk_ids,
        meta.q_pos,
        meta.q_gb0,
        counts,
        row_ptr,
        entries,
        t,
        meta.num_blocks,
        topk_ids.stride(0),
        topk_ids.stride(1),
        TOPK=k,
        BLOCK=block,
        BLOCK_S=block_s,
        BQ=bq,
    )
    # -- 4. balanced work list --
    _work_list_kernel[(nrows,)](row_ptr, item_ptr, work_row, work_start, ITEM_Q=item_q, BLOCK_I=64)
