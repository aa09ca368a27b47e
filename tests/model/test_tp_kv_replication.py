"""KV-head replication when tensor parallel exceeds the KV head count (issue 9), on CPU.

The tiny M3 has 4 query heads and 2 KV heads (GQA group 2; one index head per KV group). At TP 4
each rank holds one query head and must hold the KV head — and the index query head — of that
query head's group, i.e. KV head ``(rank · H/tp) // (H/KV)``: ranks 0, 1 → head 0, ranks 2, 3 →
head 1. At TP 2 each rank holds 2 query heads and its own KV head. For every rank of TP 2 and 4,
one MSA layer of our model is built at that rank, loaded through our loader from the checkpoint,
and run (tests/model/tp_kv_probe.py); what it hands the attention backend must equal the TP 1
layer's tensors sliced to those heads. The shared index key is replicated on every rank.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from m3serve.checkpoint.m3 import PRESETS, write_m3_checkpoint
from m3serve.checkpoint.tokenizer import write_tokenizer

PROBE = Path(__file__).with_name("tp_kv_probe.py")
TP_SIZES = (1, 2, 4)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, int], dict[str, Any]]:
    d = tmp_path_factory.mktemp("tp-kv")
    write_m3_checkpoint(d, write_tokenizer(d), preset="tiny")
    out = d / "ranks.pt"
    env = dict(os.environ, SGLANG_USE_CPU_ENGINE="1")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(Path(__file__).resolve().parents[2] / "python"), env.get("PYTHONPATH")) if p
    )
    proc = subprocess.run(
        [sys.executable, str(PROBE), str(d), str(out), *map(str, TP_SIZES)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, f"probe failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return torch.load(out)["ranks"]


@pytest.mark.parametrize("tp", [2, 4])
def test_each_rank_holds_its_query_heads_group(
    ranks: dict[tuple[int, int], dict[str, Any]], tp: int
) -> None:
    sizes = PRESETS["tiny"]
    heads, kv = sizes.heads, sizes.kv_heads
    assert max(TP_SIZES) > kv, "the preset must let TP exceed the KV heads"
    full = ranks[(1, 0)]
    q_per_rank, group = heads // tp, heads // kv
    held: list[int] = []
    for rank in range(tp):
        got = ranks[(tp, rank)]
        q0 = rank * q_per_rank
        kv0 = q0 // group
        n_kv = max(1, kv // tp)
        held += range(kv0, kv0 + n_kv)
        assert got["kv_start"] == kv0
        torch.testing.assert_close(got["q"], full["q"][:, q0 : q0 + q_per_rank], rtol=0, atol=0)
        for name in ("k", "v", "idx_q"):
            want = full[name][:, kv0 : kv0 + n_kv]
            torch.testing.assert_close(got[name], want, rtol=0, atol=0, msg=f"{name} rank {rank}")
        torch.testing.assert_close(got["idx_k"], full["idx_k"], rtol=0, atol=0)
    # every KV head lives on some rank, each on tp / kv contiguous ranks when replicated
    assert held == sorted(held) and set(held) == set(range(kv))
    assert len(held) == max(tp, kv)
