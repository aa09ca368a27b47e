"""Issue 8 item 4 (and issue 9's TP runs): tensor parallel serving of the M3-shaped checkpoint.

Serves one configuration after another (each a real ``python -m sglang.launch_server`` with
``--tp-size N`` on the first N of ``--gpus``), by default ``ours:1,ours:2,sglang:2``: our kernels at
TP 1 (the reference), our kernels at TP 2, SGLang's in-tree MSA ops at TP 2 (M3SERVE_MSA_IMPL, see
e2e_serving.py); ``inv:N`` is ours in the TP-invariant mode (M3SERVE_TP_INVARIANT=2), whose TP 2
must equal its TP 1 bit for bit. For each: the same greedy prompt set (random ids of several lengths, output
logprobs and the top-2 logprobs of every step), then the same ``sglang.benchmark.serving``
workloads. Checks every configuration's greedy tokens against the first's, and where they part
gives the step and the reference's top-2 margin there (a bf16 all-reduce sums in another order
than one GPU does, so a near-tie may flip). Custom all-reduce is off (it is an sgl_kernel op; the
stand-in has none): TP all-reduces go through NCCL. Writes $OUT/tp_<tag>.json and prints tables.
Usage: python scripts/gpu/tp_serving.py CKPT --gpus 0,1 [--configs ours:1,ours:2,sglang:2]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import requests
from e2e_serving import bench, parse_workload, warm_up
from serving_common import IMPL_ENV, card_name, physical_gpus, server_args

from m3serve.launch import SGLangServer

LENGTHS = (700, 4099, 9000, 16500, 33000)


def greedy(server: SGLangServer, ids: list[int], new: int, tail: int = 64) -> dict[str, Any]:
    """Greedy tokens with their logprobs and top-2 margins, and the prompt's last ``tail``
    logprobs (teacher-forced: the same tokens on every configuration)."""
    r = requests.post(server.url + "/generate", json={
        "input_ids": ids, "return_logprob": True, "top_logprobs_num": 2,
        "logprob_start_len": max(len(ids) - tail, 0),
        "sampling_params": {"max_new_tokens": new, "temperature": 0, "ignore_eos": True}},
        timeout=900)  # fmt: skip
    r.raise_for_status()
    meta = r.json()["meta_info"]
    top = meta.get("output_top_logprobs") or []
    return {
        "tokens": [t[1] for t in meta["output_token_logprobs"]],
        "logprobs": [t[0] for t in meta["output_token_logprobs"]],
        "top2_margin": [(s[0][0] - s[1][0]) if s and len(s) > 1 else None for s in top],
        "prompt_logprobs": [t[0] for t in meta.get("input_token_logprobs") or []],
    }


def compare(ref: list[dict[str, Any]], got: list[dict[str, Any]]) -> dict[str, Any]:
    parts, lp, plp = [], [], []
    for a, b in zip(ref, got, strict=True):
        plp += [abs(x - y) for x, y in zip(a.get("prompt_logprobs", []), b.get("prompt_logprobs", []),
                                           strict=False) if x is not None and y is not None]  # fmt: skip
        n = next(
            (i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"], strict=True)) if x != y),
            None,
        )
        same = len(a["tokens"]) if n is None else n
        lp += [abs(x - y) for x, y in zip(a["logprobs"][:same], b["logprobs"][:same], strict=True)]
        if n is not None:
            parts.append({"step": n, "ref_top2_margin": a["top2_margin"][n]})
    return {
        "prompts": len(ref),
        "prompts_identical": len(ref) - len(parts),
        "greedy_tokens_identical": not parts,
        "diverged": parts,
        "logprob_max_abs_diff_before_divergence": max(lp) if lp else None,
        "prompt_logprob_max_abs_diff": max(plp) if plp else None,
        "prompt_logprob_mean_abs_diff": sum(plp) / len(plp) if plp else None,
        "prompt_positions_compared": len(plp),
    }


def compare_files(paths: list[str]) -> int:
    """Runs from several tp_<tag>.json files (e.g. configurations served at the same time on
    different cards), each checked against the first file's first run."""
    runs = [r for p in paths for r in json.loads(Path(p).read_text())["runs"] if "greedy" in r]
    if not runs:
        raise SystemExit("no run with greedy tokens in " + ", ".join(paths))
    ref = runs[0]
    print(f"reference: {ref['impl']} TP{ref['tp']}")
    for r in runs[1:]:
        print(f"{r['impl']} TP{r['tp']}: {json.dumps(compare(ref['greedy'], r['greedy']))}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt", help="the checkpoint, or with --compare the tp_<tag>.json files")
    ap.add_argument("more", nargs="*", help="with --compare: more tp_<tag>.json files")
    ap.add_argument("--compare", action="store_true", help="only compare earlier runs' tokens")
    ap.add_argument("--gpus", default="0,1")
    ap.add_argument("--configs", default="ours:1,ours:2,sglang:2", help="IMPL:TP,...")
    ap.add_argument("--workloads", nargs="*", default=["random:32768:512:8"])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-total-tokens", type=int, default=2_000_000)
    ap.add_argument("--context-length", type=int, default=65536)
    ap.add_argument("--deadline", type=float, default=520, help="no new server starts after (s)")
    ap.add_argument("--tag", default="tp")
    ap.add_argument("--extra", default="")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script (tiny model)")
    ap.add_argument("--page-size", type=int, default=128)
    args = ap.parse_args()
    if args.compare:
        return compare_files([args.ckpt, *args.more])
    t_start = time.time()
    out = Path(os.environ.get("OUT", "gpu-out"))
    out.mkdir(parents=True, exist_ok=True)
    gpus = args.gpus.split(",")
    configs = [(c.split(":")[0], int(c.split(":")[1])) for c in args.configs.split(",")]
    workloads = [parse_workload(s) for s in args.workloads]
    prompts = [[(1103515245 * (i + 7919 * k) + 12345) % 600 + 10 for i in range(n)]
               for k, n in enumerate(LENGTHS) if n + args.new_tokens < args.context_length]  # fmt: skip
    cuda = args.device == "cuda"
    base = server_args(args.page_size, args.context_length, 64, args.extra)
    if cuda:
        base += ["--mem-fraction-static", "0.85", "--cuda-graph-max-bs-decode", "64",
                 "--disable-custom-all-reduce"]  # fmt: skip
    runs: list[dict[str, Any]] = []
    for impl, tp in configs:
        name = f"{impl}_tp{tp}"
        if time.time() - t_start > args.deadline:
            print(f"deadline: skipping {name}", flush=True)
            continue
        env = dict(IMPL_ENV[impl])
        if cuda:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(physical_gpus(gpus[:tp]))
        server = SGLangServer(
            args.ckpt, device=args.device, use_standin=True, max_total_tokens=args.max_total_tokens,
            extra_args=[*base, "--tp-size", str(tp)], env=env,
            log_path=out / f"server_{args.tag}_{name}.log", startup_timeout=480,
        )  # fmt: skip
        run: dict[str, Any] = {"impl": impl, "tp": tp, "gpus": env.get("CUDA_VISIBLE_DEVICES")}
        t0 = time.time()
        try:
            server.start()
            run["startup_s"] = round(time.time() - t0, 1)
            run["warm_up_s"] = round(warm_up(server, min(9000, args.context_length // 2)), 1)
            run["greedy"] = [greedy(server, p, args.new_tokens) for p in prompts]
            run["bench"] = []
            for w in workloads:
                for c in w["conc"]:
                    row = bench(
                        server, args.ckpt, w, c, out, f"{args.tag}_{name}_{w['input']}_c{c}"
                    )
                    run["bench"].append(row)
                    print(json.dumps({"config": name, **row}), flush=True)
        except Exception as e:  # recorded; the next configuration still runs
            run["error"] = f"{type(e).__name__}: {e}"[-2000:]
            print(f"{name} failed: {run['error']}\n{server.log_tail(40)}", flush=True)
        finally:
            server.stop()
        runs.append(run)
    ref = next((r for r in runs if "greedy" in r), None)
    for r in runs:
        if ref is not None and r is not ref and "greedy" in r:
            r["vs_first"] = compare(ref["greedy"], r["greedy"])
    card = card_name(args.device)
    meta = {"card": card, "server_args": base, "prompt_lengths": [len(p) for p in prompts],
            "new_tokens": args.new_tokens, "reference": f"{ref['impl']}_tp{ref['tp']}" if ref else None}  # fmt: skip
    (out / f"tp_{args.tag}.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    print(f"card: {card}")
    print("| config | startup s | greedy vs first | diverged (step, ref top-2 margin) | "
          "max |dlogprob| before | prompt logprobs max / mean |d| | error |")  # fmt: skip
    for r in runs:
        v = r.get("vs_first", {})
        same = f"{v['prompts_identical']}/{v['prompts']}" if v else "(reference)"
        div = ", ".join(f"({d['step']}, {d['ref_top2_margin']})" for d in v.get("diverged", []))
        print(
            f"| {r['impl']} TP{r['tp']} | {r.get('startup_s')} | {same} | {div} | "
            f"{v.get('logprob_max_abs_diff_before_divergence')} | "
            f"{v.get('prompt_logprob_max_abs_diff')} / {v.get('prompt_logprob_mean_abs_diff')} | "
            f"{r.get('error', '')[:80]} |"
        )
    print(
        "| config | workload | conc | out tok/s | out tok/s per GPU | TTFT p50 ms | TPOT p50 ms | valid |"
    )
    for r in runs:
        for b in r.get("bench", []):
            ot = b.get("output_throughput") or 0
            print(f"| {r['impl']} TP{r['tp']} | {b['kind']} {b['input_len']} | {b['concurrency']} | "
                  f"{ot:.1f} | {ot / r['tp']:.1f} | {b.get('median_ttft_ms')} | "
                  f"{b.get('median_tpot_ms')} | {b['valid']} |")  # fmt: skip
    ok = ref is not None and all("error" not in r for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
