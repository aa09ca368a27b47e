"""SGLang + m3serve (msa backend) against transformers' independent M3 forward, same checkpoint."""

from __future__ import annotations

from typing import Any

import pytest
import requests
import torch

LENGTHS = [1, 17, 130, 333, 1111, 4000]
ATOL = 1e-4  # float32 on both sides: only summation-order rounding differs


def _prompt(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 600, (n,), generator=g).tolist()


def _ref_logprobs(hf: Any, ids: list[int]) -> torch.Tensor:
    """log p(ids[i+1] | ids[:i+1]) for every i, from transformers."""
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:], dtype=torch.long)]


def _generate(server: Any, ids: list[int], new: int = 0, start: int = 0) -> dict[str, Any]:
    r = requests.post(
        server.url + "/generate",
        json={
            "input_ids": ids,
            "sampling_params": {"max_new_tokens": max(new, 1), "temperature": 0},
            "return_logprob": True,
            "logprob_start_len": start,
        },
        timeout=600,
    )
    assert r.status_code == 200, r.text
    return r.json()


def _served_logprobs(out: dict[str, Any]) -> torch.Tensor:
    return torch.tensor([x[0] for x in out["meta_info"]["input_token_logprobs"][1:]])


@pytest.mark.slow
@pytest.mark.parametrize("n", LENGTHS)
def test_prompt_logprobs_match(m3_server: Any, hf_m3: Any, n: int) -> None:
    ids = _prompt(n, seed=n)
    out = _generate(m3_server, ids)
    ours, ref = _served_logprobs(out), _ref_logprobs(hf_m3, ids)
    assert ours.shape == ref.shape
    if n > 1:
        err = (ours - ref).abs()
        assert err.max() < ATOL, f"max |Δ logprob| {err.max():.2e} at position {int(err.argmax())}"


@pytest.mark.slow
@pytest.mark.parametrize("n", [5, 333])
def test_greedy_tokens_match(m3_server: Any, hf_m3: Any, n: int) -> None:
    ids = _prompt(n, seed=1000 + n)
    out = _generate(m3_server, ids, new=8)
    with torch.no_grad():
        ref = hf_m3.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert out["output_ids"] == ref[0, n:].tolist()


@pytest.mark.slow
def test_radix_cache_hit_matches(m3_server: Any, hf_m3: Any) -> None:
    base = _prompt(300, seed=7)
    _generate(m3_server, base)
    ids = base + _prompt(90, seed=8)
    # logprobs only for the new part: asking for earlier positions would bypass the cache
    out = _generate(m3_server, ids, start=len(base))
    assert out["meta_info"]["cached_tokens"] >= 288, out["meta_info"]  # whole 16-token pages
    ours = torch.tensor([x[0] for x in out["meta_info"]["input_token_logprobs"]][1:])
    err = (ours - _ref_logprobs(hf_m3, ids)[len(base) :]).abs()
    assert err.max() < ATOL, f"max |Δ logprob| {err.max():.2e} at position {int(err.argmax())}"
