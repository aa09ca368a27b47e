"""The real SGLang 0.5.23 runtime on CPU, serving a tiny Llama (a family SGLang already has).

This is the platform check under everything else: the launcher, the CPU stand-in for sgl_kernel,
SGLang's HTTP API (native /generate and OpenAI-compatible chat), and its behaviour on bad input.
"""

from __future__ import annotations

import json

import pytest
import requests

from m3serve.launch import SGLangServer

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("show_server_log")]

GREEDY = {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}


def _generate(server: SGLangServer, **body) -> dict:
    r = requests.post(server.url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_generate_text_and_input_ids_agree(llama_server: SGLangServer, tiny_llama_dir) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    by_text = _generate(llama_server, text=prompt, sampling_params=GREEDY)
    by_ids = _generate(llama_server, input_ids=ids, sampling_params=GREEDY)
    assert by_text["meta_info"]["prompt_tokens"] == len(ids)
    assert len(by_ids["output_ids"]) == GREEDY["max_new_tokens"]
    assert by_text["output_ids"] == by_ids["output_ids"]  # greedy: same prompt, same tokens
    assert by_ids["meta_info"]["finish_reason"]["type"] == "length"
    assert by_ids["text"] == tok.decode(by_ids["output_ids"])


def _chat_body(stream: bool) -> dict:
    return {
        "model": "default",
        "messages": [{"role": "user", "content": "Tell me a story about a red kite."}],
        "max_tokens": 5,
        "temperature": 0,
        "stream": stream,
        "ignore_eos": True,
    }


def test_chat_completions_stream_matches_non_stream(llama_server: SGLangServer) -> None:
    r = requests.post(llama_server.url + "/v1/chat/completions", json=_chat_body(False), timeout=120)
    assert r.status_code == 200, r.text
    whole = r.json()
    assert whole["object"] == "chat.completion"
    assert whole["choices"][0]["message"]["role"] == "assistant"
    assert whole["usage"]["completion_tokens"] == 5
    assert whole["usage"]["total_tokens"] == whole["usage"]["prompt_tokens"] + 5

    pieces, finish = [], None
    with requests.post(
        llama_server.url + "/v1/chat/completions", json=_chat_body(True), stream=True, timeout=120
    ) as s:
        assert s.status_code == 200
        assert s.headers["content-type"].startswith("text/event-stream")
        for line in s.iter_lines(decode_unicode=True):
            if not line:
                continue
            assert line.startswith("data: "), line
            data = line[len("data: ") :]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            assert chunk["object"] == "chat.completion.chunk"
            delta = chunk["choices"][0]["delta"]
            pieces.append(delta.get("content") or "")
            finish = chunk["choices"][0].get("finish_reason") or finish
    assert "".join(pieces) == whole["choices"][0]["message"]["content"]
    assert finish == "length"


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        json.dumps({"messages": "not a list", "model": "default"}).encode(),
        json.dumps({"model": "default"}).encode(),
    ],
    ids=["malformed-json", "wrong-type", "missing-messages"],
)
def test_bad_chat_request_is_400_and_server_stays_healthy(llama_server: SGLangServer, body: bytes) -> None:
    r = requests.post(
        llama_server.url + "/v1/chat/completions",
        data=body,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 400, (r.status_code, r.text)
    err = r.json()
    assert "error" in err or "message" in err or "detail" in err, err
    assert requests.get(llama_server.url + "/health_generate", timeout=60).status_code == 200
    assert llama_server.alive()


def test_free_port_is_below_the_ephemeral_range() -> None:
    from m3serve.launch import PORT_RANGE, free_port

    ports = {free_port() for _ in range(20)}
    assert all(PORT_RANGE[0] <= p <= PORT_RANGE[1] for p in ports), ports
    assert len(ports) > 1  # drawn at random, not one fixed port


def test_server_moves_to_another_port_when_its_port_is_taken(tiny_llama_dir, tmp_path) -> None:
    """The race CI once lost: the port picked for a server is bound by someone else before the
    server binds it. The start must notice the bind error (the process does not always exit) and
    start again on a fresh port, leaving the holder of the first port alone."""
    import socket

    from m3serve.launch import SGLangServer

    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    taken = holder.getsockname()[1]
    server = SGLangServer(tiny_llama_dir, log_path=tmp_path / "server.log", startup_timeout=480)
    server.port = taken  # as if the port had been taken between free_port() and the bind
    try:
        server.start()
        assert server.port != taken
        assert requests.get(server.url + "/health_generate", timeout=60).status_code == 200
        assert "could not bind" not in server.log_tail()  # the log is the second start's
    finally:
        assert server.stop()
        holder.close()
