"""benchmarks/e2e_report.py: which serving rows count, the pairs it reports, the markdown it writes.

The report decides what the committed e2e table claims, so its rules are tested on a small
synthetic document: a row counts only if valid and no earlier run could have served its prompts
from the radix cache; a pair needs both implementations counted in the same run and cell.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _report() -> Any:
    spec = importlib.util.spec_from_file_location(
        "e2e_report", ROOT / "benchmarks" / "e2e_report.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(run: str, impl: str, conc: int, tok: float, **kw: Any) -> dict[str, Any]:
    return {"run": run, "impl": impl, "kind": "random", "input_len": 131072, "output_len": 512,
            "concurrency": conc, "num_prompts": conc, "output_throughput": tok, "valid": True, **kw}  # fmt: skip


def _doc() -> dict[str, Any]:
    rows = [
        _row("X", "ours", 8, 300.0), _row("X", "sglang", 8, 250.0),
        _row("X", "ours", 32, 400.0, prompts_cached_upper_bound=8), _row("X", "sglang", 32, 300.0),
        _row("Y", "ours", 1, 180.0), _row("Y", "sglang", 1, 0.0, valid=False, invalid_reason="server down"),
        _row("Y", "ours", 8, 320.0), _row("Y", "sglang", 8, 260.0),
    ]  # fmt: skip
    runs = {
        "X": {"meta": {"card": "card-x"}, "command": "cmd x"},
        "Y": {"meta": {"card": "card-y"}, "command": "cmd y"},
    }
    return {"date": "2026-11-26", "runs": runs, "rows": rows}


def test_only_counted_pairs_become_cases() -> None:
    rep = _report()
    doc = _doc()
    cases = rep.cases(doc)
    # X c32 (ours may have hit an earlier run's cache) and Y c1 (baseline failed) are not cases
    assert [(c["case"].split("(run ")[1][0], c["ratio"]) for c in cases] == [
        ("X", 1.2),
        ("Y", 1.231),
    ]
    assert all(c["unit"] == "tok/s" and c["baseline"] == rep.BASELINE for c in cases)
    # the plots take one pair per cell: the latest run's
    latest = rep.latest(doc["rows"], ["X", "Y"])
    assert [(o["run"], o["concurrency"]) for o, _ in latest] == [("Y", 8)]


def test_markdown_says_why_a_row_is_not_counted() -> None:
    md = _report().markdown(_doc())
    lines = {
        ln.split(" | ")[5] + ln.split(" | ")[3]: ln
        for ln in md.splitlines()
        if ln.startswith("| X |") or ln.startswith("| Y |")
    }
    assert lines["ours32"].endswith("| no: up to 8 prompts cached by an earlier run |")
    assert lines["sglang1"].endswith("| no: server down |")
    assert lines["ours8"].endswith("| yes |")
    assert "| 1.20 |" in next(
        ln for ln in md.splitlines() if ln.startswith("| X |") and "| ours | 300.0 |" in ln
    )


def test_plots_take_the_latest_run_whatever_the_listed_order() -> None:
    rep = _report()
    doc = _doc()
    for listed in (["X", "Y"], ["Y", "X"]):
        doc["plot_runs"] = listed
        sel = rep.plot_selection(doc)
        assert [(o["run"], o["concurrency"]) for o, _ in sel] == [("Y", 8)], listed
    doc["plot_runs"] = ["X"]
    assert [(o["run"], o["concurrency"]) for o, _ in rep.plot_selection(doc)] == [("X", 8)]

