"""Issue 8's concurrency-1 question, in the servers themselves: a torch-profiler window of decode
steps on each server (ours, and the same server with SGLang's in-tree MSA ops), summarised.

Serving runs H and I (e2e_serving.md) decode a lone 128K request 0.17-0.24 ms per token slower on
our server, while the attention backend's graphed step alone is not slower
(backend_decode_ab.md). This starts both servers on one card (equal memory shares), and for
each in turn: a warm-up, one request of ``--input`` random ids generating ``--new`` tokens, and,
once it decodes, SGLang's /start_profile for ``--steps`` steps twice: GPU activity alone, then with
the host's Python functions (with_stack). From each trace it prints: the window's wall time per step, GPU busy time per step (union of kernel and
memcpy intervals) and so the GPU's idle share (a host-bound step leaves the GPU idle), the host
period between consecutive CUDA-graph launches, the largest kernels with their counts, and (host
window) the inclusive time of SGLang's and m3serve's Python functions.
Writes $OUT/profile_decode.json (and the GPU windows' traces under $OUT/prof_<impl>_gpu/).
Usage: python scripts/gpu/profile_decode.py CKPT [--input 131072] [--new 1500] [--steps 40]
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import requests
from e2e_serving import warm_up
from serving_common import server_args, side_by_side_servers

from m3serve.launch import start_staggered


def load_trace(folder: Path, wait_s: float = 0.0) -> dict[str, Any] | None:
    """The newest trace under ``folder``; with ``wait_s``, retried until it parses: the server
    writes it after the window ends, and a host trace with stacks takes seconds (session 11's
    first run read one half-written and stopped)."""
    deadline = time.time() + wait_s
    while True:
        files = sorted(folder.rglob("*.json*"), key=lambda p: p.stat().st_mtime)
        try:
            if files:
                f = files[-1]
                opener = gzip.open if f.suffix == ".gz" else open
                with opener(f, "rt") as fh:
                    return json.load(fh)
        except (EOFError, OSError, json.JSONDecodeError):
            pass
        if time.time() >= deadline:
            return None
        time.sleep(0.5)


def union_us(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def summarise(trace: dict[str, Any], steps: int) -> dict[str, Any]:
    ev = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    gpu = [e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    spans = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in gpu] or [
        (e["ts"], e["ts"] + e.get("dur", 0)) for e in ev if e.get("cat") == "cpu_op"
    ]  # a CPU dry run: the window from the CPU ops
    t0, t1 = min(a for a, _ in spans), max(b for _, b in spans)
    busy = union_us(spans) if gpu else 0.0
    launches = sorted(e["ts"] for e in ev if e.get("cat") == "cuda_runtime"
                      and "GraphLaunch" in e.get("name", ""))  # fmt: skip
    periods = [b - a for a, b in itertools.pairwise(launches)]
    per: dict[str, list[float]] = {}
    for e in gpu:
        per.setdefault(e["name"][:90], []).append(e.get("dur", 0))
    top = sorted(per.items(), key=lambda kv: -sum(kv[1]))[:25]
    # host side: inclusive time of Python functions (the scheduler's and ours), per name
    py: dict[str, list[float]] = {}
    for e in ev:
        if e.get("cat") == "python_function":
            py.setdefault(e["name"][:110], []).append(e.get("dur", 0))
    keep = ("sglang/srt", "m3serve", "flashinfer")
    top_py = sorted(((k, v) for k, v in py.items() if any(w in k for w in keep)
                     and "watchdog" not in k), key=lambda kv: -sum(kv[1]))  # fmt: skip
    ours_py = [kv for kv in top_py if "m3serve" in kv[0]][:20]
    return {
        "window_us": t1 - t0,
        "gpu_busy_us": busy,
        "gpu_idle_share": 1 - busy / (t1 - t0),
        "steps_requested": steps,
        "graph_launches": len(launches),
        "graph_launch_period_us_median": sorted(periods)[len(periods) // 2] if periods else None,
        "window_us_per_graph_launch": (t1 - t0) / len(launches) if launches else None,
        "gpu_busy_us_per_graph_launch": busy / len(launches) if launches else None,
        "top_gpu": [{"name": k, "count": len(v), "total_us": round(sum(v), 1)} for k, v in top],
        "top_python": [{"name": k, "count": len(v), "total_us": round(sum(v), 1)}
                       for k, v in top_py[:40]],
        "m3serve_python": [{"name": k, "count": len(v), "total_us": round(sum(v), 1)}
                           for k, v in ours_py],
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--input", type=int, default=131072)
    ap.add_argument("--new", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--max-total-tokens", type=int, default=400_000)
    ap.add_argument("--servers", default="ours,sglang")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script (tiny model)")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    out = Path(os.environ.get("OUT", "gpu-out")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    names = args.servers.split(",")
    page = 128 if cuda else 16  # the tiny checkpoint's MSA block
    base = server_args(page, args.input + args.new + 4096, 64)
    base += ["--cuda-graph-max-bs-decode", "8"] if cuda else []
    servers = side_by_side_servers(
        args.ckpt, names, base, device=args.device, max_total_tokens=args.max_total_tokens,
        first_mem_fraction=0.4, log_prefix=out / "server_prof",
    )  # fmt: skip
    failed = start_staggered([servers[n] for n in names], share_gpu=cuda)
    result: dict[str, Any] = {"input": args.input, "new": args.new, "steps": args.steps}
    try:
        for i, e in failed.items():
            print(f"server {names[i]} failed to start:\n{str(e)[-2000:]}", flush=True)
        for n in [n for i, n in enumerate(names) if i not in failed]:
            s = servers[n]
            print(f"{n}: warm-up {warm_up(s, min(9000, args.input)):.1f} s", flush=True)
            ids = [(13 * i) % 600 + 10 for i in range(args.input)]
            box: dict[str, Any] = {}

            def go(s=s, ids=ids, box=box) -> None:
                t = time.time()
                r = requests.post(s.url + "/generate", json={
                    "input_ids": ids, "sampling_params": {"max_new_tokens": args.new,
                    "temperature": 0, "ignore_eos": True}}, timeout=900)  # fmt: skip
                box["status"], box["s"] = r.status_code, time.time() - t
                box["meta"] = r.json().get("meta_info", {}) if r.ok else r.text[:300]

            th = threading.Thread(target=go)
            th.start()
            # decode has begun once the log shows a decode batch after the prefill
            log = Path(s.log_path)
            mark = log.stat().st_size if log.exists() else 0
            deadline = time.time() + 120
            while time.time() < deadline:
                text = log.read_text(errors="replace")[mark:] if log.exists() else ""
                if "Decode batch" in text:
                    break
                time.sleep(0.05)
            time.sleep(0.3)
            # window 1: GPU activity only (no host tracing, so the steps keep their pace);
            # window 2: host Python functions too (with_stack slows the host: its GPU idle share
            # is not the server's, but its per-function host times compare the two servers)
            windows = (("gpu", ["GPU"], False), ("host", ["CPU", "GPU"], True)) if cuda else (
                ("host", ["CPU"], True),)  # fmt: skip
            for wname, acts, stack in windows:
                pdir = out / f"prof_{n}_{wname}"
                r = requests.post(s.url + "/start_profile", json={
                    "output_dir": str(pdir), "num_steps": args.steps, "activities": acts,
                    "with_stack": stack, "record_shapes": False}, timeout=120)  # fmt: skip
                print(f"{n} {wname}: start_profile {r.status_code} {r.text[:120]}", flush=True)
                tr = load_trace(pdir, wait_s=90)
                summ = summarise(tr, args.steps) if tr else {"error": "no trace written"}
                result[f"{n}_{wname}"] = summ
                if stack:  # a host trace with stacks runs to tens of MB: the summary is kept
                    for f in pdir.rglob("*.json*"):
                        f.unlink()
                lists = ("top_gpu", "top_python", "m3serve_python")
                print(f"== {n} {wname} ==\n"
                      f"{json.dumps({k: v for k, v in summ.items() if k not in lists})}",
                      flush=True)  # fmt: skip
                for key, k in (("top_gpu", 18), ("top_python", 25), ("m3serve_python", 12)):
                    if summ.get(key):
                        print(f" {key}:")
                    for row in summ.get(key, [])[:k]:
                        print(f"  {row['total_us']:10.1f} us  x{row['count']:<5d} {row['name']}")
            th.join()
            result[f"{n}_request"] = {"status": box.get("status"), "seconds": box.get("s"),
                                      "meta": box.get("meta") if isinstance(box.get("meta"), dict)
                                      else None}  # fmt: skip
            print(f"{n}: request {result[f'{n}_request']['status']} in "
                  f"{result[f'{n}_request']['seconds']} s", flush=True)  # fmt: skip
    finally:
        for s in servers.values():
            s.stop()
    (out / "profile_decode.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
