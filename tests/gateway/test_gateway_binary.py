"""The real ``smg`` binary over real sockets, in front of a mock SGLang worker."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import requests

from m3serve.gateway import Gateway, start_gateway


def _chat(gw: Gateway, **kw: object) -> requests.Response:
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello world"}], **kw}
    return requests.post(f"{gw.url}/v1/chat/completions", json=body, timeout=10)


def test_chat_non_stream(gateway: Gateway, mock_worker) -> None:
    r = _chat(gateway, max_tokens=3)
    assert r.status_code == 200, r.text
    v = r.json()
    assert v["object"] == "chat.completion" and v["model"] == "tiny"
    assert v["choices"][0]["message"] == {"role": "assistant", "content": "abc"}
    assert v["usage"]["total_tokens"] == v["usage"]["prompt_tokens"] + 3
    assert mock_worker.bodies[-1]["sampling_params"]["max_new_tokens"] == 3
    assert "x-m3serve-timings" in r.headers


def test_chat_stream_include_usage(gateway: Gateway) -> None:
    r = _chat(gateway, stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.content.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "abc"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_models_health_metrics(gateway: Gateway) -> None:
    assert requests.get(f"{gateway.url}/v1/models", timeout=5).json()["data"][0]["id"] == "tiny"
    assert requests.get(f"{gateway.url}/health", timeout=5).status_code == 200
    _chat(gateway)
    text = requests.get(f"{gateway.url}/metrics", timeout=5).text
    assert 'smg_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert "smg_request_duration_seconds_bucket" in text


def test_bad_inputs(gateway: Gateway) -> None:
    url = f"{gateway.url}/v1/chat/completions"
    cases = [
        (b'{"messages": [', 400),
        (json.dumps({"messages": 3}).encode(), 400),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 3}).encode(), 400),
        (json.dumps({"messages": [{"role": "user", "content": "hi " * 100_000}]}).encode(), 413),
        (json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}]}]}).encode(), 400),
        (json.dumps({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}] * 3}]}).encode(), 400),
    ]
    for body, status in cases:
        r = requests.post(url, data=body, headers={"content-type": "application/json"}, timeout=10)
        assert r.status_code == status, (body[:60], r.text)
        err = r.json()["error"]
        assert {"message", "type", "param", "code"} <= set(err)
    # The gateway is still fine.
    assert _chat(gateway).status_code == 200


def test_slow_client_gets_408(gateway: Gateway) -> None:
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                  b"content-type: application/json\r\ncontent-length: 1000\r\n\r\n{")
        data = s.recv(4096)
    assert data.startswith(b"HTTP/1.1 408"), data


def test_graceful_shutdown_finishes_in_flight(smg_binary, gw_model_dir, mock_worker) -> None:
    mock_worker.delay = 1.0
    gw = start_gateway([mock_worker.url], gw_model_dir, binary=smg_binary)
    result: dict[str, int] = {}

    def call() -> None:
        result["status"] = _chat(gw).status_code

    t = threading.Thread(target=call)
    t.start()
    time.sleep(0.4)
    gw.proc.send_signal(signal.SIGTERM)
    t.join(10)
    assert result.get("status") == 200
    assert gw.proc.wait(10) == 0
    gw.stop()
