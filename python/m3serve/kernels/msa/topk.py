"""Exact, exp-free MSA block top-k (k = 16 over up to 8192 blocks per row) in Triton.

Three exact kernels share this launcher (``launch_topk_rows``; pick one with ``variant=`` or the
``M3SERVE_TOPK`` environment variable, default ``DEFAULT_VARIANT`` = "auto"):

- "auto" (the shipped default): a dispatch by shape to the fastest kernel measured on H200
  (torch 2.11, triton 3.6, ``scripts/gpu/topk_check.sh``; benchmarks/results/index_topk.md):
  "slots" at W = 64, C = 5, one warp when there are ≥ ``SLOTS_MIN_ROWS`` rows of ≤
  ``SLOTS_MAX_COLS`` blocks ([32768 × 1024]: 0.093 ms vs rounds 0.362 ms, torch.topk 0.967 ms),
  "rounds" otherwise — few rows leave SMs idle, and one warp streaming an 8192-block row is
  latency bound ([256 × 8192]: rounds 0.025 ms, slots ≥ 0.115 ms; [32 × 1024]: 0.0062 vs
  0.0087 ms). Every kernel is exact, so the dispatch changes speed, never the ids.
- "slots" (``topk_slots.py``): each row streams once through W per-slot sorted lists of depth C
  (float32 compares, one insertion per block), then k − 1 rounds over the W list heads; rows the
  lists cannot decide exactly (a slot ran dry, NaN, −inf ranking) are re-ranked by an exact
  streamed pass. Its docstring has the algorithm and the cost per block.
- "rounds" (below): *packed keys, then k − 1 rounds of (row max, knock out)*. Each block score s
  becomes one int64 key ``ordered(s) << 32 | (0x7FFFFFFF − id)`` (``topk_slots.ordered32``: signed
  integer order = the reference sort's float order, −0.0 == +0.0, NaN above +inf). One int64 max
  over the row gives the best score *and*, among equal scores, the lower block id; keys are unique,
  so the winner is knocked out exactly and the max repeats. Each row is read once into registers
  ([ROWS, BLOCK_N] tile). H200, [32768 × 1024]: 0.362 ms = 2.67× torch.topk.
- "filter": "rounds" after a bound — the (k−1)-th largest of 2k interleaved group maxima — and a
  compaction of the ~20 candidates (cumsum + scatter to scratch). Exact too, but on H200 it was
  slower (0.482 vs 0.362 ms on [32768 × 1024], 0.034 vs 0.025 ms on [256 × 8192]): the scans and the
  scatter cost more than the k − 1 register-resident max rounds they save.

Rules (DESIGN.md, "MSA — the exact math"; reference: ``reference.ref_topk_from_scores``):
row r ranks blocks 0 .. local[r] − 1 by score desc, id asc into slots 0 .. k − 2, slot k − 1 holds
local[r]; if local[r] + 1 ≤ k the row is 0 .. local[r] ascending then −1. NaN policy: the
reference's ``torch.sort`` ranks every NaN (either sign) above +inf, ties to the lower id, and
−0.0 ties +0.0; all variants follow it. Scores of blocks ≥ local are never read, so callers may
leave them unwritten.
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

from . import reference as ref
from .topk_slots import SlotsConfig, launch_topk_slots, ordered32, store_ranked

MAX_BLOCKS = 8192  # 1M tokens at block 128; a row of 8192 int64 keys still fits in registers
VARIANTS = ("auto", "slots", "rounds", "filter")
# the shipped default: "auto" dispatches by shape (pick_variant); M3SERVE_TOPK pins one variant
DEFAULT_VARIANT = os.environ.get("M3SERVE_TOPK", "auto")
# "auto" takes the slot lists for ≥ SLOTS_MIN_ROWS rows of ≤ SLOTS_MAX_COLS blocks (a prefill
# chunk's rows; one warp per row needs ~30 rows per SM to hide its load latency), the knock-out
# rounds otherwise. H200: slots 7.9× torch.topk on [32768 × 1024]; rounds won [256 × 8192] and
# [32 × 1024]. The bench times [4096 × 1024] and [8192 × 2048] to place the two edges.
SLOTS_MIN_ROWS = 4096
SLOTS_MAX_COLS = 2048
FILTER_DEFAULT = DEFAULT_VARIANT == "filter"  # kept for callers that read it
FILTER_CAP = 64  # candidates kept after the bound; more → that program ranks whole rows
# Opt-in (M3SERVE_TOPK_SHORT_BLOCKS=2048): "rounds" on rows wider than this (one row per
# program) first checks the row's local block, and a row with ≤ SHORT_BLOCKS visible blocks ranks
# a SHORT_BLOCKS-wide tile instead of the whole width (a decode graph's page table spans the
# context limit: 8192 blocks at 1M, most rows far shorter). Off by default: session 8 on H200
# (decode_rank.md, the same run side by side) it took the step of 128K rows in a 1M-wide table
# from 0.0692 to 0.0626 ms (B8, FP8 keys) but slowed 1M rows (B1 x 1M step 0.0612 → 0.0734 ms,
# B8 x 1M 0.2930 → 0.3025), and 1M contexts are what M3 is served for.
SHORT_BLOCKS = int(os.environ.get("M3SERVE_TOPK_SHORT_BLOCKS", "0"))
_FILTER_BROKEN: list[str] = []  # set if the filtered kernel ever fails to compile
_SLOTS_BROKEN: list[str] = []  # set if the slot-list kernel ever fails to compile
# slot-list launch shapes: prefill-sized batches (many rows: one warp per row, ~25-32 rows per SM;
# depth 4 because at depth 3 ~8 % of random 1023-block rows need the exact fallback, 0.3 % at 4:
# H200 0.122 vs 0.239 ms) and decode-sized ones (≤ 1024 rows, up to 8192 blocks each: eight warps
# share a row; only reached with variant="slots", "auto" takes rounds there). Second H200 run
# (restart fallback): depth 5 beat 4 on every many-row shape — [32768 × 1024] 0.093 vs 0.101 ms,
# [4096 × 1024] 0.016 vs 0.029, [8192 × 2048] 0.043 vs 0.075 — all exact.
SLOTS_MANY_ROWS = SlotsConfig(slots=64, depth=5, unroll=8, num_warps=1)
SLOTS_FEW_ROWS = SlotsConfig(slots=256, depth=4, unroll=4, num_warps=8)
SLOTS_INTERPRET = SlotsConfig(slots=64, depth=4, unroll=2, num_warps=1, rows=64)
# slot-list launch shapes the benchmark times beside the shipped ones and the GPU tests check (one
# list, so a GPU run compiles each once: Triton's disk cache): depth 3 vs 4 vs 5 / 6 (fewer fallback
# rows, more selects per block), W = 128 at one warp, and the few-rows shape
SLOTS_SWEEP = (
    SlotsConfig(slots=64, depth=3, unroll=8, num_warps=1),
    SlotsConfig(slots=64, depth=4, unroll=8, num_warps=1),
    SlotsConfig(slots=64, depth=4, unroll=16, num_warps=1),
    SlotsConfig(slots=64, depth=5, unroll=8, num_warps=1),
    SlotsConfig(slots=32, depth=6, unroll=16, num_warps=1),
    SlotsConfig(slots=128, depth=4, unroll=4, num_warps=1),
    SlotsConfig(slots=256, depth=4, unroll=4, num_warps=8),
)


def pick_variant(n_rows: int, n_cols: int) -> str:
    """The kernel "auto" runs for [n_rows × n_cols] (see SLOTS_MIN_ROWS)."""
    if n_rows >= SLOTS_MIN_ROWS and n_cols <= SLOTS_MAX_COLS:
        return "slots"
    return "rounds"


def _slots_env() -> SlotsConfig | None:
    """M3SERVE_TOPK_SLOTS="W,C,U,NW" overrides both GPU launch shapes (benchmark sweeps)."""
    spec = os.environ.get("M3SERVE_TOPK_SLOTS")
    if not spec:
        return None
    w, c, u, nw = (int(v) for v in spec.split(","))
    return SlotsConfig(slots=w, depth=c, unroll=u, num_warps=nw)


@triton.jit
def _packed_keys(s, ids):
    """float32 scores + int32 ids → int64 keys ordered by (score desc, id asc) under signed max."""
    return (ordered32(s).to(tl.int64) << 32) | (0x7FFFFFFF - ids).to(tl.int64)


@triton.jit
def _key_id(key):
    """The block id packed in a ``_packed_keys`` key (its low 32 bits)."""
    return (0x7FFFFFFF - (key & 0xFFFFFFFF)).to(tl.int32)


@triton.jit
def _max_knockout(keys, ranked, slots, TOPK: tl.constexpr):
    """TOPK − 1 rounds of (row max, knock the winner out) over [ROWS, N] int64 keys."""
    sentinel = -9223372036854775807 - 1
    for i in tl.static_range(TOPK - 1):
        best = tl.max(keys, axis=1)
        best_id = _key_id(best)
        ranked = tl.where(slots[None, :] == i, best_id[:, None], ranked)
        keys = tl.where(keys == best[:, None], sentinel, keys)
    return ranked


@triton.jit
def row_keys(
    scores_ptr, rows, row_ok, loc, n_cols, stride_sr,
    K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BYPASS_L1: tl.constexpr,
):  # fmt: skip
    """The visible earlier blocks of ``rows`` loaded once as packed keys [ROWS, GS, NG] (and the
    visibility mask). Column c = e * NG + g sits in group g = c % NG (interleaved, so ≥ k − 1
    groups hold a visible block whenever local ≥ k; the filter's bound needs that). NG = 2·K_PAD:
    a tighter bound (random rows keep ~20 of 1024 or 8192 blocks, at most ~30; NG = K_PAD keeps
    ~37, up to ~95). BYPASS_L1: load through L2 only (scores written by other programs of the
    same launch: the fused decode selection)."""
    NG: tl.constexpr = 2 * K_PAD
    GS: tl.constexpr = BLOCK_N // NG
    cols = tl.arange(0, GS)[None, :, None] * NG + tl.arange(0, NG)[None, None, :]
    visible = (cols < loc[:, None, None]) & (cols < n_cols) & row_ok[:, None, None]
    ptrs = scores_ptr + rows[:, None, None].to(tl.int64) * stride_sr + cols
    if BYPASS_L1:
        s = tl.load(ptrs, mask=visible, other=0.0, cache_modifier=".cg")
    else:
        s = tl.load(ptrs, mask=visible, other=0.0)
    sentinel = -9223372036854775807 - 1
    return tl.where(visible, _packed_keys(s, cols), sentinel), visible


@triton.jit
def rank_rows(
    scores_ptr, rows, row_ok, loc, n_cols, stride_sr,
    TOPK: tl.constexpr, K_PAD: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    BYPASS_L1: tl.constexpr,
):  # fmt: skip
    """The "rounds" ranking of whole rows → ranked ids [ROWS, K_PAD] (slots 0 .. k − 2; the
    caller's store_ranked adds the local block and the dense case)."""
    keys, _ = row_keys(scores_ptr, rows, row_ok, loc, n_cols, stride_sr, K_PAD, BLOCK_N, BYPASS_L1)
    ranked = tl.full([ROWS, K_PAD], -1, tl.int32)
    slots = tl.arange(0, K_PAD)
    return _max_knockout(tl.reshape(keys, [ROWS, BLOCK_N]), ranked, slots, TOPK)


def rounds_tile(n_cols: int, topk: int) -> tuple[int, int, int]:
    """(K_PAD, BLOCK_N, rows per tile) of the "rounds" ranking for rows of ``n_cols`` blocks."""
    k_pad = max(2, triton.next_power_of_2(topk))
    block_n = max(16, 2 * k_pad, triton.next_power_of_2(max(n_cols, 1)))
    # rows of ≥ 2048 blocks take one per tile: the [2, 2048] tile ranked every row of
    # [8192 × 2048] wrong on an H200 with Triton 3.6 (benchmarks/results/index_topk.md,
    # 2026-11-26), while [1, N] tiles (N ≤ 8192) and [4, 1024] were exact on every shape measured
    rows = 1 if block_n >= 2048 else max(1, min(16, 4096 // block_n))
    return k_pad, block_n, rows


@triton.jit
def _topk_rows_kernel(
    scores_ptr,  # [R, >= n_cols] float32, row stride stride_sr
    local_ptr,  # [R] int32: local block of each row
    out_ptr,  # row r → out[r % G, r // G, :]
    scratch_ptr,  # [programs * ROWS, CAP] int64 candidate scratch (FILTER only)
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
    BLOCK_N: tl.constexpr,
    CAP: tl.constexpr,
    FILTER: tl.constexpr,
    SHORT_N: tl.constexpr,  # > 0: rows whose visible blocks fit SHORT_N rank a SHORT_N-wide tile
):
    # -- rows of this program and their local block --
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    loc = tl.load(local_ptr + rows, mask=row_ok, other=0)
    slots = tl.arange(0, K_PAD)
    ranked = tl.full([ROWS, K_PAD], -1, tl.int32)
    if SHORT_N > 0 and not FILTER:
        # a row far shorter than the grid's width (a CUDA graph spans the context limit): the
        # rounds over a SHORT_N-wide tile instead of the whole width, the same ids
        if tl.max(tl.where(row_ok, loc, 0), 0) <= SHORT_N:
            ranked = rank_rows(
                scores_ptr, rows, row_ok, loc, n_cols, stride_sr, TOPK, K_PAD, ROWS, SHORT_N,
                False,
            )  # fmt: skip
        else:
            ranked = rank_rows(
                scores_ptr, rows, row_ok, loc, n_cols, stride_sr, TOPK, K_PAD, ROWS, BLOCK_N,
                False,
            )  # fmt: skip
        store_ranked(
            out_ptr, rows, row_ok, loc, ranked, slots, stride_og, stride_ot, stride_ok, G, TOPK
        )
        return
    keys, visible = row_keys(
        scores_ptr, rows, row_ok, loc, n_cols, stride_sr, K_PAD, BLOCK_N, False
    )
    sentinel = -9223372036854775807 - 1

    if FILTER:
        # -- bound: the (k−1)-th largest group max is ≤ the (k−1)-th largest key, so only keys
        #    ≥ it can rank; on random or recency-shaped rows that leaves ~20–40 candidates --
        gmax = tl.max(keys, axis=1)  # [ROWS, NG]
        for _i in tl.static_range(TOPK - 2):
            gbest = tl.max(gmax, axis=1)
            gmax = tl.where(gmax == gbest[:, None], sentinel, gmax)
        bound = tl.max(gmax, axis=1)  # [ROWS]
        cand = visible & (keys >= bound[:, None, None])
        # -- compact the candidates: position = group offset + rank inside the group --
        c32 = cand.to(tl.int32)
        in_group = tl.cumsum(c32, axis=1) - c32
        per_group = tl.sum(c32, axis=1)  # [ROWS, NG]
        group_off = tl.cumsum(per_group, axis=1) - per_group
        pos = group_off[:, None, :] + in_group
        total = tl.sum(per_group, axis=1)  # [ROWS]
        if tl.max(total, axis=0) <= CAP:
            srow = scratch_ptr + rows.to(tl.int64) * CAP
            tl.store(srow[:, None, None] + pos, keys, mask=cand)
            tl.debug_barrier()
            c = tl.arange(0, CAP)
            small = tl.load(
                srow[:, None] + c[None, :],
                mask=(c[None, :] < total[:, None]) & row_ok[:, None],
                other=sentinel,
            )
            ranked = _max_knockout(small, ranked, slots, TOPK)
        else:  # adversarial rows (many near-equal candidates): rank the whole row
            ranked = _max_knockout(tl.reshape(keys, [ROWS, BLOCK_N]), ranked, slots, TOPK)
    else:
        ranked = _max_knockout(tl.reshape(keys, [ROWS, BLOCK_N]), ranked, slots, TOPK)
    store_ranked(
        out_ptr, rows, row_ok, loc, ranked, slots, stride_og, stride_ot, stride_ok, G, TOPK
    )


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """Triton on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests)."""
    return t.is_cuda or _interpreting()


def launch_topk_rows(
    scores: torch.Tensor,
    local: torch.Tensor,
    out: torch.Tensor,
    topk: int,
    groups: int,
    n_cols: int | None = None,
    filter: bool | None = None,
    variant: str | None = None,
    slots_cfg: SlotsConfig | None = None,
) -> torch.Tensor:
    """Top-k of rows r of ``scores`` into ``out[r % groups, r // groups]`` (``out`` is [G, T, k]).

    ``variant``: "auto", "slots", "rounds" or "filter" (default ``DEFAULT_VARIANT``; ``filter=True``
    is the old spelling of "filter"); "auto" picks by shape (``pick_variant``); ``slots_cfg``
    overrides the slot-list launch shape. Graph-safe: the kernel, grid and constexprs depend only
    on shapes.
    """
    assert scores.dim() == 2 and scores.dtype == torch.float32, (
        f"scores must be [R, nb] float32, got {tuple(scores.shape)} {scores.dtype}"
    )
    assert scores.stride(1) == 1, "scores rows must be contiguous (stride(1) == 1)"
    assert local.dim() == 1 and local.shape[0] == scores.shape[0], (
        f"local must be [R] with R = {scores.shape[0]}, got {tuple(local.shape)}"
    )
    assert local.dtype == torch.int32 and local.is_contiguous(), "local must be contiguous int32"
    assert out.dim() == 3 and out.dtype == torch.int32, "out must be [G, T, k] int32"
    assert out.shape[0] == groups and out.shape[2] == topk, (
        f"out shape {tuple(out.shape)} does not match G={groups}, k={topk}"
    )
    assert out.shape[0] * out.shape[1] >= scores.shape[0], "out has fewer rows than scores"
    assert 1 <= topk <= 64, f"topk must be in 1..64, got {topk}"
    n_rows, width = scores.shape
    n_cols = width if n_cols is None else min(n_cols, width)
    assert n_cols <= MAX_BLOCKS, f"{n_cols} blocks per row > {MAX_BLOCKS} (1M tokens)"
    if variant is None:
        variant = "filter" if filter else DEFAULT_VARIANT
    assert variant in VARIANTS, f"top-k variant must be one of {VARIANTS}, got {variant!r}"
    if n_rows == 0:
        return out
    if variant == "auto":
        variant = pick_variant(n_rows, n_cols)
    if variant == "slots" and not _SLOTS_BROKEN:
        if slots_cfg is None:
            if _interpreting():  # programs run one after another there: several rows each
                slots_cfg = SLOTS_INTERPRET
            else:
                slots_cfg = _slots_env() or (SLOTS_FEW_ROWS if n_rows <= 1024 else SLOTS_MANY_ROWS)
        try:
            return launch_topk_slots(scores, local, out, topk, groups, n_cols, slots_cfg)
        except Exception as e:  # compile/resource failure on a Triton we have not run: stay exact
            if _interpreting():
                raise
            _SLOTS_BROKEN.append(repr(e))
            warnings.warn(f"slot-list top-k failed to compile, using rounds: {e}", stacklevel=2)
    k_pad, block_n, rows = rounds_tile(n_cols, topk)
    if n_rows <= 1024:  # decode-sized batches: one row per program spreads them over more SMs
        rows = 1
    if _interpreting():  # programs run one after another there: fewer, wider ones are faster
        rows = max(1, min(256, 65536 // block_n))
    num_warps = 4 if rows * block_n <= 2048 else 8
    programs = triton.cdiv(n_rows, rows)
    use_filter = variant == "filter" and topk >= 3 and not _FILTER_BROKEN  # bound needs k − 2 ≥ 1

    def launch(use_filter: bool) -> None:
        scratch = torch.empty(
            (programs * rows, FILTER_CAP) if use_filter else (1,),
            dtype=torch.int64,
            device=out.device,
        )
        _topk_rows_kernel[(programs,)](
            scores,
            local,
            out,
            scratch,
            n_rows,
            n_cols,
            scores.stride(0),
            out.stride(0),
            out.stride(1),
            out.stride(2),
            G=groups,
            TOPK=topk,
            K_PAD=k_pad,
            ROWS=rows,
            BLOCK_N=block_n,
            CAP=FILTER_CAP,
            FILTER=use_filter,
            # (one row per program on GPUs: see rounds_tile; the interpreter tiles several)
            SHORT_N=SHORT_BLOCKS
            if block_n > SHORT_BLOCKS and (rows == 1 or _interpreting())
            else 0,
            num_warps=num_warps,
        )

    if not use_filter:
        launch(False)
        return out
    try:
        launch(True)
    except Exception as e:  # compile/resource failure on a Triton we have not run: stay exact
        _FILTER_BROKEN.append(repr(e))
        warnings.warn(f"filtered top-k failed to compile, ranking whole rows: {e}", stacklevel=2)
        launch(False)
    return out


def topk_blocks(scores: torch.Tensor, local: torch.Tensor, topk: int) -> torch.Tensor:
    """MSA top-k of block scores [R, nb] (float32) with local blocks [R] → [R, topk] int32.

    Exact: ranks by score desc then block id asc, local block last, −1 padding, dense when
    local + 1 ≤ topk. CPU tensors without TRITON_INTERPRET use the torch reference.
    """
    if not use_triton(scores):
        return ref.ref_topk_from_scores(scores.float(), local, topk)
    scores = scores.float()
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    local = local.to(torch.int32).contiguous()
    out = torch.empty(1, scores.shape[0], topk, dtype=torch.int32, device=scores.device)
    launch_topk_rows(scores, local, out, topk, groups=1)
    return out[0]
