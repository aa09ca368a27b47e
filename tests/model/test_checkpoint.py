"""The tiny MiniMax-M3 checkpoint: deterministic bytes, real names, loads cleanly in transformers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from m3serve.checkpoint.m3 import PRESETS, m3_config, m3_weight_shapes, write_m3_checkpoint
from m3serve.checkpoint.tokenizer import write_tokenizer


def _digest(d: Path) -> dict[str, str]:
    names = [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "generation_config.json",
    ]
    return {n: hashlib.sha256((d / n).read_bytes()).hexdigest() for n in names}


def _make(d: Path, seed: int = 0) -> Path:
    tok = write_tokenizer(d)
    write_m3_checkpoint(d, tok, preset="tiny", seed=seed)
    return d


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a, b, c = (_make(tmp_path / n, s) for n, s in (("a", 0), ("b", 0), ("c", 1)))
    assert _digest(a) == _digest(b)
    assert _digest(a)["model.safetensors"] != _digest(c)["model.safetensors"]


def test_structure_follows_m3() -> None:
    tok = {"vocab_size": 640, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 9,
           "image_token_id": 3, "video_token_id": 4}  # fmt: skip
    cfg = m3_config(tok, PRESETS["tiny"])
    t = cfg["text_config"]
    sparse = t["sparse_attention_config"]
    freq = sparse["sparse_attention_freq"]
    assert freq == t["moe_layer_freq"] and freq[0] == 0 and freq[-1] == 1
    assert freq == sorted(freq), "dense layers come first, then MSA + MoE layers"
    assert sparse["sparse_num_index_heads"] == t["num_key_value_heads"]
    assert t["num_attention_heads"] % t["num_key_value_heads"] == 0
    assert t["shared_intermediate_size"] == t["intermediate_size"] * t["n_shared_experts"]
    shapes = m3_weight_shapes(cfg)
    assert not any(".index_v_proj" in n for n in shapes), "M3 has no index value branch"
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in shapes


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make(tmp_path_factory.mktemp("tiny_m3"))


def test_transformers_loads_without_missing_or_unexpected(tiny_dir: Path) -> None:
    from transformers import MiniMaxM3SparseForConditionalGeneration

    model, info = MiniMaxM3SparseForConditionalGeneration.from_pretrained(
        tiny_dir, output_loading_info=True, dtype=torch.float32
    )
    assert info["missing_keys"] == set()
    assert info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set()
    text = model.config.text_config
    cfg = json.loads((tiny_dir / "config.json").read_text())
    sparse = cfg["text_config"]["sparse_attention_config"]
    assert text.index_block_size == sparse["sparse_block_size"]
    assert text.index_topk_blocks == sparse["sparse_topk_blocks"]
    assert text.layer_types.count("minimax_m3_sparse") == sum(sparse["sparse_attention_freq"])
    ids = torch.arange(5, 105).remainder(text.vocab_size)[None]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, 100, text.vocab_size)
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.1, "random weights should give non-flat logits"
