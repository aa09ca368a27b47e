"""Token ids from smg (minijinja + tokenizers crate) equal transformers' chat template +
tokenizer on the tiny M3 checkpoint (issue 3 item 4, gateway half)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

MESSAGES: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello! How are you today?"}],
    [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "What is sparse attention?"},
        {"role": "assistant", "content": "It picks 16 blocks."},
        {"role": "user", "content": "Numbers: 3.14 and 1048576, émoji 🚀, tabs\tand\nnewlines."},
    ],
    [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "What is in this image?"}, {"type": "image"},
    ]}],
]


@pytest.fixture(scope="module")
def tiny_m3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    make_tiny = pytest.importorskip("m3serve.checkpoint.make_tiny")
    return make_tiny.make_tiny(tmp_path_factory.mktemp("tiny-m3"))


def _smg_ids(smg_binary: Path, model_dir: Path, messages: list[dict[str, Any]]) -> list[int]:
    # The gateway's message type takes OpenAI parts; {"type": "image"} is sent as image_url.
    openai_msgs = [
        {**m, "content": [
            {"type": "image_url", "image_url": {"url": "data:,"}} if p.get("type") == "image" else p
            for p in m["content"]
        ]} if isinstance(m["content"], list) else m
        for m in messages
    ]
    out = subprocess.run(
        [str(smg_binary), "render", "--model-dir", str(model_dir), "--messages", json.dumps(openai_msgs)],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout)["input_ids"]


@pytest.mark.parametrize("idx", range(len(MESSAGES)))
def test_ids_equal_transformers(smg_binary: Path, tiny_m3: Path, idx: int) -> None:
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(tiny_m3))
    msgs = MESSAGES[idx]
    out = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    want = list(out["input_ids"] if hasattr(out, "keys") else out)
    assert _smg_ids(smg_binary, tiny_m3, msgs) == want
