"""Split-KV sparse decode in Triton, for the batch sizes where FlashInfer's rows are too few.

Algorithm (flash-decoding over selected pages): one row per (query t, KV head g), as in
sparse_decode_indices. The row's ≤ topk selected pages are cut into NUM_SPLITS chunks; program
(row, split) loads the group's query heads once ([GROUP, D], padded to 16 for the MMA) and runs
an online softmax over its pages, reading each page's [block, D] K and V tiles straight from the
HND cache through page_table[req, topk_ids[g, t, j]] (no kv_indices round trip). Causality: a
token is visible iff its position ≤ pos_t = seq_len − Q + q, which only bites in the local block.
The NUM_SPLITS partial (o, lse) pairs are merged by log-sum-exp, either by a second kernel
(merge "kernel") or by the row's last split to finish, found with a per-row atomic ticket, so the
attention is one launch: "serial" loops over the splits at run time (one split's loads per
iteration: a chain of L2 round trips), "unrolled" (session 7) unrolls that loop over the
constexpr split count so the partials' loads are independent and issue together. (A "vector"
merge that loaded all splits as one 3-D tile was tried in session 6 and removed after eager
timings only.)

Bytes: each selected page is read once per row (K + V = 2 · block · D · 2 B); the partials add
NUM_SPLITS · GROUP · (D + 1) · 4 B written and read per row (≈ 12% of the KV bytes at split = 1
page per program, less with fewer splits).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .pdl import launch_kwargs, pdl_active, pdl_prologue
from .topk import MAX_BLOCKS, _key_id, _packed_keys

LOG2E = 1.4426950408889634
# ranking inside the attention launch (``scores=``) takes rows of up to MAX_BLOCKS blocks (1M
# tokens); the row is walked in chunks of RANK_CHUNK blocks (packed int64 keys in registers)
RANK_MAX_BLOCKS = MAX_BLOCKS
RANK_CHUNK = 2048
# SparseDecodeWrapper ranks inside the attention for rows (page-table widths) up to this many
# blocks and runs the top-k launch for wider ones. Session 8, H200 (decode_rank.md): one chunk
# (≤ 2048 blocks) wins everywhere (B8 x 128K FP8 step 1.07x, 128K rows in a 1M-wide table 1.08x);
# rows of 1M tokens walk 4 chunks and lose (B8 x 1M 0.93x, B1 x 1M 0.74x).
RANK_DEFAULT_MAX_BLOCKS = 2048


@triton.jit
def _rank_split_pages(
    sc_ptr, pt_row, ids_ptr, row, pos, j0, pages_per_split, n_cols, stride_sc,
    BLOCK: tl.constexpr, TOPK: tl.constexpr, NC: tl.constexpr, PPS: tl.constexpr,
    K_PAD: tl.constexpr,
):  # fmt: skip
    """Block ids and pages of selection slots j0 .. j0 + pages_per_split − 1 of one row, ranked
    here from the row's block scores (the top-k rules of topk.py: slots 0 .. k − 2 by score desc,
    id asc; slot k − 1 the local block; a row with ≤ k visible blocks lists them ascending, −1
    after) → (blk [PPS], page [PPS]), −1 / 0 past the row's selection. The slots' ids are also
    stored to ``ids_ptr`` (the row's topk_ids, so callers see the same ids as the two-launch form).

    Ranking is the "rounds" kernel's (packed int64 keys, max, knock the winner out). The visible
    blocks are walked in chunks of NC: every chunk but the last updates a set of the best k − 1
    keys so far (a key that beats the set's minimum replaces it; at most k − 1 per chunk), then
    the rounds run over the last chunk and that set, cut off after this split's last slot
    (split s of 1-page splits runs s + 1 rounds). A row of ≤ NC visible blocks is one chunk and
    the set stays empty. Each key's page comes from the page-table row loaded beside the scores
    (a masked sum), so no dependent page-table load follows the ranking.
    """
    sentinel = -9223372036854775807 - 1  # below every key
    top = 9223372036854775807  # above every key
    loc = pos // BLOCK
    offs_pp = tl.arange(0, PPS)
    j = j0 + offs_pp
    in_split = (offs_pp < pages_per_split) & (j < TOPK)
    if loc + 1 <= TOPK:  # every visible block, ascending
        blk = tl.where(j <= loc, j, -1)
        page = tl.load(pt_row + blk, mask=in_split & (blk >= 0), other=0)
    else:
        sc_row = sc_ptr + row.to(tl.int64) * stride_sc
        n_vis = tl.minimum(loc, n_cols)
        last = (n_vis - 1) // NC
        kk = tl.arange(0, K_PAD)
        live = kk < TOPK - 1
        best = tl.full([K_PAD], sentinel, tl.int64)  # the set of the earlier chunks' best keys
        best_pg = tl.zeros([K_PAD], tl.int32)
        for c in range(0, last):
            keys, pts = _chunk_keys(sc_row, pt_row, c * NC, n_vis, sentinel, NC)
            lo = tl.min(tl.where(live, best, top), 0)
            for _i in range(0, tl.minimum(tl.sum((keys > lo).to(tl.int32), 0), TOPK - 1)):
                m = tl.max(keys, 0)
                hit = keys == m
                at = tl.min(tl.where(live & (best == lo) & (m > lo), kk, K_PAD), 0)
                best_pg = tl.where(kk == at, tl.sum(tl.where(hit, pts, 0)), best_pg)
                best = tl.where(kk == at, m, best)
                keys = tl.where(hit, sentinel, keys)
                lo = tl.min(tl.where(live, best, top), 0)
        keys, pts = _chunk_keys(sc_row, pt_row, last * NC, n_vis, sentinel, NC)
        blk = tl.where(j == TOPK - 1, loc, -1)
        page = tl.where(j == TOPK - 1, tl.load(pt_row + loc), 0)
        n_rank = tl.minimum(j0 + pages_per_split, TOPK - 1)
        for _i in range(0, tl.minimum(j0, n_rank)):  # the earlier splits' slots
            m = tl.maximum(tl.max(keys, 0), tl.max(best, 0))
            keys = tl.where(keys == m, sentinel, keys)
            best = tl.where(best == m, sentinel, best)
        for i in range(j0, n_rank):  # this split's ranked slots
            mk = tl.max(keys, 0)
            mb = tl.max(best, 0)
            m = tl.maximum(mk, mb)
            hit = keys == m
            hit_b = best == m
            pg = tl.where(
                mk >= mb, tl.sum(tl.where(hit, pts, 0)), tl.sum(tl.where(hit_b, best_pg, 0))
            )
            blk = tl.where(j == i, _key_id(m), blk)
            page = tl.where(j == i, pg, page)
            keys = tl.where(hit, sentinel, keys)
            best = tl.where(hit_b, sentinel, best)
    tl.store(ids_ptr + j, blk, mask=in_split)
    return blk, page


@triton.jit
def _chunk_keys(sc_row, pt_row, c0, n_vis, sentinel, NC: tl.constexpr):
    """Packed keys and pages of blocks c0 .. c0 + NC − 1 (invisible ones: the sentinel key)."""
    cols = c0 + tl.arange(0, NC)
    vis = cols < n_vis
    s = tl.load(sc_row + cols, mask=vis, other=0.0)
    pts = tl.load(pt_row + cols, mask=vis, other=0)
    return tl.where(vis, _packed_keys(s, cols), sentinel), pts


@triton.jit
def _sparse_decode_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    page_table_ptr,
    topk_ptr,
    seq_lens_ptr,
    o_part_ptr,
    lse_part_ptr,
    out_ptr,
    count_ptr,
    sc_ptr,  # [rows, >= n_cols] float32 block scores (SELECT only)
    qk_scale,
    stride_qt,
    stride_qh,
    stride_kp,
    stride_kh,
    stride_kn,
    stride_vp,
    stride_vh,
    stride_vn,
    stride_pt,
    stride_tg,
    stride_tt,
    stride_ot,
    stride_oh,
    num_rows,
    pages_per_split,
    n_cols,
    stride_sc,
    H_KV: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    D: tl.constexpr,
    BLOCK: tl.constexpr,
    TOPK: tl.constexpr,
    Q_PER_REQ: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MERGE: tl.constexpr,  # 0: second kernel, 1 / 2: fused (the row's last split merges)
    PDL: tl.constexpr,
    UNROLL: tl.constexpr,  # splits per unrolled merge step (MERGE 2: min(splits, 8); else 1)
    SELECT: tl.constexpr,  # rank the row's blocks from sc_ptr here; topk_ptr receives the ids
    NC: tl.constexpr,  # SELECT: blocks per ranking chunk (a power of two)
    PPS: tl.constexpr,  # SELECT: power of two ≥ pages_per_split
    K_PAD: tl.constexpr,  # SELECT: power of two ≥ topk − 1
):
    pdl_prologue(PDL)
    SUB: tl.constexpr = BLOCK // BLOCK_N
    row = tl.program_id(0)
    split = tl.program_id(1)
    t = row // H_KV
    g = row % H_KV
    req = t // Q_PER_REQ
    # -- this query's position, visible page count, and this split's page range --
    pos = tl.load(seq_lens_ptr + req) - Q_PER_REQ + t % Q_PER_REQ
    n_pages = tl.minimum(pos // BLOCK + 1, TOPK)
    j0 = split * pages_per_split
    j1 = tl.minimum(j0 + pages_per_split, n_pages)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    h_ok = offs_h < GROUP
    q = tl.load(
        q_ptr
        + t.to(tl.int64) * stride_qt
        + (g * GROUP + offs_h)[:, None] * stride_qh
        + offs_d[None, :],
        mask=h_ok[:, None],
        other=0.0,
    )
    ids_row = topk_ptr + g * stride_tg + t.to(tl.int64) * stride_tt
    pt_row = page_table_ptr + req.to(tl.int64) * stride_pt
    if SELECT:
        offs_pp = tl.arange(0, PPS)
        blk_v, page_v = _rank_split_pages(
            sc_ptr, pt_row, ids_row, row, pos, j0, pages_per_split, n_cols, stride_sc, BLOCK,
            TOPK, NC, PPS, K_PAD,
        )  # fmt: skip
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    # -- online softmax over the split's selected pages, BLOCK_N tokens at a time --
    # (sub-tiles of a page keep the shared memory per program small, so several programs share
    # an SM and the loop pipelines the next sub-tile's loads behind the current one's math)
    for i in range(j0 * SUB, j1 * SUB):
        j = i // SUB
        if SELECT:  # this split's slots are in registers
            here = offs_pp == j - j0
            blk = tl.sum(tl.where(here, blk_v, 0))
            page = tl.sum(tl.where(here, page_v, 0)).to(tl.int64)
        else:
            blk = tl.load(ids_row + j)
            page = tl.load(pt_row + blk).to(tl.int64)
        tok = (i % SUB) * BLOCK_N + offs_n
        k = tl.load(
            k_ptr + page * stride_kp + g * stride_kh + tok[:, None] * stride_kn + offs_d[None, :]
        )
        v = tl.load(
            v_ptr + page * stride_vp + g * stride_vh + tok[:, None] * stride_vn + offs_d[None, :]
        )
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_H, BLOCK_N], log2 domain
        visible = blk * BLOCK + tok <= pos
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    # -- partial output and its log2-sum-exp (−inf for an empty split) --
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    base = (split * num_rows + row).to(tl.int64) * GROUP
    tl.store(o_part_ptr + (base + offs_h)[:, None] * D + offs_d[None, :], o, mask=h_ok[:, None])
    tl.store(lse_part_ptr + base + offs_h, lse, mask=h_ok)
    if MERGE != 0:
        # -- the row's last split to finish merges all splits (ticket per row, reset after) --
        tl.debug_barrier()  # every thread's partial stores precede the release below
        num_splits = tl.num_programs(1)
        ticket = tl.atomic_add(count_ptr + row, 1, sem="acq_rel")
        if ticket == num_splits - 1:
            res = _merge_rows(
                o_part_ptr, lse_part_ptr, row, num_rows, offs_h, offs_d, h_ok, num_splits,
                GROUP, BLOCK_H, D, UNROLL,
            )  # fmt: skip
            tl.store(
                out_ptr
                + t.to(tl.int64) * stride_ot
                + (g * GROUP + offs_h)[:, None] * stride_oh
                + offs_d[None, :],
                res.to(out_ptr.dtype.element_ty),
                mask=h_ok[:, None],
            )
            tl.atomic_xchg(count_ptr + row, 0)


@triton.jit
def _load_lse(lse_part_ptr, sp, row, num_rows, offs_h, ok, GROUP: tl.constexpr):
    b_sp = (sp * num_rows + row).to(tl.int64) * GROUP
    return tl.load(lse_part_ptr + b_sp + offs_h, mask=ok, other=float("-inf"), cache_modifier=".cg")


@triton.jit
def _load_o(
    o_part_ptr, sp, row, num_rows, offs_h, offs_d, ok, GROUP: tl.constexpr, D: tl.constexpr
):
    b_sp = (sp * num_rows + row).to(tl.int64) * GROUP
    return tl.load(
        o_part_ptr + (b_sp + offs_h)[:, None] * D + offs_d[None, :],
        mask=ok[:, None],
        other=0.0,
        cache_modifier=".cg",
    )


@triton.jit
def _merge_rows(
    o_part_ptr, lse_part_ptr, row, num_rows, offs_h, offs_d, h_ok, num_splits,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, UNROLL: tl.constexpr,
):  # fmt: skip
    """Log-sum-exp merge of a row's ``num_splits`` partials (o, lse) → [BLOCK_H, D] float32.

    UNROLL = 1: a runtime loop, one split's loads per iteration (a chain of L2 round trips).
    UNROLL = U > 1: the loop body covers U splits unrolled, so their loads are independent and
    issue together (U ≤ 8: at 16 the sm_90 compile needed 255 registers and spilled).
    """
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    for c in range(0, num_splits, UNROLL):
        for i in tl.static_range(UNROLL):
            ok = h_ok & (c + i < num_splits)
            m = tl.maximum(m, _load_lse(lse_part_ptr, c + i, row, num_rows, offs_h, ok, GROUP))
    m = tl.where(m > float("-inf"), m, 0.0)  # padded heads: keep exp2 free of inf − inf
    den = tl.zeros([BLOCK_H], tl.float32)
    res = tl.zeros([BLOCK_H, D], tl.float32)
    for c in range(0, num_splits, UNROLL):
        for i in tl.static_range(UNROLL):
            ok = h_ok & (c + i < num_splits)
            w = tl.exp2(_load_lse(lse_part_ptr, c + i, row, num_rows, offs_h, ok, GROUP) - m)
            o = _load_o(o_part_ptr, c + i, row, num_rows, offs_h, offs_d, ok, GROUP, D)
            res += w[:, None] * o
            den += w
    return res / tl.where(den > 0, den, 1.0)[:, None]


@triton.jit
def _merge_splits_kernel(
    o_part_ptr,
    lse_part_ptr,
    out_ptr,
    num_rows,
    stride_ot,
    stride_oh,
    H_KV: tl.constexpr,
    GROUP: tl.constexpr,
    D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_prologue(PDL)
    row = tl.program_id(0)
    h = tl.program_id(1)
    t = row // H_KV
    g = row % H_KV
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    s_ok = offs_s < NUM_SPLITS
    idx = (offs_s * num_rows + row).to(tl.int64) * GROUP + h
    lse = tl.load(lse_part_ptr + idx, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(s_ok & (lse > float("-inf")), tl.exp2(lse - m), 0.0)
    o = tl.load(o_part_ptr + idx[:, None] * D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    res = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(
        out_ptr + t.to(tl.int64) * stride_ot + (g * GROUP + h) * stride_oh + offs_d,
        res.to(out_ptr.dtype.element_ty),
    )


class SplitConfig(NamedTuple):
    """One launch configuration of the split kernel.

    block_n: tokens per loop step (a page is walked in block // block_n sub-tiles: smaller tiles
    leave shared memory for more programs per SM, larger ones fewer loop steps); stages: Triton's
    software-pipelining depth; warps: per program; merge: "kernel" (second launch), "serial" or
    "unrolled" (fused: the row's last split merges); waves: programs per SM the split count aims at
    (num_splits_for), i.e. how finely each row's pages are cut; maxnreg: an optional register cap
    per thread (more programs per SM: 128 fits 4 of 4 warps where the uncapped 164-168 fit 3, so
    a batch-8 step's 512 programs run in one wave; on H200 it changed nothing at B8 — 17.0 µs
    capped or not, at 8 or 16 splits — and lost from B32 up, so no named config uses it;
    benchmarks/results/decode_launch_structure.md).
    """

    block_n: int
    stages: int
    warps: int
    merge: str
    waves: float = 4
    maxnreg: int | None = None


MERGES = {"kernel": 0, "serial": 1, "unrolled": 2}
MAX_WAVES = 4  # reserve() sizes the split scratch for this many programs per SM

# Named configs: the benchmark times each one, the tests run each one. Suffix "f": fused merge
# (runtime loop over the splits); "u": fused merge unrolled over the split count;
# "-w1"/"-w2": 1 / 2 programs per SM instead of 4 (fewer, longer splits).
SPLIT_CONFIGS = {
    "n64s2": SplitConfig(64, 2, 4, "kernel"),
    "n64s2f": SplitConfig(64, 2, 4, "serial"),
    "n32s3f": SplitConfig(32, 3, 4, "serial"),
    "n64s2-w2": SplitConfig(64, 2, 4, "kernel", 2),
    "n64s3-w1": SplitConfig(64, 3, 4, "kernel", 1),
    "n64s3f-w1": SplitConfig(64, 3, 4, "serial", 1),
    "n64s3f-w2": SplitConfig(64, 3, 4, "serial", 2),
    "n64s2u": SplitConfig(64, 2, 4, "unrolled"),
    "n64s3u-w1": SplitConfig(64, 3, 4, "unrolled", 1),
    "n64s3u-w2": SplitConfig(64, 3, 4, "unrolled", 2),
}
# Defaults from the session-6 sweep on H200 (benchmarks/results/decode_split_sweep.md: CUDA-graph
# replays, 8 selections cycled, B 8 / 32 / 64 at 128K): below SMALL_ROWS rows (batch < 16 at M3's
# 4 KV heads) n64s2 (B8: 17.0 µs vs 21.6 for n64s3f-w2), from there on n64s3f-w2 (B32: 41.6 µs
# vs 47.8 n64s2; B64: 70.4 vs 91 µs-class for the 4-wave configs). The eager sweep before it
# measured mostly host launch cost and picked differently: time these under graphs. Session 7
# (benchmarks/results/decode_launch_structure.md, H200): the same merge unrolled, n64s3u-w2, was
# at least as fast as n64s3f-w2 in every case (B32 41.9 vs 42.1 µs, B64 71.9 vs 72.1, B8 20.4 vs
# 21.6), so it replaces it from SMALL_ROWS up; at B8 n64s2's separate merge kernel still wins.
DEFAULT_SPLIT_CONFIG = "n64s2"
DEFAULT_SPLIT_CONFIG_MANY_ROWS = "n64s3u-w2"
SMALL_ROWS = 64
# With the top-k ranked inside this launch (scores=), every program ranks its row up to its own
# slots, so fewer, longer splits (one program per SM, "-w1") pay that ranking fewer times. Session
# 8 on H200 (benchmarks/results/decode_rank.md; top-k + attention in graph cycles): B8 x 128K
# n64s3-w1 18.0 µs vs 20.3 for the top-k launch + n64s2; B1 x 128K 11.4 vs 12.9; B32 x 128K
# n64s3u-w1 44.4 vs 48.0 (launch + n64s3u-w2); B64 77.4 vs 79.4.
DEFAULT_SPLIT_CONFIG_RANKED = "n64s3-w1"
DEFAULT_SPLIT_CONFIG_RANKED_MANY_ROWS = "n64s3u-w1"


def default_split_config(rows: int, ranked: bool = False) -> str:
    """The measured default for a step of ``rows`` (query, KV head) rows; ``ranked``: the step's
    top-k is ranked inside this launch (``scores=``)."""
    if ranked:
        return (
            DEFAULT_SPLIT_CONFIG_RANKED
            if rows < SMALL_ROWS
            else DEFAULT_SPLIT_CONFIG_RANKED_MANY_ROWS
        )
    return DEFAULT_SPLIT_CONFIG if rows < SMALL_ROWS else DEFAULT_SPLIT_CONFIG_MANY_ROWS


def as_split_config(config: str | SplitConfig) -> SplitConfig:
    if isinstance(config, SplitConfig):
        cfg = config
    else:
        assert config in SPLIT_CONFIGS, (
            f"config must be one of {sorted(SPLIT_CONFIGS)} or a SplitConfig, got {config!r}"
        )
        cfg = SPLIT_CONFIGS[config]
    assert cfg.merge in MERGES, f"merge must be one of {sorted(MERGES)}, got {cfg.merge!r}"
    assert 0 < cfg.waves <= MAX_WAVES, f"waves must be in (0, {MAX_WAVES}], got {cfg.waves}"
    return cfg


def num_splits_for(num_rows: int, topk: int, num_sms: int, waves: float = 4) -> int:
    """Splits per row so that rows × splits gives about ``waves`` programs per SM."""
    want = triton.cdiv(math.ceil(waves * num_sms), max(num_rows, 1))
    return max(1, min(topk, triton.next_power_of_2(want)))


def sparse_decode_split(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    topk_ids: torch.Tensor,
    seq_lens: torch.Tensor,
    q_per_req: int,
    sm_scale: float,
    num_splits: int,
    o_part: torch.Tensor,
    lse_part: torch.Tensor,
    out: torch.Tensor,
    config: str | SplitConfig = DEFAULT_SPLIT_CONFIG,
    counters: torch.Tensor | None = None,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sparse decode attention, split-KV. Shapes as in reference.ref_sparse_attention.

    q [T, H_q, D]; caches HND [P, H_kv, block, D]; page_table [B, max_pages] int32;
    topk_ids [H_kv, T, k] int32; seq_lens [B] int32 on device; o_part ≥ [S·T·H_q·D] float32 and
    lse_part ≥ [S·T·H_q] float32 scratch (fixed buffers for CUDA graphs); out [T, H_q, D];
    counters ≥ [T·H_kv] int32, zero before the first call (the fused merge leaves them zero).
    scores: the step's unranked block scores [≥ T·H_kv, n_cols] float32 (row t·H_kv + g, columns
    below each row's local block written; index_select.score_blocks_decode): each program then
    ranks its own slots from them (one launch fewer per step) and writes them to ``topk_ids``,
    which becomes an output holding the same ids as the top-k launch would have.
    n_cols ≤ RANK_MAX_BLOCKS.
    """
    total_q, hq, d = q.shape
    _, hkv, block, dk = k_cache.shape
    group = hq // hkv
    topk = topk_ids.shape[2]
    num_rows = total_q * hkv
    assert dk == d and v_cache.shape == k_cache.shape, (
        f"q D={d}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}"
    )
    assert hq % hkv == 0, f"H_q={hq} is not a multiple of H_kv={hkv}"
    assert topk_ids.shape[:2] == (hkv, total_q), (
        f"topk_ids {tuple(topk_ids.shape)} != ({hkv}, {total_q}, k)"
    )
    assert topk_ids.dtype == page_table.dtype == torch.int32, "topk_ids/page_table must be int32"
    assert seq_lens.dtype == torch.int32, "seq_lens must be int32"
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1, (
        "head_dim must be contiguous"
    )
    assert topk_ids.stride(2) == 1 and page_table.stride(1) == 1, (
        "topk_ids/page_table need a contiguous last dim"
    )
    assert out.shape == q.shape and out.stride(2) == 1, (
        f"out {tuple(out.shape)} must match q {tuple(q.shape)}"
    )
    assert o_part.numel() >= num_splits * total_q * hq * d, "o_part scratch too small"
    assert lse_part.numel() >= num_splits * total_q * hq, "lse_part scratch too small"
    assert total_q % q_per_req == 0, f"T={total_q} is not a multiple of Q={q_per_req}"
    assert d in (16, 32, 64, 128, 256) and block in (16, 32, 64, 128), (
        f"unsupported head_dim {d} / block {block}"
    )
    cfg = as_split_config(config)
    block_n, stages, warps, merge = cfg.block_n, cfg.stages, cfg.warps, cfg.merge
    fused = merge != "kernel"
    if fused:
        assert counters is not None and counters.dtype == torch.int32, (
            "fused merge needs int32 counters"
        )
        assert counters.numel() >= num_rows, f"counters hold {counters.numel()} < {num_rows} rows"
    else:
        counters = lse_part  # unused
    block_n = min(block_n, block)
    pdl = pdl_active(q)
    pages_per_split = triton.cdiv(topk, num_splits)
    num_splits = triton.cdiv(topk, pages_per_split)
    select = scores is not None
    if select:
        assert scores.dim() == 2 and scores.dtype == torch.float32 and scores.stride(1) == 1, (
            "scores must be [rows, n_cols] float32 with contiguous rows"
        )
        assert scores.shape[0] >= num_rows, f"scores hold {scores.shape[0]} < {num_rows} rows"
        assert scores.shape[1] <= RANK_MAX_BLOCKS, (
            f"ranking in the attention launch takes rows of ≤ {RANK_MAX_BLOCKS} blocks, "
            f"got {scores.shape[1]}: rank with topk.launch_topk_rows first"
        )
        assert 2 <= topk <= 64, f"topk must be in 2..64 to rank in the attention, got {topk}"
    else:
        scores = lse_part  # unused
    _sparse_decode_split_kernel[(num_rows, num_splits)](
        q,
        k_cache,
        v_cache,
        page_table,
        topk_ids,
        seq_lens,
        o_part,
        lse_part,
        out,
        counters,
        scores,
        sm_scale * LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        page_table.stride(0),
        topk_ids.stride(0),
        topk_ids.stride(1),
        out.stride(0),
        out.stride(1),
        num_rows,
        pages_per_split,
        scores.shape[1] if select else 0,
        scores.stride(0) if select else 0,
        H_KV=hkv,
        GROUP=group,
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        D=d,
        BLOCK=block,
        TOPK=topk,
        Q_PER_REQ=q_per_req,
        BLOCK_N=block_n,
        MERGE=MERGES[merge],
        PDL=pdl,
        UNROLL=min(num_splits, 8) if merge == "unrolled" else 1,
        SELECT=select,
        NC=max(16, min(RANK_CHUNK, triton.next_power_of_2(scores.shape[1]))) if select else 16,
        PPS=max(2, triton.next_power_of_2(pages_per_split)),
        K_PAD=max(2, triton.next_power_of_2(topk - 1)),
        num_warps=warps,
        num_stages=stages,
        **launch_kwargs(pdl, cfg.maxnreg),
    )
    if fused:
        return out
    _merge_splits_kernel[(num_rows, group)](
        o_part,
        lse_part,
        out,
        num_rows,
        out.stride(0),
        out.stride(1),
        H_KV=hkv,
        GROUP=group,
        D=d,
        NUM_SPLITS=num_splits,
        BLOCK_S=triton.next_power_of_2(num_splits),
        PDL=pdl,
        num_warps=4,
        **launch_kwargs(pdl),
    )
    return out
