"""Import site for SGLang 0.5.23's in-tree M3 sparse prefill (the prefill benchmark's baseline).

Extends the ops site of ``sglang_baseline_site.py`` (SGLang's ``minimax_sparse`` Triton ops,
copied unmodified, with stand-ins for the three ``sglang.srt`` helpers they import) by SGLang's
wrapper ``sglang/srt/layers/attention/minimax_sparse_ops/minimax_sparse.py`` — the function its
M3 backend calls, ``minimax_sparse_prefill`` (index scoring + top-k + sparse attention) — also
copied unmodified. Its other imports (``sglang.srt.environ``, ``sglang.srt.utils``) are already
stand-ins there; ``.msa`` (the SM100 fmha path) is only imported with use_msa=True, which the
benchmark leaves off, as SGLang does on Hopper. The new package ``__init__`` files are empty.

Usage: python benchmarks/sglang_prefill_baseline_site.py [--src DIR | --wheel WHL] [--out DIR]
then PYTHONPATH=<out> and
``from sglang.srt.layers.attention.minimax_sparse_ops.minimax_sparse import minimax_sparse_prefill``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sglang_baseline_site import build as build_ops

WRAPPER = "sglang/srt/layers/attention/minimax_sparse_ops/minimax_sparse.py"
PACKAGES = [
    "sglang/srt/layers",
    "sglang/srt/layers/attention",
    "sglang/srt/layers/attention/minimax_sparse_ops",
]


def build(out: Path, src: str | None = "/tmp/sglang_src", wheel: str | None = None) -> Path:
    build_ops(out, src, wheel)
    with tempfile.TemporaryDirectory() as t:
        if wheel:
            with zipfile.ZipFile(wheel) as z:
                z.extract(WRAPPER, t)
            text = (Path(t) / WRAPPER).read_text()
        else:
            text = (Path(src) / WRAPPER).read_text()
    for pkg in PACKAGES:
        (out / pkg).mkdir(parents=True, exist_ok=True)
        (out / pkg / "__init__.py").write_text(
            '"""Empty stand-in package (m3serve benchmark site)."""\n'
        )
    (out / WRAPPER).write_text(text)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="/tmp/sglang_src", help="unpacked sglang wheel root")
    ap.add_argument("--wheel", default=None, help="sglang-0.5.23 wheel file")
    ap.add_argument("--out", default=".dev-prefill/sglang_site", help="site folder to create")
    a = ap.parse_args()
    print(build(Path(a.out), a.src, a.wheel))


if __name__ == "__main__":
    main()
