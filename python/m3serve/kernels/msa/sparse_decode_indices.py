"""Row layout and per-layer kv_indices rewrite for MSA paged sparse decode.

A decode step with Q queries per request (Q = 1, or 2..16 for MTP verify) becomes one attention
"row" per (query t, KV head g), row = t * H_kv + g, so ``q.view(T * H_kv, group, D)`` is the rows'
queries with the group's 16 heads as the row's heads (a free view). Each row reads a one-head view
of the HND cache, [num_pages * H_kv, 1, block, D]: page p of head g is view page p * H_kv + g.

What depends only on the sequence lengths (plan, once per step, host side):
- row length in pages = min(topk, local + 1), local = pos // block, pos = seq_len - Q + q:
  MSA lists every visible block when at most ``topk`` are visible, else exactly ``topk``;
- last_page_len = pos % block + 1: the local block sits last in the selection, and its fill is
  exactly the causal limit of query q (blocks before it are full and fully visible).
What depends on the layer (per layer, on device, no host sync): the page ids, written by
``rewrite_kv_indices`` into a fixed buffer from the top-k output.
"""

from __future__ import annotations

import array
import itertools

import torch
import triton
import triton.language as tl


def decode_row_layout(
    seq_lens: list[int] | torch.Tensor, q_per_req: int, num_kv_heads: int, block: int, topk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host-side plan: (kv_indptr [R+1], last_page_len [R], row_pages [R]) int32 on CPU.

    Rows are ordered (request, query, KV head). Raises if a request has fewer than Q tokens.
    Runs once per decode step on the host, so batches of up to ``_PY_ROWS`` rows take plain
    Python integers (a few tensor constructions instead of ~10 small torch ops: ~10× less host
    time, which a ~2 ms batch-1 step cannot hide); larger ones the vectorised torch path.
    """
    assert q_per_req >= 1, f"q_per_req must be >= 1, got {q_per_req}"
    if isinstance(seq_lens, torch.Tensor):
        seq_lens = seq_lens.flatten().tolist()
    if len(seq_lens) * q_per_req * num_kv_heads <= _PY_ROWS:
        return _row_layout_py([int(x) for x in seq_lens], q_per_req, num_kv_heads, block, topk)
    lens = torch.as_tensor(seq_lens, dtype=torch.int64, device="cpu").flatten()
    check_decode_lens(lens, q_per_req)
    pos = (lens[:, None] - q_per_req + torch.arange(q_per_req)[None, :]).flatten()  # [T]
    pages = torch.clamp(pos // block + 1, max=topk)
    last = pos % block + 1
    pages = pages.repeat_interleave(num_kv_heads).to(torch.int32)
    last = last.repeat_interleave(num_kv_heads).to(torch.int32)
    indptr = torch.zeros(pages.numel() + 1, dtype=torch.int32)
    torch.cumsum(pages, 0, out=indptr[1:])
    return indptr, last, pages


_PY_ROWS = 4096
_LENS_MSG = "every seq_len must be >= q_per_req (queries are in the cache)"


def check_decode_lens(lens: torch.Tensor, q_per_req: int) -> None:
    """Every request holds its Q query tokens in the cache (host tensor of sequence lengths)."""
    assert bool((lens >= q_per_req).all()), _LENS_MSG


def _row_layout_py(
    lens: list[int], q_per_req: int, num_kv_heads: int, block: int, topk: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """decode_row_layout on Python ints (same result)."""
    assert all(n >= q_per_req for n in lens), _LENS_MSG
    pages: list[int] = []
    last: list[int] = []
    for n in lens:
        for pos in range(n - q_per_req, n):
            pages += [min(pos // block + 1, topk)] * num_kv_heads
            last += [pos % block + 1] * num_kv_heads
    indptr = [0, *itertools.accumulate(pages)]
    # frombuffer over an int32 array: ~4× faster than torch.tensor(list); the tensor keeps the
    # array alive
    return tuple(
        torch.frombuffer(array.array("i", v), dtype=torch.int32) for v in (indptr, last, pages)
    )  # type: ignore[return-value]


def ref_rewrite_kv_indices(
    topk_ids: torch.Tensor,
    page_table: torch.Tensor,
    kv_indptr: torch.Tensor,
    q_per_req: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Torch reference of ``rewrite_kv_indices`` (same arguments, same result)."""
    hkv, total_q, _ = topk_ids.shape
    indptr = kv_indptr.tolist()
    for t in range(total_q):
        req = t // q_per_req
        for g in range(hkv):
            r = t * hkv + g
            n = indptr[r + 1] - indptr[r]
            blocks = topk_ids[g, t, :n].long()
            out[indptr[r] : indptr[r] + n] = (page_table[req, blocks].long() * hkv + g).to(
                out.dtype
            )
    return out


@triton.jit
def _rewrite_kv_indices_kernel(
    topk_ptr,
    page_table_ptr,
    indptr_ptr,
    out_ptr,
    num_rows,
    stride_tg,
    stride_tt,
    stride_pt,
    H_KV: tl.constexpr,
    Q_PER_REQ: tl.constexpr,
    TOPK: tl.constexpr,
    ROWS_PER_PROG: tl.constexpr,
):
    """One program rewrites ROWS_PER_PROG rows: view page = page_table[req, block] * H_kv + g."""
    # -- rows of this program and their slices of kv_indices --
    rows = tl.program_id(0) * ROWS_PER_PROG + tl.arange(0, ROWS_PER_PROG)
    row_ok = rows < num_rows
    start = tl.load(indptr_ptr + rows, mask=row_ok, other=0)
    n = tl.load(indptr_ptr + rows + 1, mask=row_ok, other=0) - start
    t = rows // H_KV
    g = rows % H_KV
    req = t // Q_PER_REQ
    # -- gather the selected logical blocks, then their physical pages --
    j = tl.arange(0, TOPK)
    ok = row_ok[:, None] & (j[None, :] < n[:, None])
    blk = tl.load(
        topk_ptr + g[:, None] * stride_tg + t[:, None] * stride_tt + j[None, :], mask=ok, other=0
    )
    # a −1 inside the planned length would be a selection bug: clamp so it never reads out of bounds
    blk = tl.maximum(blk, 0)
    page = tl.load(page_table_ptr + req[:, None].to(tl.int64) * stride_pt + blk, mask=ok, other=0)
    tl.store(out_ptr + start[:, None] + j[None, :], page * H_KV + g[:, None], mask=ok)


def rewrite_kv_indices(
    topk_ids: torch.Tensor,
    page_table: torch.Tensor,
    kv_indptr: torch.Tensor,
    q_per_req: int,
    out: torch.Tensor,
) -> torch.Tensor:
    """Write the one-head-view page ids of every row into ``out`` (int32, fixed buffer).

    topk_ids [H_kv, T, k] int32 (last dim contiguous); page_table [B, max_pages] int32 (last dim
    contiguous, any row stride); kv_indptr [T*H_kv + 1] int32 on device (from decode_row_layout).
    Launch count, grid and arguments depend only on shapes: safe inside a CUDA graph.
    """
    hkv, total_q, topk = topk_ids.shape
    num_rows = total_q * hkv
    assert topk_ids.dtype == torch.int32, f"topk_ids must be int32, got {topk_ids.dtype}"
    assert page_table.dtype == torch.int32, f"page_table must be int32, got {page_table.dtype}"
    assert kv_indptr.dtype == torch.int32 and out.dtype == torch.int32, (
        "kv_indptr/out must be int32"
    )
    assert topk_ids.stride(2) == 1, "topk_ids needs a contiguous last dim"
    assert page_table.stride(1) == 1, "page_table needs a contiguous last dim"
    assert kv_indptr.numel() >= num_rows + 1, (
        f"kv_indptr has {kv_indptr.numel()} < {num_rows + 1} entries"
    )
    assert total_q % q_per_req == 0, f"T={total_q} is not a multiple of Q={q_per_req}"
    assert out.numel() >= num_rows * topk, f"out holds {out.numel()} < {num_rows * topk} page ids"
    assert topk_ids.device == page_table.device == kv_indptr.device == out.device, (
        "tensors on different devices"
    )
    rows_per_prog = 16
    grid = (triton.cdiv(num_rows, rows_per_prog),)
    _rewrite_kv_indices_kernel[grid](
        topk_ids,
        page_table,
        kv_indptr,
        out,
        num_rows,
        topk_ids.stride(0),
        topk_ids.stride(1),
        page_table.stride(0),
        H_KV=hkv,
        Q_PER_REQ=q_per_req,
        TOPK=triton.next_power_of_2(topk),
        ROWS_PER_PROG=rows_per_prog,
        num_warps=1,
    )
    return out
