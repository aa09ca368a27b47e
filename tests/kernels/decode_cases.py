"""Shared decode-attention test cases: a valid random MSA selection, random paged inputs with
a poisoned page-table tail, and the float32 oracle (reference.ref_sparse_attention)."""

from __future__ import annotations

import torch

from m3serve.kernels.msa.reference import ref_sparse_attention


def random_selection(
    seq_lens: list[int], q: int, hkv: int, block: int, topk: int, gen
) -> torch.Tensor:
    """A valid MSA selection [H_kv, T, k] per the reference conventions (random ranking)."""
    rows = []
    for n in seq_lens:
        for i in range(q):
            pos = n - q + i
            local = pos // block
            for _ in range(hkv):
                row = torch.full((topk,), -1, dtype=torch.int32)
                if local + 1 <= topk:
                    row[: local + 1] = torch.arange(local + 1, dtype=torch.int32)
                else:
                    row[: topk - 1] = torch.randperm(local, generator=gen)[: topk - 1].to(
                        torch.int32
                    )
                    row[topk - 1] = local
                rows.append(row)
    return torch.stack(rows).view(len(seq_lens) * q, hkv, topk).transpose(0, 1).contiguous()


def paged_kv(pages_per, hkv, block, d, gen, dtype, spare: int, pad: int, fill: int):
    """Random HND caches [pages, H_kv, block, D] (``spare`` pages more than the requests use)
    behind a shuffled page table, ``pad`` columns past the longest request set to ``fill``."""
    num_pages = sum(pages_per) + spare
    perm = torch.randperm(num_pages, generator=gen)
    page_table = torch.full((len(pages_per), max(pages_per) + pad), fill, dtype=torch.int32)
    at = 0
    for r, p in enumerate(pages_per):
        page_table[r, :p] = perm[at : at + p].to(torch.int32)
        at += p
    k = torch.randn(num_pages, hkv, block, d, generator=gen).to(dtype)
    v = torch.randn(num_pages, hkv, block, d, generator=gen).to(dtype)
    return page_table, k, v


def make_case(seq_lens, q, hkv, group, d, block, topk, seed=0, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    pages_per = [(n + block - 1) // block for n in seq_lens]
    page_table, k, v = paged_kv(pages_per, hkv, block, d, gen, dtype, spare=5, pad=2, fill=10**6)
    qt = torch.randn(len(seq_lens) * q, hkv * group, d, generator=gen).to(dtype)
    sel = random_selection(seq_lens, q, hkv, block, topk, gen)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    t = [x.to(device) for x in (qt, k, v, page_table, sel, seq)]
    return t


def oracle(q, k, v, page_table, sel, seq, qn, sm_scale):
    """ref_sparse_attention in float32 on the inputs' device (GPU keeps the big cases fast)."""
    b, dev = seq.numel(), q.device
    cu_q = torch.arange(b + 1, dtype=torch.int32, device=dev) * qn
    out = ref_sparse_attention(
        q.float(), k.float(), v.float(), page_table, cu_q, seq - qn, seq, sel, sm_scale
    )
    return out.cpu()
