"""Exact, exp-free MSA block top-k by *slot lists, then a merge of their heads* (Triton).

Why: the knock-out kernel (``topk.py``, variant "rounds") spends k − 1 full passes of int64
compare/select over every block of the row; here each block is touched once, in float32.

Algorithm (one row per program, one warp):
  1. Slots. Column c of the row belongs to slot c % W (interleaved, so neighbouring blocks — a
     recency-shaped row's best — land in different slots). Each slot keeps a sorted list of its
     C best (score, id): the row streams through in chunks of W columns, ascending, and each
     score is inserted with a strict ``>`` — an equal score never passes an earlier one, so every
     list is ordered by (score desc, id asc), the reference's order. C compares + 4C − 2 selects
     per block.
  2. Merge. k − 1 rounds over the W list heads: the best head (float max, then the lowest id
     among equal heads: −0.0 == +0.0 as in the reference's float sort) is the next ranked block;
     its slot pops its list.
  3. Exactness check, per row. While every slot that has unlisted blocks still has a head, the
     head is that slot's best remaining block, so the round is exact. A round is undecided from
     (a) the round after a slot with more than C visible blocks popped its last entry (its
     (C+1)-th could rank), (b) the first round whose best head is −inf (the empty-entry value; a
     −inf block is never inserted), or (c) round 0 when the row holds a NaN (the float compares
     never insert one; the reference ranks every NaN above +inf, ties to the lower id). Such rows
     re-rank from their first undecided round with an exact streamed pass: "largest packed int64
     key below the previous one" over the row (L1/L2-resident by then), once per remaining rank.
     Random 1023-block rows, k = 16 (simulated): W = 64 needs it for 8.3 % of rows at C = 3
     (~0.26 passes a row), 0.28 % at C = 4, 0.003 % at C = 5; W = 32: 2.8 % at C = 4, 0.006 % at
     C = 6. Adversarial rows (many equal scores in one slot) take it too and stay exact.
  Rows with ≤ k visible blocks take the dense path (0 .. local, −1 after) and read nothing.
Cost per 1024-block row and lane (W = 64, C = 4): ~20 ALU ops per block (32 blocks per lane) and
~40 per merge round (two warp reductions + the pops), against the knock-out kernel's ~8 per block
per round (k − 1 = 15 rounds).
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
    depth: int = 4  # C: list length per slot, 2..6
    unroll: int = 8  # chunks of W columns loaded per loop trip (loads in flight)
    num_warps: int = 1
    rows: int = 1  # rows per program (> 1 only under the interpreter, where it saves time)

    def check(self) -> None:
        assert 2 <= self.depth <= 6, f"slot list depth must be 2..6, got {self.depth}"
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
def store_ranked(
    out_ptr, rows, row_ok, loc, ranked, slots, stride_og, stride_ot, stride_ok,
    G: tl.constexpr, TOPK: tl.constexpr,
):  # fmt: skip
    """The epilogue every top-k kernel shares: the local block into the last slot; a row with
    ≤ k visible blocks lists all of them ascending, −1 after; row r → out[r % G, r // G, :]."""
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


@triton.jit
def _insert(x, col, v0, i0, v1, i1, v2, i2, v3, i3, v4, i4, v5, i5, C: tl.constexpr):
    """Insert scores x (ids col, above every id already listed) into each slot's sorted list of
    depth C (levels ≥ C are unused and left alone)."""
    # conditions on the old lists first, then update bottom-up (each level reads the level above)
    c0 = x > v0
    c1 = x > v1
    if C > 2:
        c2 = x > v2
    if C > 3:
        c3 = x > v3
    if C > 4:
        c4 = x > v4
    if C > 5:
        c5 = x > v5
        v5 = tl.where(c4, v4, tl.where(c5, x, v5))
        i5 = tl.where(c4, i4, tl.where(c5, col, i5))
    if C > 4:
        v4 = tl.where(c3, v3, tl.where(c4, x, v4))
        i4 = tl.where(c3, i3, tl.where(c4, col, i4))
    if C > 3:
        v3 = tl.where(c2, v2, tl.where(c3, x, v3))
        i3 = tl.where(c2, i2, tl.where(c3, col, i3))
    if C > 2:
        v2 = tl.where(c1, v1, tl.where(c2, x, v2))
        i2 = tl.where(c1, i1, tl.where(c2, col, i2))
    v1 = tl.where(c0, v0, tl.where(c1, x, v1))
    i1 = tl.where(c0, i0, tl.where(c1, col, i1))
    v0 = tl.where(c0, x, v0)
    i0 = tl.where(c0, col, i0)
    return v0, i0, v1, i1, v2, i2, v3, i3, v4, i4, v5, i5


@triton.jit
def _pop(hit, v0, i0, v1, i1, v2, i2, v3, i3, v4, i4, v5, i5, C: tl.constexpr):
    """Where ``hit``, drop each list's head: levels move up one, the last level empties."""
    neg_inf = float("-inf")
    v0 = tl.where(hit, v1, v0)
    i0 = tl.where(hit, i1, i0)
    if C > 2:
        v1 = tl.where(hit, v2, v1)
        i1 = tl.where(hit, i2, i1)
    if C > 3:
        v2 = tl.where(hit, v3, v2)
        i2 = tl.where(hit, i3, i2)
    if C > 4:
        v3 = tl.where(hit, v4, v3)
        i3 = tl.where(hit, i4, i3)
    if C > 5:
        v4 = tl.where(hit, v5, v4)
        i4 = tl.where(hit, i5, i4)
    # the last level's id stays: an empty entry is known by its −inf score alone
    if C == 2:
        v1 = tl.where(hit, neg_inf, v1)
    if C == 3:
        v2 = tl.where(hit, neg_inf, v2)
    if C == 4:
        v3 = tl.where(hit, neg_inf, v3)
    if C == 5:
        v4 = tl.where(hit, neg_inf, v4)
    if C == 6:
        v5 = tl.where(hit, neg_inf, v5)
    return v0, i0, v1, i1, v2, i2, v3, i3, v4, i4, v5, i5


@triton.jit
def _stream_exact(row_ptr, nvis, start, ranked, slots, TOPK: tl.constexpr, W: tl.constexpr):
    """Exact fallback for ranks start .. k − 2 (ranks < start are already right): each pass takes
    the largest packed key (ordered score, ~id) below the previous rank's; keys are unique, so
    this is the reference order with no state per block."""
    big = 0x7FFFFFFF
    kmin = -9223372036854775807 - 1
    s = tl.arange(0, W)
    # -- the key of rank start − 1 (the last decided one), or above every key when start = 0 --
    has_prev = start > 0
    prev_id = tl.sum(tl.where(slots[None, :] == start[:, None] - 1, ranked, 0), axis=1)
    prev_x = tl.load(row_ptr + prev_id, mask=has_prev & (nvis > 0), other=0.0)
    prev = (ordered32(prev_x).to(tl.int64) << 32) | (big - prev_id).to(tl.int64)
    prev = tl.where(has_prev, prev, 9223372036854775807)
    n_max = tl.max(nvis, axis=0)
    for r in range(tl.min(start, axis=0), TOPK - 1):
        best = tl.full(nvis.shape, kmin, tl.int64)
        for base in range(0, n_max, W):
            col = base + s[None, :]
            vis = col < nvis[:, None]
            x = tl.load(row_ptr[:, None] + col, mask=vis, other=0.0)
            key = (ordered32(x).to(tl.int64) << 32) | (big - col).to(tl.int64)
            key = tl.where(vis & (key < prev[:, None]), key, kmin)
            best = tl.maximum(best, tl.max(key, axis=1))
        bid = (big - (best & 0xFFFFFFFF)).to(tl.int32)
        todo = r >= start  # rows whose ranks before r were decided by the lists
        ranked = tl.where((slots[None, :] == r) & todo[:, None], bid[:, None], ranked)
        prev = tl.where(todo, best, prev)
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
        ranked = _stream_exact(row_ptr, nvis, tl.zeros_like(nvis), ranked, slots, TOPK, W)
    elif n_max > 0:
        # -- 1. slot lists: stream the row once, W columns a chunk, U chunks a trip --
        v0 = tl.full([ROWS, W], neg_inf, tl.float32)
        v1 = v0
        v2 = v0
        v3 = v0
        v4 = v0
        v5 = v0
        i0 = tl.full([ROWS, W], big, tl.int32)
        i1 = i0
        i2 = i0
        i3 = i0
        i4 = i0
        i5 = i0
        nan_acc = tl.zeros([ROWS, W], tl.float32)  # NaN once any NaN was seen (max.NaN.f32)
        for base in range(0, n_max, W * U):
            for u in tl.static_range(U):
                col = base + u * W + s[None, :]
                vis = col < nvis[:, None]
                x = tl.load(row_ptr[:, None] + col, mask=vis, other=neg_inf)
                nan_acc = tl.maximum(nan_acc, x, propagate_nan=tl.PropagateNan.ALL)
                v0, i0, v1, i1, v2, i2, v3, i3, v4, i4, v5, i5 = _insert(
                    x, col, v0, i0, v1, i1, v2, i2, v3, i3, v4, i4, v5, i5, C
                )

        # -- 2. merge: k − 1 rounds of (best head, lowest id among equal heads, pop its slot);
        #       last_pop: the round each slot last popped, first_ninf: the first −inf round --
        last_pop = tl.full([ROWS, W], -1, tl.int32)
        first_ninf = tl.full([ROWS], TOPK - 1, tl.int32)
        for r in tl.static_range(TOPK - 1):
            m = tl.max(v0, axis=1)
            bid = tl.min(tl.where(v0 == m[:, None], i0, big), axis=1)
            ranked = tl.where(slots[None, :] == r, bid[:, None], ranked)
            first_ninf = tl.minimum(first_ninf, tl.where(m == neg_inf, r, TOPK - 1))
            # an empty list's stale id must not count as a pop (only −inf rounds pick one)
            hit = (i0 == bid[:, None]) & (m > neg_inf)[:, None]
            last_pop = tl.where(hit, r, last_pop)
            v0, i0, v1, i1, v2, i2, v3, i3, v4, i4, v5, i5 = _pop(
                hit, v0, i0, v1, i1, v2, i2, v3, i3, v4, i4, v5, i5, C
            )

        # -- 3. first undecided round: after a slot with > C blocks ran dry, at the first −inf
        #       head, or 0 if a NaN was seen; rows with one re-rank from there --
        dry = (v0 == neg_inf) & (s[None, :] + C * W < nvis[:, None])
        start = tl.minimum(first_ninf, tl.min(tl.where(dry, last_pop + 1, TOPK - 1), axis=1))
        has_nan = tl.max((nan_acc != nan_acc).to(tl.int32), axis=1) > 0
        start = tl.where(has_nan, 0, start)
        bad = (start < TOPK - 1) & ranks_row
        if tl.max(bad.to(tl.int32), axis=0) > 0:
            start = tl.where(bad, start, TOPK - 1)
            fixed = _stream_exact(row_ptr, tl.where(bad, nvis, 0), start, ranked, slots, TOPK, W)
            ranked = tl.where(bad[:, None], fixed, ranked)

    store_ranked(
        out_ptr, rows, row_ok, loc, ranked, slots, stride_og, stride_ot, stride_ok, G, TOPK
    )


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
