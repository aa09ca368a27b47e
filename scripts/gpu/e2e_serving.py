"""Issue 8 serving benchmark on the GPU machine: our msa kernels vs SGLang's in-tree MSA ops.

Starts one real ``python -m sglang.launch_server`` per implementation on the same M3-shaped
checkpoint, concurrently: on the same card (each with its share of GPU memory), or with ``--gpus``
on one card each (the cards' GEMM and copy speeds are measured first and recorded, to show they
are alike), then drives each with ``python -m sglang.benchmark.serving`` for every workload and
concurrency: in turn on one card, at the same time on cards of their own, so that a time cut
still leaves pairs. Implementations (the model, dense layers, MoE, sampler and
traffic are identical; only the MSA layers differ):

- ``ours``:   ``--attention-backend msa``, m3serve's kernels (M3SERVE_MSA_IMPL=auto);
- ``sglang``: ``--attention-backend msa`` with M3SERVE_MSA_IMPL=sglang: SGLang 0.5.23's in-tree
  ``minimax_sparse_prefill`` / ``minimax_sparse_decode`` (its in-tree M3 model cannot start
  there: its layers call sgl_kernel ops, and sglang-kernel cannot be installed on that machine).

Workloads: ``random:IN:OUT:C1,C2`` (random-ids, exact lengths) and ``gsp:PREFIX:Q:OUT:C1,C2``
(generated-shared-prefix: one shared PREFIX-token system prompt, Q new tokens per request: the
agentic shape, served through radix-cache hits). Writes $OUT/e2e_<tag>.json and prints a table
with the ratio of ours' output throughput to the other server's (sglang, or e.g. unfused). Usage:
python scripts/gpu/e2e_serving.py CKPT --servers ours,sglang --workloads random:32768:512:1,8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
from serving_common import card_name, card_parity, server_args, side_by_side_servers

from m3serve.launch import CPU_STANDIN_DIR, SGLangServer, start_staggered

KEYS = ("output_throughput", "total_throughput", "median_ttft_ms", "p99_ttft_ms",
        "median_tpot_ms", "p99_tpot_ms", "completed", "total_input_tokens")  # fmt: skip


def parse_workload(spec: str) -> dict[str, Any]:
    parts = spec.split(":")
    if parts[0] == "random" and len(parts) == 4:
        return {"kind": "random", "input": int(parts[1]), "output": int(parts[2]),
                "conc": [int(c) for c in parts[3].split(",")]}  # fmt: skip
    if parts[0] == "gsp" and len(parts) == 5:
        return {"kind": "gsp", "prefix": int(parts[1]), "question": int(parts[2]),
                "input": int(parts[1]) + int(parts[2]), "output": int(parts[3]),
                "conc": [int(c) for c in parts[4].split(",")]}  # fmt: skip
    raise SystemExit(f"bad workload {spec!r}: random:IN:OUT:C,... or gsp:PREFIX:Q:OUT:C,...")


def bench(
    server: SGLangServer,
    ckpt: str,
    w: dict[str, Any],
    conc: int,
    out: Path,
    tag: str,
    per_conc: float = 2.0,
):
    n = max(round(per_conc * conc), 4)
    res = out / f"serving_{tag}.jsonl"
    cmd = [
        sys.executable, "-m", "sglang.benchmark.serving", "--backend", "sglang",
        "--host", "127.0.0.1", "--port", str(server.port), "--tokenizer", ckpt,
        "--num-prompts", str(n), "--max-concurrency", str(conc), "--output-file", str(res),
        "--tokenize-prompt",  # send input_ids: exact lengths (text round-trips change them)
    ]  # fmt: skip
    if w["kind"] == "random":
        cmd += ["--dataset-name", "random-ids", "--random-input-len", str(w["input"]),
                "--random-output-len", str(w["output"]), "--random-range-ratio", "1.0"]  # fmt: skip
    else:
        cmd += ["--dataset-name", "generated-shared-prefix", "--gsp-num-groups", "1",
                "--gsp-prompts-per-group", str(n), "--gsp-system-prompt-len", str(w["prefix"]),
                "--gsp-question-len", str(w["question"]), "--gsp-output-len", str(w["output"])]  # fmt: skip
    # each run starts from an empty radix cache: the client's seeded prompts repeat from run to run,
    # so a later run would otherwise hit the KV an earlier one left (a shared prefix is still
    # computed once per run, by its first request)
    requests.post(server.url + "/flush_cache", timeout=60).raise_for_status()
    env = dict(os.environ)
    standin = str(Path(__file__).resolve().parent / "bench_standin")
    # the client imports sglang.srt too: it needs the sgl_kernel and datasets stand-ins
    paths = (str(CPU_STANDIN_DIR), env.get("PYTHONPATH", ""), standin)
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
    if p.returncode:
        print(p.stdout[-1500:], p.stderr[-2500:], flush=True)
    row: dict[str, Any] = {"kind": w["kind"], "input_len": w["input"], "output_len": w["output"],
                           "concurrency": conc, "num_prompts": n, "rc": p.returncode,
                           "wall_s": round(time.time() - t0, 1), "radix_flushed_before": True}  # fmt: skip
    if w["kind"] == "gsp":
        row["shared_prefix"] = w["prefix"]
    if res.exists():
        last = json.loads(res.read_text().strip().splitlines()[-1])
        row.update({k: last.get(k) for k in KEYS})
    row["valid"] = p.returncode == 0 and row.get("completed") == n
    return row


def warm_up(server: SGLangServer, tokens: int) -> float:
    """Two requests (a long chunked prefill, then a short one) so JIT compiles leave the timings."""
    t0 = time.time()
    for n in (tokens, 300):
        r = requests.post(server.url + "/generate", json={
            "input_ids": [(7 * i) % 600 + 10 for i in range(n)],  # < the tiny vocab (640)
            "sampling_params": {"max_new_tokens": 16, "temperature": 0}}, timeout=900)  # fmt: skip
        r.raise_for_status()
    return time.time() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--servers", default="ours,sglang")
    ap.add_argument("--workloads", nargs="+", default=["random:32768:512:1,8"])
    ap.add_argument("--mem-fraction", type=float, default=0.4,
                    help="each server's share of a shared card (the second reaches 2x it)")
    ap.add_argument("--max-total-tokens", type=int, default=5_000_000, help="KV tokens per server")
    ap.add_argument("--context-length", type=int, default=0, help="0: longest workload + 4096")
    ap.add_argument("--graphs", choices=("on", "off"), default="on")
    ap.add_argument("--cuda-graph-max-bs", type=int, default=64)
    ap.add_argument("--deadline", type=float, default=500, help="no new run starts after (s)")
    ap.add_argument("--tag", default="e2e")
    ap.add_argument("--extra", default="", help="extra sglang args, space separated")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script (tiny model)")
    ap.add_argument("--page-size", type=int, default=128, help="= the checkpoint's MSA block")
    ap.add_argument("--gpus", default="", help="one device id per server, counted within the visible devices (e.g. 0,1)")
    ap.add_argument(
        "--prompts-per-conc",
        type=float,
        default=2.0,
        help="requests per run = max(this x concurrency, 4)",
    )
    args = ap.parse_args()
    gpus = [g for g in args.gpus.split(",") if g]
    t_start = time.time()
    out = Path(os.environ.get("OUT", "gpu-out"))
    out.mkdir(parents=True, exist_ok=True)
    workloads = [parse_workload(s) for s in args.workloads]
    ctx = args.context_length or max(w["input"] + w["output"] for w in workloads) + 4096
    graph_args = (
        ["--cuda-graph-max-bs-decode", str(args.cuda_graph_max_bs)]
        if args.graphs == "on"
        else ["--cuda-graph-backend-decode", "disabled"]
    )
    if args.device != "cuda":
        graph_args = []
    base = [*server_args(args.page_size, ctx, 64), *graph_args, *args.extra.split()]
    names = args.servers.split(",")
    servers = side_by_side_servers(
        args.ckpt, names, base, device=args.device, max_total_tokens=args.max_total_tokens,
        first_mem_fraction=args.mem_fraction, log_prefix=out / f"server_{args.tag}", gpus=gpus,
    )  # fmt: skip
    parity = card_parity(gpus) if gpus and args.device == "cuda" else []
    for row in parity:
        print(f"card parity: {json.dumps(row)}", flush=True)
    t0 = time.time()
    failed = start_staggered([servers[n] for n in names], share_gpu=not gpus)
    errors = {names[i]: str(e)[-3000:] for i, e in failed.items()}
    up: dict[str, float] = {n: round(time.time() - t0, 1) for n in names if n not in errors}
    rows: list[dict[str, Any]] = []
    try:
        for name, err in errors.items():
            print(f"server {name} failed to start:\n{err}", flush=True)
        live = [n for n in names if n not in errors]
        pool = ThreadPoolExecutor(max(len(live), 1))

        def warm(n: str) -> str:
            return f"{n}: up {up[n]:.1f} s after the first start, warm-up {warm_up(servers[n], min(9000, ctx // 2)):.1f} s"

        def one(n: str, w: dict[str, Any], c: int) -> dict[str, Any]:
            tag = f"{args.tag}_{n}_{w['kind']}{w['input']}_c{c}"
            row = bench(servers[n], args.ckpt, w, c, out, tag, args.prompts_per_conc)
            row["impl"] = n
            row["gpu"] = gpus[names.index(n)] if gpus else None
            print(json.dumps(row), flush=True)
            return row

        for line in pool.map(warm, live) if gpus else map(warm, live):
            print(line, flush=True)
        for w in workloads:
            for c in w["conc"]:
                if time.time() - t_start > args.deadline:
                    print(f"deadline: skipping {w['kind']} {w['input']} c{c}", flush=True)
                    continue
                if gpus:  # a card each: both run this cell at the same time
                    rows += list(pool.map(lambda n, w=w, c=c: one(n, w, c), live))
                else:
                    rows += [one(n, w, c) for n in live]
    finally:
        for s in servers.values():
            s.stop()
    for n in names:
        log = out / f"server_{args.tag}_{n}.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        n_err = text.count("[http_server] Error")  # errors SGLang answers inside a 200 stream
        for r in rows:
            if r["impl"] == n:
                r["server_errors"] = n_err
                r["valid"] = bool(r["valid"]) and n_err == 0
    for n in names:  # the KV capacity each server really got (must be equal)
        log = out / f"server_{args.tag}_{n}.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        got = [w for w in text.split() if w.startswith("max_total_num_tokens=")]
        up[f"{n}_max_total_num_tokens"] = int(got[0].split("=")[1].rstrip(",")) if got else None
        print(f"server {n}: {got[:1]}", flush=True)
    card = card_name(args.device)
    meta = {
        "card": card,
        "server_args": base,
        "startup_s": up,
        "start_errors": errors,
        "gpus": dict(zip(names, gpus, strict=False)),
        "card_parity": parity,
    }
    (out / f"e2e_{args.tag}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"card: {meta['card']}")
    base = next((n for n in names if n != "ours"), "sglang")  # the baseline: sglang, unfused, ..
    print("| workload | in | conc | impl | out tok/s | total tok/s | TTFT p50 ms | TPOT p50 ms | "
          f"TPOT p99 ms | valid | ours/{base} out tok/s |")  # fmt: skip
    for r in rows:
        pair = [x for x in rows if x["impl"] == base and x["kind"] == r["kind"]
                and x["input_len"] == r["input_len"] and x["concurrency"] == r["concurrency"]]  # fmt: skip
        ratio = ""
        if r["impl"] == "ours" and pair and pair[0].get("output_throughput"):
            ratio = f"{(r.get('output_throughput') or 0) / pair[0]['output_throughput']:.2f}"
        print(f"| {r['kind']} | {r['input_len']} | {r['concurrency']} | {r['impl']} | "
              f"{r.get('output_throughput')} | {r.get('total_throughput')} | "
              f"{r.get('median_ttft_ms')} | {r.get('median_tpot_ms')} | {r.get('p99_tpot_ms')} | "
              f"{r['valid']} | {ratio} |")  # fmt: skip
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
