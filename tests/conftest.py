"""Shared fixtures: tiny checkpoints and real SGLang servers on CPU (session-scoped: a start costs ~20 s+)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from m3serve.launch import SGLangServer


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU-marked tests skip cleanly on machines without CUDA."""
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    report = yield
    setattr(item, "rep_" + report.when, report)
    return report


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from m3serve.checkpoint.tiny_llama import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def start_cpu_server(model_dir: Path, log_dir: Path, **kwargs) -> SGLangServer:
    # imported here so GPU-only runs (kernels on the device machine) need none of the server deps
    from m3serve.launch import SGLangServer
    timeout = float(os.environ.get("M3SERVE_TEST_SERVER_TIMEOUT", "480"))
    server = SGLangServer(
        model_dir, log_path=log_dir / "server.log", startup_timeout=timeout, **kwargs
    )
    return server.start()


def stop_and_check(server: SGLangServer) -> None:
    """Stop the server and fail the session if any process of its group survived."""
    assert server.stop(), "SGLang server process group still has live processes"


@pytest.fixture(scope="session")
def llama_server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SGLangServer]:
    server = start_cpu_server(tiny_llama_dir, tmp_path_factory.mktemp("llama-server"))
    yield server
    stop_and_check(server)


@pytest.fixture
def show_server_log(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print the tail of every session server's log when the test fails."""
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for name in ("llama_server", "m3_server"):
            if name in request.fixturenames:
                server = request.getfixturevalue(name)
                print(f"\n----- {name} log tail ({server.log_path}) -----\n{server.log_tail()}")
