"""The real ``smg`` binary in front of a real SGLang worker on CPU (tiny Llama checkpoint,
session fixture from tests/conftest.py): text chat, streaming, completions, and the gateway's
own-time measurement (``x-smg-overhead-us`` / ``smg_gateway_overhead_seconds``)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import requests

from m3serve.gateway import start_gateway


@pytest.fixture(scope="module")
def sglang_gateway(smg_binary: Path, llama_server, tiny_llama_dir: Path):
    with start_gateway([llama_server.url], tiny_llama_dir, binary=smg_binary,
                       extra_args=["--served-model-name", "tiny-llama"]) as gw:
        yield gw


@pytest.mark.usefixtures("show_server_log")
def test_chat_non_stream(sglang_gateway) -> None:
    r = requests.post(f"{sglang_gateway.url}/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "Hello! How are you today?"}],
        "max_tokens": 4, "temperature": 0, "seed": 1,
    })
    assert r.status_code == 200, r.text
    v = r.json()
    assert v["object"] == "chat.completion" and v["model"] == "tiny-llama"
    assert isinstance(v["choices"][0]["message"]["content"], str)
    assert v["choices"][0]["finish_reason"] in ("length", "stop")
    assert 1 <= v["usage"]["completion_tokens"] <= 4
    assert v["usage"]["prompt_tokens"] > 5


@pytest.mark.usefixtures("show_server_log")
def test_chat_stream_matches_non_stream(sglang_gateway) -> None:
    body = {"messages": [{"role": "user", "content": "What is sparse attention?"}],
            "max_tokens": 6, "temperature": 0}
    full = requests.post(f"{sglang_gateway.url}/v1/chat/completions", json=body, timeout=120).json()
    r = requests.post(f"{sglang_gateway.url}/v1/chat/completions", timeout=120,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    events = [e for e in r.content.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == full["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"]["completion_tokens"] == full["usage"]["completion_tokens"]


@pytest.mark.usefixtures("show_server_log")
def test_completions_and_errors(sglang_gateway) -> None:
    r = requests.post(f"{sglang_gateway.url}/v1/completions", timeout=120,
                      json={"prompt": "The quick brown fox", "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "text_completion"
    r = requests.post(f"{sglang_gateway.url}/v1/chat/completions", timeout=30,
                      json={"messages": [{"role": "user", "content": "hi"}], "n": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def _overhead_count(gw_url: str, stream: bool) -> int:
    text = requests.get(f"{gw_url}/metrics", timeout=30).text
    name = ('smg_gateway_overhead_seconds_count{route="/v1/chat/completions",'
            f'stream="{str(stream).lower()}"}}')
    m = re.search(re.escape(name) + r" (\d+)", text)
    return int(m.group(1)) if m else 0


@pytest.mark.usefixtures("show_server_log")
def test_overhead_header_and_metric(sglang_gateway) -> None:
    """The gateway's own time is positive and smaller than what the client saw; with the time it
    waited on the worker it fits in the client's latency; every forward lands in the histogram."""
    url = sglang_gateway.url
    body = {"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 2, "temperature": 0}
    before = _overhead_count(url, stream=False)
    with requests.Session() as s:
        for _ in range(3):
            t0 = time.perf_counter()
            r = s.post(f"{url}/v1/chat/completions", json=body, timeout=120)
            client_us = (time.perf_counter() - t0) * 1e6
            assert r.status_code == 200, r.text
            overhead = int(r.headers["x-smg-overhead-us"])
            upstream = int(r.headers["x-smg-upstream-us"])
            assert 0 < overhead < client_us, (overhead, client_us)
            assert upstream > 0 and overhead + upstream <= client_us, (overhead, upstream, client_us)
    assert _overhead_count(url, stream=False) == before + 3
    before_stream = _overhead_count(url, stream=True)
    r = requests.post(f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=120)
    assert r.status_code == 200 and "x-smg-overhead-us" not in r.headers
    assert r.content.endswith(b"data: [DONE]\n\n")
    assert _overhead_count(url, stream=True) == before_stream + 1
