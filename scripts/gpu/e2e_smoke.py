"""Issue 8 smoke run on the GPU machine: our M3 model + `msa` backend in a real SGLang server.

Starts `python -m sglang.launch_server` (stand-in sgl_kernel: sglang-kernel cannot be installed
there) on an M3-shaped checkpoint, checks /generate answers, then drives it with
`python -m sglang.benchmark.serving` (random-ids) at a few concurrencies. Prints a table; writes
JSON under $OUT. Usage: python scripts/gpu/e2e_smoke.py CKPT [--input-len 32768] [--conc 1,8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from m3serve.launch import CPU_STANDIN_DIR, SGLangServer


def bench(url: str, port: int, ckpt: str, input_len: int, output_len: int, conc: int, out: Path) -> dict:
    n = max(2 * conc, 4)
    res = out / f"serving_in{input_len}_c{conc}.jsonl"
    cmd = [
        sys.executable, "-m", "sglang.benchmark.serving", "--backend", "sglang",
        "--host", "127.0.0.1", "--port", str(port), "--tokenizer", ckpt,
        "--dataset-name", "random-ids", "--random-input-len", str(input_len),
        "--random-output-len", str(output_len), "--random-range-ratio", "1.0",
        "--num-prompts", str(n), "--max-concurrency", str(conc), "--output-file", str(res),
        "--tokenize-prompt",  # send input_ids: exact lengths (text round-trips change them)
    ]  # fmt: skip
    env = dict(os.environ)
    standin = str(Path(__file__).resolve().parent / "bench_standin")
    # the client imports sglang.srt too, so it needs the sgl_kernel stand-in as well
    paths = (str(CPU_STANDIN_DIR), env.get("PYTHONPATH", ""), standin)
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    print(p.stdout[-2500:], p.stderr[-1500:] if p.returncode else "", flush=True)
    row = {"input_len": input_len, "output_len": output_len, "concurrency": conc, "rc": p.returncode,
           "wall_s": round(time.time() - t0, 1)}  # fmt: skip
    if res.exists():
        last = json.loads(res.read_text().strip().splitlines()[-1])
        for k in ("output_throughput", "total_throughput", "median_ttft_ms", "p99_ttft_ms",
                  "median_tpot_ms", "p99_tpot_ms", "completed"):  # fmt: skip
            row[k] = last.get(k)
    # SGLang answers some errors (e.g. prompt too long) inside a 200 stream: trust only full runs
    row["valid"] = p.returncode == 0 and row.get("completed") == n
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--input-len", type=int, default=32768)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--conc", default="1,8")
    ap.add_argument("--extra", default="", help="extra sglang args, space separated")
    ap.add_argument("--tag", default="msa")
    ap.add_argument(
        "--attention-backend", default="msa",
        help="msa (ours) or a full-attention backend (e.g. triton): for a MiniMax sparse config "
        "SGLang then wraps it in its in-tree MiniMaxHybridAttnBackend (the baseline)",
    )  # fmt: skip
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "gpu-out"))
    out.mkdir(parents=True, exist_ok=True)
    extra = [
        "--attention-backend", args.attention_backend, "--page-size", "128", "--sampling-backend", "pytorch",
        "--mem-fraction-static", "0.85", "--context-length", str(args.input_len + 4096),
        "--trust-remote-code", "--cuda-graph-backend-prefill", "disabled", *args.extra.split(),
    ]  # fmt: skip
    server = SGLangServer(
        args.ckpt, device="cuda", use_standin=True, max_total_tokens=600_000, extra_args=extra,
        log_path=out / f"server_{args.tag}.log", startup_timeout=420,
    )  # fmt: skip
    rows = []
    t0 = time.time()
    try:
        server.start()
    except Exception as e:  # report and exit non-zero; the message holds the log tail
        print(f"server failed to start: {e}")
        return 1
    try:
        print(f"server up in {time.time() - t0:.1f} s", flush=True)
        r = requests.post(server.url + "/generate", json={"input_ids": list(range(10, 300)),
                          "sampling_params": {"max_new_tokens": 8, "temperature": 0}}, timeout=300)  # fmt: skip
        print("generate:", r.status_code, r.text[:300], flush=True)
        wait_for = os.environ.get("E2E_WAIT_FOR")  # another server's run on this card goes first
        while wait_for and not Path(wait_for).exists():
            time.sleep(1)
        for c in [int(x) for x in args.conc.split(",")]:
            rows.append(bench(server.url, server.port, args.ckpt, args.input_len, args.output_len, c, out))
            print(rows[-1], flush=True)
    finally:
        server.stop()
    # SGLang answers some errors inside a 200 stream (the client counts them as successes)
    log_text = (out / f"server_{args.tag}.log").read_text(errors="replace")
    n_err = log_text.count("[http_server] Error")
    print(f"server log: {n_err} '[http_server] Error' lines", flush=True)
    for r in rows:
        r["server_errors"] = n_err
        r["valid"] = bool(r["valid"]) and n_err == 0
        r["attention_backend"] = args.attention_backend
    (out / f"e2e_{args.tag}.json").write_text(json.dumps(rows, indent=1))
    print("| tag | in | conc | out tok/s | total tok/s | TTFT p50 ms | TPOT p50 ms |")
    for r in rows:
        print(f"| {args.tag} | {r['input_len']} | {r['concurrency']} | {r.get('output_throughput')} | "
              f"{r.get('total_throughput')} | {r.get('median_ttft_ms')} | {r.get('median_tpot_ms')} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
