"""MSA block selection (index scoring + block max + exact top-k) for prefill and decode, in Triton.

Algorithm (both phases): *block-max scoring, then packed-key top-k*.
1. Scoring. One program owns a tile of index-query rows (rows = (token, group) pairs, all G groups
   of a token together) and walks the key blocks they may rank. Per block it loads the 128 index
   keys of one page once (bf16; or e4m3 widened exactly to fp16, with the query tile in fp16 and
   the per-token scale applied after the MMA), runs one tensor-core dot [rows × d] · [d × 128] for
   every row at once, and keeps only the row max. The [q × N] token-score matrix never exists; only one float per (row, block) is written
   (4 B per 128 keys read: 0.05 % of the key bytes in decode).
   Opt-in FP8 queries (``q_fp8=True``, FP8 keys only): each query row (one token, one group) is
   quantized in-kernel to e4m3 with its own scale (the index-K cache's per-token rule) and the
   dot runs e4m3 × e4m3 on the FP8 tensor cores (2× the bf16 rate on Hopper), fp32 accumulate;
   the row max is then × the row's scale. It changes which blocks win at near-ties (the queries
   lose precision), so it is an option, not the default.
2. Top-k: ``topk.launch_topk_rows`` (exact, exp-free, ties to the lower id) reads that row once.

Only blocks strictly before a row's local block are ranked, and those are fully visible
(every token < pos), so no token-level causal mask is needed and the local block itself is
never read: it is forced into the last slot by the top-k.

Decode (Q = 1..16 queries per request, MTP verify) splits each request's blocks over programs
(split-K) so batch 1 still fills the GPU; its grid, buffers and constexprs depend only on shapes
(B, Q, page-table width), never on sequence lengths, so it is CUDA-graph capturable.
Scores are not divided by sqrt(d): a positive constant does not change the ranking.
The two outputs are exact up to float32 summation order (tests: equal to the reference, or within
DESIGN.md's tolerance gate at a float-rounding tolerance on near-ties).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import reference as ref
from .index_cache import _round_to_e4m3
from .pdl import launch_kwargs, pdl_active, pdl_prologue
from .topk import MAX_BLOCKS, _interpreting, launch_topk_rows, rank_rows, rounds_tile, use_triton
from .topk_slots import store_ranked

# -- prefill autotune: the tile is (BM queries × G groups) rows against one 128-key page; bigger
#    tiles cut L2 key traffic, smaller ones balance short chunks. Six configs cover H100/H200
#    (session-6 sweeps on H200, benchmarks/results/prefill_select_sweep.md: BM 16-128 × warps ×
#    stages 2-6, and cutting each tile's blocks over 2-4 programs; BM 32 wins; FP8 queries want
#    5 stages (with their key scales loaded a block ahead: 1.52 ms vs 1.74 at 3 stages, 128K));
#    a single one under the interpreter (autotuning there only costs CPU time).
_PREFILL_CONFIGS = (
    [triton.Config({"BM": 16}, num_warps=4, num_stages=1)]
    if _interpreting()
    else [
        triton.Config({"BM": 64}, num_warps=8, num_stages=3),
        triton.Config({"BM": 32}, num_warps=8, num_stages=3),
        triton.Config({"BM": 32}, num_warps=4, num_stages=3),
        triton.Config({"BM": 32}, num_warps=4, num_stages=2),
        triton.Config({"BM": 32}, num_warps=4, num_stages=5),
        triton.Config({"BM": 16}, num_warps=4, num_stages=4),
    ]
)


@triton.jit
def _prep_q(q, IS_FP8: tl.constexpr, DOT_F32: tl.constexpr, K_MAJOR: tl.constexpr):
    """The query tile in the MMA's dtype (and transposed to [D, rows] for K_MAJOR), once."""
    if DOT_F32:
        # the interpreter's bf16 dot is wrong (triton 3.8); float32 is exact for bf16/e4m3 inputs
        q = q.to(tl.float32)
    elif IS_FP8:
        # e4m3 → fp16 is one cvt per pair (→ bf16 is several) and exact; bf16 queries convert
        # exactly too while |q| < 65504 (normalized index queries are O(1))
        q = q.to(tl.float16)
    if K_MAJOR:
        q = tl.trans(q)
    return q


@triton.jit
def _quant_q_fp8(q, DOT_F32: tl.constexpr):
    """Each query row to e4m3 with its own scale → (q8 [rows, D], scale [rows] float32).

    The index-K cache's rule (index_cache.py, reference.quantize_index_q_fp8): scale = amax / 448
    (1 for an all-zero row, masked rows included), IEEE divisions, clamp, round to nearest even.
    Under the interpreter q8 stays float32 holding the e4m3 values (software RNE: the
    interpreter's float→e4m3 cast mis-rounds); the float32 dot of them is the same math.
    """
    qf = q.to(tl.float32)
    amax = tl.max(tl.abs(qf), axis=1)
    scale = tl.where(amax > 0, tl.math.div_rn(amax, tl.full(amax.shape, 448.0, tl.float32)), 1.0)
    xs = tl.math.div_rn(qf, tl.broadcast_to(scale[:, None], qf.shape))
    xs = tl.minimum(tl.maximum(xs, -448.0), 448.0)
    # GPU: cvt.rn (round to nearest even), as the index-K store
    q8 = _round_to_e4m3(xs) if DOT_F32 else xs.to(tl.float8e4nv)
    return q8, scale


@triton.jit
def _page_at(pt_row, j, j_end):
    """Page of the row's j-th block (0 past ``j_end``: a real page, its values unused)."""
    return tl.load(pt_row + j, mask=j < j_end, other=0).to(tl.int64)


@triton.jit
def _page_scales(ks_ptr, page, stride_sp, tok):
    """FP8 keys' per-token scales of one page. The callers' loops load them one block ahead (and
    that block's page id two ahead), so both loads are in flight across an MMA: Triton's
    pipeliner stages only the loads that feed the MMA, and a scale load in its block's own
    iteration was a synchronous L2 round trip per block (session 6, the prefill loop's TTGIR).
    At equal stages this alone took FP8 decode scoring at B8 x 1M from 313 to 295 µs (H200)."""
    return tl.load(ks_ptr + page * stride_sp + tok)


@triton.jit
def _load_k(k_ptr, page, stride_kp, stride_kb, tok, d):
    """One page's index keys [BLOCK, D] in their storage dtype (bf16, or e4m3)."""
    return tl.load(k_ptr + page * stride_kp + tok[:, None] * stride_kb + d[None, :])


@triton.jit
def _score_k(q, k, ks, IS_FP8: tl.constexpr, K_MAJOR: tl.constexpr):
    """Per-row max of q · k^T over a page's tokens (FP8: × the per-token scales ``ks``, loaded
    by the caller, first). e4m3 queries (FP8-query mode) meet the e4m3 keys unconverted: an FP8 ×
    FP8 MMA, keys [BLOCK, D] D-contiguous = the K-major operand Hopper's FP8 wgmma takes.

    K_MAJOR computes S^T = K · q^T instead (widened FP8 keys as the register operand). Kept as a
    knob: on H200 it was 1.5–1.7× slower for FP8 decode and 1.2× for FP8 prefill.
    """
    k = k.to(q.dtype)
    if K_MAJOR:
        s = tl.dot(k, q)  # [BLOCK, rows]
        if IS_FP8:
            s = s * ks[:, None]
        return tl.max(s, axis=0)
    else:
        s = tl.dot(q, tl.trans(k))  # [rows, BLOCK]
        if IS_FP8:
            s = s * ks[None, :]
        return tl.max(s, axis=1)


@triton.jit
def _score_blocks(
    q,
    q_scale,
    k_ptr,
    ks_ptr,
    pt_row,
    sc_row,
    store_ok,
    row_lim,
    j0,
    j1,
    stride_kp,
    stride_kb,
    stride_sp,
    tok,
    d,
    IS_FP8: tl.constexpr,
    K_MAJOR: tl.constexpr,
    Q_FP8: tl.constexpr,
):
    """Blocks j0 ≤ j < j1 of one page-table row: each row's max score per block into
    sc_row[:, j] (rows with store_ok and j < row_lim). Both scoring kernels' loop."""
    if IS_FP8:  # scales of block j0, page id of block j0 + 1 (see _page_scales)
        ks_next = _page_scales(ks_ptr, _page_at(pt_row, j0, j1), stride_sp, tok)
        pg_next = _page_at(pt_row, j0 + 1, j1)
    for j in tl.range(j0, j1):
        page = tl.load(pt_row + j).to(tl.int64)
        if IS_FP8:
            ks = ks_next
            ks_next = _page_scales(ks_ptr, pg_next, stride_sp, tok)
            pg_next = _page_at(pt_row, j + 2, j1)
        else:
            ks = tok  # unused
        k = _load_k(k_ptr, page, stride_kp, stride_kb, tok, d)
        m = _score_k(q, k, ks, IS_FP8, K_MAJOR)
        if Q_FP8:
            # a positive per-row factor commutes with the max (rounding is monotone)
            m = m * q_scale
        tl.store(sc_row + j, m, mask=store_ok & (j < row_lim))


@triton.autotune(configs=_PREFILL_CONFIGS, key=["G", "D", "IS_FP8", "K_MAJOR", "Q_FP8"])
@triton.jit
def _prefill_block_scores_kernel(
    q_ptr,  # [T, G, D] index queries
    k_ptr,  # [num_pages, BLOCK, D] index-K cache
    ks_ptr,  # [num_pages, BLOCK] float32 scale (FP8 only)
    pt_ptr,  # [B, max_pages] int32 page table
    cu_ptr,  # [B + 1] query offsets
    pre_ptr,  # [B] prefix lengths
    sc_ptr,  # [T * G, NB] float32 block scores (row = t * G + g)
    local_ptr,  # [T * G] int32 local block of each row
    stride_qt,
    stride_qg,
    stride_kp,
    stride_kb,
    stride_sp,
    stride_pt,
    stride_sc,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    IS_FP8: tl.constexpr,
    DOT_F32: tl.constexpr,
    K_MAJOR: tl.constexpr,
    Q_FP8: tl.constexpr,
    BM: tl.constexpr,
):
    # -- this program: queries [start, start + BM) of request b, all G groups --
    b = tl.program_id(1)
    q0 = tl.load(cu_ptr + b)
    q1 = tl.load(cu_ptr + b + 1)
    start = q0 + tl.program_id(0) * BM
    if start < q1:
        pre = tl.load(pre_ptr + b)
        r = tl.arange(0, BM * G)
        t = start + r // G
        g = r % G
        row_ok = t < q1
        loc = (pre + t - q0) // BLOCK
        row = t.to(tl.int64) * G + g
        tl.store(local_ptr + row, loc, mask=row_ok)
        d = tl.arange(0, D)
        tok = tl.arange(0, BLOCK)
        q = tl.load(
            q_ptr + t[:, None].to(tl.int64) * stride_qt + g[:, None] * stride_qg + d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        if Q_FP8:
            q, q_scale = _quant_q_fp8(q, DOT_F32)
        else:
            q, q_scale = _prep_q(q, IS_FP8, DOT_F32, K_MAJOR), 1.0
        # -- walk the blocks the tile's last query may rank (< its local block) --
        lmax = (pre + tl.minimum(start + BM, q1) - 1 - q0) // BLOCK
        pt_row = pt_ptr + b.to(tl.int64) * stride_pt
        sc_row = sc_ptr + row * stride_sc
        _score_blocks(
            q, q_scale, k_ptr, ks_ptr, pt_row, sc_row, row_ok, loc, 0, lmax, stride_kp,
            stride_kb, stride_sp, tok, d, IS_FP8, K_MAJOR, Q_FP8,
        )  # fmt: skip


@triton.jit
def _decode_block_scores_kernel(
    q_ptr,  # [B * Q, G, D] index queries, request-major
    k_ptr,  # [num_pages, BLOCK, D]
    ks_ptr,  # [num_pages, BLOCK] float32 (FP8 only)
    pt_ptr,  # [B, max_pages] int32
    seq_ptr,  # [B] sequence lengths (including the Q new tokens)
    sc_ptr,  # [B * Q * G, NB] float32
    local_ptr,  # [B * Q * G] int32
    count_ptr,  # [B] int32 tickets (fused top-k only; zero between launches)
    out_ptr,  # [G, B * Q, TOPK] int32 (fused top-k only)
    blocks_per_prog,
    n_cols,
    stride_qt,
    stride_qg,
    stride_kp,
    stride_kb,
    stride_sp,
    stride_pt,
    stride_sc,
    stride_og,
    stride_ot,
    stride_ok,
    Q: tl.constexpr,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    RP: tl.constexpr,
    IS_FP8: tl.constexpr,
    DOT_F32: tl.constexpr,
    K_MAJOR: tl.constexpr,
    Q_FP8: tl.constexpr,
    FUSE_TOPK: tl.constexpr,
    TOPK: tl.constexpr,
    K_PAD: tl.constexpr,
    TILE_R: tl.constexpr,
    BLOCK_NC: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_prologue(PDL)
    # -- program (b, split): one of the grid's splits of request b's *visible* blocks, all Q·G
    #    rows: the chunk is cut from this request's length at run time (at least
    #    blocks_per_prog), so a grid spanning a wider page table (a CUDA graph sized for the
    #    context limit) still spreads a shorter request over every program --
    b = tl.program_id(0)
    split = tl.program_id(1)
    seq = tl.load(seq_ptr + b)
    r = tl.arange(0, RP)
    row_ok = r < Q * G
    qi = r // G
    g = r % G
    row = b.to(tl.int64) * (Q * G) + r
    if split == 0:
        tl.store(local_ptr + row, (seq - Q + qi) // BLOCK, mask=row_ok)
    # the last query's local block bounds every row's ranked blocks
    lmax = (seq - 1) // BLOCK
    per = tl.maximum(blocks_per_prog, tl.cdiv(lmax, tl.num_programs(1)))
    j0 = split * per
    j1 = tl.minimum(j0 + per, lmax)
    if j0 < j1:
        d = tl.arange(0, D)
        tok = tl.arange(0, BLOCK)
        t = b.to(tl.int64) * Q + qi
        q = tl.load(
            q_ptr + t[:, None] * stride_qt + g[:, None] * stride_qg + d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )
        if Q_FP8:
            q, q_scale = _quant_q_fp8(q, DOT_F32)
        else:
            q, q_scale = _prep_q(q, IS_FP8, DOT_F32, K_MAJOR), 1.0
        pt_row = pt_ptr + b.to(tl.int64) * stride_pt
        sc_row = sc_ptr + row * stride_sc
        _score_blocks(
            q, q_scale, k_ptr, ks_ptr, pt_row, sc_row, row_ok, j1, j0, j1, stride_kp,
            stride_kb, stride_sp, tok, d, IS_FP8, K_MAJOR, Q_FP8,
        )  # fmt: skip
    if FUSE_TOPK:
        # -- the request's last program to finish ranks its Q·G rows (one launch per step):
        #    a per-request ticket; the barrier orders every thread's score stores before the
        #    release, the acquire makes the other programs' stores visible to the ranking --
        tl.debug_barrier()
        ticket = tl.atomic_add(count_ptr + b, 1, sem="acq_rel")
        if ticket == tl.num_programs(1) - 1:
            slots = tl.arange(0, K_PAD)
            for r0 in tl.static_range(0, Q * G, TILE_R):
                rr = r0 + tl.arange(0, TILE_R)
                rows = b * (Q * G) + rr
                ok = rr < Q * G
                loc = (seq - Q + rr // G) // BLOCK
                ranked = rank_rows(
                    sc_ptr, rows, ok, loc, n_cols, stride_sc, TOPK, K_PAD, TILE_R, BLOCK_NC, True
                )
                store_ranked(
                    out_ptr, rows, ok, loc, ranked, slots, stride_og, stride_ot, stride_ok, G, TOPK
                )
            tl.atomic_xchg(count_ptr + b, 0)


def _check_common(index_q, index_k_cache, index_k_scale, page_table, seq_lens, topk):
    assert index_q.dim() == 3, f"index_q must be [T, G, d], got {tuple(index_q.shape)}"
    _, groups, d = index_q.shape
    assert index_k_cache.dim() == 3 and index_k_cache.shape[2] == d, (
        f"index_k_cache must be [num_pages, block, {d}], got {tuple(index_k_cache.shape)}"
    )
    block = index_k_cache.shape[1]
    assert index_q.stride(2) == 1 and index_k_cache.stride(2) == 1, "last dims must be contiguous"
    is_fp8 = index_k_cache.dtype == torch.float8_e4m3fn
    assert index_q.dtype in (torch.bfloat16, torch.float16), (
        f"index_q must be bf16/fp16 (tensor-core scoring), got {index_q.dtype}"
    )
    if is_fp8:
        assert index_k_scale is not None, "an FP8 index-K cache needs its per-token scale"
        assert index_k_scale.shape == index_k_cache.shape[:2], (
            f"index_k_scale must be {tuple(index_k_cache.shape[:2])}, got {tuple(index_k_scale.shape)}"
        )
        assert index_k_scale.dtype == torch.float32 and index_k_scale.stride(1) == 1, (
            "index_k_scale must be float32 with contiguous rows"
        )
    else:
        assert index_k_cache.dtype == index_q.dtype, (
            f"bf16/fp16 index-K cache dtype {index_k_cache.dtype} != index_q dtype {index_q.dtype}"
        )
    assert page_table.dim() == 2 and page_table.dtype == torch.int32, (
        "page_table must be [B, P] int32"
    )
    assert page_table.stride(1) == 1, "page_table rows must be contiguous"
    assert seq_lens.dim() == 1 and seq_lens.shape[0] == page_table.shape[0], (
        f"seq_lens must be [B={page_table.shape[0]}], got {tuple(seq_lens.shape)}"
    )
    assert triton.next_power_of_2(groups) == groups, f"G = {groups} must be a power of two"
    assert triton.next_power_of_2(d) == d and d >= 16, f"d = {d} must be a power of two ≥ 16"
    assert block in (16, 32, 64, 128), f"block {block} must be 16..128 (one page = one block)"
    assert 1 <= topk <= 64, f"topk must be in 1..64, got {topk}"
    return groups, d, block, is_fp8


def _check_q_fp8(q_fp8: bool, index_k_cache: torch.Tensor, k_major: bool) -> None:
    if not q_fp8:
        return
    if index_k_cache.dtype != torch.float8_e4m3fn:
        raise ValueError(
            "q_fp8=True scores e4m3 queries against e4m3 keys (FP8 tensor cores): it needs a "
            f"float8_e4m3fn index-K cache (M3SERVE_INDEX_K_DTYPE=fp8), got {index_k_cache.dtype}"
        )
    if k_major:
        raise ValueError("q_fp8=True runs the queries-as-A MMA only: pass k_major=False")


def select_blocks_prefill(
    index_q: torch.Tensor,
    index_k_cache: torch.Tensor,
    index_k_scale: torch.Tensor | None,
    page_table: torch.Tensor,
    cu_q: torch.Tensor,
    prefix_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    topk: int,
    max_q_len: int | None = None,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
    k_major: bool = False,
    q_fp8: bool = False,
) -> torch.Tensor:
    """MSA block selection for a ragged (chunked) prefill batch → topk_ids [G, T, topk] int32.

    index_q [T, G, d] bf16; query i of request r sits at prefix_lens[r] + i. ``max_q_len`` /
    ``max_seq_len`` (host ints) size the grid and the block-score buffer; when omitted they are
    read from cu_q / seq_lens (one host sync). Block scores [T·G, ⌈max_seq_len/block⌉] float32
    are the only intermediate (128 MB for an 8K chunk at 128K). ``k_major``: keys-as-A MMA
    orientation (a benchmark knob; queries-as-A by default). ``q_fp8``: FP8 keys only; quantize
    each query row to e4m3 in-kernel and score on the FP8 tensor cores (module docstring;
    reference: ``ref_select_blocks(..., q_fp8=True)``).
    """
    args = (index_q, index_k_cache, index_k_scale, page_table, cu_q, prefix_lens, seq_lens)
    groups, _, _, _ = _check_prefill(*args, topk, k_major, q_fp8)
    total_q = index_q.shape[0]
    if not use_triton(index_q):
        return ref.ref_select_blocks(*args, topk, q_fp8=q_fp8)
    if out is None:
        out = torch.empty(groups, total_q, topk, dtype=torch.int32, device=index_q.device)
    assert out.shape == (groups, total_q, topk) and out.dtype == torch.int32, "bad out buffer"
    if total_q == 0:
        return out
    scores, local = _prefill_scores(*args, topk, max_q_len, max_seq_len, k_major, q_fp8)
    return launch_topk_rows(scores, local, out, topk, groups)


def prefill_block_scores(
    index_q: torch.Tensor,
    index_k_cache: torch.Tensor,
    index_k_scale: torch.Tensor | None,
    page_table: torch.Tensor,
    cu_q: torch.Tensor,
    prefix_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    topk: int,
    max_q_len: int | None = None,
    max_seq_len: int | None = None,
    k_major: bool = False,
    q_fp8: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1 of ``select_blocks_prefill`` alone → (block scores [T·G, nb] float32, local [T·G]).

    Row t·G + g; column j is written for j < local only (the ranked blocks), unscaled (no
    1/sqrt(d)). Tests compare these scores with the reference's. Needs T ≥ 1 and the kernels
    (CUDA or the interpreter).
    """
    args = (index_q, index_k_cache, index_k_scale, page_table, cu_q, prefix_lens, seq_lens)
    _check_prefill(*args, topk, k_major, q_fp8)
    assert index_q.shape[0] > 0 and use_triton(index_q), "needs queries and the Triton kernels"
    return _prefill_scores(*args, topk, max_q_len, max_seq_len, k_major, q_fp8)


_T = torch.Tensor


def _check_prefill(
    index_q: _T, index_k_cache: _T, index_k_scale: _T | None, page_table: _T, cu_q: _T,
    prefix_lens: _T, seq_lens: _T, topk: int, k_major: bool, q_fp8: bool,
) -> tuple[int, int, int, bool]:  # fmt: skip
    checked = _check_common(index_q, index_k_cache, index_k_scale, page_table, seq_lens, topk)
    batch = page_table.shape[0]
    assert cu_q.shape == (batch + 1,) and prefix_lens.shape == (batch,), (
        f"cu_q must be [B+1] and prefix_lens [B] with B = {batch}"
    )
    _check_q_fp8(q_fp8, index_k_cache, k_major)
    return checked


def _prefill_scores(
    index_q: _T, index_k_cache: _T, index_k_scale: _T | None, page_table: _T, cu_q: _T,
    prefix_lens: _T, seq_lens: _T, topk: int, max_q_len: int | None, max_seq_len: int | None,
    k_major: bool, q_fp8: bool,
) -> tuple[_T, _T]:  # fmt: skip
    """Launch the scoring kernel (inputs checked) → (scores [T·G, nb], local [T·G])."""
    _, groups, d = index_q.shape
    block = index_k_cache.shape[1]
    is_fp8 = index_k_cache.dtype == torch.float8_e4m3fn
    total_q = index_q.shape[0]
    batch = page_table.shape[0]
    if max_q_len is None:
        max_q_len = int((cu_q[1:] - cu_q[:-1]).max())
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    n_blocks = max(1, min(page_table.shape[1], triton.cdiv(max_seq_len, block)))
    scores = torch.empty(total_q * groups, n_blocks, dtype=torch.float32, device=index_q.device)
    local = torch.empty(total_q * groups, dtype=torch.int32, device=index_q.device)
    cu_q = cu_q.to(torch.int32)
    prefix_lens = prefix_lens.to(torch.int32)

    def grid(meta):
        return (triton.cdiv(max_q_len, meta["BM"]), batch)

    _prefill_block_scores_kernel[grid](
        index_q,
        index_k_cache,
        index_k_scale if is_fp8 else index_k_cache,
        page_table,
        cu_q,
        prefix_lens,
        scores,
        local,
        index_q.stride(0),
        index_q.stride(1),
        index_k_cache.stride(0),
        index_k_cache.stride(1),
        index_k_scale.stride(0) if is_fp8 else 0,
        page_table.stride(0),
        scores.stride(0),
        G=groups,
        D=d,
        BLOCK=block,
        IS_FP8=is_fp8,
        DOT_F32=_interpreting(),
        K_MAJOR=bool(k_major),
        Q_FP8=bool(q_fp8),
    )
    return scores, local


class DecodeSelectWorkspace:
    """Fixed device buffers for ``select_blocks_decode`` (allocate once per CUDA-graph bucket)."""

    def __init__(self, rows: int, n_blocks: int, device: torch.device | str) -> None:
        self.scores = torch.empty(rows, n_blocks, dtype=torch.float32, device=device)
        self.local = torch.empty(rows, dtype=torch.int32, device=device)
        # per-request tickets of the fused top-k (≤ rows requests); every launch leaves them 0
        self.counters = torch.zeros(rows, dtype=torch.int32, device=device)


# Decode scoring launch: (num_warps, num_stages, programs per SM the split-K chunk aims at[,
# balanced]), for bf16 keys and for FP8 keys. Session-6 sweep on H200 (benchmarks/results/
# decode_select_sweep.md, CUDA-graph replays): bf16 is flat across stages (91 % of copy peak at
# B8 x 128K); FP8 pages are half the bytes per loop step, so they need deeper pipelining: 5 stages
# took B8 x 128K from 49.0 to 43.5 µs and B8 x 1M from 313 to 270 µs. Session 7 (H100 sweep, same
# file): the chunk is now balanced so the grid fills waves·SMs slots at most once (no partial
# last wave) — equal to the power-of-two chunk within 0.5 % at B 1-32 x 32K-1M; aiming FP8 at 3
# programs per SM (its sm_90 kernel needs 163-168 registers offline) was 1-2 % slower than 4.
# launch[4], optional: a register cap per thread (Triton's maxnreg) — the decode tile (Q·G ≤ 16
# rows) compiles to mma.sync with plain global loads (sm_90 PTX: no cp.async at any num_stages),
# so the bytes in flight come from programs per SM, which registers bound: offline, FP8 keys need
# 163 registers (3 programs of 4 warps per SM), bf16 110 (4); capped at 128 / 96 they compile
# without spills. Loading the next block's keys one iteration ahead by hand instead needed 255
# registers and spilled (session 7, not kept).
# Session 7 call 6 (H200 sweep, decode_select_sweep.md): FP8 capped at 128 registers (4 programs
# per SM) was 0.5-1.2 µs faster in all four FP8 cases (B8 x 128K 42.6 vs 43.2 µs); bf16 flat.
DECODE_SCORE_LAUNCH = (4, 3, 4)
DECODE_SCORE_LAUNCH_FP8 = (4, 5, 4, True, 128)


def _launch_env(name: str, default: tuple) -> tuple:
    """M3SERVE_DECODE_SCORE_LAUNCH(_FP8)="warps,stages,waves[,balanced[,maxnreg]]" (sweeps)."""
    spec = os.environ.get(name)
    if not spec:
        return default
    vals = [float(v) if "." in v else int(v) for v in spec.split(",")]
    return tuple(vals)


DECODE_SCORE_LAUNCH = _launch_env("M3SERVE_DECODE_SCORE_LAUNCH", DECODE_SCORE_LAUNCH)
DECODE_SCORE_LAUNCH_FP8 = _launch_env("M3SERVE_DECODE_SCORE_LAUNCH_FP8", DECODE_SCORE_LAUNCH_FP8)


MIN_DECODE_CHUNK = 4  # blocks per decode scoring program, at least


def decode_blocks_per_program(
    batch: int, n_blocks: int, sms: int = 132, waves: float = 4, balanced: bool = True
) -> int:
    """Split-K chunk (blocks per program, ≥ 4) of a request's ``n_blocks``: it sets the grid
    (⌈n_blocks / chunk⌉ programs per request); the kernel then cuts each request's *visible*
    blocks evenly over those programs (so a page table wider than the requests, as in a CUDA
    graph sized for the context limit, still keeps every program busy).

    balanced: ⌊waves·sms / batch⌋ programs per request (so batch × programs fills waves·sms
    slots at most once: no partial last wave), each a near-equal share. Otherwise session 6's
    rule: about ``waves`` programs per SM over the whole batch, rounded to a power-of-two chunk.
    """
    if not balanced:
        per = triton.cdiv(batch * n_blocks, int(waves * sms))
        return max(MIN_DECODE_CHUNK, triton.next_power_of_2(per))
    splits = max(1, int(waves * sms) // max(batch, 1))
    return max(MIN_DECODE_CHUNK, triton.cdiv(n_blocks, splits))


# Fused top-k (select_blocks_decode(fuse_topk=...)): rows of up to FUSE_TOPK_MAX_BLOCKS blocks
# (8K tokens) are ranked inside the scoring launch by each request's last program; longer rows
# take the separate top-k launch (one program per row, all rows in parallel). Measured on H200
# (session 7, benchmarks/results/decode_launch_structure.md, CUDA-graph replays): fused wins only
# at 8K (1.02-1.06x) and loses from 32K on (B8 x 128K bf16 78.5 vs 70.2 µs, FP8 50.9 vs 43.3;
# B1 x 1M 4.4x slower): one program ranking a request's Q·G rows one after another is slower
# than a launch ranking every row at once, and the ranking's whole-row registers (sm_90, 4
# warps: 110 registers for scoring alone, 128 fused at 1024 blocks, 250 at 8192) cut the scoring
# pass's programs per SM at long rows.
FUSE_TOPK_MAX_BLOCKS = 64


def fuse_topk_default(n_blocks: int) -> bool:
    """Whether select_blocks_decode ranks inside the scoring launch for rows of ``n_blocks``."""
    return n_blocks <= FUSE_TOPK_MAX_BLOCKS


class DecodeScores(NamedTuple):
    """A decode step's block scores left unranked (``score_blocks_decode``): row t·G + g."""

    scores: torch.Tensor  # [T·G, n_blocks] float32 (columns below each row's local block)
    local: torch.Tensor  # [T·G] int32, each row's local block


def score_blocks_decode(
    index_q: torch.Tensor,
    index_k_cache: torch.Tensor,
    index_k_scale: torch.Tensor | None,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    q_per_req: int,
    topk: int,
    *,
    max_seq_len: int | None = None,
    workspace: DecodeSelectWorkspace | None = None,
    k_major: bool = False,
    q_fp8: bool = False,
    launch: tuple | None = None,
) -> DecodeScores:
    """The scoring launch of ``select_blocks_decode`` alone (same arguments): the block scores,
    for a consumer that ranks them itself (``sparse_decode_split(scores=...)`` ranks inside the
    attention launch). GPU / interpreter only."""
    return _decode_select(
        index_q, index_k_cache, index_k_scale, page_table, seq_lens, q_per_req, topk, None,
        max_seq_len, workspace, k_major, q_fp8, launch, "none",
    )  # fmt: skip


def select_blocks_decode(
    index_q: torch.Tensor,
    index_k_cache: torch.Tensor,
    index_k_scale: torch.Tensor | None,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    q_per_req: int,
    topk: int,
    out: torch.Tensor | None = None,
    *,
    max_seq_len: int | None = None,
    workspace: DecodeSelectWorkspace | None = None,
    k_major: bool = False,
    q_fp8: bool = False,
    launch: tuple | None = None,
    fuse_topk: bool | None = None,
) -> torch.Tensor:
    """MSA block selection for decode / MTP verify → topk_ids [G, B·Q, topk] int32.

    index_q [B·Q, G, d] (request-major, Q = ``q_per_req`` in 1..16); query q of request b sits at
    seq_lens[b] − Q + q. No host sync; grid and buffers depend only on B, Q and the page-table
    width (or the host int ``max_seq_len`` of the graph bucket), so CUDA graphs can capture it
    (pass ``out`` and ``workspace`` to keep fixed addresses). ``k_major``: keys-as-A MMA
    orientation (a benchmark knob; queries-as-A, the default, measured faster for FP8 too).
    ``q_fp8``: as in ``select_blocks_prefill`` (FP8 keys only; e4m3 × e4m3 scoring). The block
    scores stay in ``workspace.scores`` (columns below each row's local block). ``launch``:
    (warps, stages, programs per SM[, balanced[, maxnreg]]) of the scoring kernel, default
    DECODE_SCORE_LAUNCH(_FP8); see decode_blocks_per_program.
    ``fuse_topk``: rank inside the scoring launch (each request's last program to finish runs the
    exact top-k over its Q·G rows: one kernel per step) instead of a second top-k launch;
    default ``fuse_topk_default(n_blocks)``. Both give the same ids.
    """
    rank = "auto" if fuse_topk is None else "fused" if fuse_topk else "launch"
    return _decode_select(
        index_q, index_k_cache, index_k_scale, page_table, seq_lens, q_per_req, topk, out,
        max_seq_len, workspace, k_major, q_fp8, launch, rank,
    )  # fmt: skip


def _decode_select(
    index_q, index_k_cache, index_k_scale, page_table, seq_lens, q_per_req, topk, out,
    max_seq_len, workspace, k_major, q_fp8, launch, rank,
):  # fmt: skip
    """select_blocks_decode / score_blocks_decode. rank: "fused" (in the scoring launch), "launch"
    (a second, top-k launch), "auto" (fuse_topk_default) → topk_ids; "none" → DecodeScores
    (Triton only). CPU tensors without TRITON_INTERPRET take the torch reference."""
    groups, d, block, is_fp8 = _check_common(
        index_q, index_k_cache, index_k_scale, page_table, seq_lens, topk
    )
    _check_q_fp8(q_fp8, index_k_cache, k_major)
    batch = page_table.shape[0]
    qn = q_per_req
    assert 1 <= qn <= 16, f"q_per_req must be in 1..16, got {qn}"
    assert index_q.shape[0] == batch * qn, (
        f"index_q has {index_q.shape[0]} rows, expected B·Q = {batch}·{qn}"
    )
    assert rank in ("auto", "fused", "launch", "none"), (
        f"rank must be auto/fused/launch/none, got {rank!r}"
    )
    if not use_triton(index_q):
        assert rank != "none", "score_blocks_decode runs the Triton kernel (CUDA or interpreter)"
        cu_q = torch.arange(batch + 1, dtype=torch.int32, device=index_q.device) * qn
        return ref.ref_select_blocks(
            index_q, index_k_cache, index_k_scale, page_table, cu_q, seq_lens - qn, seq_lens, topk,
            q_fp8=q_fp8,
        )  # fmt: skip
    if rank != "none":
        if out is None:
            out = torch.empty(groups, batch * qn, topk, dtype=torch.int32, device=index_q.device)
        assert out.shape == (groups, batch * qn, topk) and out.dtype == torch.int32, (
            f"out must be [{groups}, {batch * qn}, {topk}] int32, "
            f"got {tuple(out.shape)} {out.dtype}"
        )
    n_blocks = page_table.shape[1]
    if max_seq_len is not None:
        n_blocks = max(1, min(n_blocks, triton.cdiv(max_seq_len, block)))
    if rank == "auto":
        rank = "fused" if fuse_topk_default(n_blocks) else "launch"
    rows = batch * qn * groups
    if batch == 0:
        if rank != "none":
            return out
        empty = torch.empty(0, n_blocks, dtype=torch.float32, device=index_q.device)
        return DecodeScores(empty, torch.empty(0, dtype=torch.int32, device=index_q.device))
    if workspace is None:
        workspace = DecodeSelectWorkspace(rows, n_blocks, index_q.device)
    assert workspace.scores.shape[0] >= rows and workspace.scores.shape[1] >= n_blocks, (
        "workspace too small for this batch"
    )
    sms = (
        torch.cuda.get_device_properties(index_q.device).multi_processor_count
        if index_q.is_cuda
        else 4
    )
    launch = launch or (DECODE_SCORE_LAUNCH_FP8 if is_fp8 else DECODE_SCORE_LAUNCH)
    warps, stages, waves = launch[:3]
    balanced = bool(launch[3]) if len(launch) > 3 else True
    maxnreg = launch[4] if len(launch) > 4 else None
    # the grid comes from the width; the kernel cuts each request's visible blocks over grid[1]
    # programs, ≥ MIN_DECODE_CHUNK each
    grid = (
        batch,
        triton.cdiv(n_blocks, decode_blocks_per_program(batch, n_blocks, sms, waves, balanced)),
    )
    fused = rank == "fused"
    pdl = pdl_active(index_q)
    assert n_blocks <= MAX_BLOCKS, f"{n_blocks} blocks per row > {MAX_BLOCKS} (1M tokens)"
    k_pad, block_nc, tile_r = rounds_tile(n_blocks, topk)
    tile_r = min(tile_r, triton.next_power_of_2(qn * groups))
    if fused:
        assert workspace.counters.numel() >= batch, "workspace counters hold fewer than B requests"
    if out is None:  # scores only: the kernel's top-k output is never written
        out = workspace.local

    _decode_block_scores_kernel[grid](
        index_q,
        index_k_cache,
        index_k_scale if is_fp8 else index_k_cache,
        page_table,
        seq_lens,
        workspace.scores,
        workspace.local,
        workspace.counters,
        out,
        MIN_DECODE_CHUNK,
        n_blocks,
        index_q.stride(0),
        index_q.stride(1),
        index_k_cache.stride(0),
        index_k_cache.stride(1),
        index_k_scale.stride(0) if is_fp8 else 0,
        page_table.stride(0),
        workspace.scores.stride(0),
        out.stride(0) if fused else 0,
        out.stride(1) if fused else 0,
        out.stride(2) if fused else 0,
        Q=qn,
        G=groups,
        D=d,
        BLOCK=block,
        RP=max(16, triton.next_power_of_2(qn * groups)),
        IS_FP8=is_fp8,
        DOT_F32=_interpreting(),
        K_MAJOR=bool(k_major),
        Q_FP8=bool(q_fp8),
        FUSE_TOPK=fused,
        TOPK=topk,
        K_PAD=k_pad,
        TILE_R=tile_r,
        BLOCK_NC=block_nc,
        PDL=pdl,
        num_warps=warps,
        num_stages=stages,
        **launch_kwargs(pdl, maxnreg),
    )
    if fused:
        return out
    if rank == "none":
        return DecodeScores(workspace.scores[:rows, :n_blocks], workspace.local[:rows])
    return launch_topk_rows(
        workspace.scores[:rows], workspace.local[:rows], out, topk, groups, n_cols=n_blocks
    )
