"""The ``msa`` attention backend: MiniMax Sparse Attention for SGLang, on m3serve's kernels.

Per forward batch it builds the ragged metadata every MSA kernel takes (m3serve.kernels.msa
.reference docstring): ``cu_q``, ``prefix_lens``, ``seq_lens`` and a ``page_table`` of physical
pages (page = MSA block, so SGLang's page allocator hands out whole blocks). Per layer:

- dense layers: causal GQA over the paged KV cache;
- sparse (MSA) layers: store the token's index key in the layer's paged index-K cache, select
  blocks per (query, KV group) from the index scores, then exact softmax over the selected
  blocks ∩ causal.

KV storage is SGLang's MHA pool: page-major HND [pages, H_kv, block, D] when the plugin set
SGLANG_USE_HND_KVCACHE=1 (what the fast kernels read), else token-major [slots, H_kv, D] (viewed
as HND for the torch paths; what SGLang's in-tree MSA ops read). Index-K caches are this
backend's own, one per sparse layer, [pages, block, d_index]: bf16 by default, FP8 e4m3 with a
per-token float32 scale when ``M3SERVE_INDEX_K_DTYPE=fp8`` (half the index bytes decode reads),
float32 when the model runs in float32 (exact reference runs). ``M3SERVE_INDEX_Q_FP8=1`` (FP8 keys
only) also quantizes each index-query row to e4m3 and scores on FP8 tensor cores (opt-in: it
changes which blocks win at near-ties; the reference path quantizes the same way).
``M3SERVE_DECODE_RANK`` (``attention`` by default, or ``launch``): where a decode step's top-k
runs — inside the split-KV attention launch (each program ranks its own slots from the block
scores; rows of ≤ 2048 blocks on the Triton decode backend, else the top-k launch runs) or as its
own launch between scoring and attention. Both give the same ids.

Implementations of the sparse layers (``M3SERVE_MSA_IMPL``):
- ``auto``: m3serve's fast kernels (m3serve.kernels.msa) on CUDA, the torch references on CPU;
- ``reference``: the torch references everywhere;
- ``sglang``: SGLang 0.5.23's in-tree MSA ops (``minimax_sparse_prefill`` /
  ``minimax_sparse_decode``, Triton) on a token-major pool: the in-tree baseline inside this very
  server, same model, same dense layers, same traffic (issue 8 compares the two).

CUDA graphs (decode): ``init_cuda_graph_state`` sizes fixed device buffers for the largest
captured batch (page table as wide as the context limit, seq lens, FlashInfer plan buffers);
``init_forward_metadata_out_graph`` refills them before capture and before every replay (host
work, outside the graph), so the captured per-layer launches read fresh metadata at fixed
addresses. Prefill runs eagerly (the plugin switches prefill graphs off).

TP-invariant mode (``M3SERVE_TP_INVARIANT=2``, m3serve.models.invariant): the model calls each
layer's attention once per shard, with the shard's heads. The backend then plans for shard heads
(what a TP 2 rank holds), takes the shard's KV heads of the rank's pool from the layer's
``m3_kv_head_offset`` (writes and reads), and runs the sparse decode on the split-KV kernel at
every batch size (FlashInfer's rows need the whole pool as one-head pages), so a TP 1 shard and a
TP 2 rank run the same kernels with the same plans.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from m3serve.backend.dense_flashinfer import HEAD_DIMS, flashinfer_available
from m3serve.backend.torch_attention import paged_attention
from m3serve.kernels.msa import reference as ref
from m3serve.models import invariant as inv
from m3serve.parallel import tp_rank_size

logger = logging.getLogger(__name__)

IMPLS = ("auto", "reference", "sglang")
INDEX_DTYPES = ("auto", "bf16", "fp8")


def msa_impl() -> str:
    impl = os.environ.get("M3SERVE_MSA_IMPL", "auto")
    if impl not in IMPLS:
        raise ValueError(f"M3SERVE_MSA_IMPL must be one of {IMPLS}, got {impl!r}")
    return impl


def index_k_dtype_choice() -> str:
    choice = os.environ.get("M3SERVE_INDEX_K_DTYPE", "auto")
    if choice not in INDEX_DTYPES:
        raise ValueError(f"M3SERVE_INDEX_K_DTYPE must be one of {INDEX_DTYPES}, got {choice!r}")
    return choice


def index_q_fp8_choice() -> bool:
    """``M3SERVE_INDEX_Q_FP8`` (default 0): select blocks with e4m3 index queries (FP8 keys only)."""
    choice = os.environ.get("M3SERVE_INDEX_Q_FP8", "0")
    if choice not in ("0", "1"):
        raise ValueError(f"M3SERVE_INDEX_Q_FP8 must be 0 or 1, got {choice!r}")
    return choice == "1"


def decode_rank_choice() -> str:
    """``M3SERVE_DECODE_RANK``: "attention" (default) or "launch" (see the module docstring)."""
    choice = os.environ.get("M3SERVE_DECODE_RANK", "attention")
    if choice not in ("attention", "launch"):
        raise ValueError(f"M3SERVE_DECODE_RANK must be attention or launch, got {choice!r}")
    return choice


def index_k_bytes_per_token(index_dim: int, kv_dtype: torch.dtype | None = None) -> int:
    """Index-K bytes per token and MSA layer (the KV-pool sizing hook counts them); the dtype
    rule is setup()'s: FP8 on request, float32 with a float32 KV cache, else bf16."""
    choice = index_k_dtype_choice()
    if choice == "fp8":
        return index_dim + 4  # e4m3 key + its float32 scale
    if kv_dtype == torch.float32 and choice == "auto":
        return 4 * index_dim
    return 2 * index_dim


@dataclass
class MSAMetadata:
    cu_q: torch.Tensor  # [B+1] int32
    prefix_lens: torch.Tensor  # [B] int32
    seq_lens: torch.Tensor  # [B] int32
    page_table: torch.Tensor  # [B, max_pages] int32
    out_cache_loc: torch.Tensor  # [T] int64 slots of this batch's new tokens
    is_decode: bool = False
    max_q_len: int = 0
    max_seq_len: int = 0  # host bound on seq_lens (graphs: the context limit)
    q_lens_host: list[int] | None = None  # per request, host copies (plans need no sync)
    seq_lens_host: list[int] | None = None
    req_pool_indices: torch.Tensor | None = None  # [B] (SGLang's in-tree ops index req_to_token)
    in_graph: bool = False


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
        s = msa_settings(model_runner.model_config.hf_text_config)
        page_size = int(model_runner.page_size)
        if page_size != s["block"]:
            raise ValueError(
                f"the msa backend needs --page-size equal to the MSA block size ({s['block']}); "
                f"got page size {page_size}"
            )
        text = model_runner.model_config.hf_text_config
        tp = tp_rank_size()[1]  # the model's own split (m3serve.parallel)
        shards = inv.rank_shards(tp)  # 0 unless TP-invariant (shard heads: models/invariant.py)
        self.setup(
            device=model_runner.device,
            kv_pool=model_runner.token_to_kv_pool,
            req_to_token_pool=model_runner.req_to_token_pool,
            block=s["block"],
            topk=s["topk"],
            index_dim=s["index_dim"],
            sparse_layers=s["sparse_layers"],
            num_q_heads=text.num_attention_heads // tp // max(shards, 1),
            num_kv_heads=max(1, text.num_key_value_heads // tp) // max(shards, 1),
            q_dtype=model_runner.dtype,
            context_len=int(model_runner.model_config.context_len),
            tp_invariant=shards > 0,
        )

    def setup(
        self,
        *,
        device: Any,
        kv_pool: Any,
        req_to_token_pool: Any,
        block: int,
        topk: int,
        index_dim: int,
        sparse_layers: set[int],
        num_q_heads: int,
        num_kv_heads: int,
        q_dtype: torch.dtype,
        context_len: int,
        impl: str | None = None,
        index_dtype: str | None = None,
        dense_impl: str | None = None,
        index_q_fp8: bool | None = None,
        tp_invariant: bool = False,
    ) -> None:
        """Everything the backend needs, without a model runner (tests build it this way).
        ``impl`` / ``index_dtype`` / ``dense_impl`` / ``index_q_fp8`` default to the environment
        switches; ``tp_invariant``: the TP-invariant mode's per-shard calls (module docstring)."""
        self.device = device
        self.token_to_kv_pool = kv_pool
        self.req_to_token_pool = req_to_token_pool
        self.block, self.topk, self.index_dim = block, topk, index_dim
        self.sparse_layers = set(sparse_layers)
        self.num_q_heads, self.num_kv_heads, self.q_dtype = num_q_heads, num_kv_heads, q_dtype
        self.context_len = context_len
        self.tp_invariant = tp_invariant
        # the sparse decode's kernel: "auto" picks FlashInfer rows from 2·SMs rows on, which read
        # the whole pool as one-head pages, so shard calls (a slice of the pool's heads) stay on
        # the split-KV kernel, at TP 1 and TP 2 alike
        self.decode_backend = "triton" if tp_invariant else "auto"
        on_cuda = torch.device(device).type == "cuda"
        kbuf = kv_pool.get_key_buffer(min(self.sparse_layers | {0}))
        self.kv_is_hnd = kbuf.dim() == 4
        self.head_dim, self.kv_dtype = kbuf.shape[-1], kbuf.dtype  # every layer's alike
        tokens = kbuf.shape[0] * (kbuf.shape[2] if self.kv_is_hnd else 1)
        self.num_pages = (tokens + block - 1) // block
        impl = impl or msa_impl()
        choice = index_dtype or index_k_dtype_choice()
        # -- index-K caches: bf16 like the KV cache; float32 for a float32 model; FP8 on request
        if choice == "fp8":
            self.index_dtype = torch.float8_e4m3fn
        elif kbuf.dtype == torch.float32 and choice == "auto":
            self.index_dtype = torch.float32
        else:
            self.index_dtype = torch.bfloat16
        self.index_k: dict[int, torch.Tensor] = {
            layer: torch.zeros(
                self.num_pages, block, index_dim, dtype=self.index_dtype, device=device
            )
            for layer in self.sparse_layers
        }
        self.index_k_scale: dict[int, torch.Tensor | None] = {
            layer: (
                torch.ones(self.num_pages, block, dtype=torch.float32, device=device)
                if self.index_dtype == torch.float8_e4m3fn
                else None
            )
            for layer in self.sparse_layers
        }
        self.index_q_fp8 = index_q_fp8_choice() if index_q_fp8 is None else index_q_fp8
        self.decode_rank = decode_rank_choice()
        if self.index_q_fp8 and self.index_dtype != torch.float8_e4m3fn:
            raise ValueError(
                "M3SERVE_INDEX_Q_FP8=1 scores e4m3 queries against e4m3 keys: it needs "
                "M3SERVE_INDEX_K_DTYPE=fp8"
            )
        # -- sparse-layer implementation
        if impl == "sglang":
            if not on_cuda:
                raise ValueError("M3SERVE_MSA_IMPL=sglang runs SGLang's Triton MSA ops: CUDA only")
            if self.kv_is_hnd:
                raise ValueError(
                    "M3SERVE_MSA_IMPL=sglang needs SGLang's token-major KV pool: unset "
                    "SGLANG_USE_HND_KVCACHE (the plugin leaves it unset for this impl)"
                )
            if self.index_dtype != torch.bfloat16:
                raise ValueError("M3SERVE_MSA_IMPL=sglang supports bf16 index keys only")
            if tp_invariant:
                raise ValueError(
                    "M3SERVE_TP_INVARIANT runs m3serve's kernels per shard: not with "
                    "M3SERVE_MSA_IMPL=sglang"
                )
            self.sparse_impl = "sglang"
        elif (
            impl != "reference" and on_cuda and self.kv_is_hnd and self.index_dtype != torch.float32
        ):
            self.sparse_impl = "fast"
        else:
            self.sparse_impl = "torch"
        self.use_fast = self.sparse_impl == "fast"
        # -- dense layers on CUDA: FlashInfer paged prefill / decode (M3SERVE_DENSE_IMPL=torch: SDPA)
        dense_impl = dense_impl or os.environ.get("M3SERVE_DENSE_IMPL", "auto")
        self.dense_fast = (
            dense_impl != "torch"
            and on_cuda
            and kbuf.dtype in (torch.bfloat16, torch.float16)
            and flashinfer_available()
        )
        self.dense_layout = "HND" if self.kv_is_hnd else "NHD"
        self._dense: Any = None
        self._dense_plan_md: MSAMetadata | None = None
        self._prefill_wrapper: Any = None
        self._decode_wrapper: Any = None
        self._graph: dict[str, Any] | None = None
        self.forward_metadata: MSAMetadata | None = None
        logger.info(
            "msa backend: block %d, top-k %d, %d sparse layers, %d pages, KV %s, index-K %s, "
            "sparse=%s, dense=%s",
            block, topk, len(self.sparse_layers), self.num_pages, self.dense_layout,
            str(self.index_dtype).removeprefix("torch."), self.sparse_impl,
            "flashinfer" if self.dense_fast else "torch",
        )  # fmt: skip

    # -- per-batch metadata (eager) -----------------------------------------------------------
    def init_forward_metadata(self, forward_batch: Any) -> None:
        mode = forward_batch.forward_mode
        seq_lens = forward_batch.seq_lens.to(torch.int32)
        if mode.is_decode_or_idle():
            q_lens = torch.ones_like(seq_lens)
            q_host = [1] * seq_lens.shape[0]
        elif mode.is_extend():
            q_lens = forward_batch.extend_seq_lens.to(torch.int32)
            q_host = [int(x) for x in forward_batch.extend_seq_lens_cpu]
        else:
            raise NotImplementedError(f"msa backend: forward mode {mode} is not supported yet")
        prefix = seq_lens - q_lens
        cu_q = torch.zeros(seq_lens.shape[0] + 1, dtype=torch.int32, device=seq_lens.device)
        cu_q[1:] = torch.cumsum(q_lens, 0)
        seq_cpu = getattr(forward_batch, "seq_lens_cpu", None)
        seq_host = [int(x) for x in seq_cpu.tolist()] if seq_cpu is not None else None
        if seq_host is not None:
            max_len = max(seq_host, default=0)
        else:
            max_len = int(seq_lens.max()) if seq_lens.numel() else 0
        max_pages = max(1, (max_len + self.block - 1) // self.block)
        page_table = self._page_table(forward_batch.req_pool_indices, max_pages)
        self.forward_metadata = MSAMetadata(
            cu_q,
            prefix,
            seq_lens,
            page_table,
            forward_batch.out_cache_loc,
            is_decode=bool(mode.is_decode_or_idle()),
            max_q_len=max(q_host, default=0),
            max_seq_len=max_len,
            q_lens_host=q_host,
            seq_lens_host=seq_host,
            req_pool_indices=forward_batch.req_pool_indices,
        )
        if self.use_fast and seq_lens.numel():
            self._plan_fast(self.forward_metadata, seq_cpu if seq_cpu is not None else seq_lens)

    def _page_table(
        self, req_pool_indices: torch.Tensor, max_pages: int, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[B, max_pages] physical pages: the slot of each page's first token // block."""
        r2t = self.req_to_token_pool.req_to_token
        cols = torch.arange(max_pages, device=r2t.device) * self.block
        cols = cols.clamp(max=r2t.shape[1] - 1)
        pages = r2t[req_pool_indices.long()][:, cols] // self.block
        if out is None:
            return pages.to(torch.int32)
        out.copy_(pages)
        return out

    # -- CUDA graphs (decode) -----------------------------------------------------------------
    def get_cuda_graph_seq_len_fill_value(self) -> int:
        return 1

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        """Fixed buffers for every captured decode batch (≤ max_bs requests, one query each).
        The page table is as wide as the context limit: graphs are captured once per batch size
        and replayed at any length, like SGLang's own M3 decode under graphs."""
        if self.sparse_impl == "torch" and self.sparse_layers:
            raise NotImplementedError(
                "the msa backend's torch reference path does not capture CUDA graphs "
                "(M3SERVE_MSA_IMPL=reference or a CPU/float32 run): pass --disable-cuda-graph"
            )
        dev = self.device
        r2t = self.req_to_token_pool.req_to_token
        max_pages = max(1, (min(self.context_len, r2t.shape[1]) + self.block - 1) // self.block)
        g: dict[str, Any] = {
            "max_bs": max_bs,
            "max_pages": max_pages,
            "seq_lens": torch.ones(max_bs, dtype=torch.int32, device=dev),
            "prefix": torch.zeros(max_bs, dtype=torch.int32, device=dev),
            "cu_q": torch.arange(max_bs + 1, dtype=torch.int32, device=dev),
            "page_table": torch.zeros(max_bs, max_pages, dtype=torch.int32, device=dev),
        }
        if self.use_fast:
            from m3serve.kernels.msa.sparse_decode import SparseDecodeWrapper
            from m3serve.kernels.msa.sparse_decode_split import RANK_DEFAULT_MAX_BLOCKS

            # the graph's page table spans the context limit: past RANK_DEFAULT_MAX_BLOCKS the
            # top-k launch runs, with the split configs measured best for it
            ranked = self.decode_rank == "attention" and max_pages <= RANK_DEFAULT_MAX_BLOCKS
            g["decode"] = SparseDecodeWrapper(
                self.device, backend=self.decode_backend, ranked=ranked
            )
            g["decode"].reserve(
                max_bs * self.num_kv_heads, self.topk, self.num_q_heads // self.num_kv_heads,
                self.head_dim,
            )  # fmt: skip
        if self.dense_fast:
            if self._dense is None:
                from m3serve.backend.dense_flashinfer import DenseFlashInfer

                self._dense = DenseFlashInfer(self.device, self.dense_layout)
            self._dense.reserve_graphs(max_bs, max_pages)
        self._graph = g

    def init_forward_metadata_out_graph(self, forward_batch: Any, in_capture: bool = False) -> None:
        """Before capture and before each replay: refill the fixed buffers, re-plan."""
        g = self._graph
        assert g is not None, "init_cuda_graph_state was not called"
        if not forward_batch.forward_mode.is_decode_or_idle():
            raise NotImplementedError(
                f"msa backend: CUDA graphs for {forward_batch.forward_mode} are not supported "
                "(prefill graphs stay disabled)"
            )
        bs = int(forward_batch.batch_size)
        assert bs <= g["max_bs"], f"graph batch {bs} > max_bs {g['max_bs']}"
        seq = g["seq_lens"][:bs]
        seq.copy_(forward_batch.seq_lens[:bs])
        g["prefix"][:bs].copy_(seq - 1)
        page_table = self._page_table(
            forward_batch.req_pool_indices[:bs], g["max_pages"], g["page_table"][:bs]
        )
        seq_cpu = forward_batch.seq_lens_cpu
        seq_host = [int(x) for x in seq_cpu[:bs].tolist()] if seq_cpu is not None else seq.tolist()
        md = MSAMetadata(
            g["cu_q"][: bs + 1],
            g["prefix"][:bs],
            seq,
            page_table,
            forward_batch.out_cache_loc,
            is_decode=True,
            max_q_len=1,
            max_seq_len=g["max_pages"] * self.block,
            q_lens_host=[1] * bs,
            seq_lens_host=seq_host,
            req_pool_indices=forward_batch.req_pool_indices[:bs],
            in_graph=True,
        )
        if self.use_fast and bs:
            self._plan_decode(g["decode"], seq_host)
        if self.dense_fast and bs:
            # planned here, not lazily in the first dense layer: a plan copies host data, which
            # must not happen inside a capture; M3's dense layers use the default scale 1/√D
            self._plan_dense(md, self.num_q_heads, self.num_kv_heads, self.head_dim,
                             self.head_dim**-0.5, self.q_dtype, self.kv_dtype)  # fmt: skip
        self.forward_metadata = md

    def init_forward_metadata_in_graph(self, forward_batch: Any) -> None:
        """Nothing to record: every metadata buffer is refilled outside the graph."""

    # -- CUDA fast path (m3serve.kernels.msa) -------------------------------------------------
    def _plan_fast(self, md: MSAMetadata, seq_lens_cpu: Any) -> None:
        """Host-side plans once per step; per-layer launches only touch device buffers."""
        from m3serve.kernels.msa.sparse_decode import SparseDecodeWrapper
        from m3serve.kernels.msa.sparse_prefill import SparsePrefillWrapper

        if md.is_decode:
            if self._decode_wrapper is None:
                self._decode_wrapper = SparseDecodeWrapper(
                    self.device, backend=self.decode_backend, ranked=self.decode_rank == "attention"
                )
            self._plan_decode(self._decode_wrapper, seq_lens_cpu)
        else:
            if self._prefill_wrapper is None:
                self._prefill_wrapper = SparsePrefillWrapper()
            self._prefill_wrapper.plan(
                md.cu_q, md.prefix_lens, md.seq_lens, md.page_table, self.num_q_heads,
                self.num_kv_heads, self.head_dim, self.block, self.topk, device=self.device,
            )  # fmt: skip

    def _plan_decode(self, wrapper: Any, seq_lens_cpu: Any) -> None:
        """One query per request (eager steps and graph replays plan alike)."""
        wrapper.plan(
            seq_lens_cpu, 1, self.num_q_heads, self.num_kv_heads, self.head_dim, self.block,
            self.topk, self.q_dtype, self.kv_dtype,
        )  # fmt: skip

    def _select_fast(
        self, md: MSAMetadata, idx_q: torch.Tensor, cache: torch.Tensor, scale: Any
    ) -> torch.Tensor:
        from m3serve.kernels.msa.index_select import (
            score_blocks_decode,
            select_blocks_decode,
            select_blocks_prefill,
        )

        if md.is_decode:
            # graphs: the grid spans the whole page table (the context limit), as captured
            # rank "attention": the block scores go to the attention, which ranks them itself
            fn = score_blocks_decode if self.decode_rank == "attention" else select_blocks_decode
            return fn(
                idx_q, cache, scale, md.page_table, md.seq_lens, 1, self.topk,
                max_seq_len=None if md.in_graph else md.max_seq_len, q_fp8=self.index_q_fp8,
            )  # fmt: skip
        return select_blocks_prefill(
            idx_q, cache, scale, md.page_table, md.cu_q, md.prefix_lens, md.seq_lens, self.topk,
            max_q_len=md.max_q_len, max_seq_len=md.max_seq_len, q_fp8=self.index_q_fp8,
        )  # fmt: skip

    def _attend_fast(self, md, q3, k_cache, v_cache, selection, scale) -> torch.Tensor:
        """selection: topk_ids, or (decode, rank "attention") the step's DecodeScores."""
        if md.is_decode:
            wrapper = self._graph["decode"] if md.in_graph else self._decode_wrapper
            if isinstance(selection, torch.Tensor):
                return wrapper.run(q3, k_cache, v_cache, md.page_table, selection, scale)
            ids = torch.empty(
                self.num_kv_heads, q3.shape[0], self.topk, dtype=torch.int32, device=q3.device
            )
            return wrapper.run(q3, k_cache, v_cache, md.page_table, ids, scale, scores=selection)
        return self._prefill_wrapper.run(q3, k_cache, v_cache, selection, scale)

    # -- SGLang 0.5.23's in-tree MSA ops (the baseline, M3SERVE_MSA_IMPL=sglang) ---------------
    def _sglang_sparse(
        self, md: MSAMetadata, q3: torch.Tensor, layer: Any, idx_q: torch.Tensor, fb: Any
    ) -> torch.Tensor:
        """minimax_sparse_prefill / _decode exactly as SGLang's MiniMaxSparseAttnBackend calls
        them on Hopper (Triton path, block_size_q 1, score 'max', no index value), over the
        token-major pool and this layer's index keys viewed as [slots, 1, d]."""
        from sglang.srt.layers.attention.minimax_sparse_ops.minimax_sparse import (
            minimax_sparse_decode,
            minimax_sparse_prefill,
        )

        k_buf = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        v_buf = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        cache = self.index_k[layer.layer_id]
        idx_k_slots = cache.view(-1, 1, cache.shape[-1])
        r2t = self.req_to_token_pool.req_to_token
        idx_scale = 1.0 / math.sqrt(cache.shape[-1])
        if md.is_decode:
            _, o = minimax_sparse_decode(
                q3, None, k_buf, v_buf, idx_q, None, idx_k_slots, None, r2t,
                md.req_pool_indices, md.seq_lens, md.max_seq_len, 1, self.block, self.topk,
                0, 1, sm_scale=layer.scaling, idx_sm_scale=idx_scale, score_type="max",
                disable_index_value=True, page_size=self.block,
            )  # fmt: skip
            return o.view(q3.shape)
        from sglang.kernels.ops.attention.minimax_sparse.common.utils import get_cu_seqblocks

        cu_blocks, max_blocks, all_blocks, *_ = get_cu_seqblocks(
            md.cu_q, md.max_q_len, 1, self.block, md.q_lens_host
        )
        _, o = minimax_sparse_prefill(
            q3, k_buf, v_buf, None, idx_q, idx_k_slots, None, None, r2t, md.req_pool_indices,
            md.cu_q, md.seq_lens, md.prefix_lens, md.max_q_len, md.max_seq_len, 1, self.block,
            self.topk, 0, 1, sm_scale=layer.scaling, idx_sm_scale=idx_scale, score_type="max",
            disable_index_value=True, use_msa=False, seqlens_cpu=md.q_lens_host,
            seq_lens_cpu=getattr(fb, "seq_lens_cpu", None), cu_seqblocks_q=cu_blocks,
            max_seqblock_q=max_blocks, all_seqblock_q=all_blocks, page_size=self.block,
        )  # fmt: skip
        return o.view(q3.shape)

    # -- dense layers on CUDA (FlashInfer) ----------------------------------------------------
    def _plan_dense(self, md: MSAMetadata, hq: int, hkv: int, d: int, scale: float,
                    q_dtype: torch.dtype, kv_dtype: torch.dtype) -> None:  # fmt: skip
        if self._dense is None:
            from m3serve.backend.dense_flashinfer import DenseFlashInfer

            self._dense = DenseFlashInfer(self.device, self.dense_layout)
        q_lens = md.q_lens_host or (md.cu_q[1:] - md.cu_q[:-1]).tolist()
        seq_lens = md.seq_lens_host or md.seq_lens.tolist()
        self._dense.plan(
            q_lens, seq_lens, md.page_table, hq, hkv, d, self.block, scale, q_dtype, kv_dtype,
            md.is_decode, graph=md.in_graph,
        )  # fmt: skip
        self._dense_plan_md = md
        self._dense_plan_scale = scale

    def _dense_flashinfer(self, md: MSAMetadata, q3: torch.Tensor, layer: Any, k_cache, v_cache):
        """Causal GQA over the paged cache; planned once per step (eager: on the step's first
        dense layer; graphs: in init_forward_metadata_out_graph, outside the capture)."""
        if self._dense_plan_md is not md:
            assert not md.in_graph, "graph steps plan the dense layers before the capture"
            self._plan_dense(md, q3.shape[1], k_cache.shape[1], q3.shape[2], layer.scaling,
                             q3.dtype, k_cache.dtype)  # fmt: skip
        assert abs(self._dense_plan_scale - layer.scaling) < 1e-9, (
            f"dense layers planned with scale {self._dense_plan_scale}, layer has {layer.scaling}"
        )
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

    def _save_kv_heads(self, layer_id: int, h0: int, loc: torch.Tensor, k, v) -> None:
        """A shard's K/V [T, h, D] into KV heads h0.. of the pool (TP-invariant mode)."""
        loc = loc.long()
        page, off = loc // self.block, loc % self.block  # HND pools
        for buf, x in (
            (self.token_to_kv_pool.get_key_buffer(layer_id), k),
            (self.token_to_kv_pool.get_value_buffer(layer_id), v),
        ):
            x = x.view(x.shape[0], -1, buf.shape[-1]).to(buf.dtype)
            heads = slice(h0, h0 + x.shape[1])
            if buf.dim() == 4:  # HND [pages, H, block, D]
                buf[:, heads][page, :, off] = x
            else:  # token-major [slots, H, D]
                buf[loc, heads] = x

    def _store_index_k(self, layer_id: int, idx_k: torch.Tensor, slots: torch.Tensor) -> None:
        cache, scale = self.index_k[layer_id], self.index_k_scale[layer_id]
        flat = idx_k.reshape(idx_k.shape[0], -1)
        if self.sparse_impl == "torch":
            ref.ref_store_index_k(cache, scale, flat, slots)
            return
        from m3serve.kernels.msa.index_cache import store_index_k

        store_index_k(cache, scale, flat, slots)

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
        hq, d = layer.tp_q_head_num, layer.head_dim
        if (hq, layer.tp_k_head_num) != (self.num_q_heads, self.num_kv_heads):
            raise ValueError(
                f"layer {layer.layer_id} has {hq} q / {layer.tp_k_head_num} KV heads on this rank; "
                f"the msa backend planned {self.num_q_heads} / {self.num_kv_heads}"
            )
        q3 = q.view(-1, hq, d)
        k_cache, v_cache = self._paged_kv(layer.layer_id)
        h0 = getattr(layer, "m3_kv_head_offset", 0)  # a TP-invariant shard's first KV head
        if h0 or layer.tp_k_head_num != k_cache.shape[1]:
            heads = slice(h0, h0 + layer.tp_k_head_num)
            k_cache, v_cache = k_cache[:, heads], v_cache[:, heads]
            if save_kv_cache and k is not None:
                self._save_kv_heads(layer.layer_id, h0, md.out_cache_loc, k, v)
        elif save_kv_cache and k is not None:
            self._save_kv(layer, forward_batch, k, v)
        if idx_q is None:  # a dense layer
            if self.dense_fast and q3.dtype in (torch.bfloat16, torch.float16) and d in HEAD_DIMS:
                out = self._dense_flashinfer(md, q3, layer, k_cache, v_cache)
                return out.reshape(q3.shape[0], hq * d)
            out = paged_attention(
                q3, k_cache, v_cache, md.page_table, md.cu_q, md.prefix_lens, md.seq_lens,
                layer.scaling,
            )  # fmt: skip
            return out.view(q3.shape[0], hq * d)
        assert layer.layer_id in self.sparse_layers, f"layer {layer.layer_id} is not an MSA layer"
        if save_kv_cache and idx_k is not None and h0 == 0:  # shards share one index key
            self._store_index_k(layer.layer_id, idx_k, md.out_cache_loc)
        cache, scale = self.index_k[layer.layer_id], self.index_k_scale[layer.layer_id]
        # FP8 keys are scored against bf16 queries; other caches take the queries in their dtype
        iq = idx_q if scale is not None else idx_q.to(cache.dtype)
        if self.sparse_impl == "sglang":
            return None, self._sglang_sparse(md, q3, layer, iq, forward_batch)
        if self.sparse_impl == "fast":
            selection = self._select_fast(md, iq, cache, scale)
            out = self._attend_fast(md, q3, k_cache, v_cache, selection, layer.scaling)
            return None, out.view(q3.shape[0], hq, d)
        topk_ids = ref.ref_select_blocks(
            iq, cache, scale, md.page_table, md.cu_q, md.prefix_lens, md.seq_lens, self.topk,
            q_fp8=self.index_q_fp8,
        )  # fmt: skip
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
