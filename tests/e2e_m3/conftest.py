"""Session fixtures for the end-to-end M3 tests: one tiny M3 checkpoint, one real SGLang server
(``python -m sglang.launch_server`` on CPU with the m3serve plugin and the ``msa`` backend), and
transformers' independent MiniMax-M3 implementation loading the same checkpoint.

The server runs in float32 with the MSA block size 16 and top-k 4 from the tiny config, and a
chunked-prefill size of 64 tokens, so prompts of a few hundred tokens cross many blocks, select
sparsely and arrive in several chunks; float32 makes the comparison with transformers exact up to
float rounding (block selection has no near-ties to flip).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

CHUNK = 64


@pytest.fixture(scope="session")
def m3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from m3serve.checkpoint.make_tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-m3"))


def _m3_cpu_server(m3_dir: Path, log: Path, *extra: str, env: dict[str, str] | None = None) -> Any:
    """A (not yet started) CPU server of the tiny M3 with the flags every e2e test shares, plus
    ``extra`` flags and ``env`` settings."""
    from m3serve.launch import SGLangServer

    return SGLangServer(
        m3_dir,
        log_path=log,
        startup_timeout=float(os.environ.get("M3SERVE_TEST_SERVER_TIMEOUT", "480")),
        extra_args=[
            "--attention-backend", "msa",
            "--page-size", "16",
            "--dtype", "float32",
            "--chunked-prefill-size", str(CHUNK),
            *extra,
        ],
        env=env,
    )  # fmt: skip


@pytest.fixture(scope="session")
def m3_cpu_server() -> Callable[..., Any]:
    """The factory of the session server's siblings (same flags plus extras, e.g. --tp-size)."""
    return _m3_cpu_server


@pytest.fixture(scope="session")
def greedy_logprobs() -> Callable[[Any, list[int], int], dict[str, Any]]:
    """``generate(server, ids, new)``: POST /generate, greedy, ``new`` tokens, with every prompt
    and output logprob (what the TP comparisons read)."""
    import requests

    def generate(server: Any, ids: list[int], new: int) -> dict[str, Any]:
        r = requests.post(
            server.url + "/generate",
            json={
                "input_ids": ids,
                "sampling_params": {"max_new_tokens": new, "temperature": 0},
                "return_logprob": True,
                "logprob_start_len": 0,
            },
            timeout=600,
        )
        assert r.status_code == 200, r.text
        return r.json()

    return generate


@pytest.fixture(scope="session")
def logprob_values() -> Callable[[dict[str, Any], str], list[float]]:
    """``values(response, key)``: the logprobs of a greedy_logprobs response's
    ``meta_info[key]`` (input_token_logprobs / output_token_logprobs), the first prompt
    position's None left out."""

    def values(response: dict[str, Any], key: str) -> list[float]:
        return [x[0] for x in response["meta_info"][key] if x[0] is not None]

    return values


@pytest.fixture(scope="session")
def m3_server(m3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    log = tmp_path_factory.mktemp("m3-server") / "server.log"
    server = _m3_cpu_server(m3_dir, log, "--enable-cache-report")
    server.start()
    yield server
    assert server.stop(), "SGLang server process group still has live processes"


@pytest.fixture(scope="session")
def hf_m3(m3_dir: Path) -> Any:
    import torch
    from transformers import MiniMaxM3SparseForConditionalGeneration

    return MiniMaxM3SparseForConditionalGeneration.from_pretrained(
        m3_dir, dtype=torch.float32
    ).eval()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    report = yield
    if report.when == "call" and report.failed and "m3_server" in getattr(item, "fixturenames", ()):
        server = item.funcargs.get("m3_server")
        if server is not None:
            report.sections.append(("m3 server log tail", server.log_tail(60)))
    return report
