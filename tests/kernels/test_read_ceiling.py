"""benchmarks/bench_read_ceiling.py's read kernels sum exactly the bytes they claim to read
(under the Triton interpreter here, compiled on a GPU), against their torch references."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_read_ceiling.py"
_spec = importlib.util.spec_from_file_location("bench_read_ceiling", _PATH)
rc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rc)


def test_sum_pages_matches_gather_reference():
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(12, rc.TILE_ELEMS, generator=gen).to(torch.bfloat16).to(DEV)
    v = torch.randn(12, rc.TILE_ELEMS, generator=gen).to(torch.bfloat16).to(DEV)
    pages = torch.randint(0, 12, (3, 16), generator=gen, dtype=torch.int32).to(DEV)
    out = torch.full((3, 16), float("nan"), device=DEV)
    rc.sum_pages(k, v, pages, out)
    torch.testing.assert_close(out, rc.ref_sum_pages(k, v, pages), rtol=1e-4, atol=1e-1)


def test_sum_chunks_covers_each_programs_chunks():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6 * rc.CHUNK, generator=gen).to(torch.bfloat16).to(DEV)
    out = torch.full((6,), float("nan"), device=DEV)
    rc.sum_chunks(x, out, 3)  # 2 programs of 3 chunks each
    expect = x.float().view(2, -1).sum(1)
    torch.testing.assert_close(out[:2], expect, rtol=1e-4, atol=1e-1)
    assert out[2:].isnan().all(), "programs past the grid wrote"
