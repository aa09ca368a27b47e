"""Fixtures for the gateway tests: the built ``smg`` binary, a tiny model directory, a mock
SGLang worker (thread, real socket on 127.0.0.1) and a running gateway in front of it."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from m3serve.gateway import REPO_ROOT, Gateway, find_smg_binary, start_gateway

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }} {% if m.content is string %}"
    "{{ m.content }}{% else %}{% for p in m.content %}{% if p.type == 'image' %}]<]image[>["
    "{% else %}{{ p.text }}{% endif %}{% endfor %}{% endif %}<|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


@pytest.fixture(scope="session")
def smg_binary() -> Path:
    try:
        return find_smg_binary(build=False)
    except FileNotFoundError:
        if shutil.which("cargo") is None:
            pytest.skip("smg not built and no cargo")
        subprocess.run(["cargo", "build", "-p", "smg-gateway"], cwd=REPO_ROOT, check=True)
        return find_smg_binary(build=False)


@pytest.fixture(scope="session")
def gw_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """WordLevel tokenizer trained-free with the `tokenizers` library + an image chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<|im_start|>", "<|im_end|>", "]<]image[>[",
                "]<]start of image[>[", "]<]end of image[>["]
    words = ["user", "assistant", "system", "hello", "world", "what", "is", "this", "hi"]
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    d = tmp_path_factory.mktemp("tiny-gw-model")
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    (d / "config.json").write_text(json.dumps({"image_token_id": vocab["]<]image[>["]}))
    return d


class MockWorker:
    """SGLang `/generate` stand-in: records bodies, answers "abc" (stream: a, ab, abc)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.delay = 0.0
        worker = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self._send(200, b"ok", "text/plain")

            def do_POST(self) -> None:
                n = int(self.headers.get("content-length", "0"))
                body = json.loads(self.rfile.read(n))
                worker.bodies.append(body)
                if worker.delay:
                    import time

                    time.sleep(worker.delay)
                ids = len(body.get("input_ids") or [])

                def meta(done: bool, k: int) -> dict[str, Any]:
                    fr = {"type": "length", "length": k} if done else None
                    return {"prompt_tokens": ids, "completion_tokens": k, "finish_reason": fr}

                if not body.get("stream"):
                    out = {"text": "abc", "output_ids": [1, 2, 3], "meta_info": meta(True, 3)}
                    self._send(200, json.dumps(out).encode(), "application/json")
                    return
                events = [{"text": t, "meta_info": meta(i == 2, i + 1)}
                          for i, t in enumerate(["a", "ab", "abc"])]
                data = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
                self._send(200, data + b"data: [DONE]\n\n", "text/event-stream")

            def _send(self, code: int, data: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def mock_worker() -> Iterator[MockWorker]:
    w = MockWorker()
    yield w
    w.close()


@pytest.fixture
def gateway(smg_binary: Path, gw_model_dir: Path, mock_worker: MockWorker) -> Iterator[Gateway]:
    with start_gateway([mock_worker.url], gw_model_dir, binary=smg_binary,
                       extra_args=["--served-model-name", "tiny", "--max-images", "2",
                                   "--max-body-bytes", "200000", "--body-timeout", "1"]) as gw:
        yield gw
