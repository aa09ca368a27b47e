"""Issue 8's serving results: merge runs of scripts/gpu/e2e_serving.py into
benchmarks/results/e2e_serving.json and write the markdown table and the two plots.

    python benchmarks/e2e_report.py --add D gpu-out/e2e_r128k.json --command "STAGES=e2e ..."
    python benchmarks/e2e_report.py            # only rewrite .md / .png from the .json

The JSON keeps DESIGN.md's results format ("cases": one per valid ours/sglang pair, unit tok/s,
ratio = ours / sglang output throughput) plus every run's metadata and raw rows. A row counts
only if every request completed, the server logged no error, and no earlier run on that server
could have left its prompts in the radix cache (rows with ``prompts_cached_upper_bound`` > 0, from
runs made before the script flushed the cache, are listed but not plotted). Plots (matplotlib):
e2e_throughput.png (output tok/s vs concurrency, one panel per workload) and e2e_speedup.png
(ours / SGLang output tok/s vs input length, one line per concurrency).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
BASELINE = "SGLang 0.5.23 in-tree MSA ops (same server, M3SERVE_MSA_IMPL=sglang)"


def workload(r: dict[str, Any]) -> str:
    if r["kind"] == "gsp":
        return f"shared prefix {r.get('shared_prefix', 61440)} + {r['input_len'] - r.get('shared_prefix', 61440)}"
    return f"random {r['input_len']}"


def counted(r: dict[str, Any]) -> bool:
    return bool(r.get("valid")) and not r.get("prompts_cached_upper_bound")


def pairs(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(ours, sglang) rows of the same run, workload and concurrency; both counted."""
    out = []
    for o in rows:
        if o["impl"] != "ours" or not counted(o):
            continue
        for s in rows:
            same = all(s.get(k) == o.get(k) for k in ("run", "kind", "input_len", "concurrency"))
            if s["impl"] == "sglang" and same and counted(s):
                out.append((o, s))
    return out


def latest(
    rows: list[dict[str, Any]], order: list[str]
) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """One pair per (workload, concurrency): the one from the latest run."""
    best: dict[tuple[str, int], tuple[dict[str, Any], dict[str, Any]]] = {}
    for o, s in sorted(pairs(rows), key=lambda p: order.index(p[0]["run"])):
        best[(workload(o), o["concurrency"])] = (o, s)
    return list(best.values())


def cases(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for o, s in pairs(doc["rows"]):
        card = doc["runs"][o["run"]]["meta"].get("card", "?")
        out.append({
            "case": f"{workload(o)}, out {o['output_len']}, concurrency {o['concurrency']} "
                    f"(run {o['run']}, {card})",
            "ours": round(o["output_throughput"], 1), "baseline": BASELINE,
            "baseline_value": round(s["output_throughput"], 1), "unit": "tok/s",
            "ratio": round(o["output_throughput"] / s["output_throughput"], 3),
            "roofline_fraction": None,
        })  # fmt: skip
    return out


def fmt(x: Any, nd: int = 1) -> str:
    return "—" if x is None else f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        f"# e2e_serving (issue 8): ours vs SGLang's in-tree MSA ops, same server — {doc['date']}",
        "",
        doc.get("preamble", ""),
        "",
        "| run | card | workload | conc | prompts | impl | out tok/s | total tok/s | TTFT p50 / p99 ms | "
        "TPOT p50 / p99 ms | ours / sglang out tok/s | counted |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratio = {(o["run"], workload(o), o["concurrency"]): o["output_throughput"] / s["output_throughput"]
             for o, s in pairs(doc["rows"])}  # fmt: skip
    for r in doc["rows"]:
        card = doc["runs"][r["run"]]["meta"].get("card", "?")
        rt = ratio.get((r["run"], workload(r), r["concurrency"])) if r["impl"] == "ours" else None
        why = "yes" if counted(r) else (
            f"no: up to {r['prompts_cached_upper_bound']} prompts cached by an earlier run"
            if r.get("prompts_cached_upper_bound") else "no: " + r.get("invalid_reason", "failed"))  # fmt: skip
        lines.append(
            f"| {r['run']} | {card} | {workload(r)} | {r['concurrency']} | {r.get('num_prompts')} | "
            f"{r['impl']} | {fmt(r.get('output_throughput'))} | {fmt(r.get('total_throughput'), 0)} | "
            f"{fmt(r.get('median_ttft_ms'), 0)} / {fmt(r.get('p99_ttft_ms'), 0)} | "
            f"{fmt(r.get('median_tpot_ms'), 2)} / {fmt(r.get('p99_tpot_ms'), 2)} | "
            f"{'' if rt is None else f'{rt:.2f}'} | {why} |"
        )
    lines += ["", "Runs:"]
    for name, run in doc["runs"].items():
        meta = run["meta"]
        lines.append(f"- {name} ({meta.get('card', '?')}; servers on GPUs {meta.get('gpus') or 'shared'}; "
                     f"card parity {meta.get('card_parity') or '—'}): `{run.get('command', '')}`"
                     + (f" — {run['note']}" if run.get("note") else ""))  # fmt: skip
    lines += ["", doc.get("reading", ""), ""]
    return "\n".join(lines)


def plot_selection(doc: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """The pairs the plots draw: of the runs in ``plot_runs`` (all if unset), per cell the
    latest run's. "Latest" is the order runs were added to the JSON (``--add``), whatever order
    ``plot_runs`` lists them in (it listed them newest first until session 10, so the oldest
    run's cells were drawn where a newer run had the same cell)."""
    chosen = set(doc.get("plot_runs") or doc["runs"])
    runs = [r for r in doc["runs"] if r in chosen]
    return latest([r for r in doc["rows"] if r["run"] in runs], runs)


def plots(doc: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = plot_selection(doc)
    loads = sorted({workload(o) for o, _ in sel}, key=lambda w: ("shared" in w, len(w), w))
    fig, axes = plt.subplots(1, len(loads), figsize=(5 * len(loads), 4), squeeze=False)
    for ax, w in zip(axes[0], loads, strict=True):
        ps = sorted((p for p in sel if workload(p[0]) == w), key=lambda p: p[0]["concurrency"])
        c = [o["concurrency"] for o, _ in ps]
        ax.plot(c, [o["output_throughput"] for o, _ in ps], "o-", label="ours (m3serve kernels)")
        ax.plot(c, [s["output_throughput"] for _, s in ps], "s--", label="SGLang in-tree MSA ops")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("max concurrency")
        used = sorted({o["run"] for o, _ in ps})
        ax.text(0.02, 0.02, "runs " + ", ".join(used) + " (see the .md)", transform=ax.transAxes,
                fontsize=7)  # fmt: skip
        ax.set_ylabel("output tok/s")
        ax.set_title(f"{w} in, 512 out", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "e2e_throughput.png", dpi=110)
    fig, ax = plt.subplots(figsize=(6, 4))
    rand = [p for p in sel if p[0]["kind"] == "random"]
    for conc in sorted({o["concurrency"] for o, _ in rand}):
        ps = sorted(
            (p for p in rand if p[0]["concurrency"] == conc), key=lambda p: p[0]["input_len"]
        )
        ax.plot([o["input_len"] for o, _ in ps],
                [o["output_throughput"] / s["output_throughput"] for o, s in ps], "o-", label=f"c{conc}")  # fmt: skip
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("input tokens (random ids)")
    ax.set_ylabel("ours / SGLang output tok/s")
    runs = sorted({o["run"] for o, _ in sel})
    ax.set_title(f"end-to-end speedup vs context (runs {', '.join(runs)})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "e2e_speedup.png", dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--add", nargs=2, metavar=("RUN", "E2E_JSON"), help="merge a run's e2e_<tag>.json"
    )
    ap.add_argument("--command", default="", help="the command that made the added run")
    ap.add_argument("--note", default="")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument(
        "--plot-runs", default="", help="runs to plot (comma separated; kept in the JSON)"
    )
    args = ap.parse_args()
    path = RESULTS / "e2e_serving.json"
    doc = json.loads(path.read_text())
    if args.add:
        name, src = args.add
        run = json.loads(Path(src).read_text())
        doc["runs"][name] = {"meta": run["meta"], "command": args.command, "note": args.note}
        doc["rows"] = [r for r in doc["rows"] if r["run"] != name]
        doc["rows"] += [{**r, "run": name} for r in run["rows"]]
    if args.plot_runs:
        doc["plot_runs"] = args.plot_runs.split(",")
    doc["benchmark"] = "e2e_serving"
    doc["cases"] = cases(doc)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    (RESULTS / "e2e_serving.md").write_text(markdown(doc))
    if not args.no_plots:
        plots(doc)
    for c in doc["cases"]:
        print(f"{c['case']}: ours {c['ours']} vs {c['baseline_value']} tok/s = {c['ratio']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
