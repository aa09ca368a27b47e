"""A/B of two versions of the sparse-prefill kernels in one process on one card.

    python3 scripts/gpu/ab_sparse_prefill.py --old DIR [--contexts 32768,131072]

DIR holds an older copy of python/m3serve/kernels/msa as the package ``msa_old`` (its imports
are relative, so it loads beside the tree's own). For each context (one 8K-query chunk at the
end of the prompt, 64 q / 4 KV heads, the benchmark's random inputs and our bf16 selection),
both versions' run() are timed interleaved (old, new, old, new, ...; do_bench medians), with
the Triton main kernel and the CUDA one, each also in the full prefill (select + run), one more
contender of the new version (``--new-kw``: SparsePrefillWrapper kwargs as JSON, e.g.
'{"fused_build": true}'), and SGLang
0.5.23's full prefill (bench_sparse_prefill.sglang_full) as the fixed yardstick; each run() also
replayed from a CUDA graph (GPU time without the host's launch cost) and its host cost per call
(50 calls, no sync between). The outputs
of the two versions are compared with each other (max abs difference). Prints one table.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_sparse_prefill as bsp  # noqa: E402
from bench_sparse_decode import capture  # noqa: E402


def ab_context(ctx: int, old, new, fns, rounds: int, extra: dict):
    """Median ms per contender at one context, and each output's max abs difference from old's."""
    sm = 1 / math.sqrt(bsp.D)
    x = bsp.make_inputs(ctx, bsp.CHUNK, 64, 4)
    ids = bsp.select(x)
    lay = bsp.sglang_layout(x) if fns is not None else None
    fns_t = {}
    outs = {}
    for ver, mod in (("old", old), ("new", new)):
        for mk in ("triton", "cuda"):
            w = mod.SparsePrefillWrapper(main_kernel=mk)
            w.plan(x["cu_q"], x["prefix"], x["seq"], x["page_table"], 64, 4, bsp.D, bsp.BLOCK,
                   bsp.TOPK)  # fmt: skip
            o = outs[ver, mk] = w.run(x["q"], x["k"], x["v"], ids, sm)
            fns_t[f"{ver} {mk} run"] = lambda w=w, o=o: w.run(x["q"], x["k"], x["v"], ids, sm, out=o)

            def full(w=w, o=o):
                bsp.select(x, out=ids)
                w.run(x["q"], x["k"], x["v"], ids, sm, out=o)

            fns_t[f"{ver} {mk} full"] = full
    # one more contender of the new package: SparsePrefillWrapper(**extra) (--new-kw)
    wx = new.SparsePrefillWrapper(**extra)
    wx.plan(x["cu_q"], x["prefix"], x["seq"], x["page_table"], 64, 4, bsp.D, bsp.BLOCK, bsp.TOPK)
    ox = outs["new", "extra"] = wx.run(x["q"], x["k"], x["v"], ids, sm)
    fns_t["new extra run"] = lambda: wx.run(x["q"], x["k"], x["v"], ids, sm, out=ox)
    if fns is not None:
        fns_t["sglang full"] = lambda: bsp.sglang_full(fns, x, lay)
    ref = outs["old", "triton"].float()
    diffs = {f"{v} {k}": float((o.float() - ref).abs().max()) for (v, k), o in outs.items()}
    # GPU time alone: each run() replayed from a CUDA graph; host time: run() calls per second
    graphs, cpu_us = {}, {}
    for label, fn in list(fns_t.items()):
        if not label.endswith(" run"):
            continue
        graphs[label.replace(" run", " graph")] = capture(fn)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            fn()
        cpu_us[label] = (time.perf_counter() - t0) / 50 * 1e6
        torch.cuda.synchronize()
    fns_t.update({k: g.replay for k, g in graphs.items()})
    times: dict[str, list[float]] = {}
    for _ in range(rounds):  # interleaved: old, new, ... every round
        for label, fn in fns_t.items():
            times.setdefault(label, []).append(bsp.bench(fn))
    print(ctx, "rounds", {k: [round(x, 3) for x in v] for k, v in times.items()}, flush=True)
    print(ctx, "host us per run() call", {k: round(v, 1) for k, v in cpu_us.items()}, flush=True)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}, diffs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old", type=Path, required=True)
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-kw", default='{"main_kernel": "triton", "item_q": 64}',
                    help="JSON kwargs of SparsePrefillWrapper for the extra new contender")  # fmt: skip
    args = ap.parse_args()
    extra = json.loads(args.new_kw)
    sys.path.insert(0, str(args.old))
    old = importlib.import_module("msa_old.sparse_prefill")
    new = importlib.import_module("m3serve.kernels.msa.sparse_prefill")
    fns = bsp.load_sglang()
    card = torch.cuda.get_device_name()
    print(f"card {card}", flush=True)
    rows = []
    for ctx in (int(c) for c in args.contexts.split(",")):
        med, diffs = ab_context(ctx, old, new, fns, args.rounds, extra)
        rows.append((ctx, med))
        print(ctx, {k: round(v, 4) for k, v in med.items()}, "diffs", diffs, flush=True)
        torch.cuda.empty_cache()
    print(f"\nA/B sparse prefill, {card}, 8K chunk, 64/4 (ms, median of {args.rounds} do_bench medians)")
    print("| context | run old / new (Triton) | run old / new (CUDA) | graph old / new (Triton) "
          "| graph old / new (CUDA) | full old / new (Triton) | full old / new (CUDA) | SGLang full "
          "| full vs SGLang old / new (Triton) | (CUDA) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for ctx, m in rows:
        sg = m.get("sglang full", float("nan"))
        print(
            f"| {ctx // 1024}K | {m['old triton run']:.3f} / {m['new triton run']:.3f} "
            f"({m['old triton run'] / m['new triton run']:.3f}x) | {m['old cuda run']:.3f} / "
            f"{m['new cuda run']:.3f} ({m['old cuda run'] / m['new cuda run']:.3f}x) | "
            f"{m['old triton graph']:.3f} / {m['new triton graph']:.3f} | "
            f"{m['old cuda graph']:.3f} / {m['new cuda graph']:.3f} | "
            f"{m['old triton full']:.3f} / {m['new triton full']:.3f} | "
            f"{m['old cuda full']:.3f} / {m['new cuda full']:.3f} | {sg:.3f} | "
            f"{sg / m['old triton full']:.2f}x / {sg / m['new triton full']:.2f}x | "
            f"{sg / m['old cuda full']:.2f}x / {sg / m['new cuda full']:.2f}x |"
        )


if __name__ == "__main__":
    main()
