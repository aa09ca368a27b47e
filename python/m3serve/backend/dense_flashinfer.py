"""Dense causal GQA over the paged KV cache on CUDA through FlashInfer (the msa backend's dense layers).

Chunked prefill: query i of request r sits at position ``prefix_r + i`` (FlashInfer's causal mask
is aligned to the end of the KV, which is exactly that); decode: one query per request through
the tensor-core decode kernel (GQA 16 is rejected by the CUDA-core one). One plan per forward
step from the backend's metadata (host-side lengths, device page table); every dense layer then
only launches. FlashInfer is imported lazily: the CPU path never needs it.
"""

from __future__ import annotations

from typing import Any

import torch

WORKSPACE_BYTES = 256 << 20
HEAD_DIMS = (64, 128, 256)


def flashinfer_available() -> bool:
    try:
        import flashinfer  # noqa: F401
    except Exception:  # any import failure means "not here"
        return False
    return True


class DenseFlashInfer:
    """Plan once per step (``plan``), run per dense layer (``run``)."""

    def __init__(self, device: Any, kv_layout: str = "HND") -> None:
        import flashinfer

        self.device = torch.device(device)
        self.kv_layout = kv_layout
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, kv_layout)
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, kv_layout, use_tensor_cores=True
        )
        self._graph_decode: dict[int, Any] = {}  # per captured batch size (fixed buffers)
        self._graph_bufs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._active: Any = None

    def reserve_graphs(self, max_bs: int, max_pages_per_req: int) -> None:
        """Fixed plan buffers for CUDA-graph decode of up to ``max_bs`` requests; FlashInfer's
        graph-mode wrappers read them at the addresses captured (one wrapper per batch size)."""
        dev = self.device
        self._graph_bufs = (
            torch.zeros(max_bs + 1, dtype=torch.int32, device=dev),
            torch.zeros(max_bs * max_pages_per_req, dtype=torch.int32, device=dev),
            torch.ones(max_bs, dtype=torch.int32, device=dev),
        )
        self._graph_decode.clear()

    def _graph_wrapper(self, bs: int) -> Any:
        wrapper = self._graph_decode.get(bs)
        if wrapper is None:
            import flashinfer

            assert self._graph_bufs is not None, "reserve_graphs() before graph plans"
            indptr, indices, last = self._graph_bufs
            wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace,
                self.kv_layout,
                use_cuda_graph=True,
                use_tensor_cores=True,
                paged_kv_indptr_buffer=indptr[: bs + 1],
                paged_kv_indices_buffer=indices,
                paged_kv_last_page_len_buffer=last[:bs],
            )
            self._graph_decode[bs] = wrapper
        return wrapper

    def plan(
        self,
        q_lens: list[int],
        seq_lens: list[int],
        page_table: torch.Tensor,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        sm_scale: float,
        q_dtype: torch.dtype,
        kv_dtype: torch.dtype,
        is_decode: bool,
        graph: bool = False,
    ) -> None:
        """q_lens / seq_lens: host lists per request; page_table [B, max_pages] int32 on device.
        ``graph``: a decode step replayed from a CUDA graph (plan into the fixed buffers)."""
        npages = [(n + page_size - 1) // page_size for n in seq_lens]
        cols = page_table.shape[1]
        flat = torch.cat(
            [torch.arange(p, dtype=torch.int64) + r * cols for r, p in enumerate(npages)]
            or [torch.zeros(0, dtype=torch.int64)]
        )
        indices = page_table.reshape(-1)[flat.to(self.device, non_blocking=True)]
        kv_indptr = torch.zeros(len(npages) + 1, dtype=torch.int32)
        kv_indptr[1:] = torch.cumsum(torch.tensor(npages, dtype=torch.int32), 0)
        last = torch.tensor(
            [n - (p - 1) * page_size if p else 0 for n, p in zip(seq_lens, npages, strict=True)],
            dtype=torch.int32,
        )
        # indptrs / last-page lengths stay on the host: FlashInfer plans from host copies anyway
        if is_decode:
            self._active = self._graph_wrapper(len(seq_lens)) if graph else self.decode
            self._active.plan(
                kv_indptr, indices, last, num_q_heads, num_kv_heads, head_dim, page_size,
                pos_encoding_mode="NONE", q_data_type=q_dtype, kv_data_type=kv_dtype,
                sm_scale=sm_scale,
            )  # fmt: skip
            return
        self._active = self.prefill
        qo_indptr = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
        qo_indptr[1:] = torch.cumsum(torch.tensor(q_lens, dtype=torch.int32), 0)
        self.prefill.plan(
            qo_indptr, kv_indptr, indices, last,
            num_q_heads, num_kv_heads, head_dim, page_size, causal=True, sm_scale=sm_scale,
            q_data_type=q_dtype, kv_data_type=kv_dtype,
        )  # fmt: skip

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, D]; caches in this wrapper's layout. Returns [T, Hq, D] in q's dtype."""
        assert self._active is not None, "plan() before run()"
        return self._active.run(q.contiguous(), (k_cache, v_cache))
