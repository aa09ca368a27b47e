"""Build the folder of cp312 wheels that the GPU test machine needs to run SGLang + m3serve.

The device machine has torch 2.11 + triton but no sglang/flashinfer and no internet; wheels travel
with the working tree in an ignored folder (`run`'s carry, at most 64 MiB with the tree). SGLang's
own wheel is 39 MB, 18 MB of it optional compiled Rust extensions (gRPC/bench/HTTP front, loaded
lazily), so this script repacks it without them, without the diffusion runtime and without its
tests. Usage: python scripts/gpu/make_wheelhouse.py [--out .dev-e2e/wheels] [--flashinfer VER]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLATFORMS = ["manylinux_2_17_x86_64", "manylinux_2_24_x86_64", "manylinux_2_27_x86_64",
             "manylinux_2_28_x86_64", "manylinux_2_34_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]  # fmt: skip
DROP_PREFIXES = ("sglang/multimodal_gen/", "sglang/test/")


def download(spec: str, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
           "--python-version", "3.12", "--implementation", "cp", "-d", str(dest), spec]  # fmt: skip
    for p in PLATFORMS:
        cmd += ["--platform", p]
    subprocess.run(cmd, check=True)


def _keep(name: str) -> bool:
    if name.startswith(DROP_PREFIXES):
        return False
    return not (name.startswith("sglang/srt/rust_extensions/") and name.endswith(".so"))


def slim_sglang(wheel: Path) -> None:
    """Rewrite the sglang wheel in place without optional binaries, with a matching RECORD."""
    tmp = wheel.with_suffix(".slim")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        rows = []
        for info in src.infolist():
            if info.filename == record_name or not _keep(info.filename):
                continue
            data = src.read(info)
            dst.writestr(info, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            rows.append(f"{info.filename},sha256={digest.decode()},{len(data)}")
        rows.append(f"{record_name},,")
        dst.writestr(record_name, "\n".join(rows) + "\n")
    tmp.replace(wheel)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".dev-e2e/wheels")
    ap.add_argument("--flashinfer", default="0.6.18.post1", help="'' to skip FlashInfer")
    ap.add_argument("--tvm-ffi", default="0.1.15.post2")
    ap.add_argument("--no-sglang", action="store_true", help="FlashInfer only")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    specs: list[str] = []
    if not args.no_sglang:
        specs += [
            line.strip()
            for line in (HERE / "sglang-wheels.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#") and not line.startswith("apache-tvm-ffi")
        ]
    if args.flashinfer:
        specs.append(f"flashinfer-python=={args.flashinfer}")
    specs.append(f"apache-tvm-ffi=={args.tvm_ffi}")
    for spec in specs:
        name = spec.split("==")[0].replace("-", "_").lower()
        if any(p.name.lower().startswith(name + "-") for p in out.glob("*.whl")):
            continue
        download(spec, out)
    for w in out.glob("sglang-*.whl"):
        if w.stat().st_size > 25_000_000:
            slim_sglang(w)
    total = sum(p.stat().st_size for p in out.glob("*.whl"))
    print(f"{len(list(out.glob('*.whl')))} wheels, {total / 2**20:.1f} MiB in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
