"""Readable torch references for MiniMax Sparse Attention (MSA). Slow on purpose.

Every fast MSA kernel in this package is tested against these functions; the math is the one in
DESIGN.md ("MSA — the exact math"). Conventions shared by all kernels:

- Ragged batch: ``cu_q`` [B+1] offsets of each request's queries in the packed T queries,
  ``prefix_lens`` [B] tokens before the request's first query (query i sits at position
  prefix_lens[r] + i), ``seq_lens`` [B] = prefix_lens + q_lens. Decode/MTP: q_len = Q in 1..16.
- ``page_table`` [B, max_pages] int32: physical page of logical block j of request r; page = block.
- KV cache of one layer, HND paged: [num_pages, H_kv, block, D]; index-K cache: [num_pages, block,
  d_index] (bf16, or float8_e4m3fn with a float32 per-token scale [num_pages, block]).
- ``topk_ids`` [G, T, k] int32: logical block ids; the local block (pos // block) sits in the
  last valid slot, the rest are ranked by block score (desc) then block id (asc); −1 pads the end.
  If at most k blocks are visible, all are listed in ascending order. G = H_kv (one index head per
  KV head); query head h reads group h // (H_q // G).
"""

from __future__ import annotations

import math

import torch

FP8_E4M3_MAX = 448.0


def _request_ranges(cu_q: torch.Tensor) -> list[tuple[int, int]]:
    cu = cu_q.tolist()
    return [(cu[r], cu[r + 1]) for r in range(len(cu) - 1)]


def gather_request_tokens(paged: torch.Tensor, page_row: torch.Tensor, n: int) -> torch.Tensor:
    """Tokens 0..n-1 of one request from a [num_pages, block, ...] token-major paged tensor."""
    block = paged.shape[1]
    pages = page_row[: (n + block - 1) // block].long()
    return paged[pages].flatten(0, 1)[:n]


def quantize_index_k_fp8(index_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token FP8 e4m3 quantization: scale = amax / 448 (1 where the row is all zero)."""
    x = index_k.float()
    amax = x.abs().amax(dim=-1)
    # divide by a tensor, not a Python float: on CUDA torch turns `t / 448.0` into t * (1/448),
    # which is not the IEEE quotient (it flips e4m3 rounding ties against the fast kernel)
    scale = torch.where(amax > 0, amax / torch.full_like(amax, FP8_E4M3_MAX), torch.ones_like(amax))
    q = (x / scale[..., None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def quantize_index_q_fp8(index_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index queries [T, G, d] → e4m3 [T, G, d] and float32 scale [T, G]: every (token, group)
    row quantized on its own by the key rule (``quantize_index_k_fp8``). The opt-in FP8-query
    selection (``q_fp8=True``) scores these against FP8 keys on FP8 tensor cores."""
    return quantize_index_k_fp8(index_q)


def dequant_index_q_fp8(index_q: torch.Tensor) -> torch.Tensor:
    """The index queries as the FP8-query selection sees them: quantized, then float32 again."""
    q, scale = quantize_index_q_fp8(index_q)
    return q.float() * scale[..., None]


def ref_store_index_k(
    cache: torch.Tensor,
    scale: torch.Tensor | None,
    index_k: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Write index_k [T, d] into cache [num_pages, block, d] at flat slots (page * block + offset)."""
    block = cache.shape[1]
    pages, offs = slots.long() // block, slots.long() % block
    if cache.dtype == torch.float8_e4m3fn:
        assert scale is not None, "an FP8 index-K cache needs its per-token scale tensor"
        q, s = quantize_index_k_fp8(index_k)
        cache[pages, offs] = q
        scale[pages, offs] = s
    else:
        cache[pages, offs] = index_k.to(cache.dtype)


def dequant_index_k(cache: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The index-K cache as float32 [num_pages, block, d]."""
    if cache.dtype == torch.float8_e4m3fn:
        assert scale is not None
        return cache.float() * scale.float()[..., None]
    return cache.float()


def ref_block_scores(
    index_q: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor, block: int
) -> torch.Tensor:
    """Block scores [G, Lq, num_blocks]: max over visible tokens of q·k / sqrt(d), −inf if none."""
    d = index_q.shape[-1]
    n = keys.shape[0]
    s = torch.einsum("tgd,nd->gtn", index_q.float(), keys.float()) / math.sqrt(d)
    causal = torch.arange(n, device=keys.device)[None, :] <= positions[:, None]
    s = s.masked_fill(~causal[None], float("-inf"))
    nb = (n + block - 1) // block
    s = torch.nn.functional.pad(s, (0, nb * block - n), value=float("-inf"))
    return s.view(s.shape[0], s.shape[1], nb, block).amax(dim=-1)


def ref_topk_from_scores(scores: torch.Tensor, local: torch.Tensor, topk: int) -> torch.Tensor:
    """Exact MSA top-k for rows of block scores [R, nb] whose local block is ``local`` [R].

    Blocks after ``local`` are not visible. Returns [R, topk] int32 per the module rules.
    """
    rows, nb = scores.shape
    out = torch.full((rows, topk), -1, dtype=torch.int32, device=scores.device)
    ids = torch.arange(nb, device=scores.device)
    for r in range(rows):
        loc = int(local[r])
        if loc + 1 <= topk:
            out[r, : loc + 1] = ids[: loc + 1].to(torch.int32)
            continue
        earlier = scores[r, :loc]
        # stable sort on descending score keeps the lower block id first among equal scores
        order = torch.sort(earlier, descending=True, stable=True).indices[: topk - 1]
        out[r, : topk - 1] = order.to(torch.int32)
        out[r, topk - 1] = loc
    return out


def ref_select_blocks(
    index_q: torch.Tensor,
    index_k_cache: torch.Tensor,
    index_k_scale: torch.Tensor | None,
    page_table: torch.Tensor,
    cu_q: torch.Tensor,
    prefix_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    topk: int,
    q_fp8: bool = False,
) -> torch.Tensor:
    """MSA block selection for a ragged batch: index_q [T, G, d] → topk_ids [G, T, k] int32.

    ``q_fp8``: score e4m3-quantized queries (``dequant_index_q_fp8``) instead, in float32 (every
    e4m3 × e4m3 product is exact in float32, so a fast kernel differs only in summation order)."""
    block = index_k_cache.shape[1]
    if q_fp8:
        index_q = dequant_index_q_fp8(index_q)
    total_q, groups, _ = index_q.shape
    keys_all = dequant_index_k(index_k_cache, index_k_scale)
    out = torch.full((groups, total_q, topk), -1, dtype=torch.int32, device=index_q.device)
    for r, (q0, q1) in enumerate(_request_ranges(cu_q)):
        if q1 == q0:
            continue
        n = int(seq_lens[r])
        keys = gather_request_tokens(keys_all, page_table[r], n)
        pos = int(prefix_lens[r]) + torch.arange(q1 - q0, device=index_q.device)
        assert int(pos[-1]) < n, f"request {r}: last query position {int(pos[-1])} >= seq_len {n}"
        scores = ref_block_scores(index_q[q0:q1], keys, pos, block)  # [G, Lq, nb]
        local = (pos // block).repeat(groups)
        sel = ref_topk_from_scores(scores.flatten(0, 1), local, topk)
        out[:, q0:q1] = sel.view(groups, q1 - q0, topk)
    return out


def ref_sparse_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    cu_q: torch.Tensor,
    prefix_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    topk_ids: torch.Tensor,
    sm_scale: float,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention over selected blocks ∩ causal (gather + masked softmax), float32.

    q [T, H_q, D]; caches HND [num_pages, H_kv, block, D]; topk_ids [H_kv, T, k].
    Returns out [T, H_q, D] float32 (and lse [T, H_q], natural log, if asked).
    """
    total_q, hq, _ = q.shape
    _, hkv, block, _ = k_cache.shape
    group = hq // hkv
    assert topk_ids.shape[0] == hkv, "topk_ids needs one row of selections per KV head"
    out = torch.zeros(total_q, hq, v_cache.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((total_q, hq), float("-inf"), dtype=torch.float32, device=q.device)
    for r, (q0, q1) in enumerate(_request_ranges(cu_q)):
        if q1 == q0:
            continue
        n = int(seq_lens[r])
        k = gather_request_tokens(k_cache.transpose(1, 2), page_table[r], n).float()  # [n, Hkv, D]
        v = gather_request_tokens(v_cache.transpose(1, 2), page_table[r], n).float()
        pos = int(prefix_lens[r]) + torch.arange(q1 - q0, device=q.device)
        tok_block = torch.arange(n, device=q.device) // block
        sel = topk_ids[:, q0:q1].long()  # [Hkv, Lq, k]
        chosen = (tok_block[None, None, :, None] == sel[:, :, None, :]).any(-1)  # [Hkv, Lq, n]
        mask = chosen & (torch.arange(n, device=q.device)[None, None, :] <= pos[None, :, None])
        mask = mask.repeat_interleave(group, dim=0)  # [Hq, Lq, n]
        k_h = k.repeat_interleave(group, dim=1)  # [n, Hq, D]
        v_h = v.repeat_interleave(group, dim=1)
        s = torch.einsum("thd,nhd->htn", q[q0:q1].float(), k_h) * sm_scale
        s = s.masked_fill(~mask, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)  # [Hq, Lq]
        p = torch.exp(s - row_lse[..., None]).nan_to_num(0.0)
        out[q0:q1] = torch.einsum("htn,nhd->thd", p, v_h)
        lse[q0:q1] = row_lse.transpose(0, 1)
    return (out, lse) if return_lse else out


def ref_dense_causal_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    cu_q: torch.Tensor,
    prefix_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """Dense causal GQA attention on the same paged cache: sparse attention with every block."""
    _, hkv, _, _ = k_cache.shape
    block = k_cache.shape[2]
    max_blocks = (int(seq_lens.max()) + block - 1) // block
    total_q = q.shape[0]
    all_blocks = torch.arange(max_blocks, dtype=torch.int32, device=q.device)
    ids = all_blocks[None, None, :].expand(hkv, total_q, max_blocks).contiguous()
    return ref_sparse_attention(
        q, k_cache, v_cache, page_table, cu_q, prefix_lens, seq_lens, ids, sm_scale
    )
