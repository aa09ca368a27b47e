"""Vectorised torch attention over the paged cache: the backend's CPU path (no GPU kernels there).

Same math as ``ref_sparse_attention`` / ``ref_dense_causal_attention`` in
m3serve.kernels.msa.reference (tests/backend checks equality), but the selected-block mask is
built per block and expanded per token instead of comparing every token against every selected
slot, and the softmax runs in SDPA, so a 4K-token prompt in 64-token chunks serves in seconds on
a small CPU. The references stay the oracle; these are a faster torch implementation of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from m3serve.kernels.msa.reference import gather_request_tokens


def _requests(cu_q: torch.Tensor) -> list[tuple[int, int, int]]:
    cu = cu_q.tolist()
    return [(r, cu[r], cu[r + 1]) for r in range(len(cu) - 1) if cu[r + 1] > cu[r]]


QUERY_TILE = 2048


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    cu_q: torch.Tensor,
    prefix_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    topk_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, Hq, D]; HND caches [pages, Hkv, block, D]; topk_ids [Hkv, T, k] or None (dense).

    Returns [T, Hq, D] in q's dtype; float32 math on CPU, q's dtype on CUDA (SDPA's fused
    kernels). Queries go in tiles of ``QUERY_TILE`` so the mask stays [tile, n], not [Lq, n].
    """
    total, hq, _ = q.shape
    _, hkv, block, _ = k_cache.shape
    group = hq // hkv
    out = torch.zeros(total, hq, v_cache.shape[-1], dtype=q.dtype, device=q.device)
    seq, pre = seq_lens.tolist(), prefix_lens.tolist()
    dt = torch.float32 if q.device.type == "cpu" else q.dtype
    for r, r0, r1 in _requests(cu_q):
        n = seq[r]
        k = gather_request_tokens(k_cache.transpose(1, 2), page_table[r], n).to(dt)  # [n, Hkv, D]
        v = gather_request_tokens(v_cache.transpose(1, 2), page_table[r], n).to(dt)
        kh = k.transpose(0, 1).repeat_interleave(group, dim=0)  # [Hq, n, D]
        vh = v.transpose(0, 1).repeat_interleave(group, dim=0)
        for q0 in range(r0, r1, QUERY_TILE):
            q1 = min(q0 + QUERY_TILE, r1)
            pos = pre[r] + (q0 - r0) + torch.arange(q1 - q0, device=q.device)
            mask = torch.arange(n, device=q.device)[None, :] <= pos[:, None]  # [Lq, n] causal
            if topk_ids is not None:
                nb = (n + block - 1) // block
                sel = topk_ids[:, q0:q1].long()  # [Hkv, Lq, k]
                chosen = torch.zeros(hkv, q1 - q0, nb + 1, dtype=torch.bool, device=q.device)
                chosen.scatter_(-1, torch.where(sel < 0, nb, sel), True)  # −1 → dropped column
                tok = chosen[..., :nb].repeat_interleave(block, dim=-1)[..., :n]
                mask = (mask[None] & tok).repeat_interleave(group, dim=0)  # [Hq, Lq, n]
            qh = q[q0:q1].to(dt).transpose(0, 1)  # [Hq, Lq, D]
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=sm_scale)
            out[q0:q1] = o.transpose(0, 1).to(q.dtype)
    return out
