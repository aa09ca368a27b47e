"""Find, build and start the ``smg`` gateway binary (rust/smg/crates/smg-gateway).

``m3serve serve`` uses :func:`start_gateway`; tests and benchmarks use it too. The binary is
looked up in the cargo target directory (``$CARGO_TARGET_DIR``, else
``~/.cache/m3serve/cargo-target``, else the repository's ``target/``), release before debug,
and built with ``cargo build --release -p smg-gateway`` when none is found.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_PREFIX = "SMG_READY "


def _target_dirs() -> list[Path]:
    dirs = []
    if env := os.environ.get("CARGO_TARGET_DIR"):
        dirs.append(Path(env))
    dirs.append(Path.home() / ".cache" / "m3serve" / "cargo-target")
    dirs.append(REPO_ROOT / "target")
    return dirs


def find_smg_binary(*, build: bool = True, profile: str | None = None) -> Path:
    """Path of the newest built ``smg`` (release preferred); build it if missing and allowed."""
    if env := os.environ.get("M3SERVE_SMG_BIN"):
        return Path(env)
    profiles = [profile] if profile else ["release", "debug"]
    found = [
        d / p / "smg"
        for d in _target_dirs()
        for p in profiles
        if (d / p / "smg").is_file()
    ]
    if found:
        return max(found, key=lambda p: p.stat().st_mtime)
    if not build:
        raise FileNotFoundError("smg binary not built: cargo build --release -p smg-gateway")
    cargo = shutil.which("cargo")
    if cargo is None:
        raise FileNotFoundError("smg binary not built and cargo not on PATH")
    subprocess.run(
        [cargo, "build", "--release", "-p", "smg-gateway"], cwd=REPO_ROOT, check=True
    )
    return find_smg_binary(build=False, profile="release")


class Gateway:
    """A running ``smg`` process; use as a context manager or call :meth:`stop`."""

    def __init__(self, proc: subprocess.Popen[str], url: str, pump: threading.Thread) -> None:
        self.proc = proc
        self.url = url
        self._pump = pump

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM (graceful: in-flight requests finish), then SIGKILL after ``timeout``."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._pump.join(5)
        return self.proc.returncode

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_gateway(
    workers: Sequence[str],
    model_dir: str | os.PathLike[str],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    extra_args: Sequence[str] = (),
    binary: Path | None = None,
    ready_timeout: float = 30.0,
    log: Path | None = None,
) -> Gateway:
    """Start ``smg`` and wait for its ready line. ``port=0`` picks a free port."""
    exe = binary or find_smg_binary()
    cmd = [str(exe), "--model-dir", str(model_dir), "--host", host, "--port", str(port)]
    for w in workers:
        cmd += ["--worker", w]
    cmd += list(extra_args)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, bufsize=1
    )
    assert proc.stderr is not None
    deadline = time.monotonic() + ready_timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith(READY_PREFIX):
            url = line[len(READY_PREFIX):].strip()
            return Gateway(proc, url, _drain(proc, log))
    proc.kill()
    proc.wait()
    proc.stderr.close()
    raise RuntimeError("smg did not start:\n" + "".join(lines[-30:]))


def _drain(proc: subprocess.Popen[str], log: Path | None) -> threading.Thread:
    """Keep reading stderr so the gateway never blocks on a full pipe; closes it at EOF."""

    def pump() -> None:
        assert proc.stderr is not None
        with proc.stderr, (log.open("a") if log else open(os.devnull, "w")) as sink:
            for line in proc.stderr:
                sink.write(line)
                sink.flush()

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    return t


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m m3serve.gateway ARGS``: exec the binary with the given smg flags."""
    exe = find_smg_binary()
    args = list(sys.argv[1:] if argv is None else argv)
    os.execv(exe, [str(exe), *args])
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
