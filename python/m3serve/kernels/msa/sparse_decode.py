"""MSA paged sparse decode (Q = 1..16 queries per request): plan once per step, run per layer.

Mapping onto FlashInfer's paged decode (BatchDecodeWithPagedKVCacheWrapper, tensor-core path,
page_size = block): one row per (query t, KV head g), row = t·H_kv + g, whose heads are the GQA
group's query heads (q.view(T·H_kv, group, D) is free) and whose KV is a one-head view of the HND
cache, [P, H_kv, block, D] → [P·H_kv, 1, block, D] (page p, head g → p·H_kv + g). Each query has
its own selection, so MTP queries get their own rows; the row's causal limit is its last page's
fill, since the local block sits last in the selection (sparse_decode_indices explains the plan).

plan(): host work from seq_lens only (row lengths, last-page lengths, FlashInfer's schedule) into
fixed device buffers. run(): per layer, one small Triton kernel rewrites kv_indices from the top-k
output, then FlashInfer runs; or, at small batch where FlashInfer has too few rows to fill the GPU,
our split-KV Triton kernel (sparse_decode_split) reads the pages straight from topk_ids. Neither
path syncs with the host, and both capture in a CUDA graph (buffers are allocated once, for the
largest step seen; pass ``max_rows`` to size them before the first capture).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch

from .reference import ref_sparse_attention
from .sparse_decode_indices import check_decode_lens, decode_row_layout, rewrite_kv_indices
from .sparse_decode_split import (
    MAX_WAVES,
    RANK_DEFAULT_MAX_BLOCKS,
    SplitConfig,
    as_split_config,
    default_split_config,
    num_splits_for,
    sparse_decode_split,
)

BACKENDS = ("auto", "flashinfer", "triton")


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class SparseDecodeWrapper:
    """Plan/run wrapper for MSA sparse decode on a paged HND cache (see module docstring).

    backend: "flashinfer" (FlashInfer paged decode over rewritten kv_indices), "triton" (our
    split-KV kernel) or "auto" (triton while T·H_kv rows are fewer than ``auto_min_rows``).
    split_config: a key of sparse_decode_split.SPLIT_CONFIGS or a SplitConfig; None picks the
    measured default for the step's row count (default_split_config). Set it before plan() (it
    fixes the split count). ranked: run() will be handed the step's block scores (the top-k ranked
    inside the attention launch), so the default split configs are the ones measured best for that.
    """

    def __init__(
        self,
        device: torch.device | str = "cuda",
        backend: str = "auto",
        max_rows: int = 0,
        max_topk: int = 16,
        workspace_bytes: int = 128 * 1024 * 1024,
        auto_min_rows: int | None = None,
        split_config: str | SplitConfig | None = None,
        ranked: bool = False,
    ) -> None:
        assert backend in BACKENDS, f"backend must be one of {BACKENDS}, got {backend!r}"
        self.device = torch.device(device)
        self.backend = backend
        self.split_config = split_config
        self.ranked = ranked
        self._workspace_bytes = workspace_bytes
        self._fi_wrappers: dict[int, Any] = {}
        self._fi_workspace: torch.Tensor | None = None
        self._cap_rows = 0
        self._max_topk = max_topk
        self._num_sms = 0
        if self.device.type == "cuda":
            self._num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        self.auto_min_rows = (
            auto_min_rows if auto_min_rows is not None else 2 * max(self._num_sms, 1)
        )
        self._planned: dict[str, Any] | None = None
        self._o_part: torch.Tensor | None = None
        self._lse_part: torch.Tensor | None = None
        if max_rows:
            self._ensure_capacity(max_rows, max_topk)

    # -- fixed device buffers (grow only outside CUDA-graph capture) --
    def _ensure_capacity(self, rows: int, topk: int) -> None:
        if rows <= self._cap_rows and topk <= self._max_topk:
            return
        assert not _capturing(), "buffers must be sized before capture (max_rows)"
        self._cap_rows = max(rows, self._cap_rows)
        self._max_topk = max(topk, self._max_topk)
        r, k, dev = self._cap_rows, self._max_topk, self.device
        self.kv_indptr = torch.zeros(r + 1, dtype=torch.int32, device=dev)
        self.kv_last_page_len = torch.ones(r, dtype=torch.int32, device=dev)
        self.kv_indices = torch.zeros(r * k, dtype=torch.int32, device=dev)
        self.seq_lens = torch.ones(r, dtype=torch.int32, device=dev)  # ≥ batch size
        self.split_counters = torch.zeros(r, dtype=torch.int32, device=dev)  # fused-merge tickets
        self._fi_wrappers.clear()  # they hold views of the old buffers

    def reserve(self, max_rows: int, topk: int, group: int, head_dim: int) -> None:
        """Size every buffer (indices, split scratch, FlashInfer workspace) for plans of up to
        ``max_rows`` rows. Call before capturing CUDA graphs: a later plan() then never
        reallocates, so every captured graph keeps reading live buffers."""
        self._ensure_capacity(max_rows, topk)
        sms = max(self._num_sms, 1)
        parts = max(num_splits_for(r, topk, sms, MAX_WAVES) * r for r in range(1, max_rows + 1))
        self._scratch(parts * group * head_dim, parts * group)
        need = self._fi_workspace_bytes(max_rows, group, head_dim)
        if self._fi_workspace is None or self._fi_workspace.numel() < need:
            self._fi_workspace = torch.zeros(need, dtype=torch.uint8, device=self.device)
            self._fi_wrappers.clear()

    def _scratch(self, numel_o: int, numel_lse: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (
            self._o_part is None
            or self._lse_part is None
            or self._o_part.numel() < numel_o
            or self._lse_part.numel() < numel_lse
        ):
            assert not _capturing(), "split scratch must exist before capture"
            self._o_part = torch.empty(numel_o, dtype=torch.float32, device=self.device)
            self._lse_part = torch.empty(numel_lse, dtype=torch.float32, device=self.device)
        return self._o_part, self._lse_part

    def _fi_workspace_bytes(self, rows: int, group: int, head_dim: int) -> int:
        """Float workspace FlashInfer's CUDA-graph plan needs: it reserves split-KV partials for
        its worst-case padded batch (seen on H200 with 0.6.18: 1023 tiles of 16 packed heads, a
        134 MB tmp_v, at 512 rows), so size for max(rows, 8·SMs) tiles, with 25 % slack."""
        tiles = max(rows, 8 * max(self._num_sms, 1))
        need = int(tiles * group * max(16, group) * (head_dim + 1) * 4 * 1.25) + (16 << 20)
        return max(self._workspace_bytes, need)

    def _flashinfer_wrapper(self, rows: int, group: int, head_dim: int) -> Any:
        need = self._fi_workspace_bytes(rows, group, head_dim)
        if self._fi_workspace is not None and self._fi_workspace.numel() < need:
            assert not _capturing(), "workspace must grow before capture"
            self._fi_workspace = None
            self._fi_wrappers.clear()  # they hold the old workspace
        wrapper = self._fi_wrappers.get(rows)
        if wrapper is not None:
            return wrapper
        import flashinfer  # lazy: needs CUDA

        if self._fi_workspace is None:
            self._fi_workspace = torch.zeros(need, dtype=torch.uint8, device=self.device)
        kwargs: dict[str, Any] = {}
        if (
            "backend"
            in inspect.signature(flashinfer.BatchDecodeWithPagedKVCacheWrapper.__init__).parameters
        ):
            kwargs["backend"] = "fa2"  # bf16 tensor-core decode; 0.7's "auto" may pick cuDNN
        # use_cuda_graph: FlashInfer keeps our fixed buffers (views) instead of copies, so the
        # kv_indices we rewrite per layer are what it reads, eager or replayed.
        wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self._fi_workspace,
            "HND",
            use_cuda_graph=True,
            use_tensor_cores=True,  # its CUDA-core path rejects a group of 16
            paged_kv_indptr_buffer=self.kv_indptr[: rows + 1],
            paged_kv_indices_buffer=self.kv_indices,
            paged_kv_last_page_len_buffer=self.kv_last_page_len[:rows],
            **kwargs,
        )
        self._fi_wrappers[rows] = wrapper
        return wrapper

    def plan(
        self,
        seq_lens: torch.Tensor | list[int],
        q_per_req: int,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block: int,
        topk: int,
        q_dtype: torch.dtype = torch.bfloat16,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        """Once per step. seq_lens [B] (host tensor/list preferred; a device tensor costs one sync)."""
        assert num_q_heads % num_kv_heads == 0, (
            f"H_q={num_q_heads} not a multiple of H_kv={num_kv_heads}"
        )
        assert 1 <= q_per_req <= 16, f"q_per_req must be in 1..16, got {q_per_req}"
        lens_host = torch.as_tensor(seq_lens).to("cpu", torch.int32).flatten()
        check_decode_lens(lens_host, q_per_req)
        batch = lens_host.numel()
        rows = batch * q_per_req * num_kv_heads
        self._ensure_capacity(max(rows, batch), topk)
        backend = self.auto_pick(rows)
        group = num_q_heads // num_kv_heads
        self.seq_lens[:batch].copy_(lens_host, non_blocking=True)
        if backend == "flashinfer":
            layout_lens = seq_lens if isinstance(seq_lens, list) else lens_host  # lists: no tolist()
            indptr, last, _ = decode_row_layout(layout_lens, q_per_req, num_kv_heads, block, topk)
            wrapper = self._flashinfer_wrapper(rows, group, head_dim)
            # FlashInfer copies indptr / last_page_len into our buffers; kv_indices (empty here)
            # are written per layer by rewrite_kv_indices.
            wrapper.plan(
                indptr,
                self.kv_indices[:0],
                last,
                group,
                1,
                head_dim,
                block,
                pos_encoding_mode="NONE",
                q_data_type=q_dtype,
                kv_data_type=kv_dtype or q_dtype,
                sm_scale=1.0 / math.sqrt(head_dim),
            )
            num_splits = 0
        else:
            # the split kernel walks each row's slots from topk_ids and seq_lens: it needs no row
            # layout (indptr, last page lengths), so none is built
            waves = as_split_config(self._split_config(rows)).waves
            num_splits = num_splits_for(rows, topk, max(self._num_sms, 1), waves)
            self._scratch(num_splits * rows * group * head_dim, num_splits * rows * group)
        self._planned = dict(
            backend=backend,
            batch=batch,
            q_per_req=q_per_req,
            num_q_heads=num_q_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            block=block,
            topk=topk,
            rows=rows,
            num_splits=num_splits,
        )

    def _split_config(self, rows: int | None = None) -> str | SplitConfig:
        """The split config for a step of ``rows`` rows (default: the planned step's)."""
        if self.split_config is not None:
            return self.split_config
        if rows is None:
            assert self._planned is not None, "plan() first"
            rows = self._planned["rows"]
        return default_split_config(rows, self.ranked)

    def auto_pick(self, rows: int) -> str:
        """The backend a plan with ``rows`` rows (T·H_kv) runs."""
        if self.backend != "auto":
            return self.backend
        return "triton" if rows < self.auto_min_rows else "flashinfer"

    def ranks_in_attention(self, n_blocks: int) -> bool:
        """Whether run(scores=...) ranks inside the attention launch for rows of ``n_blocks``
        (the planned step on the Triton backend, rows ≤ RANK_DEFAULT_MAX_BLOCKS blocks)."""
        assert self._planned is not None, "plan() first"
        return self._planned["backend"] == "triton" and n_blocks <= RANK_DEFAULT_MAX_BLOCKS

    @property
    def planned_backend(self) -> str:
        assert self._planned is not None, "plan() first"
        return self._planned["backend"]

    def run(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        page_table: torch.Tensor,
        topk_ids: torch.Tensor,
        sm_scale: float,
        out: torch.Tensor | None = None,
        scores: Any = None,
    ) -> torch.Tensor:
        """Per layer. q [T, H_q, D] (T = B·Q), HND caches [P, H_kv, block, D], page_table [B, *]
        int32, topk_ids [H_kv, T, k] int32 → out [T, H_q, D] in q's dtype.

        scores: the step's unranked block scores (index_select.DecodeScores from
        score_blocks_decode) instead of a ranked selection; ``topk_ids`` is then written with the
        selection. The Triton backend ranks inside its attention launch (rows of ≤
        RANK_DEFAULT_MAX_BLOCKS blocks); otherwise the top-k launch runs first.
        """
        p = self._planned
        assert p is not None, "plan() before run()"
        total_q = p["batch"] * p["q_per_req"]
        hkv, group, d = p["num_kv_heads"], p["num_q_heads"] // p["num_kv_heads"], p["head_dim"]
        assert q.shape == (total_q, p["num_q_heads"], d), (
            f"q {tuple(q.shape)} != planned ({total_q}, {p['num_q_heads']}, {d})"
        )
        assert k_cache.shape[1:] == (hkv, p["block"], d), (
            f"k_cache {tuple(k_cache.shape)} is not HND [P, {hkv}, {p['block']}, {d}]"
        )
        assert topk_ids.shape == (hkv, total_q, p["topk"]), (
            f"topk_ids {tuple(topk_ids.shape)} != ({hkv}, {total_q}, {p['topk']})"
        )
        assert page_table.shape[0] >= p["batch"], "page_table has fewer rows than the batch"
        if out is None:
            out = torch.empty_like(q)
        rank_here = scores is not None and self.ranks_in_attention(scores.scores.shape[1])
        if scores is not None and not rank_here:
            from .topk import launch_topk_rows

            launch_topk_rows(scores.scores, scores.local, topk_ids, p["topk"], hkv)
        if p["backend"] == "triton":
            o_part, lse_part = self._scratch(0, 0)
            return sparse_decode_split(
                q, k_cache, v_cache, page_table, topk_ids, self.seq_lens, p["q_per_req"], sm_scale,
                p["num_splits"], o_part, lse_part, out, self._split_config(), self.split_counters,
                scores=scores.scores if rank_here else None,
            )  # fmt: skip
        assert q.is_contiguous() and out.is_contiguous(), (
            "FlashInfer rows are a view of contiguous q/out"
        )
        for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
            assert cache.stride(0) == hkv * cache.stride(1), (
                f"{name}: the one-head view needs pages × heads of the HND cache to be one flat dim"
            )
        rewrite_kv_indices(topk_ids, page_table, self.kv_indptr, p["q_per_req"], self.kv_indices)
        num_view_pages = k_cache.shape[0] * hkv
        k_view = k_cache.view(num_view_pages, 1, p["block"], d)  # a view: never a silent copy
        v_view = v_cache.view(num_view_pages, 1, p["block"], d)
        planned_scale = 1.0 / math.sqrt(d)
        k_scale = None if sm_scale == planned_scale else sm_scale / planned_scale
        self._fi_wrappers[p["rows"]].run(
            q.view(p["rows"], group, d),
            (k_view, v_view),
            out=out.view(p["rows"], group, d),
            k_scale=k_scale,
        )
        return out


_WRAPPERS: dict[torch.device, SparseDecodeWrapper] = {}


def sparse_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    q_per_req: int,
    topk_ids: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """One-shot MSA sparse decode (plan + run). Torch reference on CPU; on GPU it plans each call
    (one host sync for seq_lens): serving code keeps a SparseDecodeWrapper and plans per step."""
    if not q.is_cuda:
        batch = seq_lens.numel()
        cu_q = torch.arange(batch + 1, dtype=torch.int32) * q_per_req
        prefix = seq_lens.to(torch.int32) - q_per_req
        out = ref_sparse_attention(
            q, k_cache, v_cache, page_table, cu_q, prefix, seq_lens, topk_ids, sm_scale
        )
        return out.to(q.dtype)
    wrapper = _WRAPPERS.get(q.device)
    if wrapper is None:
        wrapper = _WRAPPERS[q.device] = SparseDecodeWrapper(q.device)
    hkv, block, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    wrapper.plan(
        seq_lens, q_per_req, q.shape[1], hkv, d, block, topk_ids.shape[2], q.dtype, k_cache.dtype
    )
    return wrapper.run(q, k_cache, v_cache, page_table, topk_ids, sm_scale)
