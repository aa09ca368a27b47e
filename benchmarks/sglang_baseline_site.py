"""Build a tiny import site with SGLang 0.5.23's own M3 index-selection Triton ops (the baseline).

The device machine has torch + triton but no sglang, and the full sglang wheel drags in dozens of
start-up dependencies. The selection ops under ``sglang/kernels/ops/attention/minimax_sparse/`` are
plain Triton; they import only three small ``sglang.srt`` helpers, replaced here by stand-ins:
``sglang.srt.utils`` (is_hip / is_xpu / is_gfx95_supported → False on Hopper),
``sglang.srt.environ.envs`` (every flag at False: the decode top-k takes SGLang's Triton two-stage
path, since the JIT radix top-k needs tvm-ffi + sgl_kernel headers that do not travel) and
``sglang.srt.runtime_context.get_platform`` (is_sm90 from the CUDA capability, which selects
SGLang's paged decode-scoring kernel on Hopper, its best path there). The package ``__init__``
files are empty so nothing else is imported. The op files are copied unmodified.

Usage: python benchmarks/sglang_baseline_site.py [--src DIR | --wheel WHL] [--out DIR]
(default: the unpacked wheel at /tmp/sglang_src, else ``pip download --no-deps sglang==0.5.23``).
Then PYTHONPATH=<out> and ``import sglang.kernels.ops.attention.minimax_sparse...``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OPS = "sglang/kernels/ops/attention/minimax_sparse"
PACKAGES = [
    "sglang",
    "sglang/kernels",
    "sglang/kernels/ops",
    "sglang/kernels/ops/attention",
    "sglang/srt",
]

STANDINS = {
    "sglang/srt/utils.py": '''"""Stand-in (m3serve benchmark site): platform probes the minimax_sparse ops import."""


def is_hip() -> bool:
    return False


def is_xpu() -> bool:
    return False


def is_gfx95_supported() -> bool:
    return False
''',
    "sglang/srt/environ.py": '''"""Stand-in (m3serve benchmark site): every SGLang env flag reads False."""


class _Flag:
    def get(self) -> bool:
        return False


class _Envs:
    def __getattr__(self, name: str) -> _Flag:
        return _Flag()


envs = _Envs()
''',
    "sglang/srt/runtime_context.py": '''"""Stand-in (m3serve benchmark site): get_platform().is_sm90 from the CUDA capability."""

from types import SimpleNamespace

import torch


def get_platform() -> SimpleNamespace:
    cap = torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)
    return SimpleNamespace(is_sm90=cap[0] == 9, is_sm100=cap[0] == 10)
''',
}


def _source_root(src: str | None, wheel: str | None, tmp: Path) -> Path:
    if wheel:
        with zipfile.ZipFile(wheel) as z:
            z.extractall(tmp, [n for n in z.namelist() if n.startswith(OPS)])
        return tmp
    if src and (Path(src) / OPS).is_dir():
        return Path(src)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "sglang==0.5.23",
            "-d",
            str(tmp),
        ],
        check=True,
    )
    return _source_root(None, str(next(tmp.glob("sglang-*.whl"))), tmp)


def build(out: Path, src: str | None = "/tmp/sglang_src", wheel: str | None = None) -> Path:
    with tempfile.TemporaryDirectory() as t:
        root = _source_root(src, wheel, Path(t))
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(root / OPS, out / OPS, ignore=shutil.ignore_patterns("__pycache__"))
    for pkg in PACKAGES:
        (out / pkg).mkdir(parents=True, exist_ok=True)
        (out / pkg / "__init__.py").write_text(
            '"""Empty stand-in package (m3serve benchmark site)."""\n'
        )
    for rel, text in STANDINS.items():
        (out / rel).write_text(text)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default="/tmp/sglang_src", help="unpacked sglang wheel root")
    ap.add_argument("--wheel", default=None, help="sglang-0.5.23 wheel file")
    ap.add_argument("--out", default=".dev-index/index_topk_sglang", help="site folder to create")
    a = ap.parse_args()
    print(build(Path(a.out), a.src, a.wheel))


if __name__ == "__main__":
    main()
