"""The backend's vectorised torch attention equals the MSA references (odd lengths, chunks)."""

from __future__ import annotations

import pytest
import torch

from m3serve.backend.torch_attention import paged_attention
from m3serve.kernels.msa import reference as ref


def _case(seed: int, q_lens: list[int], prefixes: list[int], block: int = 16, topk: int = 4):
    g = torch.Generator().manual_seed(seed)
    hq, hkv, d = 4, 2, 32
    seq = [p + q for p, q in zip(prefixes, q_lens, strict=True)]
    pages_per = [(s + block - 1) // block for s in seq]
    num_pages = sum(pages_per) + 3
    perm = torch.randperm(num_pages, generator=g).to(torch.int32)
    table = torch.zeros(len(seq), max(pages_per), dtype=torch.int32)
    at = 0
    for r, p in enumerate(pages_per):
        table[r, :p] = perm[at : at + p]
        at += p
    k_cache = torch.randn(num_pages, hkv, block, d, generator=g)
    v_cache = torch.randn(num_pages, hkv, block, d, generator=g)
    idx_cache = torch.randn(num_pages, block, d, generator=g)
    cu = torch.zeros(len(seq) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    total = int(cu[-1])
    q = torch.randn(total, hq, d, generator=g)
    iq = torch.randn(total, hkv, d, generator=g)
    meta = (
        table,
        cu,
        torch.tensor(prefixes, dtype=torch.int32),
        torch.tensor(seq, dtype=torch.int32),
    )
    topk_ids = ref.ref_select_blocks(iq, idx_cache, None, *meta, topk)
    return q, k_cache, v_cache, meta, topk_ids


@pytest.mark.parametrize(
    ("q_lens", "prefixes"),
    [([1], [0]), ([127], [0]), ([129, 1, 33], [0, 200, 16]), ([64, 1], [333, 1110]), ([5], [1111])],
)
def test_paged_attention_matches_reference(q_lens: list[int], prefixes: list[int]) -> None:
    q, kc, vc, meta, topk_ids = _case(len(q_lens) + sum(q_lens), q_lens, prefixes)
    scale = 32**-0.5
    sparse = paged_attention(q, kc, vc, *meta, scale, topk_ids)
    dense = paged_attention(q, kc, vc, *meta, scale)
    torch.testing.assert_close(sparse, ref.ref_sparse_attention(q, kc, vc, *meta, topk_ids, scale))
    torch.testing.assert_close(dense, ref.ref_dense_causal_attention(q, kc, vc, *meta, scale))


def test_query_tiles_do_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    import m3serve.backend.torch_attention as ta

    q, kc, vc, meta, topk_ids = _case(5, [129, 33], [0, 200])
    scale = 32**-0.5
    whole = (
        paged_attention(q, kc, vc, *meta, scale, topk_ids),
        paged_attention(q, kc, vc, *meta, scale),
    )
    monkeypatch.setattr(ta, "QUERY_TILE", 7)
    tiled = (
        paged_attention(q, kc, vc, *meta, scale, topk_ids),
        paged_attention(q, kc, vc, *meta, scale),
    )
    for a, b in zip(whole, tiled, strict=True):
        torch.testing.assert_close(a, b)
