"""Launch-config sweeps for two MSA kernels, on the GPU test machine (CUDA only).

  decode-split     sparse_decode_split (issue 6's sparse-attention part) over a grid of
                   SplitConfig (tokens per step, pipelining stages, warps, merge, programs per SM)
                   at batch 8 / 32 / 64 (16 random selected pages per (request, KV head) row,
                   M3 heads 64 q / 4 KV, head_dim 128, bf16): ms and GB/s on the minimum bytes
                   (sparse_attn_bytes), against the measured copy peak. CUDA-graph replays
                   cycling 8 selections (bench_sparse_decode.graph_cycle_ms), as in serving.
  decode-select    decode index scoring + top-k (issue 4; the step's larger part) over
                   (warps, stages, programs per SM) of the scoring kernel, bf16 / FP8 keys /
                   FP8 keys + queries, at B8 x 128K, B8 x 1M, B32 x 32K; graph replays.
  prefill-select   index scoring + top-k of one 8K-query chunk (issue 4) for each prefill
                   scoring config (BM, warps, stages), bf16 keys and FP8 keys + FP8
                   queries, at 32K and 128K context: ms and TFLOP/s, plus whether the compiled
                   kernel uses Hopper's wgmma.

Each point is checked against the first config's output (decode attention: max |diff| ≤ 2e-2;
selection: the share of rows with the same top-k ids is printed) before it is timed. Timing:
triton.testing.do_bench, median, L2 flushed before every repetition.
Writes sweep_<part>.json to --out and prints a table, fastest first.

    python3 benchmarks/sweep_kernels.py decode-split --out OUT
    python3 benchmarks/sweep_kernels.py decode-select --out OUT
    python3 benchmarks/sweep_kernels.py prefill-select --out OUT
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import triton
import triton.testing
from bench_sparse_decode import (
    BLOCK,
    HKV,
    HQ,
    TOPK,
    D,
    copy_bandwidth,
    graph_cycle_ms,
    index_bytes,
    random_selection,
    sparse_attn_bytes,
)


def bench(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=5, rep=30, return_mode="median"))


def decode_split(args: argparse.Namespace) -> list[dict[str, Any]]:
    from m3serve.kernels.msa.sparse_decode_split import SPLIT_CONFIGS, SplitConfig

    peak = copy_bandwidth()
    # session 7: register-capped launches (more programs per SM) and the unrolled fused merge
    # first (new), then session 6's grid
    grid = (
        [
            SplitConfig(n, s, 4, m, wv, 128)
            for m, wv, (n, s) in itertools.product(
                ("kernel", "unrolled"), (4, 2, 1), ((64, 1), (32, 2), (64, 2), (32, 3))
            )
        ]
        + [
            SplitConfig(n, s, w, "unrolled", wv)
            for wv, n, s, w in itertools.product((1, 2, 4), (64, 32), (2, 3), (4, 8))
        ]
        + [
            SplitConfig(n, s, w, m, wv)
            for m, wv, n, s, w in itertools.product(
                ("kernel", "serial"), (1, 2, 4), (64, 32), (3, 2, 4), (4, 8)
            )
        ]
    )
    names = {c: k for k, c in SPLIT_CONFIGS.items()}
    rows: list[dict[str, Any]] = []
    t_end = time.time() + args.budget_s
    for b in args.batches:
        rows += decode_split_batch(b, args.context, grid, names, peak, t_end)
        torch.cuda.empty_cache()
    return rows


def decode_split_batch(b, n, grid, names, peak, t_end) -> list[dict[str, Any]]:
    from m3serve.kernels.msa.sparse_decode import SparseDecodeWrapper

    nb = n // BLOCK
    gen = torch.Generator(device="cuda").manual_seed(b)
    pages = b * nb + 1
    pt = torch.randperm(pages, device="cuda", generator=gen)[: b * nb].view(b, nb).int()
    k = torch.randn(pages, HKV, BLOCK, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn_like(k)
    q = torch.randn(b, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    sels = [random_selection(b * HKV, nb, gen) for _ in range(8)]
    out = torch.empty_like(q)
    scale = 1 / math.sqrt(D)
    nbytes = sparse_attn_bytes(b, n)
    ref = None
    rows: list[dict[str, Any]] = []
    for cfg in grid:
        if time.time() > t_end:
            print(f"  [budget spent: B{b} stops at {cfg}]", flush=True)
            break
        w = SparseDecodeWrapper("cuda", backend="triton", split_config=cfg, max_rows=b * HKV)
        w.plan([n] * b, 1, HQ, HKV, D, BLOCK, TOPK)
        try:
            got = w.run(q, k, v, pt, sels[0], scale, out=out).float().clone()
            if ref is None:
                ref = got
            diff = float((got - ref).abs().max())
            assert diff <= 2e-2, f"max |diff| {diff} vs the first config"
            ms = graph_cycle_ms(lambda i, w=w: w.run(q, k, v, pt, sels[i], scale, out=out), 8)
        except Exception as err:  # a config that does not compile or fit: report, go on
            print(f"  B{b} {cfg}: {type(err).__name__}: {str(err)[:160]}", flush=True)
            continue
        rows.append(
            dict(
                batch=b,
                context=n,
                config=cfg._asdict(),
                name=names.get(cfg, ""),
                splits=w._planned["num_splits"],
                ms=ms,
                GBps=nbytes / ms / 1e6,
                pct_peak=100 * nbytes / (ms * 1e-3) / peak,
            )
        )
    print(f"B{b} x {n // 1024}K: {nbytes / 1e6:.1f} MB, copy peak {peak / 1e12:.2f} TB/s")
    for r in sorted(rows, key=lambda r: r["ms"])[:8]:
        c = r["config"]
        print(
            f"  {r['ms'] * 1e3:7.1f} us {r['GBps']:6.0f} GB/s {r['pct_peak']:4.0f}%  "
            f"n{c['block_n']} s{c['stages']} w{c['warps']} {c['merge']:6s} "
            f"waves {c['waves']} maxnreg {c['maxnreg']} splits {r['splits']} {r['name']}",
            flush=True,
        )
    return rows


def decode_select(args: argparse.Namespace) -> list[dict[str, Any]]:
    peak = copy_bandwidth()
    # (warps, stages, programs per SM, balanced): session 7 balances the split-K grid to the
    # resident slots (balanced) instead of a power-of-two chunk at ~waves programs per SM
    # session 7 (2nd sweep): a register cap (maxnreg) for more programs per SM — the decode tile
    # compiles to mma.sync with plain loads, so programs per SM set the bytes in flight
    grid = [(4, st, w, True, mx) for st in (5, 3) for w in (4, 5, 6) for mx in (None, 128, 96)]
    rows: list[dict[str, Any]] = []
    t_end = time.time() + args.budget_s
    for b, n in ((8, 131072), (8, 1048576), (1, 1048576), (32, 131072), (32, 32768)):
        rows += decode_select_case(b, n, grid, peak, t_end)
        torch.cuda.empty_cache()
    return rows


def decode_select_case(b, n, grid, peak, t_end) -> list[dict[str, Any]]:
    from m3serve.kernels.msa.index_select import (
        DECODE_SCORE_LAUNCH,
        DECODE_SCORE_LAUNCH_FP8,
        DecodeSelectWorkspace,
        select_blocks_decode,
    )
    from m3serve.kernels.msa.reference import quantize_index_k_fp8

    nb = n // BLOCK
    pages = b * nb + 1
    gen = torch.Generator(device="cuda").manual_seed(b + n)
    pt = torch.randperm(pages, device="cuda", generator=gen)[: b * nb].view(b, nb).int()
    idx_k = torch.randn(pages, BLOCK, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k8, s8 = quantize_index_k_fp8(idx_k.view(-1, D))
    k8, s8 = k8.view(pages, BLOCK, D), s8.view(pages, BLOCK)
    iq = torch.randn(b, HKV, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    seq = torch.full((b,), n, dtype=torch.int32, device="cuda")
    ws = DecodeSelectWorkspace(b * HKV, nb, "cuda")
    out = torch.empty(HKV, b, TOPK, dtype=torch.int32, device="cuda")
    rows: list[dict[str, Any]] = []
    for mode in ("fp8", "bf16"):  # (FP8 queries: "fp8q"; session 6 swept them, slower)
        cache, sc = (idx_k, None) if mode == "bf16" else (k8, s8)
        nbytes = index_bytes(b, n, mode != "bf16")
        ref = None
        for launch in grid:
            if time.time() > t_end:
                break

            def fn(i, cache=cache, sc=sc, mode=mode, launch=launch):
                return select_blocks_decode(
                    iq, cache, sc, pt, seq, 1, TOPK, out=out, max_seq_len=n, workspace=ws,
                    q_fp8=mode == "fp8q", launch=launch,
                )  # fmt: skip

            try:
                got = fn(0).clone()
                ref = got if ref is None else ref
                same = float((got == ref).all(-1).float().mean())
                ms = graph_cycle_ms(fn, 1, calls=8)
            except Exception as err:
                print(f"  {mode} {launch}: {type(err).__name__}: {str(err)[:160]}", flush=True)
                continue
            rows.append(
                dict(
                    mode=mode, batch=b, context=n, warps=launch[0], stages=launch[1],
                    waves=launch[2], balanced=launch[3], maxnreg=launch[4], ms=ms, GBps=nbytes / ms / 1e6,
                    pct_peak=100 * nbytes / (ms * 1e-3) / peak, rows_same_as_first=same,
                )
            )  # fmt: skip
        dflt = DECODE_SCORE_LAUNCH if mode == "bf16" else DECODE_SCORE_LAUNCH_FP8
        print(f"{mode} B{b} x {n // 1024}K: {nbytes / 1e6:.0f} MB, peak {peak / 1e12:.2f} TB/s")
        for r in sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["ms"])[:5]:
            print(
                f"  {r['ms'] * 1e3:7.1f} us {r['pct_peak']:4.0f}%  w{r['warps']} s{r['stages']}"
                f" waves {r['waves']} {'balanced' if r['balanced'] else 'pow2'} maxnreg {r['maxnreg']}"
                f" same {r['rows_same_as_first']:.3f}"
                + (
                    "  (default)"
                    if (r["warps"], r["stages"], r["waves"], r["maxnreg"]) == (*dflt[:3], None)
                    else ""
                ),
                flush=True,
            )
    return rows


def uses_wgmma(cache_dir: str, name: str) -> dict[str, int]:
    """Counts of wgmma / mma.sync in the PTX Triton cached for kernels called ``name``."""
    counts = {"ptx_files": 0, "wgmma": 0, "mma_sync": 0}
    for f in glob.glob(os.path.join(cache_dir, "**", f"{name}.ptx"), recursive=True):
        txt = Path(f).read_text()
        counts["ptx_files"] += 1
        counts["wgmma"] += txt.count("wgmma.mma_async")
        counts["mma_sync"] += txt.count("mma.sync")
    return counts


def prefill_select(args: argparse.Namespace) -> list[dict[str, Any]]:
    grid = [
        triton.Config({"BM": bm}, num_warps=w, num_stages=st)
        for bm, w, st in itertools.product((32, 64), (4, 8), (3, 2, 4, 5, 6))
    ] + [triton.Config({"BM": 16}, num_warps=4, num_stages=st) for st in (4, 6)]
    rows: list[dict[str, Any]] = []
    t_end = time.time() + args.budget_s
    for ctx in args.select_contexts:
        rows += prefill_select_context(ctx, grid, t_end)
    cache_dir = os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))
    print("PTX:", uses_wgmma(cache_dir, "_prefill_block_scores_kernel"), flush=True)
    return rows


def prefill_select_context(ctx, grid, t_end) -> list[dict[str, Any]]:
    from bench_index_topk import G, prefill_inputs

    from m3serve.kernels.msa import index_select
    from m3serve.kernels.msa.index_select import select_blocks_prefill

    kern = index_select._prefill_block_scores_kernel
    chunk = 8192
    gen = torch.Generator(device="cuda").manual_seed(ctx)
    pt, cache, cache8, scale8, iq, cu, seq, pre, out = prefill_inputs(gen, chunk, ctx)
    pos = torch.arange(ctx - chunk, ctx, dtype=torch.float64)
    flops = 2 * G * D * float((pos + 1).sum())
    rows: list[dict[str, Any]] = []
    for mode in ("bf16", "fp8q"):
        c, s, q8 = (cache, None, False) if mode == "bf16" else (cache8, scale8, True)

        def run(c=c, s=s, q8=q8):
            return select_blocks_prefill(
                iq, c, s, pt, cu, pre, seq, TOPK, max_q_len=chunk, max_seq_len=ctx,
                out=out, q_fp8=q8,
            )  # fmt: skip

        ref = None
        for cfg in grid:
            if time.time() > t_end:
                print(f"  [budget spent: {mode} {ctx} stops at {cfg}]", flush=True)
                break
            kern.configs = [cfg]
            kern.cache.clear()
            try:
                got = run().clone()
                if ref is None:
                    ref = got
                same = float((got == ref).all(-1).float().mean())
                ms = bench(run)
            except Exception as err:
                print(f"  {mode} {cfg}: {type(err).__name__}: {str(err)[:160]}", flush=True)
                continue
            rows.append(
                dict(
                    mode=mode,
                    context=ctx,
                    BM=cfg.kwargs["BM"],
                    warps=cfg.num_warps,
                    stages=cfg.num_stages,
                    ms=ms,
                    TFLOPs=flops / ms / 1e9,
                    rows_same_as_first=same,
                )
            )
        print(f"{mode} 8K chunk at {ctx // 1024}K:")
        for r in sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["ms"])[:8]:
            print(
                f"  {r['ms']:.3f} ms {r['TFLOPs']:5.0f} TFLOP/s  BM{r['BM']} "
                f"w{r['warps']} s{r['stages']} same {r['rows_same_as_first']:.3f}",
                flush=True,
            )
    return rows


PARTS = {
    "decode-split": decode_split,
    "decode-select": decode_select,
    "prefill-select": prefill_select,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=tuple(PARTS))
    ap.add_argument("--out", type=Path, default=Path("."))
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32, 64])
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument(
        "--select-contexts", type=lambda s: [int(x) for x in s.split(",")], default=[131072, 32768]
    )
    ap.add_argument("--budget-s", type=float, default=400, help="stop timing new points after")
    args = ap.parse_args()
    rows = PARTS[args.part](args)
    args.out.mkdir(parents=True, exist_ok=True)
    doc = dict(
        device=torch.cuda.get_device_name(),
        versions=dict(torch=torch.__version__, triton=triton.__version__),
        rows=rows,
    )
    (args.out / f"sweep_{args.part.replace('-', '_')}.json").write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
