"""The ``msa`` attention backend: MiniMax Sparse Attention for SGLang, on m3serve's kernels.

Per forward batch it builds the ragged metadata every MSA kernel takes (m3serve.kernels.msa
.reference docstring): ``cu_q``, ``prefix_lens``, ``seq_lens`` and a ``page_table`` of physical
pages (page = MSA block, so SGLang's page allocator hands out whole blocks). Per layer:

- dense layers: causal GQA over the paged KV cache;
- sparse (MSA) layers: store the token's index key in the layer's paged index-K cache, select
  blocks per (query, KV group) from the index scores, then exact softmax over the selected
  blocks ∩ causal.

KV storage is SGLang's MHA pool (token-major [slots, H_kv, D]); with page = block it is viewed
as [pages, block, H_kv, D] and transposed to the HND view the kernels index by page. Index-K
caches are this backend's own, one per sparse layer, [pages, block, d_index], bf16 (float32
when the model runs in float32, for exact comparisons).

Kernels: on CPU the MSA references for index-K storage and block selection, and a vectorised
torch equivalent of the reference attention (backend/torch_attention.py); on CUDA the fast
kernels from m3serve.kernels.msa, imported lazily, with the reference as fallback. Set
``M3SERVE_MSA_IMPL=reference`` to force the references on CUDA too.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from m3serve.backend.dense_flashinfer import HEAD_DIMS, flashinfer_available
from m3serve.backend.torch_attention import paged_attention
from m3serve.kernels.msa import reference as ref

logger = logging.getLogger(__name__)


@dataclass
class MSAMetadata:
    cu_q: torch.Tensor  # [B+1] int32
    prefix_lens: torch.Tensor  # [B] int32
    seq_lens: torch.Tensor  # [B] int32
    page_table: torch.Tensor  # [B, max_pages] int32
    out_cache_loc: torch.Tensor  # [T] int64 slots of this batch's new tokens
    is_decode: bool = False
    max_q_len: int = 0
    max_seq_len: int = 0
    q_lens_host: list[int] | None = None  # per request, host copies (plans need no sync)
    seq_lens_host: list[int] | None = None


def _sglang_base() -> type:
    from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

    return AttentionBackend


def msa_settings(hf_text_config: Any) -> dict[str, Any]:
    sc = getattr(hf_text_config, "sparse_attention_config", None)
    if not sc:
        raise ValueError("the msa attention backend needs a config with sparse_attention_config")
    freq = sc["sparse_attention_freq"]
    return {
        "block": int(sc["sparse_block_size"]),
        "topk": int(sc["sparse_topk_blocks"]),
        "index_dim": int(sc["sparse_index_dim"]),
        "sparse_layers": {i for i, f in enumerate(freq) if f},
    }


class MSAAttnBackend(_sglang_base()):  # type: ignore[misc]
    """SGLang AttentionBackend for M3: dense layers and MSA layers in one backend."""

    def __init__(self, model_runner: Any) -> None:
        super().__init__()
        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool
        s = msa_settings(model_runner.model_config.hf_text_config)
        self.block, self.topk = s["block"], s["topk"]
        self.sparse_layers: set[int] = s["sparse_layers"]
        self.page_size = int(model_runner.page_size)
        if self.page_size != self.block:
            raise ValueError(
                f"the msa backend needs --page-size equal to the MSA block size ({self.block}); "
                f"got page size {self.page_size}"
            )
        kbuf = self.token_to_kv_pool.get_key_buffer(min(self.sparse_layers | {0}))
        tokens = kbuf.shape[0] * (kbuf.shape[2] if kbuf.dim() == 4 else 1)
        self.num_pages = (tokens + self.block - 1) // self.block
        text = model_runner.model_config.hf_text_config
        tp = max(1, int(getattr(model_runner, "tp_size", 1)))
        self.num_q_heads = text.num_attention_heads // tp
        self.num_kv_heads = max(1, text.num_key_value_heads // tp)
        self.q_dtype = model_runner.dtype
        self._prefill_wrapper: Any = None
        self._decode_wrapper: Any = None
        # bf16 like the KV cache (a float32 model keeps float32 keys: exact reference runs)
        self.index_dtype = kbuf.dtype if kbuf.dtype == torch.float32 else torch.bfloat16
        self.index_k: dict[int, torch.Tensor] = {
            layer: torch.zeros(
                self.num_pages,
                self.block,
                s["index_dim"],
                dtype=self.index_dtype,
                device=self.device,
            )
            for layer in self.sparse_layers
        }
        impl = os.environ.get("M3SERVE_MSA_IMPL", "auto")
        self.use_fast = (
            impl != "reference"
            and torch.device(self.device).type == "cuda"
            and kbuf.dim() == 4  # the fast kernels read a real HND cache
            and self.index_dtype == torch.bfloat16
        )
        # dense layers on CUDA: FlashInfer paged prefill / decode (M3SERVE_DENSE_IMPL=torch: SDPA)
        self.dense_fast = (
            os.environ.get("M3SERVE_DENSE_IMPL", "auto") != "torch"
            and torch.device(self.device).type == "cuda"
            and kbuf.dtype in (torch.bfloat16, torch.float16)
            and flashinfer_available()
        )
        self.dense_layout = "HND" if kbuf.dim() == 4 else "NHD"
        self._dense: Any = None
        self._dense_plan_md: MSAMetadata | None = None
        self.forward_metadata: MSAMetadata | None = None
        logger.info(
            "msa backend: block %d, top-k %d, %d sparse layers, %d pages, KV %s, kernels=%s, "
            "dense=%s",
            self.block, self.topk, len(self.sparse_layers), self.num_pages,
            "HND" if kbuf.dim() == 4 else "NHD", "fast" if self.use_fast else "torch",
            "flashinfer" if self.dense_fast else "torch",
        )  # fmt: skip

    # -- per-batch metadata -------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch: Any) -> None:
        mode = forward_batch.forward_mode
        seq_lens = forward_batch.seq_lens.to(torch.int32)
        if mode.is_decode_or_idle():
            q_lens = torch.ones_like(seq_lens)
        elif mode.is_extend():
            q_lens = forward_batch.extend_seq_lens.to(torch.int32)
        else:
            raise NotImplementedError(f"msa backend: forward mode {mode} is not supported yet")
        prefix = seq_lens - q_lens
        cu_q = torch.zeros(seq_lens.shape[0] + 1, dtype=torch.int32, device=seq_lens.device)
        cu_q[1:] = torch.cumsum(q_lens, 0)
        max_len = int(seq_lens.max()) if seq_lens.numel() else 0
        max_pages = max(1, (max_len + self.block - 1) // self.block)
        r2t = self.req_to_token_pool.req_to_token
        cols = torch.arange(max_pages, device=r2t.device) * self.block
        cols = cols.clamp(max=r2t.shape[1] - 1)
        slots = r2t[forward_batch.req_pool_indices.long()][:, cols]
        page_table = (slots // self.block).to(torch.int32)
        q_host = (
            [1] * seq_lens.shape[0]
            if mode.is_decode_or_idle()
            else list(forward_batch.extend_seq_lens_cpu)
        )
        self.forward_metadata = MSAMetadata(
            cu_q,
            prefix,
            seq_lens,
            page_table,
            forward_batch.out_cache_loc,
            is_decode=bool(mode.is_decode_or_idle()),
            max_q_len=max(q_host, default=0),
            max_seq_len=max_len,
            q_lens_host=[int(x) for x in q_host],
            seq_lens_host=(
                forward_batch.seq_lens_cpu.tolist()
                if getattr(forward_batch, "seq_lens_cpu", None) is not None
                else None
            ),
        )
        if self.use_fast and seq_lens.numel():
            self._plan_fast(self.forward_metadata, forward_batch)

    # -- CUDA fast path (m3serve.kernels.msa) -------------------------------------------------
    def _plan_fast(self, md: MSAMetadata, forward_batch: Any) -> None:
        """Host-side plans once per step; per-layer launches only touch device buffers."""
        from m3serve.kernels.msa.sparse_decode import SparseDecodeWrapper
        from m3serve.kernels.msa.sparse_prefill import SparsePrefillWrapper

        kbuf = self.token_to_kv_pool.get_key_buffer(min(self.sparse_layers))
        hkv, d = self.num_kv_heads, kbuf.shape[-1]
        if md.is_decode:
            if self._decode_wrapper is None:
                self._decode_wrapper = SparseDecodeWrapper(self.device)
            self._decode_wrapper.plan(
                forward_batch.seq_lens_cpu, 1, self.num_q_heads, hkv, d, self.block, self.topk,
                self.q_dtype, kbuf.dtype,
            )  # fmt: skip
        else:
            if self._prefill_wrapper is None:
                self._prefill_wrapper = SparsePrefillWrapper()
            self._prefill_wrapper.plan(
                md.cu_q, md.prefix_lens, md.seq_lens, md.page_table, self.num_q_heads, hkv, d,
                self.block, self.topk, device=self.device,
            )  # fmt: skip

    def _select_fast(
        self, md: MSAMetadata, idx_q: torch.Tensor, cache: torch.Tensor
    ) -> torch.Tensor:
        from m3serve.kernels.msa.index_select import select_blocks_decode, select_blocks_prefill

        if md.is_decode:
            return select_blocks_decode(
                idx_q, cache, None, md.page_table, md.seq_lens, 1, self.topk,
                max_seq_len=md.max_seq_len,
            )  # fmt: skip
        return select_blocks_prefill(
            idx_q, cache, None, md.page_table, md.cu_q, md.prefix_lens, md.seq_lens, self.topk,
            max_q_len=md.max_q_len, max_seq_len=md.max_seq_len,
        )  # fmt: skip

    def _attend_fast(self, md, q3, k_cache, v_cache, topk_ids, scale) -> torch.Tensor:
        if md.is_decode:
            return self._decode_wrapper.run(q3, k_cache, v_cache, md.page_table, topk_ids, scale)
        return self._prefill_wrapper.run(q3, k_cache, v_cache, topk_ids, scale)

    # -- dense layers on CUDA (FlashInfer) ----------------------------------------------------
    def _dense_flashinfer(self, md: MSAMetadata, q3: torch.Tensor, layer: Any, k_cache, v_cache):
        """Causal GQA over the paged cache; planned on the step's first dense layer."""
        if self._dense is None:
            from m3serve.backend.dense_flashinfer import DenseFlashInfer

            self._dense = DenseFlashInfer(self.device, self.dense_layout)
        if self._dense_plan_md is not md:
            q_lens = md.q_lens_host or (md.cu_q[1:] - md.cu_q[:-1]).tolist()
            seq_lens = md.seq_lens_host or md.seq_lens.tolist()
            self._dense.plan(
                q_lens, seq_lens, md.page_table, q3.shape[1], k_cache.shape[1], q3.shape[2],
                self.block, layer.scaling, q3.dtype, k_cache.dtype, md.is_decode,
            )  # fmt: skip
            self._dense_plan_md = md
        if self.dense_layout == "NHD":  # _paged_kv's HND views of token-major buffers
            k_cache, v_cache = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
        return self._dense.run(q3, k_cache, v_cache)

    # -- attention ----------------------------------------------------------------------------
    def _paged_kv(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[pages, H_kv, block, D] K and V: the pool's own buffers when it is HND
        (SGLANG_USE_HND_KVCACHE=1, which the fast kernels need), else HND views of its
        token-major [slots, H_kv, D] buffers (fine for the torch paths)."""
        out = []
        for buf in (
            self.token_to_kv_pool.get_key_buffer(layer_id),
            self.token_to_kv_pool.get_value_buffer(layer_id),
        ):
            if buf.dim() == 4:
                out.append(buf)
                continue
            n = buf.shape[0] // self.block * self.block
            out.append(buf[:n].view(n // self.block, self.block, *buf.shape[1:]).transpose(1, 2))
        return out[0], out[1]

    def _save_kv(self, layer: Any, forward_batch: Any, k: torch.Tensor, v: torch.Tensor) -> None:
        from sglang.srt.mem_cache.memory_pool import KVWriteLoc

        self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc.for_batch(forward_batch), k, v)

    def _run(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        layer: Any,
        forward_batch: Any,
        save_kv_cache: bool,
        idx_q: torch.Tensor | None,
        idx_k: torch.Tensor | None,
    ) -> Any:
        md = self.forward_metadata
        assert md is not None, "init_forward_metadata was not called"
        if save_kv_cache and k is not None:
            self._save_kv(layer, forward_batch, k, v)
        hq, d = layer.tp_q_head_num, layer.head_dim
        q3 = q.view(-1, hq, d)
        k_cache, v_cache = self._paged_kv(layer.layer_id)
        sparse = idx_q is not None
        if not sparse:
            if (
                getattr(self, "dense_fast", False)
                and q3.dtype in (torch.bfloat16, torch.float16)
                and d in HEAD_DIMS
            ):
                out = self._dense_flashinfer(md, q3, layer, k_cache, v_cache)
                return out.reshape(q3.shape[0], hq * d)
            out = paged_attention(
                q3, k_cache, v_cache, md.page_table, md.cu_q, md.prefix_lens, md.seq_lens,
                layer.scaling,
            )  # fmt: skip
            return out.view(q3.shape[0], hq * d)
        assert layer.layer_id in self.sparse_layers, f"layer {layer.layer_id} is not an MSA layer"
        cache = self.index_k[layer.layer_id]
        if self.use_fast:
            from m3serve.kernels.msa.index_cache import store_index_k

            if save_kv_cache and idx_k is not None:
                store_index_k(cache, None, idx_k.reshape(idx_k.shape[0], -1), md.out_cache_loc)
            topk_ids = self._select_fast(md, idx_q.to(cache.dtype), cache)
            out = self._attend_fast(md, q3, k_cache, v_cache, topk_ids, layer.scaling)
            return None, out.view(q3.shape[0], hq, d)
        if save_kv_cache and idx_k is not None:
            ref.ref_store_index_k(cache, None, idx_k.reshape(idx_k.shape[0], -1), md.out_cache_loc)
        topk_ids = ref.ref_select_blocks(
            idx_q, cache, None, md.page_table, md.cu_q, md.prefix_lens, md.seq_lens, self.topk
        )
        out = paged_attention(
            q3, k_cache, v_cache, md.page_table, md.cu_q, md.prefix_lens, md.seq_lens,
            layer.scaling, topk_ids,
        )  # fmt: skip
        return None, out

    def forward_extend(
        self, q, k, v, layer, forward_batch, save_kv_cache=True, idx_q=None, idx_k=None,
        idx_v=None, **_: Any,
    ):  # fmt: skip
        return self._run(q, k, v, layer, forward_batch, save_kv_cache, idx_q, idx_k)

    def forward_decode(
        self, q, k, v, layer, forward_batch, save_kv_cache=True, idx_q=None, idx_k=None,
        idx_v=None, **_: Any,
    ):  # fmt: skip
        return self._run(q, k, v, layer, forward_batch, save_kv_cache, idx_q, idx_k)

    # -- CUDA graphs ----------------------------------------------------------------------------
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        raise NotImplementedError(
            "the msa backend does not capture CUDA graphs yet: pass --disable-cuda-graph"
        )
