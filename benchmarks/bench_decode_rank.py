"""Where the decode step's top-k runs: its own launch vs inside the split-KV attention launch.

The MSA decode step is index scoring → top-k → sparse attention. "launch": select_blocks_decode
(scoring, then the top-k launch; fused into the scoring launch only at ≤ 64 blocks) and the
attention reading its ids. "attention": score_blocks_decode (scoring alone) and the split-KV
attention ranking each row's blocks itself (sparse_decode_split(scores=...): every (row, split)
program runs the exact "rounds" ranking up to its own slots), one launch fewer per step.

Timed on one card, same inputs, same process (shapes, inputs and timing method of
bench_sparse_decode.py): per step inside one CUDA graph of 8 steps cycling 4 layers' index-K
caches and 8 query sets (how a decode iteration runs a layer's step), bf16 and FP8 index keys,
the two forms alternated REPEATS times (median each); the dense FlashInfer decode timed the same
way; and the top-k + attention alone (scores fixed, graph cycles), for every split config. The
ids and outputs of the two forms are compared (they must be equal). Ratio > 1: "attention" faster.

Usage: python benchmarks/bench_decode_rank.py [--cases 8x131072,...] [--out DIR]
Writes DIR/decode_rank.json and decode_rank.md (the default DIR is a scratch folder, not
benchmarks/results: the numbers that are reported are committed by hand from a GPU run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_sparse_decode as bsd

CASES = "8x131072,8x32768,8x8192,1x131072,32x131072,64x131072,8x262144"
# BxNwW: contexts N in a page table W tokens wide, selection grid over the whole width (as in a
# serving CUDA graph, whose page table spans the context limit), e.g. 8x131072w1048576
REPEATS = 3


def run_case(b: int, n: int, peak: float, width: int | None = None) -> dict[str, Any]:
    from m3serve.kernels.msa.index_select import (
        DecodeSelectWorkspace,
        score_blocks_decode,
    )
    from m3serve.kernels.msa.sparse_decode import SparseDecodeWrapper
    from m3serve.kernels.msa.sparse_decode_split import RANK_MAX_BLOCKS, SPLIT_CONFIGS
    from m3serve.kernels.msa.topk import launch_topk_rows

    nb, _, gen, pt, k, v, idx_k, _, _, q, idx_q, seq, seq_host = bsd.case_inputs(b, n)
    hkv, topk, scale = bsd.HKV, bsd.TOPK, 1 / math.sqrt(bsd.D)
    res: dict[str, Any] = {"batch": b, "context": n, "blocks": nb, "width": width}
    dense_pt, msl = pt, n
    if width:  # the selection grid and the scores span the whole (wider) page table
        wide = torch.zeros(b, math.ceil(width / bsd.BLOCK), dtype=torch.int32, device="cuda")
        wide[:, :nb] = pt
        pt, msl = wide, None
    assert pt.shape[1] <= RANK_MAX_BLOCKS, f"{pt.shape[1]} blocks > {RANK_MAX_BLOCKS}"
    ws = DecodeSelectWorkspace(b * hkv, pt.shape[1], "cuda")
    ids = torch.empty(hkv, b, topk, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    # each form with its own default split configs (sparse_decode_split.default_split_config)
    wrappers = {
        rank: SparseDecodeWrapper(
            "cuda", backend="triton", max_rows=b * hkv, ranked=rank == "attention"
        )
        for rank in ("launch", "attention")
    }
    for rank, w in wrappers.items():
        w.plan(seq_host, 1, bsd.HQ, hkv, bsd.D, bsd.BLOCK, topk)
        res[f"split_config_{rank}"] = str(w._split_config())
    cyc = bsd.step_cycle_inputs(idx_k, q, idx_q, gen)
    res["cycle_layers"] = len(cyc["idx_k"])

    def run(w, ranked: bool, i: int, fp8: bool) -> None:
        bsd.decode_step(
            w, ranked, cyc["q"][i], cyc["idx_q"][i], *bsd.cycle_keys(cyc, i, fp8), k, v, pt, seq,
            ids, out, scale, ws, msl,
        )  # fmt: skip

    def step(rank: str, fp8: bool):
        return lambda i: run(wrappers[rank], rank == "attention", i, fp8)

    # -- the two forms give the same ids and, with the same split config, the same outputs (their
    #    default configs differ in split count, so there only within rounding) --
    same, maxdiff = True, 0.0
    for fp8 in (False, True):
        for i in range(bsd.STEP_CYCLE):
            step("launch", fp8)(i)
            want_ids, want_out = ids.clone(), out.clone()
            ids.fill_(-7)
            out.fill_(float("nan"))
            step("attention", fp8)(i)
            same &= bool(torch.equal(ids, want_ids))
            maxdiff = max(maxdiff, float((out.float() - want_out.float()).abs().max()))
            run(wrappers["launch"], True, i, fp8)  # the launch form's config, ranked inside
            same &= bool(torch.equal(out, want_out))  # bit-equal
    res["same_ids_and_out"] = same
    res["default_configs_maxdiff"] = maxdiff

    dense, dense_out = bsd.dense_wrapper(dense_pt, n), torch.empty_like(q)
    res["dense_cycle_ms"] = bsd.graph_cycle_ms(
        lambda i: dense.run(cyc["q"][i], (k, v), out=dense_out), bsd.STEP_CYCLE, bsd.STEP_CYCLE
    )
    for fp8 in (False, True):
        tag = "fp8" if fp8 else "bf16"
        runs: dict[str, list[float]] = {"launch": [], "attention": []}
        for _ in range(REPEATS):
            for rank in runs:
                runs[rank].append(
                    bsd.graph_cycle_ms(step(rank, fp8), bsd.STEP_CYCLE, bsd.STEP_CYCLE)
                )
        for rank, ms in runs.items():
            res[f"step_{tag}_{rank}_ms"] = statistics.median(ms)
            res[f"step_{tag}_{rank}_runs"] = ms
        res[f"step_{tag}_ratio"] = res[f"step_{tag}_launch_ms"] / res[f"step_{tag}_attention_ms"]
        nbytes = bsd.sparse_attn_bytes(b, n) + bsd.index_bytes(b, n, fp8)
        res[f"step_{tag}_pct_peak"] = nbytes / (res[f"step_{tag}_attention_ms"] * 1e-3) / peak
        for rank in runs:
            res[f"step_{tag}_{rank}_vs_dense"] = (
                res["dense_cycle_ms"] / res[f"step_{tag}_{rank}_ms"]
            )

    # -- top-k + attention alone, scores fixed (the scoring pass's output of the first input) --
    scores = score_blocks_decode(
        idx_q, idx_k, None, pt, seq, 1, topk, max_seq_len=msl, workspace=ws
    )
    w = wrappers["launch"]
    for cfg in SPLIT_CONFIGS:
        bsd.set_split_config(w, cfg, seq_host, 1)

        def two(i: int) -> None:
            launch_topk_rows(scores.scores, scores.local, ids, topk, hkv)
            w.run(cyc["q"][i], k, v, pt, ids, scale, out=out)

        def one(i: int) -> None:
            w.run(cyc["q"][i], k, v, pt, ids, scale, out=out, scores=scores)

        res[f"attn_{cfg}_launch_ms"] = bsd.graph_cycle_ms(two, bsd.STEP_CYCLE)
        res[f"attn_{cfg}_attention_ms"] = bsd.graph_cycle_ms(one, bsd.STEP_CYCLE)
    return res


def _label(r: dict[str, Any]) -> str:
    """N, and the page-table width when the selection spans a wider one."""
    w = r.get("width")
    return f"{r['context'] // 1024}K" + (f" in {w // 1024}K" if w else "")


def write_markdown(doc: dict[str, Any], path: Path) -> None:
    from m3serve.kernels.msa.sparse_decode_split import SPLIT_CONFIGS

    lines = [
        f"# decode top-k: own launch vs ranked inside the attention — {doc['device']}, "
        f"{doc['date']}",
        "",
        f"`{doc['command']}`; {doc['versions']}. Per step inside an 8-step CUDA graph, median of "
        f"{REPEATS} alternated runs each, ms; ratio = launch / attention (> 1: ranking inside "
        "the attention is faster); % peak = the step's minimum bytes / time / copy bandwidth "
        f"({doc['peak_Bps'] / 1e12:.2f} TB/s).",
        "",
        "| B | N | dense | bf16 launch | bf16 attention | ratio | FP8 launch | FP8 attention | "
        "ratio | FP8 vs dense (launch → attention) | split configs (launch / attention) | "
        "same ids + out |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        dn = r["dense_cycle_ms"]
        vs = f"{r['step_fp8_launch_vs_dense']:.2f}× → {r['step_fp8_attention_vs_dense']:.2f}×"
        lines.append(
            f"| {r['batch']} | {_label(r)} | {dn:.4f} | "
            f"{r['step_bf16_launch_ms']:.4f} | {r['step_bf16_attention_ms']:.4f} | "
            f"{r['step_bf16_ratio']:.3f} | {r['step_fp8_launch_ms']:.4f} | "
            f"{r['step_fp8_attention_ms']:.4f} | {r['step_fp8_ratio']:.3f} | {vs} | "
            f"{r['split_config_launch']} / {r['split_config_attention']} | "
            f"{r['same_ids_and_out']} |"
        )
    lines += [
        "",
        "Top-k + attention alone (scores fixed; graph cycles of 8 query sets), µs, launch / "
        "attention per split config:",
        "",
        "| B | N | " + " | ".join(SPLIT_CONFIGS) + " |",
        "|---|---|" + "---|" * len(SPLIT_CONFIGS),
    ]
    for r in doc["rows"]:
        cells = [
            f"{r[f'attn_{c}_launch_ms'] * 1e3:.1f} / {r[f'attn_{c}_attention_ms'] * 1e3:.1f}"
            for c in SPLIT_CONFIGS
        ]
        lines.append(f"| {r['batch']} | {_label(r)} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=CASES, help="BxN,... (batch x context)")
    ap.add_argument("--out", type=Path, default=Path("gpu-out"))
    args = ap.parse_args()
    import flashinfer
    import triton

    peak = bsd.copy_bandwidth()
    rows = []
    for spec in args.cases.split(","):
        b, rest = spec.split("x")
        n, _, w = rest.partition("w")
        r = run_case(int(b), int(n), peak, int(w) if w else None)
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if not k.startswith("attn_")}), flush=True)
        torch.cuda.empty_cache()
    doc = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "command": "python3 benchmarks/bench_decode_rank.py --cases " + args.cases,
        "versions": f"torch {torch.__version__}, triton {triton.__version__}, "
        f"flashinfer {flashinfer.__version__}",
        "peak_Bps": peak,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_rank.json").write_text(json.dumps(doc, indent=1))
    write_markdown(doc, args.out / "decode_rank.md")
    print((args.out / "decode_rank.md").read_text())


if __name__ == "__main__":
    main()
