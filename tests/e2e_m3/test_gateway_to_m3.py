"""The whole stack on CPU: OpenAI chat request → smg gateway (Rust: image decode/resize/patchify,
chat template, tokenization, wire items) → real SGLang worker with our M3 model and `msa` backend.

The same request sent to the worker directly (SGLang renders the template and our processor
preprocesses the raw image) must give the same prompt length and the same greedy tokens: this pins
the gateway's template, tokenization, placeholder expansion and wire transport to the worker's own
path.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gateway(m3_server: Any, m3_dir: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from m3serve.gateway import start_gateway

    gw = start_gateway([m3_server.url], m3_dir, log=tmp_path_factory.mktemp("smg") / "smg.log")
    yield gw
    assert gw.stop() in (0, -15), "smg did not shut down cleanly"


def _photo_uri() -> str:
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.chelsea()).resize((120, 90), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def test_gateway_image_chat_equals_worker_direct(gateway: Any, m3_server: Any) -> None:
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": _photo_uri()}},
            {"type": "text", "text": "Describe the cat in this photo."},
        ]}],
        "max_tokens": 8,
        "temperature": 0,
    }  # fmt: skip
    via_gw = requests.post(gateway.url + "/v1/chat/completions", json=body, timeout=600)
    assert via_gw.status_code == 200, via_gw.text
    direct = requests.post(m3_server.url + "/v1/chat/completions", json=body, timeout=600)
    assert direct.status_code == 200, direct.text
    g, d = via_gw.json(), direct.json()
    assert g["usage"]["prompt_tokens"] == d["usage"]["prompt_tokens"]
    assert g["usage"]["completion_tokens"] == d["usage"]["completion_tokens"] == 8
    assert g["choices"][0]["message"]["content"] == d["choices"][0]["message"]["content"]
    stages = g["m3serve"]["timings_ms"]
    assert stages, "the gateway reports its per-stage timings"


def test_gateway_rejects_corrupt_image_and_worker_stays_healthy(gateway: Any, m3_server: Any) -> None:
    junk = "data:image/jpeg;base64," + base64.b64encode(np.arange(64, dtype=np.uint8).tobytes()).decode()
    body = {
        "model": "default",
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": junk}},
            {"type": "text", "text": "hi"},
        ]}],
        "max_tokens": 2,
    }  # fmt: skip
    r = requests.post(gateway.url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    assert requests.get(m3_server.url + "/health_generate", timeout=120).status_code == 200
