"""``m3serve demo``: a tiny checkpoint served on CPU by the real SGLang, one chat request.

Prints the answer and where the time went (checkpoint, server start, time to first token,
decode rate). Everything is local: the checkpoint is made here, the server is a real
``python -m sglang.launch_server`` process, the request goes over real HTTP.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import requests

from m3serve.launch import SGLangServer


def _stream_chat(url: str, prompt: str, max_tokens: int) -> tuple[str, float, int]:
    """Send one streamed chat request; return (answer, ttft seconds, chunks with content)."""
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    t0 = time.perf_counter()
    ttft = None
    pieces: list[str] = []
    with requests.post(url + "/v1/chat/completions", json=body, stream=True, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                break
            delta = json.loads(data)["choices"][0]["delta"].get("content") or ""
            if delta:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                pieces.append(delta)
    return "".join(pieces), ttft or 0.0, len(pieces)


def run_demo(family: str = "llama", workdir: str | None = None, prompt: str = "Hello") -> int:
    work = Path(workdir or tempfile.mkdtemp(prefix="m3serve-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if family == "llama":
        from m3serve.checkpoint.tiny_llama import make_tiny_llama

        ckpt = make_tiny_llama(work / "tiny-llama")
    else:
        from m3serve.checkpoint.make_tiny import make_tiny

        ckpt = make_tiny(work / "tiny-m3")
    t_ckpt = time.perf_counter() - t0
    print(f"[demo] tiny {family} checkpoint: {ckpt} ({t_ckpt:.2f} s)", flush=True)

    t0 = time.perf_counter()
    with SGLangServer(ckpt, log_path=work / "sglang.log") as server:
        t_start = time.perf_counter() - t0
        print(f"[demo] SGLang worker on CPU ready at {server.url} ({t_start:.1f} s)", flush=True)
        max_tokens = 16
        t0 = time.perf_counter()
        answer, ttft, chunks = _stream_chat(server.url, prompt, max_tokens)
        total = time.perf_counter() - t0
    decode_rate = (chunks - 1) / (total - ttft) if chunks > 1 and total > ttft else 0.0
    print(f"[demo] prompt: {prompt!r}")
    print(f"[demo] answer (random weights, so not meaningful): {answer!r}")
    print("[demo] timings:")
    print(f"  checkpoint made        {t_ckpt * 1e3:9.1f} ms")
    print(f"  server start           {t_start * 1e3:9.1f} ms")
    print(f"  time to first token    {ttft * 1e3:9.1f} ms")
    print(f"  request total          {total * 1e3:9.1f} ms ({chunks} streamed chunks)")
    print(f"  decode rate            {decode_rate:9.1f} chunks/s")
    print(f"[demo] server log: {work / 'sglang.log'}")
    return 0
