"""Exact exp-free MSA top-k (every variant: slot lists, int64 knock-out rounds, filtered) vs
``reference.ref_topk_from_scores``.

The kernels rank exactly, so results must be equal bit for bit: random rows of many widths
(1 → 8192 blocks), every local position including ≤ k visible, negative scores, ±0, ties,
all-equal rows (ties to the lower id), NaN (either sign: above +inf, as torch.sort ranks it) and
±inf, and rows built to defeat each shortcut (a slot list running dry, the group-max bound).
CPU runs the Triton kernels under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before the kernels are imported: triton.jit reads it then
    os.environ.setdefault("TRITON_INTERPRET", "1")

from m3serve.kernels.msa import reference as ref
from m3serve.kernels.msa import topk as topk_mod
from m3serve.kernels.msa.topk import VARIANTS, launch_topk_rows, topk_blocks
from m3serve.kernels.msa.topk_slots import SlotsConfig, launch_topk_slots

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def run(scores, local, topk, groups=1, **kw):
    """launch_topk_rows into a poisoned [1, R, k] output (catches unwritten slots)."""
    out = torch.full((groups, -(-scores.shape[0] // groups), topk), 12345, dtype=torch.int32)
    out = out.to(DEV)
    launch_topk_rows(scores.to(DEV), local.int().to(DEV), out, topk, groups, **kw)
    return out.cpu()


@pytest.mark.parametrize("variant", ["slots", "rounds"])
@pytest.mark.parametrize(
    ("rows", "width", "topk"),
    [(37, 1, 16), (40, 33, 16), (9, 333, 16), (5, 1111, 4), (3, 1100, 16), (70, 129, 8)],
)
def test_random_rows_equal_reference(rows, width, topk, variant):
    gen = torch.Generator().manual_seed(rows * width + topk)
    scores = torch.randn(rows, width, generator=gen) * 5
    local = torch.randint(0, width, (rows,), generator=gen)
    local[0] = width - 1
    local[-1] = min(topk - 1, width - 1)  # exactly k visible: dense
    local[1 % rows] = min(topk, width - 1)  # k + 1 visible: the first ranked row
    got = run(scores, local, topk, variant=variant)[0]
    assert torch.equal(got, ref.ref_topk_from_scores(scores, local, topk))


def test_topk_blocks_entry_point():
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(6, 200, generator=gen)
    local = torch.tensor([199, 3, 15, 16, 100, 0])
    got = topk_blocks(scores.to(DEV), local.to(DEV), 16).cpu()
    assert torch.equal(got, ref.ref_topk_from_scores(scores, local, 16))


# slot-list launch shapes: tiny W / depth 2 make lists run dry often (the exact fallback, from the
# first undecided rank), wide W with several rows per program, every depth 2 .. 6, and the GPU
# default's W / C with one row per program
SLOT_CONFIGS = [
    SlotsConfig(slots=16, depth=2, unroll=1, rows=8),
    SlotsConfig(slots=32, depth=4, unroll=3, rows=4),
    SlotsConfig(slots=64, depth=4, unroll=2, rows=1),
    SlotsConfig(slots=128, depth=3, unroll=1, rows=2),
    SlotsConfig(slots=64, depth=5, unroll=1, rows=8),
    SlotsConfig(slots=32, depth=6, unroll=2, rows=8),
]


def _hard_rows(width: int, gen: torch.Generator) -> torch.Tensor:
    """Rows that defeat the shortcuts: all best blocks in one slot (period 16 / 32 / 64), ramps
    (the best blocks are the newest), rounded scores (many exact ties), all equal, ±0 only."""
    ar = torch.arange(width)
    rows = []
    for period in (16, 32, 64):
        rows.append(
            torch.where(ar % period == 5, 3.0, 0.0) + torch.randn(width, generator=gen) * 1e-3
        )
        rows.append(torch.where(ar % period == 7, 1.0, 0.0))  # exact ties inside one slot
    ramp = ar.float()
    zeros = torch.zeros(width)
    zeros[1::3] = -0.0
    rows += [
        ramp,
        -ramp,
        (torch.randn(width, generator=gen) * 3).round(),
        torch.full((width,), 0.5),
    ]
    rows += [zeros, torch.randn(width, generator=gen)]
    return torch.stack(rows)


@pytest.mark.parametrize("cfg", SLOT_CONFIGS, ids=lambda c: f"W{c.slots}C{c.depth}R{c.rows}")
def test_slot_configs_hard_rows(cfg):
    width = 300 if cfg.slots < 128 else 1111
    gen = torch.Generator().manual_seed(width + cfg.slots)
    scores = torch.cat([_hard_rows(width, gen), torch.randn(12, width, generator=gen)])
    local = torch.randint(17, width, (scores.shape[0],), generator=gen)
    local[: len(local) // 2] = width - 1
    for topk in (16, 5):
        out = torch.full((1, scores.shape[0], topk), 12345, dtype=torch.int32, device=DEV)
        launch_topk_slots(scores.to(DEV), local.int().to(DEV), out, topk, 1, width, cfg)
        assert torch.equal(out[0].cpu(), ref.ref_topk_from_scores(scores, local, topk))


@pytest.mark.parametrize("cfg", SLOT_CONFIGS, ids=lambda c: f"W{c.slots}C{c.depth}R{c.rows}")
def test_slots_fallback_starts_at_the_first_undecided_rank(cfg):
    # C·W + 2 visible blocks: slots 0 and 1 hold C + 1, the others C. Slot 0's are finite (its
    # list runs dry after C pops: rank C is undecided), slot 1 has one finite block (the lists
    # would rank it C-th), the rest are −inf: round C + 1 finds only −inf heads and picks an empty
    # list's stale id, which must not move the restart later. Then random rows.
    w, c = cfg.slots, cfg.depth
    width = max(300, (c + 1) * w + 2)
    row = torch.full((width,), float("-inf"))
    row[torch.arange(c + 1) * w] = torch.arange(c + 1, 0, -1).float() + 10.0
    row[c * w + 1] = 1.0
    gen = torch.Generator().manual_seed(w * c)
    scores = torch.cat([row[None], torch.randn(7, width, generator=gen)])
    local = torch.full((scores.shape[0],), width - 1)
    local[0] = c * w + 2
    out = torch.full((1, scores.shape[0], 16), 12345, dtype=torch.int32, device=DEV)
    launch_topk_slots(scores.to(DEV), local.int().to(DEV), out, 16, 1, width, cfg)
    expect = ref.ref_topk_from_scores(scores, local, 16)
    assert expect[0, : c + 2].tolist() == [*(i * w for i in range(c + 1)), c * w + 1]
    assert torch.equal(out[0].cpu(), expect)


def test_auto_dispatch_by_shape(monkeypatch):
    # "auto" runs the slot lists on many narrow rows and the knock-out rounds otherwise; both exact
    assert topk_mod.pick_variant(32768, 1024) == "slots"
    assert topk_mod.pick_variant(256, 8192) == "rounds"
    assert topk_mod.pick_variant(32, 1024) == "rounds"
    assert topk_mod.pick_variant(topk_mod.SLOTS_MIN_ROWS, topk_mod.SLOTS_MAX_COLS + 1) == "rounds"
    calls = []

    def counting(*a, **kw):
        calls.append(a[0].shape)
        return launch_topk_slots(*a, **kw)

    monkeypatch.setattr(topk_mod, "launch_topk_slots", counting)
    gen = torch.Generator().manual_seed(11)
    scores = torch.randn(40, 300, generator=gen)
    scores[::3] = scores[::3].round()
    local = torch.randint(0, 300, (40,), generator=gen)
    expect = ref.ref_topk_from_scores(scores, local, 16)
    assert torch.equal(run(scores, local, 16, variant="auto")[0], expect)
    assert calls == []  # 40 rows: rounds
    monkeypatch.setattr(topk_mod, "SLOTS_MIN_ROWS", 32)
    assert torch.equal(run(scores, local, 16, variant="auto")[0], expect)
    assert calls == [scores.shape]  # ≥ 32 rows of ≤ 2048 blocks: slots
    assert torch.equal(run(scores, local, 16, variant="auto", n_cols=300)[0], expect)
    monkeypatch.setattr(topk_mod, "SLOTS_MAX_COLS", 299)
    assert torch.equal(run(scores, local, 16, variant="auto")[0], expect)
    assert len(calls) == 2  # 300 blocks > 299: rounds again


def test_slots_exact_fallback_alone():
    # the streamed fallback ranks every row when forced: random, tied, ±0 and NaN rows
    gen = torch.Generator().manual_seed(3)
    width = 260
    scores = torch.cat([_hard_rows(width, gen), torch.randn(8, width, generator=gen)])
    scores[-1, 17] = float("nan")
    local = torch.randint(0, width, (scores.shape[0],), generator=gen)
    local[0] = width - 1
    out = torch.full((1, scores.shape[0], 16), 12345, dtype=torch.int32, device=DEV)
    cfg = SlotsConfig(slots=64, depth=4, unroll=1, rows=4)
    launch_topk_slots(
        scores.to(DEV), local.int().to(DEV), out, 16, 1, width, cfg, force_stream=True
    )
    assert torch.equal(out[0].cpu(), ref.ref_topk_from_scores(scores, local, 16))


@pytest.mark.parametrize("variant", VARIANTS)
def test_nan_and_inf_follow_the_reference_sort(variant):
    # torch.sort ranks NaN (either sign) above +inf, ties to the lower id; −inf blocks rank last
    gen = torch.Generator().manual_seed(4)
    width = 200
    nan = float("nan")
    neg_nan = torch.tensor(-0x400000, dtype=torch.int32).view(torch.float32).item()  # 0xFFC00000
    scores = torch.randn(6, width, generator=gen)
    scores[0, [3, 50, 120]] = nan
    scores[0, [9, 77]] = neg_nan
    scores[1, [4, 5, 150]] = float("inf")
    scores[1, 160] = nan
    scores[2, :] = float("-inf")
    scores[2, [10, 90]] = 1.0
    scores[3, ::2] = float("-inf")
    scores[4, :] = nan
    scores[5, 1::2] = float("inf")
    scores[5, 0::2] = float("-inf")
    local = torch.tensor([199, 199, 150, 40, 30, 199])
    got = run(scores, local, 16, variant=variant)[0]
    expect = ref.ref_topk_from_scores(scores, local, 16)
    assert got[0, :5].tolist() == [3, 9, 50, 77, 120]  # the policy, spelled out
    assert torch.equal(got, expect)


def test_every_row_length_1_to_300():
    # local 0 .. 299 on one width: dense (≤ k), k + 1 visible, then longer rows, ties mixed in
    gen = torch.Generator().manual_seed(6)
    width = 300
    scores = torch.randn(width, width, generator=gen)
    scores[::4] = scores[::4].round()
    local = torch.arange(width)
    for variant in ("slots", "rounds"):
        got = run(scores, local, 16, variant=variant)[0]
        assert torch.equal(got, ref.ref_topk_from_scores(scores, local, 16)), variant


def test_rows_of_8192_blocks():
    gen = torch.Generator().manual_seed(8)
    width = 8192
    scores = torch.randn(3, width, generator=gen)
    scores[1] = scores[1].round()
    scores[2, -64:] = 50.0  # the newest blocks best, all tied
    local = torch.tensor([8191, 8000, 8191])
    got = run(scores, local, 16, variant="slots")[0]
    assert torch.equal(got, ref.ref_topk_from_scores(scores, local, 16))


@pytest.mark.parametrize("short_blocks", [2048, 0])
@pytest.mark.parametrize("short_rows", [True, False])
def test_rounds_short_rows_in_a_wide_table(short_rows, short_blocks, monkeypatch):
    """Rows in an 8192-block-wide table (a decode graph's page table at the 1M limit): with the
    opt-in short-row path, a program whose rows all fit SHORT_BLOCKS ranks a narrower tile, rows
    past it the whole width; off, every row the whole width. Scores at or past each row's local
    block are NaN poison (ranked above +inf if ever read)."""
    monkeypatch.setattr(topk_mod, "SHORT_BLOCKS", short_blocks)
    gen = torch.Generator().manual_seed(9 + short_rows)
    width, rows = 8192, 8
    scores = torch.randn(rows, width, generator=gen)
    scores[::2] = scores[::2].round()  # ties
    if short_rows:
        local = torch.tensor([16, 17, 100, 2000, 2047, 2048, 5, 1500])
    else:
        local = torch.tensor([2049, 8191, 100, 4000, 2048, 7000, 3000, 17])
    cols = torch.arange(width)
    scores[cols[None, :] >= local[:, None]] = float("nan")
    got = run(scores, local, 16, variant="rounds")[0]
    assert torch.equal(got, ref.ref_topk_from_scores(scores, local, 16))


def test_default_variant_is_known():
    assert topk_mod.DEFAULT_VARIANT in VARIANTS
    with pytest.raises(AssertionError, match="variant"):
        run(torch.zeros(2, 20), torch.tensor([19, 19]), 16, variant="nope")


@pytest.mark.parametrize(("rows", "width"), [(40, 33), (9, 1111)])
def test_filtered_variant_random_rows(rows, width):
    # the optional bound + compaction path (FILTER) must be exact too
    gen = torch.Generator().manual_seed(rows + width)
    scores = torch.randn(rows, width, generator=gen)
    local = torch.randint(0, width, (rows,), generator=gen)
    out = torch.full((1, rows, 16), 12345, dtype=torch.int32, device=DEV)
    launch_topk_rows(scores.to(DEV), local.int().to(DEV), out, 16, 1, filter=True)
    assert torch.equal(out[0].cpu(), ref.ref_topk_from_scores(scores, local, 16))


@pytest.mark.parametrize("variant", VARIANTS)
def test_ties_signed_zero_and_all_equal(variant):
    scores = torch.tensor(
        [
            [1.0, -0.0, 0.0, 1.0, -2.0, 1.0, -1.0, 0.5, 1.0, 3.0],
            [7.0] * 10,
            [-3.0, -1.0, -2.0, -1.0, -5.0, -4.0, -1.0, -9.0, -0.5, 0.0],
        ]
    )
    local = torch.tensor([9, 9, 8])
    got = run(scores, local, 5, variant=variant)[0]
    # float order puts -0.0 == 0.0: the reference's stable sort keeps the lower id first
    assert got[0].tolist() == [0, 3, 5, 8, 9]
    assert got[1].tolist() == [0, 1, 2, 3, 9]
    assert got[2].tolist() == [1, 3, 6, 2, 8]
    assert torch.equal(got, ref.ref_topk_from_scores(scores, local, 5))


@pytest.mark.parametrize("variant", VARIANTS)
def test_bound_fallback_and_unfiltered_path(variant):
    # rows built to defeat the group-max bound (many candidates ≥ it → whole-row ranking), rows
    # it prunes well, and -0.0 / +0.0 ties; both kernel paths must equal the reference exactly
    gen = torch.Generator().manual_seed(9)
    width, topk = 300, 16
    periodic = (
        torch.where(torch.arange(width) % 16 == 3, 5.0, 0.0)
        + torch.randn(width, generator=gen) * 1e-3
    )
    ramp = torch.arange(width, dtype=torch.float32)
    zeros = torch.zeros(width)
    zeros[1::2] = -0.0
    equal = torch.full((width,), 0.25)  # every block a candidate: > CAP → whole-row ranking
    rows = [periodic, ramp, -ramp, zeros, torch.randn(width, generator=gen), equal]
    scores = torch.stack(rows)
    local = torch.tensor([299, 250, 299, 100, 40, 200])
    out = torch.full((1, len(rows), topk), 12345, dtype=torch.int32, device=DEV)
    launch_topk_rows(scores.to(DEV), local.int().to(DEV), out, topk, 1, variant=variant)
    assert torch.equal(out[0].cpu(), ref.ref_topk_from_scores(scores, local, topk))


@pytest.mark.parametrize("variant", ["slots", "rounds"])
def test_grouped_output_layout(variant):
    # row r = t * G + g lands in out[g, t]: the layout select_blocks_* hands to the top-k
    gen = torch.Generator().manual_seed(2)
    groups, tokens, width, topk = 4, 6, 50, 16
    scores = torch.randn(groups * tokens, width, generator=gen)
    local = torch.randint(0, width, (groups * tokens,), generator=gen).to(torch.int32)
    out = torch.full((groups, tokens, topk), 12345, dtype=torch.int32)
    launch_topk_rows(
        scores.to(DEV), local.to(DEV), out := out.to(DEV), topk, groups, variant=variant
    )
    expect = ref.ref_topk_from_scores(scores, local, topk).view(tokens, groups, topk)
    assert torch.equal(out.cpu(), expect.transpose(0, 1))


GPU_SLOT_CONFIGS = [None, *topk_mod.SLOTS_SWEEP]  # None: the launcher's own choice for the shape


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("rows", "width"), [(4096, 1024), (64, 8192), (300, 257), (2048, 4099), (2048, 2048)]
)
def test_gpu_large_rows_poisoned(rows, width):
    """(2048, 2048): > 1024 rows of 2048 blocks, where "rounds" once tiled two rows per program
    and ranked every row wrong on an H200 (Triton 3.6)."""
    gen = torch.Generator().manual_seed(width)
    scores = torch.randn(rows, width, generator=gen)
    scores[::7] = scores[::7].round()  # many exact ties
    scores[1::7] = _hard_rows(width, gen).repeat(rows, 1)[: len(range(1, rows, 7))]
    scores[3, 5] = float("nan")
    local = torch.randint(0, width, (rows,), generator=gen)
    # the first rows (the hard and NaN ones among them) and 256 random later ones, if any
    check = torch.arange(min(rows, 256))
    if rows > 256:
        check = torch.cat([check, torch.randint(256, rows, (256,), generator=gen)])
    expect = ref.ref_topk_from_scores(scores[check], local[check], 16)
    runs = [dict(variant=v) for v in VARIANTS] + [
        dict(variant="slots", slots_cfg=c) for c in GPU_SLOT_CONFIGS[1:]
    ]
    for kw in runs:
        out = torch.full((1, rows, 16), 12345, dtype=torch.int32, device="cuda")
        launch_topk_rows(scores.cuda(), local.int().cuda(), out, 16, 1, **kw)
        assert torch.equal(out[0, check].cpu(), expect), kw
        assert (out != 12345).all(), kw


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    "cfg", GPU_SLOT_CONFIGS[1:], ids=lambda c: f"W{c.slots}C{c.depth}U{c.unroll}NW{c.num_warps}"
)
def test_gpu_slots_fallback_rows_and_graph(cfg):
    # every row hard (fallback-heavy), then a CUDA-graph replay equals the eager launch
    gen = torch.Generator().manual_seed(cfg.slots)
    width = 1500
    hard = _hard_rows(width, gen)
    scores = torch.cat([hard.repeat(20, 1), torch.randn(500, width, generator=gen)]).cuda()
    local = torch.randint(16, width, (scores.shape[0],), generator=gen).int().cuda()
    expect = ref.ref_topk_from_scores(scores.cpu(), local.cpu(), 16)
    out = torch.full((1, scores.shape[0], 16), 12345, dtype=torch.int32, device="cuda")
    launch_topk_rows(scores, local, out, 16, 1, variant="slots", slots_cfg=cfg)
    assert torch.equal(out[0].cpu(), expect)
    out.fill_(12345)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launch_topk_rows(scores, local, out, 16, 1, variant="slots", slots_cfg=cfg)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out[0].cpu(), expect)
    assert not topk_mod._SLOTS_BROKEN
