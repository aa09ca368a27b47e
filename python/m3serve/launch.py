"""Start and stop a real ``python -m sglang.launch_server`` process (CPU or GPU).

Used by the demo, the tests and the benchmarks. On CPU it sets SGLANG_USE_CPU_ENGINE=1 and puts the
stand-in ``sgl_kernel`` package (tests/sgl_kernel_standin, see its docstring) first on the server
process's PYTHONPATH only. The server runs in its own process group so that stop() leaves nothing
behind, and its log goes to a file that is shown when start-up fails.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import requests

from m3serve.argv import argv_values

REPO_ROOT = Path(__file__).resolve().parents[2]
CPU_STANDIN_DIR = REPO_ROOT / "tests" / "sgl_kernel_standin"


class ServerStartError(RuntimeError):
    """The SGLang server exited or did not become healthy in time; the message holds its log."""


# Ports for servers we start are drawn below the kernel's ephemeral range (32768+ by default, which
# bind(0) and every outgoing connection draw from, so a port found free there can be taken before
# the server binds it: CI lost a run to that) and below 22000-29999, where SGLang draws its own
# internal ports.
PORT_RANGE = (12000, 21999)


def _bindable(port: int) -> bool:
    for host in ("0.0.0.0", "127.0.0.1"):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def free_port(attempts: int = 64) -> int:
    """A TCP port that was free a moment ago, outside the ephemeral range when possible."""
    low, high = PORT_RANGE
    for port in random.sample(range(low, high + 1), attempts):
        if _bindable(port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


BIND_ERROR = "error while attempting to bind on address"


def tail(path: Path, lines: int = 80) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while group_alive(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


class SGLangServer:
    """A real SGLang HTTP server in a subprocess; use as a context manager."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        port: int | None = None,
        device: str = "cpu",
        max_total_tokens: int = 16384,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 240.0,
        cpu_standin_dir: str | os.PathLike[str] | None = None,
        use_standin: bool | None = None,
    ) -> None:
        self.model_path = str(model_path)
        self.auto_port = not port
        self.port = port or free_port()
        self.device = device
        self.max_total_tokens = max_total_tokens
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.startup_timeout = startup_timeout
        self.cpu_standin_dir = Path(cpu_standin_dir) if cpu_standin_dir else CPU_STANDIN_DIR
        # the stand-in is needed on CPU, and on GPUs where sglang-kernel cannot be installed
        self.use_standin = device == "cpu" if use_standin is None else use_standin
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="sglang-server-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "sglang.launch_server",
            "--model-path", self.model_path,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--device", self.device,
            "--max-total-tokens", str(self.max_total_tokens),
            *self.extra_args,
        ]  # fmt: skip

    def tp_size(self) -> int:
        return int((argv_values(self.extra_args, "--tp-size", "--tp") or ["1"])[0])

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.use_standin:
            if not (self.cpu_standin_dir / "sgl_kernel" / "__init__.py").exists():
                raise FileNotFoundError(
                    f"serving without sgl_kernel needs the stand-in package at {self.cpu_standin_dir}"
                )
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(self.cpu_standin_dir), env.get("PYTHONPATH", "")) if p
            )
            # SGLang's compiled radix tree is built for a torch it may not run with here.
            env.setdefault("SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND", "python")
        # the server imports m3serve (plugin, model, backend) from this tree, whatever clone the
        # venv's editable install points at
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (env.get("PYTHONPATH", ""), str(REPO_ROOT / "python")) if p
        )
        if self.device == "cpu":
            env["SGLANG_USE_CPU_ENGINE"] = "1"
            tp = self.tp_size()
            if tp > 1:
                # SGLang 0.5.23's CPU engine builds an NCCL communicator whenever libnccl loads
                # (the CUDA torch wheel ships one) and it fails on CPU: point it at no library so
                # it switches itself off and the TP all-reduce goes through gloo. And it asserts
                # TP ≤ NUMA nodes unless every rank has an OMP binding (only sgl_kernel's CPU
                # build applies it, so any cores do).
                env.setdefault(
                    "SGLANG_NCCL_SO_PATH",
                    str(Path(tempfile.gettempdir()) / "m3serve-no-nccl" / "libnccl.so.2"),
                )
                env.setdefault(
                    "SGLANG_CPU_OMP_THREADS_BIND",
                    "|".join(str(r % (os.cpu_count() or 1)) for r in range(tp)),
                )
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.update(self.extra_env)
        return env

    def start(self, bind_attempts: int = 3) -> SGLangServer:
        """Start the server and wait until it is healthy. When the port was picked here and was
        taken before the server bound it, it starts again on another port (``bind_attempts`` in
        all)."""
        for attempt in range(bind_attempts):
            try:
                return self._start_once()
            except ServerStartError:
                # the whole log, not the tail the message quotes: the bind error may be further up
                if not (self.auto_port and self._log_has(BIND_ERROR)) or attempt + 1 == bind_attempts:
                    raise
                self.port = free_port()
        raise AssertionError("not reached")

    def _start_once(self) -> SGLangServer:
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.environment(),
            start_new_session=True,
        )
        log.close()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                raise ServerStartError(
                    f"SGLang server exited with code {code} during start-up; log "
                    f"{self.log_path}:\n{tail(self.log_path)}"
                )
            if self._log_has(BIND_ERROR):
                # uvicorn could not bind the port; the process does not always exit by itself
                raise ServerStartError(
                    f"SGLang server could not bind port {self.port}; log "
                    f"{self.log_path}:\n{tail(self.log_path)}"
                )
            try:
                if requests.get(self.url + "/health_generate", timeout=30).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1.0)
        raise ServerStartError(
            f"SGLang server not healthy after {self.startup_timeout:.0f} s; log "
            f"{self.log_path}:\n{tail(self.log_path)}"
        )

    def _log_has(self, text: str) -> bool:
        try:
            return text in self.log_path.read_text(errors="replace")
        except OSError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> bool:
        """SIGTERM the whole process group; SIGKILL whatever is left after 20 s.

        Returns whether no process of the group is left (True when nothing was running).
        """
        if self.proc is None:
            return True
        pgid = self.proc.pid
        for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                continue
            # the leader is gone; wait for its children (scheduler, detokenizer) too
            if _wait_group_gone(pgid, grace):
                break
        if self.proc.poll() is None:  # reap the leader whatever happened above
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        return not group_alive(pgid)

    def log_tail(self, lines: int = 80) -> str:
        return tail(self.log_path, lines)

    def __enter__(self) -> SGLangServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_staggered(
    servers: Sequence[SGLangServer], *, share_gpu: bool = True
) -> dict[int, BaseException]:
    """Start servers concurrently. With ``share_gpu`` (they share one GPU) each starts once the one
    before it has allocated its KV pool (SGLang sizes the pool from the free memory it sees, so two
    profiling at once race), then the rest of their start-ups (graph capture, JIT compiles)
    overlap; servers on GPUs of their own start at once. Returns the start errors by index; the
    servers that started are up when this returns."""
    import threading

    errors: dict[int, BaseException] = {}

    def run(i: int) -> None:
        try:
            servers[i].start()
        except BaseException as e:  # reported to the caller
            errors[i] = e

    threads = []
    for i, server in enumerate(servers):
        t = threading.Thread(target=run, args=(i,), daemon=True)
        t.start()
        threads.append(t)
        while share_gpu and t.is_alive():
            try:
                if "Memory pool end" in server.log_path.read_text(errors="replace"):
                    break
            except OSError:
                pass
            time.sleep(1)
    for t in threads:
        t.join()
    return errors
