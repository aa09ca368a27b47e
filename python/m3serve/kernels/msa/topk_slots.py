"""Exact, exp-free MSA block top-k by *slot lists, then a merge of their heads* (Triton).

Why: the knock-out kernel (``topk.py``, variant "rounds") spends k − 1 full passes of int64
compare/select over every block of the row; here each block is touched once, in float32.

Algorithm (one row per program, one warp):
  1. Slots. Column c of the row belongs to slot c % W (interleaved, so neighbouring blocks — a
     recency-shaped row's best — land in different slots). Each slot keeps a sorted list of its
     C best (score, id): the row streams through in chunks of W columns, ascending, and each
     score is inserted with a strict ``>`` — an equal score never passes an earlier one, so every
     list is ordered by (score desc, id asc), the reference's order. 3C − 2 selects per block.
  2. Merge. k − 1 rounds over the W list heads: the best head (float max, then the lowest id
     among equal heads: −0.0 == +0.0 as in the reference's float sort) is the next ranked block;
     its slot pops its list.
  3. Exactness check, per row. The merge is exact unless (a) a slot with more than C visible blocks
     had all C entries popped (its (C+1)-th could rank), (b) a NaN was seen (the float compares
     never insert one; the reference ranks every NaN above +inf, ties to the lower id), or (c) a
     −inf would rank (−inf is the empty-entry value, never inserted). Such rows — ~0.5 % of random
     rows at W = 64, C = 3, and adversarial ones (many equal scores in one slot) — are ranked
     again by an exact streamed pass: k − 1 rounds of "largest packed int64 key below the
     previous one" over the row (L1/L2-resident by then).
  Rows with ≤ k visible blocks take the dense path (0 .. local, −1 after) and read nothing.
Cost per 1024-block row and lane (W = 64, C = 3): ~13 ALU ops per block (32 blocks per lane) plus
~28 per merge round — about a quarter of the knock-out kernel's ~8 ALU ops per block per round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class SlotsConfig:
    """Launch shape of the slot-list kernel; the benchmark sweeps these (see bench_index_topk)."""

    slots: int = 64  # W: slots per row (a multiple of 32 · num_warps)
    depth: int = 3  # C: list length per slot, 2..4
    unroll: int = 8  # chunks of W columns loaded per loop trip (loads in flight)
    num_warps: int = 1
    rows: int = 1  # rows per program (> 1 only under the interpreter, where it saves time)

    def check(self) -> None:
        assert 2 <= self.depth <= 4, f"slot list depth must be 2..4, got {self.depth}"
        assert self.slots >= 16 and self.slots & (self.slots - 1) == 0, (
            f"slots must be a power of two >= 16, got {self.slots}"
        )
        assert self.unroll >= 1 and self.rows >= 1 and self.num_warps >= 1


@triton.jit
def ordered32(s):
    """float32 → int32 whose signed order is the reference sort's order: −0.0 == +0.0 and every
    NaN (either sign) above +inf. Negatives become −magnitude (so −0.0 → 0)."""
    bits = s.to(tl.int32, bitcast=True)
    mag = bits & 0x7FFFFFFF
    neg = bits >> 31  # arithmetic: 0 or −1
    key = (mag ^ neg) - neg
    return tl.where(mag > 0x7F800000, 0x7FFFFFFF, key)


@triton.jit
def _insert(x, col, v0, i0, v1, i1, v2, i2, v3, i3, C: tl.constexpr):
    """Insert scores x (ids col, above every id already listed) into each slot's sorted list."""
    # conditions on the old lists first, then update bottom-up (each level reads the level above)
    c0 = x > v0
    c1 = x > v1
    if C > 2:
        c2 = x > v2
    if C > 3:
        c3 = x > v3
        v3 = tl.where(c2, v2, tl.where(c3, x, v3))
        i3 = tl.where(c2, i2, tl.where(c3, col, i3))
    if C > 2:
        v2 = tl.where(c1, v1, tl.where(c2, x, v2))
        i2 = tl.where(c1, i1, tl.where(c2, col, i2))
    v1 = tl.where(c0, v0, tl.where(c1, x, v1))
    i1 = tl.where(c0, i0, tl.where(c1, col, i1))
    v0 = tl.where(c0, x, v0)
    i0 = tl.where(c0, col, i0)
    return v0, i0, v1, i1, v2, i2, v3, i3


@triton.jit
def _stream_exact(row_ptr, nvis, ranked, slots, TOPK: tl.constexpr, W: tl.constexpr):
    """Exact fallback: k − 1 passes, each the largest packed key (ordered score, ~id) below the
    previous pass's; keys are unique, so this is the reference order with no state per block."""
    big = 0x7FFFFFFF
    kmin = -9223372036854775807 - 1
    s = tl.arange(0, W)
    prev = tl.full(nvis.shape, 9223372036854775807, tl.int64)
    n_max = tl.max(nvis, axis=0)
    for r in range(TOPK - 1):
        best = tl.full(nvis.shape, kmin, tl.int64)
        for base in range(0, n_max, W):
            col = base + s[None, :]
            vis = col < nvis[:, None]
            x = tl.load(row_ptr[:, None] + col, mask=vis, other=0.0)
            key = (ordered32(x).to(tl.int64) << 32) | (big - col).to(tl.int64)
            key = tl.where(vis & (key < prev[:, None]), key, kmin)
            best = tl.maximum(best, tl.max(key, axis=1))
        bid = (big - (best & 0xFFFFFFFF)).to(tl.int32)
        ranked = tl.where(slots[None, :] == r, bid[:, None], ranked)
        prev = best
    return ranked


@triton.jit
def _topk_slots_kernel(
    scores_ptr,  # [R, >= n_cols] float32, row stride stride_sr
    local_ptr,  # [R] int32: local block of each row
    out_ptr,  # row r → out[r % G, r // G, :]
    n_rows,
    n_cols,  # valid columns of scores (blocks ≥ n_cols are never read)
    stride_sr,
    stride_og,
    stride_ot,
    stride_ok,
    G: tl.constexpr,
    TOPK: tl.constexpr,
    K_PAD: tl.constexpr,
    ROWS: tl.constexpr,
    W: tl.constexpr,
    C: tl.constexpr,
    U: tl.constexpr,
    FORCE_STREAM: tl.constexpr,  # tests: rank every row with the exact fallback
):
    neg_inf = float("-inf")
    big = 0x7FFFFFFF
    # -- rows of this program; dense (≤ k visible) and absent rows read nothing --
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    loc = tl.load(local_ptr + rows, mask=row_ok, other=0)
    ranks_row = row_ok & (loc + 1 > TOPK)
    nvis = tl.where(ranks_row, tl.minimum(loc, n_cols), 0)
    row_ptr = scores_ptr + rows.to(tl.int64) * stride_sr
    s = tl.arange(0, W)
    slots = tl.arange(0, K_PAD)
    ranked = tl.full([ROWS, K_PAD], -1, tl.int32)
    n_max = tl.max(nvis, axis=0)

    if FORCE_STREAM:
        ranked = _stream_exact(row_ptr, nvis, ranked, slots, TOPK, W)
    elif n_max > 0:
        # -- 1. slot lists: stream the row once, W columns a chunk, U chunks a trip --
        v0 = tl.full([ROWS, W], neg_inf, tl.float32)
        v1 = v0
        v2 = v0
        v3 = v0
        i0 = tl.full([ROWS, W], big, tl.int32)
        i1 = i0
        i2 = i0
        i3 = i0
        nan_acc = tl.zeros([ROWS, W], tl.float32)  # NaN once any NaN was seen (max.NaN.f32)
        for base in range(0, n_max, W * U):
            for u in tl.static_range(U):
                col = base + u * W + s[None, :]
                vis = col < nvis[:, None]
                x = tl.load(row_ptr[:, None] + col, mask=vis, other=neg_inf)
                nan_acc = tl.maximum(nan_acc, x, propagate_nan=tl.PropagateNan.ALL)
                v0, i0, v1, i1, v2, i2, v3, i3 = _insert(x, col, v0, i0, v1, i1, v2, i2, v3, i3, C)

        # -- 2. merge: k − 1 rounds of (best head, lowest id among equal heads, pop its slot) --
        m = tl.max(v0, axis=1)
        for r in tl.static_range(TOPK - 1):
            m = tl.max(v0, axis=1)
            bid = tl.min(tl.where(v0 == m[:, None], i0, big), axis=1)
            ranked = tl.where(slots[None, :] == r, bid[:, None], ranked)
            hit = i0 == bid[:, None]
            v0 = tl.where(hit, v1, v0)
            i0 = tl.where(hit, i1, i0)
            if C > 2:
                v1 = tl.where(hit, v2, v1)
                i1 = tl.where(hit, i2, i1)
            if C > 3:
                v2 = tl.where(hit, v3, v2)
                i2 = tl.where(hit, i3, i2)
            if C == 2:
                v1 = tl.where(hit, neg_inf, v1)
            if C == 3:
                v2 = tl.where(hit, neg_inf, v2)
            if C == 4:
                v3 = tl.where(hit, neg_inf, v3)

        # -- 3. exact unless a slot with > C blocks ran dry, a NaN was seen or a −inf ranks --
        dry = (v0 == neg_inf) & (s[None, :] + C * W < nvis[:, None])
        bad = (tl.max(dry.to(tl.int32), axis=1) > 0) | (m == neg_inf)
        bad = (bad | (tl.max((nan_acc != nan_acc).to(tl.int32), axis=1) > 0)) & ranks_row
        if tl.max(bad.to(tl.int32), axis=0) > 0:
            fixed = _stream_exact(row_ptr, tl.where(bad, nvis, 0), ranked, slots, TOPK, W)
            ranked = tl.where(bad[:, None], fixed, ranked)

    # -- local block last; ≤ k visible blocks: all of them ascending, −1 after --
    ranked = tl.where(slots[None, :] == TOPK - 1, loc[:, None], ranked)
    dense = tl.where(slots[None, :] <= loc[:, None], slots[None, :], -1)
    res = tl.where((loc + 1 <= TOPK)[:, None], dense, ranked)
    g = rows % G
    t = rows // G
    out_ptrs = (
        out_ptr
        + g[:, None].to(tl.int64) * stride_og
        + t[:, None].to(tl.int64) * stride_ot
        + slots[None, :] * stride_ok
    )
    tl.store(out_ptrs, res, mask=row_ok[:, None] & (slots[None, :] < TOPK))


def launch_topk_slots(
    scores: torch.Tensor,
    local: torch.Tensor,
    out: torch.Tensor,
    topk: int,
    groups: int,
    n_cols: int,
    cfg: SlotsConfig,
    force_stream: bool = False,
) -> torch.Tensor:
    """Slot-list top-k (inputs already checked by ``topk.launch_topk_rows``). Graph-safe: the grid
    and constexprs depend only on shapes; the fallback is a branch inside the kernel."""
    cfg.check()
    n_rows = scores.shape[0]
    k_pad = max(2, triton.next_power_of_2(topk))
    _topk_slots_kernel[(triton.cdiv(n_rows, cfg.rows),)](
        scores,
        local,
        out,
        n_rows,
        n_cols,
        scores.stride(0),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        G=groups,
        TOPK=topk,
        K_PAD=k_pad,
        ROWS=cfg.rows,
        W=cfg.slots,
        C=cfg.depth,
        U=cfg.unroll,
        FORCE_STREAM=force_stream,
        num_warps=cfg.num_warps,
    )
    return out
