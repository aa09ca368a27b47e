"""Benchmark the model's per-token ops: torch ops (the references in m3serve.models.ops) vs the
fused Triton kernels (m3serve.models.fused_ops), side by side on the same inputs and card.

Cases (M3 shapes, bf16): the Gemma RMSNorm of the hidden state [T, 6144], and a head RMSNorm +
partial RoPE of q [T, 64, 128] (rotary 64) sliced from a packed QKV output, at T = 1, 8, 64
(decode batches) and 8192 (a prefill chunk). Each side is timed as a CUDA-graph replay of 20
calls (decode replays one graph per step; per call = replay / 20; triton.testing.do_bench
median) and its kernels per call are counted with torch.profiler. The step estimate multiplies
the per-call savings by the calls of one decode step of the 1 dense + 3 MSA-layer serving
checkpoint (9 hidden norms; q, k norm + RoPE per layer and index q, k per MSA layer: 14).
Results: with --out, DIR/fused_ops.{json,md} (DESIGN.md format; ratio > 1: fused faster).

Usage: python benchmarks/bench_fused_ops.py [--out [DIR]]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from m3serve.models.ops import GemmaRMSNorm, PartialRope, norm_rope  # noqa: E402

HIDDEN, HEADS, HEAD_DIM, ROT = 6144, 64, 128, 64
TOKENS = (1, 8, 64, 8192)
CALLS = 20
STEP_CALLS = {"hidden rmsnorm": 9, "q/k norm + rope": 14}


def graph_ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(CALLS):
            fn()
    return float(do_bench(g.replay, warmup=10, rep=100, return_mode="median")) / CALLS


def kernels_per_call(fn) -> int:
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def cases() -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(0)
    hn = GemmaRMSNorm(HIDDEN).cuda().bfloat16()
    qn = GemmaRMSNorm(HEAD_DIM).cuda().bfloat16()
    rope = PartialRope(ROT, 8192, 5_000_000.0).cuda()
    for n in (hn, qn):
        n.weight.data.normal_(0, 0.3, generator=g)
    rows = []
    for t in TOKENS:
        x = torch.randn(t, HIDDEN, device="cuda", generator=g).bfloat16()
        qkv = torch.randn(t, (HEADS + 8) * HEAD_DIM, device="cuda", generator=g).bfloat16()
        q = qkv[:, : HEADS * HEAD_DIM].view(t, HEADS, HEAD_DIM)
        pos = torch.randint(0, 1 << 17, (t,), device="cuda", generator=g)
        pairs = {
            "hidden rmsnorm": (lambda x=x: hn.reference(x), lambda x=x: hn(x)),
            "q/k norm + rope": (
                lambda q=q, pos=pos: rope.apply(qn.reference(q), *rope.cos_sin(pos)),
                lambda q=q, pos=pos: norm_rope(qn, rope, q, pos),
            ),
        }
        for op, (torch_fn, fused_fn) in pairs.items():
            err = (torch_fn().float() - fused_fn().float()).abs().max().item()
            r = {"op": op, "tokens": t, "max_abs_diff": err}
            for side, fn in (("torch", torch_fn), ("fused", fused_fn)):
                r[f"{side}_us"] = graph_ms(fn) * 1e3
                r[f"{side}_kernels"] = kernels_per_call(fn)
            r["ratio"] = r["torch_us"] / r["fused_us"]
            rows.append(r)
            print(json.dumps(r), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", nargs="?", const=str(REPO / "benchmarks" / "results"), default=None)
    args = ap.parse_args()
    card = torch.cuda.get_device_name()
    rows = cases()
    step = {}
    for t in TOKENS[:3]:
        saved_us = sum(
            STEP_CALLS[r["op"]] * (r["torch_us"] - r["fused_us"]) for r in rows if r["tokens"] == t
        )
        saved_k = sum(
            STEP_CALLS[r["op"]] * (r["torch_kernels"] - r["fused_kernels"])
            for r in rows
            if r["tokens"] == t
        )
        step[t] = {"gpu_us_saved": saved_us, "kernels_saved": saved_k}
    versions = {"torch": torch.__version__, "triton": triton.__version__}
    lines = [
        f"# fused_ops — {card} — {datetime.date.today()}",
        "",
        f"versions: {json.dumps(versions)}. Per call: CUDA-graph replay of {CALLS} calls / "
        f"{CALLS} (do_bench median); kernels per call from torch.profiler; ratio > 1: fused faster.",
        "",
        "| op | tokens | torch µs | fused µs | ratio | torch kernels | fused kernels | max |diff| |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['tokens']} | {r['torch_us']:.2f} | {r['fused_us']:.2f} | "
            f"{r['ratio']:.2f}× | {r['torch_kernels']} | {r['fused_kernels']} | "
            f"{r['max_abs_diff']:.3g} |"
        )
    lines += ["", "ESTIMATE per decode step of the 1 dense + 3 MSA-layer checkpoint "
              f"({STEP_CALLS}): " + "; ".join(
                  f"B{t}: {v['gpu_us_saved']:.0f} µs of GPU time and {v['kernels_saved']} "
                  "graph nodes fewer" for t, v in step.items())]  # fmt: skip
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        doc = {"card": card, "versions": versions, "rows": rows, "step_estimate": step}
        (out / "fused_ops.json").write_text(json.dumps(doc, indent=1) + "\n")
        (out / "fused_ops.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
