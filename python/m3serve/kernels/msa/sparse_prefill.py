"""MSA sparse prefill attention over the paged KV cache: plan once per step, run once per layer.

    wrapper = SparsePrefillWrapper()
    wrapper.plan(cu_q, prefix_lens, seq_lens, page_table, num_q_heads=64, num_kv_heads=4,
                 head_dim=128, block=128, topk=16)          # host metadata + fixed buffers
    for layer in sparse_layers:
        out = wrapper.run(q, k_cache, v_cache, topk_ids, sm_scale)   # device only, no sync

run() per layer: build the inverse index of this layer's topk_ids (count → scan → fill → work
list, sparse_prefill_plan.py), run the KV-block-major main kernel into per-(query, slot)
partials, merge them by log-sum-exp (sparse_prefill_triton.py). Every buffer it touches was
sized in plan() for the worst case, so the launches can be captured in a CUDA graph.
``variant="query_major"`` runs the comparison kernel (sparse_prefill_query_major.py) instead;
The main kernel has two forms: CUDA (sparse_prefill_main.cu: Hopper, bf16, head_dim 128,
block 128, GQA groups ≤ 64; compiled with NVRTC at first use) and Triton (any card, dtype and
shape the plan accepts). ``main_kernel="auto"`` (default) runs the CUDA one where it applies and
Triton elsewhere: on H200 run() takes 2.10 vs 2.36 ms at 32K and 2.19 vs 2.37 at 128K (64/4,
8K chunk; sparse_prefill.md, session 16). ``"cuda"`` / ``"triton"`` force one (``"cuda"`` raises
ValueError where it does not apply).

Conventions (shapes, topk_ids layout, ragged metadata) are those of reference.py. Constraints:
bf16/fp16 q and caches, head_dim and block powers of two ≥ 16, H_q % H_kv == 0 (any group; a
tile holds whole groups, BLOCK_M = max(64, next_pow2(group))), topk_ids distinct within a row
(MSA's top-k never repeats a block). Memory: plan() allocates T·k·H_q·D partials in bf16
(2.1 GB for an 8K chunk at 64 q heads, k = 16) plus small int32 index buffers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from . import reference
from .sparse_prefill_cuda import cuda_tile_ok, launch_block_major_cuda
from .sparse_prefill_plan import (
    HostMetadata,
    build_host_metadata,
    build_inverse_index,
    max_work_items,
)
from .sparse_prefill_query_major import launch_query_major
from .sparse_prefill_triton import launch_block_major, launch_combine


@dataclass
class SparsePrefillPlan:
    """Everything plan() decides for one forward step: metadata and fixed device buffers."""

    meta: HostMetadata
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    block: int
    topk: int
    block_m: int
    item_q: int
    hoist_kv: bool
    prefetch: bool
    combine_unroll: bool
    main_kernel: str  # "triton" or "cuda" (sparse_prefill_main.cu)
    auto: bool  # main kernel chosen by "auto": a run() with other than bf16 q goes to Triton
    fused_build: bool  # inverse index in 3 launches (sparse_prefill_plan._offsets_kernel)
    counts: torch.Tensor  # [G*NB] int32, zero between runs
    row_ptr: torch.Tensor  # [G*NB+1] int32 CSR offsets
    item_ptr: torch.Tensor  # [G*NB+1] int32 work-item offsets
    entries: torch.Tensor  # [G*T*k] int32 (t * k + slot), grouped by row
    work_row: torch.Tensor  # [max_items] int32
    work_start: torch.Tensor  # [max_items] int32
    o_part: torch.Tensor  # [T*k, Hq, D] partial outputs
    lse_part: torch.Tensor  # [T*k, Hq, 2] float32: (log2-sum-exp, row max) of the unnormalised O


def default_tile(group: int, main_kernel: str = "triton") -> tuple[int, int]:
    """(BLOCK_M, ITEM_Q): 64-row tiles and 128 (query, slot) pairs per work item (64 for CUDA).

    Measured on H200 (64 q / 4 KV heads, 128K context, 8K chunk, whole run()): 64-row tiles beat
    128-row ones (2.97 vs 3.59 ms; the resident K/V block leaves little room for a 128-row S and
    O); ITEM_Q 128 beat 64 in four of five session-14 runs, by 1-2 % (2.303-2.330 vs
    2.350-2.357 ms; the fifth: 2.363 vs 2.349). With the prefetching loop (default) run() takes
    2.41 ms vs 2.87 without; the unrolled combine (combine_unroll=True) spills and costs
    +7.5 ms, hence off by default. The CUDA kernel keeps 64: at 128 two CTAs no longer fit an
    SM (3.46 ms). sparse_prefill.md has the sweeps.
    """
    gp = triton.next_power_of_2(group)
    block_m = max(64, gp)
    return block_m, max(64 if main_kernel == "cuda" else 128, block_m // gp)


class SparsePrefillWrapper:
    """plan()/run() wrapper for MSA sparse prefill (KV-block-major, or query-major to compare)."""

    def __init__(
        self,
        variant: str = "block_major",
        block_m: int | None = None,
        item_q: int | None = None,
        hoist_kv: bool = True,
        prefetch: bool = True,
        combine_unroll: bool = False,
        partial_dtype: torch.dtype = torch.bfloat16,
        main_kernel: str = "auto",
        fused_build: bool = False,
    ) -> None:
        assert variant in ("block_major", "query_major"), f"unknown variant {variant!r}"
        assert main_kernel in ("auto", "triton", "cuda"), f"unknown main_kernel {main_kernel!r}"
        self._main_kernel = main_kernel
        self._fused_build = fused_build
        self.variant = variant
        self._block_m = block_m
        self._item_q = item_q
        self._hoist_kv = hoist_kv
        self._prefetch = prefetch
        self._combine_unroll = combine_unroll
        self._partial_dtype = partial_dtype
        self.p: SparsePrefillPlan | None = None

    def plan(
        self,
        cu_q: torch.Tensor,
        prefix_lens: torch.Tensor,
        seq_lens: torch.Tensor,
        page_table: torch.Tensor,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block: int,
        topk: int,
        device: torch.device | str | None = None,
    ) -> SparsePrefillPlan:
        """Host metadata (one small device→host copy) and worst-case buffers for run().

        The previous plan's buffers are let go first: an 8K chunk's partials are 2.1 GB, and
        holding the old ones while the new ones are allocated would double that at every step."""
        self.p = None
        device = torch.device(device) if device is not None else page_table.device
        assert num_q_heads % num_kv_heads == 0, (
            f"num_q_heads {num_q_heads} not a multiple of num_kv_heads {num_kv_heads}"
        )
        assert block >= 16 and block & (block - 1) == 0, (
            f"block {block} must be a power of two ≥ 16"
        )
        assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, (
            f"head_dim {head_dim} must be a power of two ≥ 16"
        )
        assert topk >= 1, "topk must be ≥ 1"
        group = num_q_heads // num_kv_heads
        auto = self._main_kernel == "auto"
        cuda_ok = device.type == "cuda" and head_dim == 128 and block == 128 and group <= 64
        main_kernel = ("cuda" if cuda_ok and _hopper(device) else "triton") if auto else (
            self._main_kernel
        )
        bm, iq = default_tile(group, main_kernel)
        block_m = self._block_m or bm
        gp = triton.next_power_of_2(group)
        assert block_m % gp == 0, f"BLOCK_M {block_m} must hold whole GQA groups of {gp} rows"
        item_q = self._item_q or max(iq, block_m // gp)
        if auto and main_kernel == "cuda" and not cuda_tile_ok(block_m, gp, item_q):
            main_kernel = "triton"  # a tile asked for that the CUDA kernel runs badly or not at all
        meta = build_host_metadata(cu_q, prefix_lens, seq_lens, page_table, block, device)
        t, nb = meta.num_queries, meta.num_blocks
        nrows = num_kv_heads * nb
        n_items = max_work_items(num_kv_heads, t, nb, topk, item_q)
        i32 = dict(dtype=torch.int32, device=device)
        block_major = self.variant == "block_major"
        e = t * topk if block_major else 0
        self.p = SparsePrefillPlan(
            meta,
            num_q_heads,
            num_kv_heads,
            head_dim,
            block,
            topk,
            block_m,
            item_q,
            self._hoist_kv,
            self._prefetch,
            self._combine_unroll,
            main_kernel if block_major else "triton",
            auto,
            self._fused_build,
            counts=torch.zeros(nrows, **i32),
            row_ptr=torch.zeros(nrows + 1, **i32),
            item_ptr=torch.zeros(nrows + 1, **i32),
            entries=torch.empty(num_kv_heads * e, **i32),
            work_row=torch.empty(n_items if block_major else 0, **i32),
            work_start=torch.empty(n_items if block_major else 0, **i32),
            o_part=torch.empty(e, num_q_heads, head_dim, dtype=self._partial_dtype, device=device),
            lse_part=torch.empty(e, num_q_heads, 2, dtype=torch.float32, device=device),
        )
        return self.p

    def _check(self, q, k_cache, v_cache, topk_ids, out) -> None:
        p = self.p
        assert p is not None, "call plan() before run()"
        t = p.meta.num_queries
        assert q.shape == (t, p.num_q_heads, p.head_dim), (
            f"q {tuple(q.shape)} != planned [{t}, {p.num_q_heads}, {p.head_dim}]"
        )
        assert q.dtype in (torch.bfloat16, torch.float16), f"q must be bf16/fp16, got {q.dtype}"
        for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
            assert c.dim() == 4 and c.shape[1:] == (p.num_kv_heads, p.block, p.head_dim), (
                f"{name} {tuple(c.shape)} must be HND [num_pages, {p.num_kv_heads}, {p.block}, {p.head_dim}]"
            )
            assert c.dtype == q.dtype, f"{name} dtype {c.dtype} != q dtype {q.dtype}"
            assert c.stride(3) == 1, f"{name} must be contiguous in head_dim"
            assert c.device == q.device, f"{name} on {c.device}, q on {q.device}"
        assert q.stride(2) == 1, "q must be contiguous in head_dim"
        assert topk_ids.shape == (p.num_kv_heads, t, p.topk), (
            f"topk_ids {tuple(topk_ids.shape)} != [{p.num_kv_heads}, {t}, {p.topk}]"
        )
        assert topk_ids.dtype == torch.int32 and topk_ids.stride(2) == 1, (
            "topk_ids must be int32, last dim contiguous"
        )
        assert q.device == p.counts.device, f"q on {q.device}, plan on {p.counts.device}"
        if out is not None:
            assert out.shape == q.shape and out.stride(2) == 1, (
                f"out {tuple(out.shape)} must match q {tuple(q.shape)}, last dim contiguous"
            )

    def launch_main(self, q, k_cache, v_cache, sm_scale: float) -> None:
        """The main kernel alone (Triton or CUDA, as planned) on the planned buffers: run()'s
        step 2, after the inverse index of this layer's selection was built."""
        p, m = self.p, self.p.meta
        args = (q, k_cache, v_cache, p.o_part, p.lse_part, p.entries, p.row_ptr, p.item_ptr,
                p.work_row, p.work_start, m.q_pos, m.gb_page, m.gb_start, m.gb_len,
                m.num_blocks, p.topk, sm_scale, p.block_m, p.item_q)  # fmt: skip
        if p.main_kernel == "cuda" and not p.auto:
            launch_block_major_cuda(*args)
            return
        if p.main_kernel == "cuda" and q.dtype == torch.bfloat16:
            try:  # "auto": the launcher's checks (alignment, strides) decide, Triton otherwise
                launch_block_major_cuda(*args)
                return
            except ValueError:
                pass
        launch_block_major(*args, p.hoist_kv, p.prefetch)

    def run(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        topk_ids: torch.Tensor,
        sm_scale: float,
        out: torch.Tensor | None = None,
        lse: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """out [T, Hq, D] (q's dtype) = softmax over selected blocks ∩ causal. No host sync.

        ``lse`` [T, Hq] float32, if given, receives the natural-log LSE (block-major only).
        """
        self._check(q, k_cache, v_cache, topk_ids, out)
        p = self.p
        m = p.meta
        if out is None:
            out = torch.empty_like(q)
        if self.variant == "query_major":
            assert lse is None, "the query-major variant does not return the LSE"
            launch_query_major(
                q,
                k_cache,
                v_cache,
                topk_ids,
                out,
                m.q_pos,
                m.q_gb0,
                m.gb_page,
                m.gb_start,
                m.gb_len,
                sm_scale,
            )
            return out
        # -- 1. inverse index of this layer's selection (fixed buffers, no sync) --
        build_inverse_index(
            topk_ids,
            m,
            p.block,
            p.item_q,
            p.counts,
            p.row_ptr,
            p.item_ptr,
            p.entries,
            p.work_row,
            p.work_start,
            p.fused_build,
        )
        # -- 2. KV-block-major main kernel → per-(query, slot) partials --
        self.launch_main(q, k_cache, v_cache, sm_scale)
        # -- 3. log-sum-exp merge of the ≤ k partials per (query, head) --
        launch_combine(
            p.o_part, p.lse_part, topk_ids, m.q_pos, out, lse, p.num_kv_heads, p.block,
            p.combine_unroll,
        )  # fmt: skip
        return out


def _hopper(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device)[0] == 9


def _triton_can_run(x: torch.Tensor) -> bool:
    return x.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"


def sparse_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    cu_q: torch.Tensor,
    prefix_lens: torch.Tensor,
    seq_lens: torch.Tensor,
    topk_ids: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """One-shot plan + run (KV-block-major). CPU tensors without TRITON_INTERPRET=1 use the
    torch reference (float32 math, cast to q's dtype)."""
    if not _triton_can_run(q):
        out = reference.ref_sparse_attention(
            q, k_cache, v_cache, page_table, cu_q, prefix_lens, seq_lens, topk_ids, sm_scale
        )
        return out.to(q.dtype)
    w = SparsePrefillWrapper()
    w.plan(
        cu_q,
        prefix_lens,
        seq_lens,
        page_table,
        q.shape[1],
        k_cache.shape[1],
        q.shape[2],
        k_cache.shape[2],
        topk_ids.shape[-1],
        device=q.device,
    )
    return w.run(q, k_cache, v_cache, topk_ids, sm_scale)
