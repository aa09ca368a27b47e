"""Build a tiny import site holding only SGLang 0.5.23's M3 decode ops, for the GPU baseline.

The GPU test machine has no sglang and cannot take its wheel plus dependencies in one run, and
importing ``sglang.srt.*`` pulls in most of the server. ``minimax_sparse_decode`` itself is plain
Triton + torch; it needs only its own package files and three small sglang.srt helpers
(``environ.envs``, ``runtime_context.get_platform``, ``utils.is_hip/is_xpu/is_gfx95_supported``).
This script copies SGLang's files unchanged from an installed sglang (its package __init__ files
replaced by empty ones, so importing one op does not import the server) and writes stand-ins for
those helpers. Nothing of SGLang is vendored into the repo: the site is built into an ignored
folder and travels with the GPU run.

Stand-in choices, all stated so the baseline is reproducible:
- every ``envs.X.get()`` is False: SGLANG_OPT_USE_MINIMAX_DECODE_TOPK_RADIX off (its JIT CUDA
  top-k needs sglang's jit build system; the 2-stage Triton top-k runs instead), no AITER, no
  Gluon prefill;
- ``get_platform().is_sm90`` is True on a compute-capability-9 GPU (selects SGLang's
  Hopper-tuned paged kernels), every other platform flag False.

Usage: python benchmarks/sglang_decode_baseline_site.py [--src SITE_PACKAGES/sglang] [--out DIR]
then PYTHONPATH=DIR and ``from sglang.srt.layers.attention.minimax_sparse_ops.minimax_sparse
import minimax_sparse_decode``.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
from pathlib import Path

OPS = "kernels/ops/attention/minimax_sparse"
SRT_OPS = "srt/layers/attention/minimax_sparse_ops"
EMPTY_INITS = [
    "__init__.py",
    "kernels/__init__.py",
    "kernels/ops/__init__.py",
    "kernels/ops/attention/__init__.py",
    "srt/__init__.py",
    "srt/layers/__init__.py",
    "srt/layers/attention/__init__.py",
    f"{SRT_OPS}/__init__.py",
]

ENVIRON = '''"""Stand-in for sglang.srt.environ (m3serve baseline site): every flag reads False."""


class _Flag:
    def get(self):
        return False


class _Envs:
    def __getattr__(self, name):
        return _Flag()


envs = _Envs()
'''

RUNTIME_CONTEXT = '''"""Stand-in for sglang.srt.runtime_context (m3serve baseline site)."""

import torch


class _Platform:
    @property
    def is_sm90(self):
        return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9

    def __getattr__(self, name):
        return False


def get_platform():
    return _Platform()
'''

UTILS = '''"""Stand-in for sglang.srt.utils (m3serve baseline site): CUDA only, no ROCm/XPU."""


def is_hip():
    return False


def is_xpu():
    return False


def is_gfx95_supported():
    return False
'''


def find_installed_sglang() -> Path:
    spec = importlib.util.find_spec("sglang")  # locates the package without importing it
    assert spec is not None and spec.submodule_search_locations, "sglang is not installed here"
    return Path(next(iter(spec.submodule_search_locations)))


def build(src: Path, out: Path) -> Path:
    site = out / "sglang"
    if site.exists():
        shutil.rmtree(site)
    shutil.copytree(
        src / OPS,
        site / OPS,
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        dirs_exist_ok=True,
    )
    (site / SRT_OPS).mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / SRT_OPS / "minimax_sparse.py", site / SRT_OPS / "minimax_sparse.py")
    for init in EMPTY_INITS:
        (site / init).parent.mkdir(parents=True, exist_ok=True)
        (site / init).write_text('"""Empty: the m3serve baseline site imports single modules."""\n')
    (site / "srt/environ.py").write_text(ENVIRON)
    (site / "srt/runtime_context.py").write_text(RUNTIME_CONTEXT)
    (site / "srt/utils.py").write_text(UTILS)
    version = (src.parent / "sglang-0.5.23.dist-info").exists()
    (site / "BASELINE_SOURCE.txt").write_text(
        f"copied from {src} (0.5.23 dist-info present: {version})\n"
    )
    return site


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", type=Path, default=None, help="an installed sglang package folder")
    ap.add_argument("--out", type=Path, default=Path(".dev-decode/sglang_site"))
    args = ap.parse_args()
    site = build(args.src or find_installed_sglang(), args.out)
    print(f"baseline site: {site}")


if __name__ == "__main__":
    main()
