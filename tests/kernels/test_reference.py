"""Independent checks of the MSA torch references (they are the oracle for every fast kernel)."""

from __future__ import annotations

import math

import pytest
import torch

from m3serve.kernels.msa import reference as ref


def _paged_batch(seq_lens: list[int], q_lens: list[int], block: int, hkv: int, d: int, gen):
    """Random HND caches with a shuffled page table; returns the metadata tensors."""
    pages_per = [(n + block - 1) // block for n in seq_lens]
    num_pages = sum(pages_per) + 3
    perm = torch.randperm(num_pages, generator=gen)
    max_pages = max(pages_per)
    page_table = torch.zeros(len(seq_lens), max_pages, dtype=torch.int32)
    at = 0
    for r, p in enumerate(pages_per):
        page_table[r, :p] = perm[at : at + p].to(torch.int32)
        at += p
    k = torch.randn(num_pages, hkv, block, d, generator=gen)
    v = torch.randn(num_pages, hkv, block, d, generator=gen)
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    prefix = seq - torch.tensor(q_lens, dtype=torch.int32)
    return k, v, page_table, cu_q, prefix, seq


@pytest.mark.parametrize("seq_lens,q_lens", [([1], [1]), ([37, 80], [37, 5]), ([129], [64])])
def test_all_blocks_selected_equals_sdpa(seq_lens, q_lens):
    gen = torch.Generator().manual_seed(0)
    block, hq, hkv, d = 16, 8, 2, 32
    k, v, pt, cu_q, prefix, seq = _paged_batch(seq_lens, q_lens, block, hkv, d, gen)
    q = torch.randn(int(cu_q[-1]), hq, d, generator=gen)
    out = ref.ref_dense_causal_attention(q, k, v, pt, cu_q, prefix, seq, 1 / math.sqrt(d))
    for r in range(len(seq_lens)):
        n, q0, q1 = seq_lens[r], int(cu_q[r]), int(cu_q[r + 1])
        kr = ref.gather_request_tokens(k.transpose(1, 2), pt[r], n)  # [n, Hkv, D]
        vr = ref.gather_request_tokens(v.transpose(1, 2), pt[r], n)
        pos = int(prefix[r]) + torch.arange(q1 - q0)
        mask = torch.arange(n)[None, :] <= pos[:, None]
        expect = torch.nn.functional.scaled_dot_product_attention(
            q[q0:q1].transpose(0, 1),
            kr.repeat_interleave(hq // hkv, 1).transpose(0, 1),
            vr.repeat_interleave(hq // hkv, 1).transpose(0, 1),
            attn_mask=mask,
        ).transpose(0, 1)
        torch.testing.assert_close(out[q0:q1], expect, rtol=1e-5, atol=1e-5)


def test_topk_rules():
    scores = torch.tensor([[3.0, 1.0, 3.0, 2.0, 9.0, 0.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    got = ref.ref_topk_from_scores(scores, torch.tensor([5, 2]), topk=4)
    # row 0: best earlier blocks 4 (9.0), then 0 and 2 tie at 3.0 (lower id first); local 5 last
    assert got[0].tolist() == [4, 0, 2, 5]
    # row 1: 3 visible blocks ≤ k: all of them in order, then −1
    assert got[1].tolist() == [0, 1, 2, -1]


def test_selection_is_a_true_top_k():
    gen = torch.Generator().manual_seed(1)
    block, g, d, topk = 8, 2, 16, 3
    seq_lens, q_lens = [70, 9], [20, 9]
    pages = sum((n + block - 1) // block for n in seq_lens)
    cache = torch.randn(pages, block, d, generator=gen).to(torch.bfloat16)
    pt = torch.arange(pages, dtype=torch.int32)
    page_table = torch.stack([pt[:9], torch.cat([pt[9:11], pt[:7]])])
    cu_q = torch.tensor([0, 20, 29], dtype=torch.int32)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    prefix = seq - torch.tensor(q_lens, dtype=torch.int32)
    iq = torch.randn(29, g, d, generator=gen)
    ids = ref.ref_select_blocks(iq, cache, None, page_table, cu_q, prefix, seq, topk)
    keys = ref.gather_request_tokens(cache.float(), page_table[0], 70)
    for t in range(20):
        pos = 50 + t
        for gi in range(g):
            s = (iq[t, gi] @ keys[: pos + 1].T) / math.sqrt(d)
            bs = [s[b * block : (b + 1) * block].max().item() for b in range(pos // block + 1)]
            row = ids[gi, t].tolist()
            assert row[-1] == pos // block
            chosen = set(row[:-1])
            worst = min(bs[b] for b in chosen)
            others = [bs[b] for b in range(pos // block) if b not in chosen]
            assert all(o <= worst for o in others)


def test_fp8_store_roundtrip():
    gen = torch.Generator().manual_seed(2)
    cache = torch.zeros(4, 8, 16, dtype=torch.float8_e4m3fn)
    scale = torch.zeros(4, 8)
    k = torch.randn(5, 16, generator=gen)
    slots = torch.tensor([0, 9, 17, 30, 31])
    ref.ref_store_index_k(cache, scale, k, slots)
    back = ref.dequant_index_k(cache, scale)[slots // 8, slots % 8]
    torch.testing.assert_close(back, k, rtol=0.07, atol=1e-3)
