"""Exact exp-free MSA top-k (packed int64 keys) vs ``reference.ref_topk_from_scores``.

The kernel ranks exactly, so results must be equal bit for bit: random rows of many widths
(16 → 8192 blocks), every local position including ≤ k visible, negative scores, ±0, ties and
all-equal rows (ties to the lower id). CPU runs the Triton kernel under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before the kernels are imported: triton.jit reads it then
    os.environ.setdefault("TRITON_INTERPRET", "1")

from m3serve.kernels.msa import reference as ref
from m3serve.kernels.msa import topk as topk_mod
from m3serve.kernels.msa.topk import launch_topk_rows, topk_blocks

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    ("rows", "width", "topk"),
    [(37, 1, 16), (40, 33, 16), (9, 333, 16), (5, 1111, 4), (3, 1100, 16)],
)
def test_random_rows_equal_reference(rows, width, topk):
    gen = torch.Generator().manual_seed(rows * width + topk)
    scores = torch.randn(rows, width, generator=gen) * 5
    local = torch.randint(0, width, (rows,), generator=gen)
    local[0] = width - 1
    local[-1] = min(topk - 1, width - 1)  # exactly k visible: dense
    got = topk_blocks(scores.to(DEV), local.to(DEV), topk).cpu()
    assert torch.equal(got, ref.ref_topk_from_scores(scores, local, topk))


@pytest.mark.parametrize(("rows", "width"), [(40, 33), (9, 1111)])
def test_filtered_variant_random_rows(rows, width):
    # the optional bound + compaction path (FILTER) must be exact too
    gen = torch.Generator().manual_seed(rows + width)
    scores = torch.randn(rows, width, generator=gen)
    local = torch.randint(0, width, (rows,), generator=gen)
    out = torch.full((1, rows, 16), 12345, dtype=torch.int32, device=DEV)
    launch_topk_rows(scores.to(DEV), local.int().to(DEV), out, 16, 1, filter=True)
    assert torch.equal(out[0].cpu(), ref.ref_topk_from_scores(scores, local, 16))


def test_ties_signed_zero_and_all_equal():
    scores = torch.tensor(
        [
            [1.0, -0.0, 0.0, 1.0, -2.0, 1.0, -1.0, 0.5, 1.0, 3.0],
            [7.0] * 10,
            [-3.0, -1.0, -2.0, -1.0, -5.0, -4.0, -1.0, -9.0, -0.5, 0.0],
        ]
    )
    local = torch.tensor([9, 9, 8])
    got = topk_blocks(scores.to(DEV), local.to(DEV), 5).cpu()
    # float order puts -0.0 == 0.0: the reference's stable sort keeps the lower id first
    assert got[0].tolist() == [0, 3, 5, 8, 9]
    assert got[1].tolist() == [0, 1, 2, 3, 9]
    assert got[2].tolist() == [1, 3, 6, 2, 8]
    assert torch.equal(got, ref.ref_topk_from_scores(scores, local, 5))


@pytest.mark.parametrize("filtered", [True, False])
def test_bound_fallback_and_unfiltered_path(filtered):
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
    launch_topk_rows(scores.to(DEV), local.int().to(DEV), out, topk, 1, filter=filtered)
    assert torch.equal(out[0].cpu(), ref.ref_topk_from_scores(scores, local, topk))


def test_grouped_output_layout():
    # row r = t * G + g lands in out[g, t]: the layout select_blocks_* hands to the top-k
    gen = torch.Generator().manual_seed(2)
    groups, tokens, width, topk = 4, 6, 50, 16
    scores = torch.randn(groups * tokens, width, generator=gen)
    local = torch.randint(0, width, (groups * tokens,), generator=gen).to(torch.int32)
    out = torch.full((groups, tokens, topk), 12345, dtype=torch.int32)
    launch_topk_rows(scores.to(DEV), local.to(DEV), out := out.to(DEV), topk, groups)
    expect = ref.ref_topk_from_scores(scores, local, topk).view(tokens, groups, topk)
    assert torch.equal(out.cpu(), expect.transpose(0, 1))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(("rows", "width"), [(4096, 1024), (64, 8192), (300, 257)])
def test_gpu_large_rows_poisoned(rows, width):
    gen = torch.Generator().manual_seed(width)
    scores = torch.randn(rows, width, generator=gen)
    scores[::7] = scores[::7].round()  # many exact ties
    local = torch.randint(0, width, (rows,), generator=gen)
    expect = ref.ref_topk_from_scores(scores[:512], local[:512], 16)
    for filtered in (True, False):
        out = torch.full((1, rows, 16), 12345, dtype=torch.int32, device="cuda")
        launch_topk_rows(scores.cuda(), local.int().cuda(), out, 16, 1, filter=filtered)
        assert torch.equal(out[0, :512].cpu(), expect)
        assert (out != 12345).all()
    assert topk_mod.FILTER_DEFAULT is False  # the measured-faster path is the default
