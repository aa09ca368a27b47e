"""Routed-expert compute of the M3 MoE: a readable reference loop and a grouped-GEMM fast path.

Both take the stacked weights of ``M3Experts`` (w13 [E, 2·I, H] = [gate | up], w2 [E, H, I], I
the local, TP-sharded intermediate size), the tokens x [T, H], and the router's choice
(topk_ids [T, k] int, topk_w [T, k] float32), and return the weighted sum over each token's k
experts in float32 [T, H] (a TP partial sum; the caller reduces it).

``moe_experts_reference`` is the torch loop: sort the (token, slot) pairs by expert, run each
expert that received tokens as two matmuls, add the weighted outputs back. It reads the
per-expert counts on the host (``.tolist()``), so it cannot be captured in a CUDA graph.

``moe_experts`` is the same math without a host synchronisation, for decode CUDA graphs:
  -- sort --      the T·k pairs by expert with a device argsort; per-expert end offsets by
                  ``searchsorted`` on the sorted ids (not ``bincount``: on CUDA it reads the
                  max id on the host to size its output)
  -- gate_up --   ``torch._grouped_mm`` over the expert-contiguous rows, then swigluoai
  -- down --      ``torch._grouped_mm`` again
  -- combine --   un-permute to [T, k, H] and sum the k slots weighted, in float32 (a segment
                  sum over fixed-size segments: no atomics, deterministic)
Every tensor it allocates has a shape derived from x, topk_ids and the weights, so a captured
graph replays correctly when the routing (the contents of topk_ids / topk_w) changes.

Where the grouped path runs (``grouped_mm_supported``): CUDA, bf16 activations and weights,
compute capability 9.x/10.x, and 16-byte aligned rows (H and I multiples of 8): there
``torch._grouped_mm`` is a CUTLASS kernel that reads the offsets on the device. On other CUDA
cards or dtypes its fallback copies the offsets to the host, so we use the reference loop (not
capturable); on CPU the reference loop is also the path (``_grouped_mm`` runs there too, via the
same fallback, and the tests compare it with the loop).
"""

from __future__ import annotations

import functools

import torch

from m3serve.models.ops import swigluoai

_GROUPED_MM_CAPABILITIES = (9, 10)  # sm90 (H100/H200) and sm100: torch's CUTLASS grouped GEMM


def moe_experts_reference(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_w: torch.Tensor,
    alpha: float,
    limit: float,
) -> torch.Tensor:
    """Torch loop over the experts that received tokens; float32 [T, H]. Syncs with the host."""
    num_experts = w13.shape[0]
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    flat = topk_ids.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    tokens = order // topk_ids.shape[1]
    weights = topk_w.flatten()[order]
    start = 0
    for e, c in enumerate(counts):
        if c == 0:
            continue
        idx = tokens[start : start + c]
        h = swigluoai(x[idx] @ w13[e].t(), alpha, limit)
        y = (h @ w2[e].t()).float() * weights[start : start + c, None]
        out.index_add_(0, idx, y)
        start += c
    return out


def moe_experts_grouped(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_w: torch.Tensor,
    alpha: float,
    limit: float,
) -> torch.Tensor:
    """The grouped-GEMM path on any device ``torch._grouped_mm`` accepts; float32 [T, H].

    No host synchronisation where ``_grouped_mm`` itself has none (see the module docstring).
    """
    num_tokens, top_k = topk_ids.shape
    num_experts, hidden = w13.shape[0], w2.shape[1]
    if num_tokens == 0:
        return torch.zeros(0, hidden, dtype=torch.float32, device=x.device)

    # -- sort: pairs by expert; offs[e] = end of expert e's rows (int32, cumulative) --
    flat = topk_ids.flatten()
    sorted_ids, order = flat.sort(stable=True)
    experts = torch.arange(num_experts, device=x.device, dtype=sorted_ids.dtype)
    offs = torch.searchsorted(sorted_ids, experts, right=True).to(torch.int32)

    # -- gate_up: [T·k, H] × [E, H, 2I] (w13 viewed column-major, no copy) --
    xs = x.index_select(0, order // top_k)
    gate_up = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
    h = swigluoai(gate_up, alpha, limit)

    # -- down: [T·k, I] × [E, I, H] --
    y = torch._grouped_mm(h, w2.transpose(1, 2), offs=offs)

    # -- combine: back to (token, slot) order, weighted sum over the k slots in float32 --
    slots = torch.arange(order.numel(), device=x.device, dtype=order.dtype)
    inverse = torch.empty_like(order).scatter_(0, order, slots)
    y = y.index_select(0, inverse).view(num_tokens, top_k, hidden).float()
    # elementwise, not bmm: a float32 bmm may run in TF32 where the caller allows it
    return y.mul_(topk_w.float().unsqueeze(-1)).sum(dim=1)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def grouped_mm_supported(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether ``moe_experts`` takes the capturable grouped-GEMM path for these tensors."""
    if not (x.is_cuda and hasattr(torch, "_grouped_mm")):
        return False
    if not x.dtype == w13.dtype == w2.dtype == torch.bfloat16:
        return False
    if _capability(x.device.index or 0)[0] not in _GROUPED_MM_CAPABILITIES:
        return False
    # CUTLASS needs every leading dimension 16-byte aligned: H (x, w13 rows) and I (h, w2 rows).
    hidden, inter = w2.shape[1], w2.shape[2]
    return hidden % 8 == 0 and inter % 8 == 0


def moe_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_w: torch.Tensor,
    alpha: float,
    limit: float,
) -> torch.Tensor:
    """Routed experts, float32 [T, H]: grouped GEMMs where supported, else the reference loop.

    The choice depends only on device, dtypes and shapes (``grouped_mm_supported``), so it is
    the same at capture and at replay.
    """
    if grouped_mm_supported(x, w13, w2):
        return moe_experts_grouped(x, w13, w2, topk_ids, topk_w, alpha, limit)
    return moe_experts_reference(x, w13, w2, topk_ids, topk_w, alpha, limit)
