"""Benchmark the routed experts: the torch loop (moe_experts_reference) vs the grouped-GEMM path.

M3 shapes: H = 6144, I = 1536 (local intermediate), top-4, bf16, E = 8 and 128 experts,
T = 1, 8, 64, 512, 8192 tokens, uniform random routing (distinct experts per token).
Both sides run in this process, on this card, on identical inputs; triton.testing.do_bench
(median, L2 flushed before each sample). The fast path is timed eagerly and as a CUDA-graph
replay (serving captures decode; the loop cannot be captured: it reads counts on the host).
  FLOPs  = 2 · T·k · 3·H·I                    (gate_up 2I×H and down H×I per (token, slot))
  bytes  = n_active · 3·H·I · 2 + T·H·2 + T·H·4  (weights of the experts that got tokens, x in
           bf16, out in float32); decode is weight-bound, so GB/s is the figure to read there.
Results: with --out, DIR/moe.{json,md} (DESIGN.md format; ratio > 1: ours faster).

Usage: python benchmarks/bench_moe.py [--out [DIR]] [--quick]
Needs only torch, triton and m3serve.models.moe (the repo's python/ is put on sys.path).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from m3serve.models.moe import (  # noqa: E402
    grouped_mm_supported,
    moe_experts,
    moe_experts_reference,
)

H, INTER, TOP_K = 6144, 1536, 4
ALPHA, LIMIT = 1.702, 7.0
EXPERTS = (8, 128)
TOKENS = (1, 8, 64, 512, 8192)


def _inputs(tokens: int, experts: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, H, device="cuda", generator=gen).bfloat16()
    ids = torch.rand(tokens, experts, device="cuda", generator=gen).topk(TOP_K, dim=-1).indices
    w = torch.rand(tokens, TOP_K, device="cuda", generator=gen) + 0.05
    return x, ids, w / w.sum(dim=-1, keepdim=True)


def _graph(fn):
    """Capture fn() (after a warm-up on a side stream); returns the replay callable."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay, graph


def run(quick: bool) -> list[dict]:
    cases: list[dict] = []
    tokens_list = (1, 64, 8192) if quick else TOKENS
    print(f"{'case':<22}{'loop ms':>10}{'fast ms':>10}{'graph ms':>10}{'x eager':>9}"
          f"{'x graph':>9}{'TFLOP/s':>9}{'GB/s':>8}{'rel err':>9}")  # fmt: skip
    for experts in EXPERTS:
        gen = torch.Generator(device="cuda").manual_seed(experts)
        w13 = torch.randn(experts, 2 * INTER, H, device="cuda", generator=gen) * H**-0.5 * 4
        w13 = w13.bfloat16()
        w2 = torch.randn(experts, H, INTER, device="cuda", generator=gen) * INTER**-0.5
        w2 = w2.bfloat16()
        for tokens in tokens_list:
            x, ids, w = _inputs(tokens, experts, tokens)
            assert grouped_mm_supported(x, w13, w2), "the grouped path does not run on this card"

            ref = functools.partial(moe_experts_reference, x, w13, w2, ids, w, ALPHA, LIMIT)
            fast = functools.partial(moe_experts, x, w13, w2, ids, w, ALPHA, LIMIT)

            want, got = ref(), fast()
            rel = float((got - want).double().norm() / want.double().norm())
            t_ref = do_bench(ref, return_mode="median")
            t_fast = do_bench(fast, return_mode="median")
            replay, graph = _graph(fast)
            t_graph = do_bench(replay, return_mode="median")
            del graph

            active = int(torch.unique(ids).numel())
            flops = 2 * tokens * TOP_K * 3 * H * INTER
            nbytes = active * 3 * H * INTER * 2 + tokens * H * 2 + tokens * H * 4
            tflops = flops / (t_graph * 1e-3) / 1e12
            gbps = nbytes / (t_graph * 1e-3) / 1e9
            name = f"E{experts} T{tokens}"
            print(f"{name:<22}{t_ref:>10.4f}{t_fast:>10.4f}{t_graph:>10.4f}"
                  f"{t_ref / t_fast:>9.2f}{t_ref / t_graph:>9.2f}{tflops:>9.1f}{gbps:>8.0f}"
                  f"{rel:>9.1e}")  # fmt: skip
            extra = {"active_experts": active, "rel_err_vs_loop": rel}
            for mode, t in (("eager", t_fast), ("cuda graph", t_graph)):
                cases.append({
                    "case": f"{name} k{TOP_K} H{H} I{INTER} bf16, fast {mode}",
                    "ours": round(t, 5), "baseline": "torch loop (moe_experts_reference), eager",
                    "baseline_value": round(t_ref, 5), "unit": "ms",
                    "ratio": round(t_ref / t, 3), "roofline_fraction": None,
                    "TFLOPs": round(flops / (t * 1e-3) / 1e12, 2),
                    "GBps": round(nbytes / (t * 1e-3) / 1e9, 1), **extra,
                })  # fmt: skip
            del x, ids, w, want, got, ref, fast, replay
        del w13, w2
        torch.cuda.empty_cache()
    return cases


def write(out_dir: Path, cases: list[dict]) -> None:
    res = {
        "benchmark": "moe",
        "card": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "versions": {"torch": torch.__version__, "triton": triton.__version__},
        "cases": cases,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "moe.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [
        f"# moe — {res['card']}, {res['date']}",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}. Routed experts, H={H}, "
        f"I={INTER}, top-{TOP_K}, bf16, uniform random routing. ours = grouped GEMMs "
        "(torch._grouped_mm), baseline = the torch loop; ratio > 1: ours faster. "
        "FLOPs = 2·T·k·3·H·I; bytes = active experts' weights + x (bf16) + out (float32).",
        "",
        "| case | ours | baseline | baseline value | unit | ratio | TFLOP/s | GB/s | rel err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        lines.append(
            f"| {c['case']} | {c['ours']} | {c['baseline']} | {c['baseline_value']} | "
            f"{c['unit']} | {c['ratio']} | {c['TFLOPs']} | {c['GBps']} | "
            f"{c['rel_err_vs_loop']:.1e} |"
        )
    (out_dir / "moe.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out_dir / 'moe.json'} and {out_dir / 'moe.md'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", nargs="?", const=str(REPO / "benchmarks" / "results"), default=None,
                    help="write moe.{json,md} here (default with no DIR: benchmarks/results)")  # fmt: skip
    ap.add_argument("--quick", action="store_true", help="T = 1, 64, 8192 only")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_moe needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    cases = run(args.quick)
    if args.out is not None:
        write(Path(args.out), cases)


if __name__ == "__main__":
    main()
