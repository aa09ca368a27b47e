"""The tiny M3 checkpoints load cleanly in SGLang 0.5.23's in-tree M3 loader (issue 7 item 4).

SGLang's own model (``sglang.srt.models.minimax_m3_vl.MiniMaxM3SparseForConditionalGeneration``,
the class its registry holds for config.json's architecture name) is built on CPU at TP 1 and its
own ``load_weights`` runs over each preset's safetensors, in a subprocess
(tests/model/intree_loader_probe.py says why and what it measures). Its loader never reports
missing or unexpected names (it skips unknown ones, at most logging a warning), so the probe
measures instead: every parameter NaN-filled first and none left NaN; each checkpoint tensor
necessary (dropping it leaves some parameter NaN); every value equal to the checkpoint tensors
put through the in-tree name/shard mapping; no warning logged.

The one expected gap: the in-tree vision tower builds ``vision_model.post_layernorm`` (its
``require_post_norm`` defaults to "all encoder layers kept") but never applies it in forward;
MiniMax-M3's vision tower has no post-norm (transformers 5.19's ``minimax_m3_vl``, the format
authority, has no such weight), so a real checkpoint does not carry it either.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from m3serve.checkpoint.m3 import write_m3_checkpoint
from m3serve.checkpoint.tokenizer import write_tokenizer

PROBE = Path(__file__).with_name("intree_loader_probe.py")
PRESETS = ("tiny", "tiny-block128")
ARCH = "MiniMaxM3SparseForConditionalGeneration"
# built by the in-tree model, never used in its forward, absent from M3 checkpoints (see above)
UNUSED_INTREE_PARAMS = [
    "vision_tower.vision_model.post_layernorm.bias",
    "vision_tower.vision_model.post_layernorm.weight",
]


@pytest.fixture(scope="module")
def probe_result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("intree")
    dirs = []
    for preset in PRESETS:
        d = root / preset
        write_m3_checkpoint(d, write_tokenizer(d), preset=preset)
        dirs.append(d)
    out = root / "probe.json"
    env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parents[2] / "python"), env.get("PYTHONPATH")) if p
    )
    proc = subprocess.run(
        [sys.executable, str(PROBE), str(out), *map(str, dirs)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, (
        f"in-tree probe failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    )
    raw = json.loads(out.read_text())
    return {preset: raw[str(d)] for preset, d in zip(PRESETS, dirs, strict=True)}


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
def test_intree_loader_takes_every_tensor_and_fills_every_param(
    probe_result: dict[str, dict], preset: str
) -> None:
    r = probe_result[preset]
    assert r["arch"] == ARCH
    assert r["cls"] == f"sglang.srt.models.minimax_m3_vl.{ARCH}"
    assert r["warnings"] == []
    assert r["not_written"] == UNUSED_INTREE_PARAMS, "in-tree parameters the checkpoint missed"
    assert r["params_without_expectation"] == UNUSED_INTREE_PARAMS
    assert r["not_needed"] == [], "checkpoint tensors the in-tree loader skips silently"
    assert r["expected_but_no_param"] == [], "mapped names with no in-tree parameter"
    assert r["mismatched"] == [], "values not where the in-tree name/shard mapping puts them"
    assert r["persistent_buffers"] == []
    assert r["num_tensors"] > r["num_params"] > 50, "stacked q/k/v, gate/up and experts merge"
