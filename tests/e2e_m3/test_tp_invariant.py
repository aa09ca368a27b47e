"""The TP-invariant mode (``M3SERVE_TP_INVARIANT=2``): TP 2 serves the same bits as TP 1.

Two real launch_server processes on CPU (msa backend, the tiny M3, float32 as every e2e server
here), both with the mode on: TP 1 runs each layer as two shards one after another, TP 2 one
shard per rank (models/invariant.py). Without the mode the two agree only up to float32
summation order (test_tensor_parallel.py: logprobs within 1e-4); with it every prompt and output
logprob must be *equal*, and so the greedy tokens. Prompts cross many MSA blocks and prefill
chunks, and the generation crosses block boundaries. The mode changes only the order of float
additions, not the model: its TP 1 equals the session's plain TP 1 server up to rounding.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

LENGTHS = [40, 150, 333]
NEW = 12
ENV = {"M3SERVE_TP_INVARIANT": "2"}


@pytest.fixture(scope="module")
def servers(
    m3_dir: Path, m3_cpu_server: Callable[..., Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Any, Any]]:
    tmp = tmp_path_factory.mktemp("m3-tp-invariant")
    pair = [
        m3_cpu_server(m3_dir, tmp / f"tp{tp}.log", "--tp-size", str(tp), env=ENV) for tp in (1, 2)
    ]
    errors: list[BaseException] = []

    def _start(s: Any) -> None:
        try:
            s.start()
        except BaseException as e:  # re-raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=_start, args=(s,), daemon=True) for s in pair]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield pair[0], pair[1]
    finally:
        for s in pair:
            assert s.stop(), "server process group still has live processes"


@pytest.mark.slow
@pytest.mark.parametrize("n", LENGTHS)
def test_tp2_bit_identical_to_tp1(
    servers: tuple[Any, Any],
    greedy_logprobs: Callable[..., Any],
    logprob_values: Callable[..., list[float]],
    n: int,
) -> None:
    tp1, tp2 = servers
    g = torch.Generator().manual_seed(3000 + n)
    ids = torch.randint(10, 600, (n,), generator=g).tolist()
    a, b = greedy_logprobs(tp1, ids, NEW), greedy_logprobs(tp2, ids, NEW)
    assert a["output_ids"] == b["output_ids"]
    for key in ("input_token_logprobs", "output_token_logprobs"):
        la, lb = logprob_values(a, key), logprob_values(b, key)
        assert len(la) == len(lb) >= (NEW if key[0] == "o" else n - 1)
        diff = [i for i, (x, y) in enumerate(zip(la, lb, strict=True)) if x != y]
        assert not diff, (
            f"{key}: {len(diff)} of {len(la)} differ, first at {diff[0]}: "
            f"{la[diff[0]]!r} vs {lb[diff[0]]!r}"
        )


@pytest.mark.slow
def test_invariant_mode_is_the_same_model(
    servers: tuple[Any, Any],
    m3_server: Any,
    greedy_logprobs: Callable[..., Any],
    logprob_values: Callable[..., list[float]],
) -> None:
    """The mode's TP 1 = the plain TP 1 server: same greedy tokens, logprobs within 1e-4."""
    ids = torch.randint(10, 600, (222,), generator=torch.Generator().manual_seed(7)).tolist()
    a, b = greedy_logprobs(servers[0], ids, NEW), greedy_logprobs(m3_server, ids, NEW)
    assert a["output_ids"] == b["output_ids"]
    for key in ("input_token_logprobs", "output_token_logprobs"):
        la, lb = torch.tensor(logprob_values(a, key)), torch.tensor(logprob_values(b, key))
        assert la.shape == lb.shape and la.numel() >= NEW
        assert (la - lb).abs().max() < 1e-4
