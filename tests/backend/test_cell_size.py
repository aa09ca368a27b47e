"""The KV-pool sizing hook adds the msa backend's index-K bytes per token, in its index dtype."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from m3serve.backend import _cell_size_with_index_k

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:sglang.*")

SC = {"sparse_attention_freq": [0, 1, 1, 0, 1], "sparse_block_size": 128,
      "sparse_topk_blocks": 16, "sparse_index_dim": 128}  # fmt: skip


def _size(kv_dtype: torch.dtype) -> int:
    cfg = SimpleNamespace(sparse_attention_config=SC)
    kvc = SimpleNamespace(model_config=SimpleNamespace(hf_text_config=cfg), kv_cache_dtype=kv_dtype)
    return _cell_size_with_index_k(lambda self, kvc, n: 1000, None, kvc, 5)


@pytest.mark.parametrize(
    ("choice", "kv_dtype", "per_layer"),
    [("auto", torch.bfloat16, 256), ("bf16", torch.float32, 256), ("auto", torch.float32, 512),
     ("fp8", torch.bfloat16, 132)],
)  # fmt: skip
def test_index_k_bytes_are_counted(
    monkeypatch: pytest.MonkeyPatch, choice: str, kv_dtype: torch.dtype, per_layer: int
) -> None:
    monkeypatch.setenv("M3SERVE_ATTENTION_BACKEND_IS_MSA", "1")
    monkeypatch.setenv("M3SERVE_INDEX_K_DTYPE", choice)
    assert _size(kv_dtype) == 1000 + 3 * per_layer  # three MSA layers


def test_other_backends_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("M3SERVE_ATTENTION_BACKEND_IS_MSA", raising=False)
    assert _size(torch.bfloat16) == 1000
