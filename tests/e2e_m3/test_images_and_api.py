"""Images through the real server: outputs equal transformers' for the same patches; the gateway
wire path and the raw-image path agree; the OpenAI API streams and not; bad requests get 400s
and the server stays healthy; 16 concurrent requests all answer what a lone request answers."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import io
import json
from typing import Any

import numpy as np
import pytest
import requests
import torch

pytestmark = pytest.mark.slow


def _png(h: int, w: int, seed: int) -> bytes:
    from PIL import Image

    arr = (np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _tok(m3_dir: Any) -> dict[str, int]:
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(m3_dir)
    names = {"img": "]<]image[>[", "start": "]<]start of image[>[", "end": "]<]end of image[>["}
    return {k: t.convert_tokens_to_ids(v) for k, v in names.items()}


def _post(server: Any, path: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(server.url + path, json=body, timeout=600)


def _logprobs(out: dict[str, Any]) -> torch.Tensor:
    return torch.tensor([x[0] for x in out["meta_info"]["input_token_logprobs"][1:]])


def test_image_logprobs_match_transformers_and_wire_path(
    m3_server: Any, hf_m3: Any, m3_dir: Any
) -> None:
    from m3serve import preprocess

    tok = _tok(m3_dir)
    png = _png(150, 230, seed=3)
    pre = preprocess.preprocess(png)
    text = list(range(20, 60))
    ids = [*text[:10], tok["start"], tok["img"], tok["end"], *text[10:]]
    params = {"max_new_tokens": 4, "temperature": 0}
    raw = _post(m3_server, "/generate", {"input_ids": ids, "image_data": [_uri(png)],
                "sampling_params": params, "return_logprob": True, "logprob_start_len": 0})  # fmt: skip
    assert raw.status_code == 200, raw.text
    n = pre.num_image_tokens
    expanded = [*text[:10], tok["start"], *[tok["img"]] * n, tok["end"], *text[10:]]
    patches = pre.pixel_values
    item = {
        "format": "m3serve.patches.v1", "dtype": "bfloat16", "shape": list(patches.shape),
        "grid_thw": list(pre.grid_thw), "hash": pre.hash, "offset": 11, "length": n,
        "data": base64.b64encode(patches.view(torch.int16).numpy().tobytes()).decode(),
    }  # fmt: skip
    wire = _post(m3_server, "/generate", {"input_ids": expanded, "image_data": [item],
                 "sampling_params": params, "return_logprob": True, "logprob_start_len": 0})  # fmt: skip
    assert wire.status_code == 200, wire.text
    a, b = raw.json(), wire.json()
    assert a["output_ids"] == b["output_ids"]
    torch.testing.assert_close(_logprobs(a), _logprobs(b), atol=1e-5, rtol=0)

    with torch.no_grad():
        logits = hf_m3(
            input_ids=torch.tensor([expanded]),
            pixel_values=patches.float(),
            image_grid_thw=torch.tensor([list(pre.grid_thw)]),
        ).logits[0]
    lp = torch.log_softmax(logits.float(), -1)
    ref = lp[torch.arange(len(expanded) - 1), torch.tensor(expanded[1:])]
    ours = _logprobs(a)
    text_pos = [i for i in range(len(expanded) - 1) if expanded[i + 1] != tok["img"]]
    err = (ours[text_pos] - ref[text_pos]).abs().max()
    assert err < 1e-4, f"max |Δ logprob| after the image {err:.2e}"
    # and the image matters: a different image changes the logprobs after it
    other = _post(m3_server, "/generate", {"input_ids": ids, "image_data": [_uri(_png(150, 230, seed=4))],
                  "sampling_params": params, "return_logprob": True, "logprob_start_len": 0})  # fmt: skip
    assert (_logprobs(other.json())[-5:] - ours[-5:]).abs().max() > 1e-3


def test_chat_completions_with_image_stream_and_not(m3_server: Any) -> None:
    msgs = [{"role": "user", "content": [
        {"type": "text", "text": "What is in this image?"},
        {"type": "image_url", "image_url": {"url": _uri(_png(60, 90, seed=5))}},
    ]}]  # fmt: skip
    body = {"model": "m3", "messages": msgs, "max_tokens": 6, "temperature": 0}
    r = _post(m3_server, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    full = r.json()
    assert full["usage"]["completion_tokens"] == 6
    text = full["choices"][0]["message"]["content"]
    r = requests.post(
        m3_server.url + "/v1/chat/completions",
        json={**body, "stream": True},
        stream=True,
        timeout=600,
    )
    assert r.status_code == 200
    chunks = []
    for line in r.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            delta = json.loads(line[6:])["choices"]
            if delta:
                chunks.append(delta[0]["delta"].get("content") or "")
    assert "".join(chunks) == text


@pytest.mark.parametrize(
    ("name", "image_data", "ids_fn"),
    [
        ("unknown image format", lambda: ["data:image/png;base64,AAAAAAAAAAAA"], None),
        (
            "malformed tensor",
            lambda: [
                {
                    "format": "m3serve.patches.v1",
                    "dtype": "bfloat16",
                    "shape": [4, 1176],
                    "grid_thw": [1, 2, 2],
                    "hash": "x",
                    "offset": 1,
                    "length": 1,
                    "data": "AAAA",
                }
            ],
            "one",
        ),
        (
            "too many image tokens",
            lambda: [
                {
                    "format": "m3serve.patches.v1",
                    "dtype": "bfloat16",
                    "shape": [4, 1176],
                    "grid_thw": [1, 2, 2],
                    "hash": "x",
                    "offset": 1,
                    "length": 1,
                    "data": base64.b64encode(bytes(4 * 1176 * 2)).decode(),
                }
            ],
            "three",
        ),
        (
            "more images than placeholders",
            lambda: [_uri(_png(40, 40, 1)), _uri(_png(40, 40, 2))],
            "one",
        ),
    ],
)
def test_bad_requests_get_400_and_server_stays_healthy(
    m3_server: Any, m3_dir: Any, name: str, image_data: Any, ids_fn: Any
) -> None:
    img = _tok(m3_dir)["img"]
    ids = {None: [30, img, 31], "one": [30, img, 31], "three": [30, img, img, img, 31]}[ids_fn]
    body: dict[str, Any] = {"input_ids": ids, "sampling_params": {"max_new_tokens": 2}}
    data = image_data()
    if data is not None:
        body["image_data"] = data
    r = _post(m3_server, "/generate", body)
    assert r.status_code == 400, f"{name}: {r.status_code} {r.text[:300]}"
    assert requests.get(m3_server.url + "/health_generate", timeout=120).status_code == 200


@pytest.mark.parametrize("bad_id", [-1, 10**6])
def test_out_of_vocab_input_ids_get_400_and_server_stays_healthy(
    m3_server: Any, bad_id: int
) -> None:
    """Unchecked, an id past the vocabulary kills the scheduler (device assert on a GPU)."""
    body = {"input_ids": [30, 31, bad_id, 32], "sampling_params": {"max_new_tokens": 2}}
    r = _post(m3_server, "/generate", body)
    assert r.status_code == 400, f"{r.status_code} {r.text[:300]}"
    assert "input_ids[2]" in r.text and "vocabulary" in r.text, r.text[:300]
    assert requests.get(m3_server.url + "/health_generate", timeout=120).status_code == 200


def test_sixteen_concurrent_requests(m3_server: Any, m3_dir: Any) -> None:
    tok = _tok(m3_dir)
    pngs = [_png(56 + 28 * (i % 3), 84, seed=100 + i) for i in range(4)]

    def one(i: int) -> list[int]:
        body: dict[str, Any] = {"sampling_params": {"max_new_tokens": 5, "temperature": 0}}
        if i % 2:
            body |= {"input_ids": [40 + i, tok["start"], tok["img"], tok["end"], 50 + i],
                     "image_data": [_uri(pngs[i % 4])]}  # fmt: skip
        else:
            body["input_ids"] = [(7 * i + j) % 500 + 10 for j in range(40 + 9 * i)]
        r = _post(m3_server, "/generate", body)
        assert r.status_code == 200, r.text
        return r.json()["output_ids"]

    alone = [one(i) for i in range(16)]
    with cf.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(one, range(16)))
    assert together == alone
