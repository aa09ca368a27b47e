"""Where the Triton sparse-prefill main kernel's time goes: the same kernel with parts taken out.

    python3 scripts/gpu/ablate_prefill_main.py [--contexts 32768,131072]

Copies python/m3serve/kernels/msa into a temporary package per variant, edits the main
kernel's source text there (each edit must apply exactly once), and times the main kernel alone
(launch_main, after the layer's inverse index was built) on the benchmark's inputs (8K-query
chunk, 64 q / 4 KV heads, our bf16 selection):

    base       the Triton kernel as shipped (cuda: the CUDA one; cuda_*: the same cuts in it)
    nostore    partial O / lse stores predicated off at run time (ent < 0 never holds), so the
               MMAs, softmax and layout conversions still run but nothing reaches memory
    qsame      every tile gathers the query rows of the chunk's first 16 queries (L1/L2 hits)
               instead of the item's; the same instructions, no DRAM gather traffic
    both       nostore + qsame: the kernel's compute and shared-memory work alone

Prints ms per variant and the difference to base: what the partial stores and the gathers cost.
"""

from __future__ import annotations

import argparse
import importlib
import math
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_sparse_prefill as bsp  # noqa: E402

TRI = "sparse_prefill_triton.py"
CU = "sparse_prefill_main.cu"
NOSTORE = [(TRI, "mask=rmask[:, None],\n    )\n    two", "mask=rmask[:, None] & (ent64 < 0)[:, None],\n    )\n    two"),
           (TRI, "tl.join(lse, m_out),\n        mask=rmask[:, None],", "tl.join(lse, m_out),\n        mask=rmask[:, None] & (ent64 < 0)[:, None],")]  # fmt: skip
QSAME = [(TRI, "    t = ent // TOPK\n    rmask = _rows_ok", "    t = (ent // TOPK) % 16\n    rmask = _rows_ok")]
CU_NOSTORE = [(CU, "      if (pos_s[qi] >= 0) {", "      if (pos_s[qi] >= 0 && ent_s[qi] < 0) {"),
              (CU, "if (x.ok && (lane & 3) == 0)", "if (x.ok && (lane & 3) == 0 && x.ent < 0)")]  # fmt: skip
CU_QSAME = [(CU, "(long long)t_s[qi] * stride_qt + q_lane", "(long long)(t_s[qi] % 16) * stride_qt + q_lane")]  # fmt: skip
# name: (main kernel, edits); the CUDA kernel's nostore / qsame are the same cuts (in its
# one-query-per-warp path, the one GP 16 runs)
SAVED = ("nostore", "qsame", "both")
VARIANTS = {
    "base": ("triton", []), "nostore": ("triton", NOSTORE), "qsame": ("triton", QSAME),
    "both": ("triton", NOSTORE + QSAME), "cuda": ("cuda", []),
    "cuda_nostore": ("cuda", CU_NOSTORE), "cuda_qsame": ("cuda", CU_QSAME),
    "cuda_both": ("cuda", CU_NOSTORE + CU_QSAME),
}


def build(variant: str, edits: list[tuple[str, str, str]], root: Path):
    pkg = root / f"msa_{variant}"
    shutil.copytree(ROOT / "python/m3serve/kernels/msa", pkg)
    for name, old, new in edits:
        f = pkg / name
        src = f.read_text()
        assert src.count(old) == 1, f"{variant}: edit does not apply once: {old!r}"
        f.write_text(src.replace(old, new))
    return importlib.import_module(f"msa_{variant}.sparse_prefill")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="32768,131072")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ablate-"))
    sys.path.insert(0, str(root))
    mods = {v: (mk, build(v, e, root)) for v, (mk, e) in VARIANTS.items()}
    card = torch.cuda.get_device_name()
    sm = 1 / math.sqrt(bsp.D)
    lines = []
    for ctx in (int(c) for c in args.contexts.split(",")):
        x = bsp.make_inputs(ctx, bsp.CHUNK, 64, 4)
        ids = bsp.select(x)
        ms = {}
        for v, (mk, mod) in mods.items():
            w = mod.SparsePrefillWrapper(main_kernel=mk)
            w.plan(x["cu_q"], x["prefix"], x["seq"], x["page_table"], 64, 4, bsp.D, bsp.BLOCK,
                   bsp.TOPK)  # fmt: skip
            w.run(x["q"], x["k"], x["v"], ids, sm)  # builds the inverse index, autotunes
            ms[v] = bsp.bench(lambda w=w, x=x: w.launch_main(x["q"], x["k"], x["v"], sm))
        lines.append(
            f"| {ctx // 1024}K | " + " | ".join(f"{ms[v]:.3f}" for v in VARIANTS) + " | "
            + " | ".join(f"{ms['base'] - ms[v]:+.3f}" for v in SAVED) + " | "
            + " | ".join(f"{ms['cuda'] - ms['cuda_' + v]:+.3f}" for v in SAVED) + " |"
        )  # fmt: skip
        print(lines[-1], flush=True)
        x = ids = None
        torch.cuda.empty_cache()
    print(f"\nmain kernel ablation, {card}, 8K chunk, 64/4, ms (do_bench median)")
    print("| context | " + " | ".join(VARIANTS) + " | " + " | ".join(
        f"Triton saved by {v}" for v in SAVED) + " | " + " | ".join(
        f"CUDA saved by {v}" for v in SAVED) + " |")  # fmt: skip
    print("|---" * (1 + len(VARIANTS) + 2 * len(SAVED)) + "|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
