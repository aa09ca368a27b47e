"""How much of the HBM copy peak can *any* kernel reach reading N bytes, timed as the decode
attention is (issue 6: "the sparse-attention part ≥ 70 % of HBM bandwidth from batch 8 up").

At batch 8 × 128K the sparse attention reads 33.8 MB (32 rows × 16 selected pages × K + V of 32
KB each); its best kernel takes 17.0 µs on H200 = 47 % of the copy peak (decode_split_sweep.md).
This benchmark asks what a kernel that does nothing but read those bytes reaches, timed the same
way (bench_sparse_decode.graph_cycle_ms: 16 calls in one CUDA graph cycling 8 input sets, L2
cleared before every replay, ms per call), so the attention's number can be read against the
ceiling of its size rather than against a 1 GiB copy.

Kernels (Triton, each program sums its tiles into one float32, so the reads cannot be dropped):

- ``contiguous``: the bytes as one array, one program per 64 KB chunk (one page's K + V for one
  KV head, as a decode split reads it);
- ``pages``: the decode pattern: per row 16 pages picked at random from a pool of 4 GB, the
  program of (row, page) reading that page's K and V tiles ([128, 128] bf16 each) through the
  page index (one dependent load before the data, as the attention has);
- ``persistent``: ``contiguous`` on a grid of about 2 programs per SM, each looping over its
  chunks.

Each result is checked against torch's sum of the same bytes. Usage:
    python benchmarks/bench_read_ceiling.py [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl

RESULTS = Path(__file__).resolve().parent / "results"
PAGE_TOK, D = 128, 128  # a page: 128 tokens × head_dim 128, bf16
TILE_ELEMS = PAGE_TOK * D  # one K or V tile
CALLS, COPIES = 16, 8  # graph of 16 calls cycling 8 input sets (graph_cycle_ms)
# rows of 16 pages of 64 KB (K + V): 32 rows = 33.5 MB = B8 x 128K's sparse attention (8
# requests x 4 KV heads)
ROWS = (1, 2, 4, 8, 16, 32, 64, 128)


@triton.jit
def _sum_chunks_kernel(x_ptr, out_ptr, chunks_per_prog, CHUNK: tl.constexpr):
    """Program p sums chunks p·n .. p·n + n − 1 of x (CHUNK elements each, one load per chunk)."""
    p = tl.program_id(0)
    acc = tl.zeros([CHUNK], tl.float32)
    base = p.to(tl.int64) * chunks_per_prog * CHUNK
    for i in range(0, chunks_per_prog):
        acc += tl.load(x_ptr + base + i * CHUNK + tl.arange(0, CHUNK)).to(tl.float32)
    tl.store(out_ptr + p, tl.sum(acc, 0))


@triton.jit
def _sum_pages_kernel(k_ptr, v_ptr, pages_ptr, out_ptr, PAGES: tl.constexpr, TILE: tl.constexpr):
    """Program (row, j) sums the K and V tiles of page pages[row, j] (a dependent load first;
    both tiles' loads issued together, 64 KB in flight per program)."""
    row = tl.program_id(0)
    j = tl.program_id(1)
    page = tl.load(pages_ptr + row * PAGES + j).to(tl.int64)
    offs = page * TILE + tl.arange(0, TILE)
    kt = tl.load(k_ptr + offs).to(tl.float32)
    vt = tl.load(v_ptr + offs).to(tl.float32)
    tl.store(out_ptr + row * PAGES + j, tl.sum(kt, 0) + tl.sum(vt, 0))


CHUNK = 2 * TILE_ELEMS  # 64 KB: one page's K + V for one KV head


def sum_chunks(x: torch.Tensor, out: torch.Tensor, chunks_per_prog: int) -> torch.Tensor:
    """out[p] = sum of x's 64 KB chunks p·n .. p·n + n − 1 (x: a flat bf16 buffer)."""
    n = x.numel() // CHUNK
    assert x.numel() % CHUNK == 0 and n % chunks_per_prog == 0, "whole chunks per program"
    grid = (n // chunks_per_prog,)
    assert out.numel() >= grid[0], f"out holds {out.numel()} < {grid[0]} programs"
    _sum_chunks_kernel[grid](x, out, chunks_per_prog, CHUNK=CHUNK, num_warps=8)
    return out


def sum_pages(k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor, out: torch.Tensor):
    """out[row, j] = sum of page pages[row, j]'s K and V tiles (k, v: [P, TILE] bf16)."""
    rows, npages = pages.shape
    assert pages.dtype == torch.int32 and out.shape == pages.shape
    _sum_pages_kernel[(rows, npages)](k, v, pages, out, PAGES=npages, TILE=TILE_ELEMS, num_warps=8)
    return out


def ref_sum_pages(k: torch.Tensor, v: torch.Tensor, pages: torch.Tensor) -> torch.Tensor:
    """The torch reference of sum_pages: gather, then sum in float32."""
    idx = pages.long()
    return k[idx].float().sum(-1) + v[idx].float().sum(-1)


def measure(rows, k_pool, v_pool, pool_pages, sms, peak, gen, cycle_ms) -> dict[str, Any]:
    """One size: ``rows`` rows of 16 pages (64 KB each), read three ways; µs and % of peak."""
    nbytes = rows * 16 * 2 * TILE_ELEMS * 2
    r: dict[str, Any] = {"rows": rows, "MB": nbytes / 1e6}
    # -- the decode pattern: 16 random pages per row from the pool, COPIES selections --
    sels = [
        torch.randint(0, pool_pages, (rows, 16), device="cuda", generator=gen, dtype=torch.int32)
        for _ in range(COPIES)
    ]
    outs = [torch.empty(rows, 16, device="cuda") for _ in range(COPIES)]
    sum_pages(k_pool, v_pool, sels[0], outs[0])
    expect = ref_sum_pages(k_pool, v_pool, sels[0])
    torch.testing.assert_close(outs[0], expect, rtol=1e-4, atol=1e-1)
    r["pages_us"] = 1e3 * cycle_ms(lambda i: sum_pages(k_pool, v_pool, sels[i], outs[i]))
    # -- the same bytes contiguous, COPIES distinct buffers: one program per 64 KB, then about
    #    2 programs per SM looping over their chunks --
    bufs = [
        torch.randn(nbytes // 2, device="cuda", dtype=torch.bfloat16, generator=gen)
        for _ in range(COPIES)
    ]
    n_chunks = nbytes // 2 // CHUNK
    out = torch.empty(n_chunks, device="cuda")
    sum_chunks(bufs[0], out, 1)
    torch.testing.assert_close(out.sum(), bufs[0].float().sum(), rtol=1e-3, atol=10.0)
    r["contiguous_us"] = 1e3 * cycle_ms(lambda i: sum_chunks(bufs[i], out, 1))
    per = max(1, triton.next_power_of_2(triton.cdiv(n_chunks, 2 * sms)))
    while n_chunks % per:
        per //= 2
    r["persistent_chunks_per_prog"] = per
    r["persistent_us"] = 1e3 * cycle_ms(lambda i: sum_chunks(bufs[i], out, per))
    for kname in ("pages", "contiguous", "persistent"):
        r[f"{kname}_pct_peak"] = 100 * nbytes / (r[f"{kname}_us"] * 1e-6) / peak
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_sparse_decode import capture
    from sweep_kernels import bench, copy_bandwidth

    def cycle_ms(fn) -> float:  # bench_sparse_decode.graph_cycle_ms, with sweep_kernels' bench
        g = capture(lambda: [fn(j % COPIES) for j in range(CALLS)])
        ms = bench(g.replay) / CALLS
        del g
        return ms

    peak = copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device="cuda").manual_seed(0)
    pool_pages = (4 << 30) // (2 * TILE_ELEMS * 2)  # 4 GB of K + V pages
    k_pool = torch.randn(pool_pages, TILE_ELEMS, device="cuda", dtype=torch.bfloat16, generator=gen)
    v_pool = torch.randn_like(k_pool)
    rows_out: list[dict[str, Any]] = []
    for rows in ROWS:
        r = measure(rows, k_pool, v_pool, pool_pages, sms, peak, gen, cycle_ms)
        rows_out.append(r)
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}),
              flush=True)  # fmt: skip
        torch.cuda.empty_cache()
    card = torch.cuda.get_device_name()
    doc = {
        "benchmark": "read_ceiling",
        "card": card,
        "date": datetime.date.today().isoformat(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__},
        "copy_peak_Bps": peak,
        "rows": rows_out,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "read_ceiling.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = [
        f"# read_ceiling — {card} — {doc['date']}",
        "",
        f"`python benchmarks/bench_read_ceiling.py`; copy peak {peak / 1e12:.2f} TB/s (1 GiB copy, "
        "read + write). µs per call in a 16-call CUDA graph cycling 8 input sets, L2 cleared "
        "before each replay (as the decode attention is timed); % of the copy peak.",
        "",
        "| rows (x16 pages) | MB read | pages µs | pages % | contiguous µs | contiguous % | "
        "persistent µs | persistent % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows_out:
        lines.append(
            f"| {r['rows']} | {r['MB']:.1f} | {r['pages_us']:.1f} | {r['pages_pct_peak']:.0f}% | "
            f"{r['contiguous_us']:.1f} | {r['contiguous_pct_peak']:.0f}% | "
            f"{r['persistent_us']:.1f} | {r['persistent_pct_peak']:.0f}% |"
        )
    (args.out / "read_ceiling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
