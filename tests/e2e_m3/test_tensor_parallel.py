"""Tensor parallel 2 serves the same tokens as TP 1: the real launch_server on CPU, msa backend.

The TP 1 server is the session's ``m3_server`` (float32, block 16, top-k 4, chunked prefill 64);
a second server runs the same checkpoint and flags with ``--tp-size 2`` (two scheduler processes,
gloo). Prompts cross many MSA blocks (sparse selection from 65 tokens on), and a generation
crosses block boundaries. Greedy tokens must be equal, logprobs equal up to float32 summation
order (TP splits the o_proj/down_proj/expert reductions into per-rank partial sums + all-reduce).

Two settings make SGLang 0.5.23's CPU engine run TP > 1 here; m3serve.launch sets them for every
CPU server with ``--tp-size`` > 1 (SGLangServer.environment), so this test relies on the launcher:
- ``SGLANG_NCCL_SO_PATH`` pointing at no file. ``init_model_parallel_group`` consults the
  platform's ``supports_pynccl`` (False for CPU) only for out-of-tree platforms; on the in-tree CPU
  platform it builds a PyNcclCommunicator whenever libnccl.so.2 loads (the nvidia-nccl wheel the
  CUDA torch build pulls into this venv), which then calls ``torch.cuda.device("cpu")`` and raises.
  With no loadable library the communicator disables itself, as on a host without NCCL, and the TP
  all-reduce takes ``GroupCoordinator.all_reduce``'s CPU branch: torch.distributed over gloo (its
  shared-memory all-reduce needs sgl_kernel's CPU build, absent here).
- ``SGLANG_CPU_OMP_THREADS_BIND`` with one entry per rank: without it SGLang asserts TP ≤ NUMA
  nodes (one here). The binding itself is applied only by sgl_kernel's CPU build, so any cores do.

TP larger than the KV heads (2 here) is not served on CPU: for ``--device cpu`` SGLang rewrites the
config when KV heads don't divide by TP (``adjust_config_with_unaligned_cpu_tp``: heads padded to
a multiple of TP, expert FFN to a multiple of 32·TP) instead of replicating KV heads as on GPUs.
tests/model/test_tp_kv_replication.py checks the replication rank by rank instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

TP = 2
LENGTHS = [40, 150, 333]
NEW = 12
ATOL = 1e-4


@pytest.fixture(scope="module")
def servers(
    request: pytest.FixtureRequest,
    m3_dir: Path,
    m3_cpu_server: Callable[..., Any],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Any, Any]]:
    tmp = tmp_path_factory.mktemp(f"m3-tp{TP}")
    tp2 = m3_cpu_server(m3_dir, tmp / "server.log", "--tp-size", str(TP))
    # start TP 2 while the session's TP 1 server starts (or is already up): start-up is mostly
    # imports and waiting, so the two overlap even on two cores
    errors: list[BaseException] = []

    def _start() -> None:
        try:
            tp2.start()
        except BaseException as e:  # re-raised below, in the test's thread
            errors.append(e)

    t = threading.Thread(target=_start, daemon=True)
    t.start()
    try:
        tp1 = request.getfixturevalue("m3_server")
    finally:
        t.join()
    if errors:
        tp2.stop()
        raise errors[0]
    try:
        yield tp1, tp2
    finally:
        assert tp2.stop(), "TP 2 server process group still has live processes"


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 600, (n,), generator=g).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("n", LENGTHS)
def test_tp2_equals_tp1(
    servers: tuple[Any, Any],
    greedy_logprobs: Callable[..., Any],
    logprob_values: Callable[..., list[float]],
    n: int,
) -> None:
    tp1, tp2 = servers
    ids = _prompt(n, seed=2000 + n)
    a, b = greedy_logprobs(tp1, ids, NEW), greedy_logprobs(tp2, ids, NEW)
    assert a["output_ids"] == b["output_ids"]
    for key in ("input_token_logprobs", "output_token_logprobs"):
        la, lb = torch.tensor(logprob_values(a, key)), torch.tensor(logprob_values(b, key))
        assert la.shape == lb.shape and la.numel() >= (NEW if key[0] == "o" else n - 1)
        err = (la - lb).abs()
        assert err.max() < ATOL, f"{key}: max |Δ| {err.max():.2e} at {int(err.argmax())}"
