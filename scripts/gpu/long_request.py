"""Issue 8 item 3: one request at M3's context limit (1,048,576 tokens) served end to end.

Starts the same M3-shaped checkpoint twice, concurrently, on one card or (``--gpus 0,1``) on a card
each: ``ours`` (msa backend,
m3serve kernels) and ``sglang`` (msa backend with M3SERVE_MSA_IMPL=sglang: SGLang 0.5.23's in-tree
MSA ops; its in-tree M3 model cannot start there, see e2e_serving.py). Each gets the same
request: prompt = context limit − output tokens − 2 (SGLang's reserve), greedy, streamed (TTFT, decode tok/s), with the
prompt logprobs of the last positions. Peak GPU memory is polled with nvidia-smi during each
request (on the server's card; the servers hold their static pools, so the delta over the idle
level is the request's). On cards of their own the two requests run at the same time.

The reference for the answer is the other implementation of the same model: SGLang's in-tree MSA
ops, run chunk by chunk by the same server code (chunked prefill, 8192-token chunks). The script
checks that both give the same greedy tokens and that the prompt logprobs at the last positions
agree within bf16 tolerance, and writes $OUT/long_request.json. Usage:
python scripts/gpu/long_request.py CKPT [--tokens 1048576] [--output 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
from serving_common import card_name, physical_gpus, server_args, side_by_side_servers

from m3serve.launch import SGLangServer, start_staggered


class MemPoll(threading.Thread):
    """Peak nvidia-smi memory.used (MiB) while running."""

    def __init__(self, gpu: str = "0") -> None:
        super().__init__(daemon=True)
        self.gpu = gpu
        self.peak = 0
        self.stop_flag = threading.Event()

    @staticmethod
    def used(gpu: str = "0") -> int:
        try:
            out = subprocess.run(
                ["nvidia-smi", "-i", gpu, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
        except FileNotFoundError:  # a CPU dry run
            return 0
        return int(out.stdout.split()[0]) if out.stdout.strip() else 0

    def run(self) -> None:
        while not self.stop_flag.is_set():
            self.peak = max(self.peak, self.used(self.gpu))
            time.sleep(0.5)


def one_request(
    server: SGLangServer, ids: list[int], output: int, lp_tail: int, gpu: str = "0"
) -> dict[str, Any]:
    body = {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": output, "temperature": 0, "ignore_eos": True},
        "stream": True,
        "return_logprob": True,
        "logprob_start_len": len(ids) - lp_tail,
    }
    idle = MemPoll.used(gpu)
    poll = MemPoll(gpu)
    poll.start()
    t0 = time.time()
    first = None
    meta: dict[str, Any] = {}
    lists: dict[str, list[Any]] = {"output_token_logprobs": [], "input_token_logprobs": []}
    with requests.post(server.url + "/generate", json=body, stream=True, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            if first is None:
                first = time.time()
            meta = json.loads(line[5:]).get("meta_info", {})
            fin = meta.get("finish_reason") or {}
            if isinstance(fin, dict) and fin.get("type") == "abort":  # SGLang streams errors as 200
                raise RuntimeError(f"request aborted by the server: {fin.get('message')}")
            for key, have in lists.items():  # chunks carry cumulative or incremental lists
                got = meta.get(key) or []
                if len(got) >= len(have) and got[: len(have)] == have:
                    lists[key] = list(got)
                else:
                    have.extend(got)
    t1 = time.time()
    poll.stop_flag.set()
    poll.join()
    meta.update(lists)
    out_ids = [t[1] for t in meta["output_token_logprobs"]]
    ttft = (first or t1) - t0
    return {
        "prompt_tokens": meta.get("prompt_tokens"),
        "completion_tokens": meta.get("completion_tokens"),
        "ttft_s": round(ttft, 2),
        "decode_tok_s": round((len(out_ids) - 1) / max(t1 - (first or t1), 1e-9), 1),
        "e2e_s": round(t1 - t0, 2),
        "gpu_mem_idle_mib": idle,
        "gpu_mem_peak_mib": poll.peak,
        "output_ids": out_ids,
        "prompt_logprobs_tail": [t[0] for t in meta.get("input_token_logprobs", [])][-lp_tail:],
        "output_logprobs": [t[0] for t in meta.get("output_token_logprobs", [])],
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--tokens", type=int, default=1_048_576, help="the context limit")
    ap.add_argument("--output", type=int, default=32)
    ap.add_argument("--logprob-tail", type=int, default=64)
    ap.add_argument("--servers", default="ours,sglang")
    ap.add_argument("--mem-fraction", type=float, default=0.4,
                    help="each server's share of a shared card (the second reaches 2x it)")
    ap.add_argument("--extra", default="")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script (tiny model)")
    ap.add_argument("--page-size", type=int, default=128, help="= the checkpoint's MSA block")
    ap.add_argument("--gpus", default="", help="one device id per server, counted within the visible devices (e.g. 0,1)")
    args = ap.parse_args()
    gpus = [g for g in args.gpus.split(",") if g]
    out = Path(os.environ.get("OUT", "gpu-out"))
    out.mkdir(parents=True, exist_ok=True)
    base = server_args(args.page_size, args.tokens, 8, args.extra)
    names = args.servers.split(",")
    servers = side_by_side_servers(
        args.ckpt, names, base, device=args.device, max_total_tokens=args.tokens + 65536,
        first_mem_fraction=args.mem_fraction, log_prefix=out / "server_long",
        gpu_args=["--cuda-graph-max-bs-decode", "8"], gpus=gpus,
    )  # fmt: skip
    failed = start_staggered([servers[n] for n in names], share_gpu=not gpus)
    errors = {names[i]: str(e)[-3000:] for i, e in failed.items()}
    # SGLang generates at most context − prompt − 2 tokens; at 1M the limit is also MSA's (8192
    # blocks of 128: the top-k kernels' MAX_BLOCKS), so the prompt leaves those two slots free
    n_prompt = args.tokens - args.output - 2
    prompt = [(1103515245 * i + 12345) % 600 + 10 for i in range(n_prompt)]
    results: dict[str, Any] = {}
    try:
        for n, e in errors.items():
            print(f"server {n} failed to start:\n{e}", flush=True)

        def serve(n: str) -> None:
            # nvidia-smi counts every card: the device behind the visible id
            gpu = physical_gpus([gpus[names.index(n)] if gpus else "0"])[0]
            warm = [(7 * i) % 580 + 20 for i in range(min(20000, args.tokens // 2))]  # not a prefix
            one_request(servers[n], warm, 4, 8, gpu)  # warm-up: JIT compiles, graphs
            results[n] = r = one_request(servers[n], prompt, args.output, args.logprob_tail, gpu)
            r["gpu"] = gpu
            print(f"{n}: prompt {r['prompt_tokens']} TTFT {r['ttft_s']} s, decode "
                  f"{r['decode_tok_s']} tok/s, peak GPU {r['gpu_mem_peak_mib']} MiB "
                  f"(idle {r['gpu_mem_idle_mib']})", flush=True)  # fmt: skip

        live = [n for n in names if n not in errors]
        if gpus:  # a card each: both requests at the same time
            list(ThreadPoolExecutor(len(live) or 1).map(serve, live))
        else:
            for n in live:
                serve(n)
    finally:
        for s in servers.values():
            s.stop()
    check: dict[str, Any] = {}
    if "ours" in results and "sglang" in results:
        a, b = results["ours"], results["sglang"]
        lp = [abs(x - y) for x, y in zip(a["prompt_logprobs_tail"], b["prompt_logprobs_tail"],
                                         strict=False) if x is not None and y is not None]  # fmt: skip
        same = sum(x == y for x, y in zip(a["output_ids"], b["output_ids"], strict=False))
        check = {
            "greedy_tokens_equal": a["output_ids"] == b["output_ids"],
            "greedy_prefix_equal": same,
            "prompt_logprob_max_abs_diff": max(lp) if lp else None,
            "prompt_logprob_mean_abs_diff": sum(lp) / len(lp) if lp else None,
            "positions_compared": len(lp),
            "ttft_ratio_sglang_over_ours": round(b["ttft_s"] / a["ttft_s"], 2),
            "decode_ratio_ours_over_sglang": round(a["decode_tok_s"] / b["decode_tok_s"], 2),
        }
        print(json.dumps(check), flush=True)
    card = card_name(args.device)
    (out / "long_request.json").write_text(json.dumps(
        {"card": card, "server_args": base, "tokens": args.tokens, "output": args.output,
         "results": results, "check": check, "start_errors": errors}, indent=1))  # fmt: skip
    return 1 if errors or not results else 0


if __name__ == "__main__":
    raise SystemExit(main())
