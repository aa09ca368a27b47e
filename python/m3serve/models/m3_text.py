"""MiniMax-M3's text model on SGLang's parallel layers, with torch-native math everywhere else.

Layers 0..D-1 use dense causal GQA attention and a dense swigluoai MLP; the others use MSA (an
index branch selects KV blocks per query and per KV group, DESIGN.md "MSA — the exact math") and a
MoE (sigmoid router with correction bias, top-k renormalised, routed scaling, one shared expert).

Attention goes through ``RadixAttention`` so any SGLang attention backend serves the dense layers.
Sparse layers call it with the index tensors as keyword arguments, in the convention of SGLang
0.5.23's in-tree MiniMax sparse backend: ``idx_o, out = attn(q, k, v, fb, idx_q=, idx_k=, idx_v=)``
with q [T, H, D], idx_q [T, G, d], idx_k [T, 1, d]. So the same model runs on our ``msa`` backend
(m3serve.backend) or, for A/B comparisons, on SGLang's in-tree MSA backend.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from m3serve.models import invariant as inv
from m3serve.models.moe import moe_experts
from m3serve.models.ops import GemmaRMSNorm, PartialRope, fused_ok, norm_rope, swigluoai
from m3serve.parallel import tp_rank_size

logger = logging.getLogger(__name__)


def sparse_layer_ids(config: Any) -> set[int]:
    cfg = getattr(config, "sparse_attention_config", None) or {}
    return {i for i, f in enumerate(cfg.get("sparse_attention_freq", [])) if f}


def moe_layer_ids(config: Any) -> set[int]:
    freq = getattr(config, "moe_layer_freq", None)
    if freq is None:
        return set(range(config.num_hidden_layers))
    return {i for i, f in enumerate(freq) if f}


def _all_reduce(x: torch.Tensor) -> torch.Tensor:
    if tp_rank_size()[1] == 1:
        return x
    from sglang.srt.distributed.communication_op import tensor_model_parallel_all_reduce

    return tensor_model_parallel_all_reduce(x)


def _reduce_f32(parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """TP-invariant mode: this rank's float32 shard partials summed in shard order, all-reduced
    in float32, rounded once (models/invariant.py)."""
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return _all_reduce(total).to(dtype)


def _free(param: nn.Parameter) -> None:
    """Drop a weight whose per-shard copy replaced it (TP-invariant mode)."""
    param.data = torch.empty(0, dtype=param.dtype, device=param.device)


class M3MLP(nn.Module):
    """Dense / shared-expert MLP: merged gate_up (column parallel) → swigluoai → down (row)."""

    def __init__(self, config: Any, intermediate: int, prefix: str, reduce_results: bool) -> None:
        super().__init__()
        from sglang.srt.layers.linear import MergedColumnParallelLinear, RowParallelLinear

        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [intermediate] * 2, bias=False, prefix=f"{prefix}.gate_up_proj"
        )
        self.down_proj = RowParallelLinear(
            intermediate,
            config.hidden_size,
            bias=False,
            reduce_results=reduce_results,
            prefix=f"{prefix}.down_proj",
        )
        self.alpha = float(config.swiglu_alpha)
        self.limit = float(config.swiglu_limit)
        self.reduce_results = reduce_results
        self.shards = inv.rank_shards(tp_rank_size()[1])

    def m3_after_load(self) -> None:
        if self.shards:
            w = self.gate_up_proj.weight
            self.gate_up_shards = inv.shard_rows(w, [w.shape[0] // 2] * 2, self.shards)
            self.down_shards = inv.shard_cols(self.down_proj.weight, self.shards)
            _free(self.gate_up_proj.weight)
            _free(self.down_proj.weight)

    def partials(self, x: torch.Tensor) -> list[torch.Tensor]:
        """TP-invariant mode: float32 down-projection partials, one per shard."""
        return [
            inv.mm_f32(swigluoai(inv.linear(x, gu), self.alpha, self.limit), down)
            for gu, down in zip(self.gate_up_shards, self.down_shards, strict=True)
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shards:
            assert self.reduce_results, "a shared expert's partials go through partials()"
            return _reduce_f32(self.partials(x), x.dtype)
        gate_up, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(swigluoai(gate_up, self.alpha, self.limit))
        return out


class M3Experts(nn.Module):
    """Routed experts as stacked weights: w13 [E, 2·I/tp, H] ([gate | up]), w2 [E, H, I/tp].

    Tensor parallelism shards each expert's intermediate dimension (the output is a partial sum,
    reduced once per layer together with the shared expert). The forward is
    ``models.moe.moe_experts``: grouped GEMMs without a host sync on CUDA (bf16, sm90+), so decode
    captures in a CUDA graph; the readable torch loop (``moe_experts_reference``) elsewhere.
    """

    def __init__(
        self, num_experts: int, hidden: int, intermediate: int, alpha: float, limit: float
    ):
        super().__init__()
        rank, size = tp_rank_size()
        assert intermediate % size == 0, f"expert FFN {intermediate} not divisible by TP {size}"
        self.num_experts, self.hidden, self.local_inter = num_experts, hidden, intermediate // size
        self.tp_rank = rank
        self.alpha, self.limit = alpha, limit
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * self.local_inter, hidden))
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden, self.local_inter))
        self.shards = inv.rank_shards(size)

    def m3_after_load(self) -> None:
        if self.shards:
            n, (e, two_i, h) = self.shards, self.w13_weight.shape
            w13 = self.w13_weight.view(e, 2, n, two_i // (2 * n), h)
            self.w13_shards = [w13[:, :, j].reshape(e, -1, h).contiguous() for j in range(n)]
            self.w2_shards = list(inv.shard_cols(self.w2_weight, n))
            _free(self.w13_weight)
            _free(self.w2_weight)

    def load_expert(self, name: str, expert: int, loaded: torch.Tensor) -> None:
        """name: the checkpoint's w1 (gate), w3 (up) or w2 (down)."""
        n, r = self.local_inter, self.tp_rank
        if name == "w2":
            self.w2_weight.data[expert].copy_(loaded[:, r * n : (r + 1) * n])
        else:
            half = 0 if name == "w1" else 1
            self.w13_weight.data[expert, half * n : (half + 1) * n].copy_(
                loaded[r * n : (r + 1) * n]
            )

    def forward(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor
    ) -> torch.Tensor:
        """Float32 [T, H]: the weighted sum of each token's top-k expert outputs."""
        return moe_experts(
            x, self.w13_weight, self.w2_weight, topk_ids, topk_w, self.alpha, self.limit
        )

    def forward_shard(
        self, j: int, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor
    ) -> torch.Tensor:
        """TP-invariant mode: shard j's float32 partial (its slice of every expert's FFN)."""
        return moe_experts(
            x, self.w13_shards[j], self.w2_shards[j], topk_ids, topk_w, self.alpha, self.limit
        )


class M3SparseMoE(nn.Module):
    def __init__(self, config: Any, prefix: str) -> None:
        super().__init__()
        e, h = config.num_local_experts, config.hidden_size
        self.top_k = config.num_experts_per_tok
        self.routed_scaling = float(getattr(config, "routed_scaling_factor", 1.0))
        self.gate = nn.Module()
        self.gate.weight = nn.Parameter(torch.empty(e, h, dtype=torch.float32))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(e, dtype=torch.float32))
        self.experts = M3Experts(
            e, h, config.intermediate_size, float(config.swiglu_alpha), float(config.swiglu_limit)
        )
        n_shared = getattr(config, "n_shared_experts", None) or 0
        self.shared_experts = (
            M3MLP(config, config.intermediate_size * n_shared, f"{prefix}.shared_experts", False)
            if n_shared
            else None
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sigmoid scores; top-k by score + bias; weights = renormalised scores (no bias)."""
        scores = torch.sigmoid(x.float() @ self.gate.weight.t())
        _, ids = torch.topk(scores + self.e_score_correction_bias[None], self.top_k, dim=-1)
        w = scores.gather(1, ids)
        return ids, w / w.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            return x
        ids, w = self.route(x)
        if self.experts.shards:  # TP-invariant mode: per-shard float32 partials
            shared = self.shared_experts.partials(x) if self.shared_experts is not None else None
            parts = []
            for j in range(self.experts.shards):
                p = self.experts.forward_shard(j, x, ids, w) * self.routed_scaling
                parts.append(p if shared is None else p + shared[j])
            return _reduce_f32(parts, x.dtype)
        out = self.experts(x, ids, w) * self.routed_scaling
        if self.shared_experts is not None:
            out = out + self.shared_experts(x).float()
        return _all_reduce(out.to(x.dtype))


class M3Attention(nn.Module):
    def __init__(self, config: Any, layer_id: int, sparse: bool, prefix: str) -> None:
        super().__init__()
        from sglang.srt.layers.linear import QKVParallelLinear, ReplicatedLinear, RowParallelLinear
        from sglang.srt.layers.radix_attention import RadixAttention

        rank, size = tp_rank_size()
        self.total_heads = config.num_attention_heads
        self.total_kv = config.num_key_value_heads
        self.head_dim = config.head_dim
        assert self.total_heads % size == 0, "query heads must divide by TP"
        self.num_heads = self.total_heads // size
        self.num_kv = max(1, self.total_kv // size)
        # the KV heads this rank holds (replicated when TP > KV heads)
        self.kv_start = (
            rank * self.num_kv if self.total_kv >= size else rank // (size // self.total_kv)
        )
        self.sparse = sparse
        eps = config.rms_norm_eps
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, self.total_heads, self.total_kv, bias=False,
            prefix=f"{prefix}.qkv_proj",
        )  # fmt: skip
        self.o_proj = RowParallelLinear(
            self.total_heads * self.head_dim, config.hidden_size, bias=False,
            reduce_results=True, prefix=f"{prefix}.o_proj",
        )  # fmt: skip
        self.q_norm = GemmaRMSNorm(self.head_dim, eps)
        self.k_norm = GemmaRMSNorm(self.head_dim, eps)
        self.rope = PartialRope(
            getattr(config, "rotary_dim", self.head_dim),
            getattr(config, "max_position_embeddings", 8192),
            float(_rope_theta(config)),
        )
        self.attn = RadixAttention(
            self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_kv,
            layer_id=layer_id, prefix=f"{prefix}.attn",
        )  # fmt: skip
        # TP-invariant mode: one attention call per shard (its heads, its KV heads of the pool);
        # a plain list, so SGLang's module walks see only self.attn
        self.shards = inv.rank_shards(size)
        self.shard_attn: list[Any] = []
        if self.shards:
            assert self.total_kv >= size and self.num_kv % self.shards == 0, (
                f"TP-invariant mode needs {self.shards} shards of whole KV heads per rank "
                f"({self.num_kv} KV heads here)"
            )
            self.shard_heads = self.num_heads // self.shards
            self.shard_kv = self.num_kv // self.shards
            for j in range(self.shards):
                a = RadixAttention(
                    self.shard_heads, self.head_dim, self.head_dim**-0.5,
                    num_kv_heads=self.shard_kv, layer_id=layer_id, prefix=f"{prefix}.attn.{j}",
                )  # fmt: skip
                a.m3_kv_head_offset = j * self.shard_kv  # within this rank's pool
                self.shard_attn.append(a)
        if sparse:
            sc = config.sparse_attention_config
            self.idx_heads, self.idx_dim = sc["sparse_num_index_heads"], sc["sparse_index_dim"]
            assert self.idx_heads == self.total_kv, "MSA uses one index head per KV head"
            # replicated: the index branch is tiny; each rank keeps its own KV groups' heads
            self.index_q_proj = ReplicatedLinear(
                config.hidden_size, self.idx_heads * self.idx_dim, bias=False,
                prefix=f"{prefix}.index_q_proj",
            )  # fmt: skip
            self.index_k_proj = ReplicatedLinear(
                config.hidden_size, self.idx_dim, bias=False, prefix=f"{prefix}.index_k_proj"
            )
            self.index_q_norm = GemmaRMSNorm(self.idx_dim, eps)
            self.index_k_norm = GemmaRMSNorm(self.idx_dim, eps)

    def m3_after_load(self) -> None:
        if self.shards:
            d = self.head_dim
            segs = [self.num_heads * d, self.num_kv * d, self.num_kv * d]
            self.qkv_shards = inv.shard_rows(self.qkv_proj.weight, segs, self.shards)
            self.o_shards = inv.shard_cols(self.o_proj.weight, self.shards)
            _free(self.qkv_proj.weight)
            _free(self.o_proj.weight)

    def _cos_sin(self, x: torch.Tensor, positions: torch.Tensor):
        """The layer's cos/sin, computed once for its norm + RoPE calls; None where those run as
        the fused kernel, which computes its own."""
        return None if fused_ok(x) else self.rope.cos_sin(positions)

    def _norm_rope(self, norm: GemmaRMSNorm, x: torch.Tensor, positions, cs) -> torch.Tensor:
        """rope(norm(x)) for x [T, H, D], contiguous (one Triton kernel on CUDA: ops.norm_rope)."""
        return norm_rope(norm, self.rope, x, positions, cs).contiguous()

    def forward_invariant(self, positions: torch.Tensor, x: torch.Tensor, fb: Any) -> torch.Tensor:
        """TP-invariant mode (models/invariant.py): each shard as a TP-2 rank would run it."""
        t, d, hs, ks = x.shape[0], self.head_dim, self.shard_heads, self.shard_kv
        cs = self._cos_sin(x, positions)
        if self.sparse:
            iq_all = self.index_q_proj(x)[0].view(t, self.idx_heads, self.idx_dim)
            ik, _ = self.index_k_proj(x)
            ik = self._norm_rope(self.index_k_norm, ik.view(t, 1, self.idx_dim), positions, cs)
        parts = []
        for j, attn in enumerate(self.shard_attn):
            q, k, v = inv.linear(x, self.qkv_shards[j]).split([hs * d, ks * d, ks * d], dim=-1)
            q = self._norm_rope(self.q_norm, q.view(t, hs, d), positions, cs)
            k = self._norm_rope(self.k_norm, k.view(t, ks, d), positions, cs)
            v = v.view(t, ks, d)
            if not self.sparse:
                out = attn(q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1), fb)
            else:
                g0 = self.kv_start + j * ks
                iq = self._norm_rope(self.index_q_norm, iq_all[:, g0 : g0 + ks], positions, cs)
                _, out = attn(q, k, v, fb, idx_q=iq, idx_k=ik, idx_v=None)
            parts.append(inv.mm_f32(out.reshape(t, -1), self.o_shards[j]))
        return _reduce_f32(parts, x.dtype)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, forward_batch: Any) -> torch.Tensor:
        if self.shards:
            return self.forward_invariant(positions, x, forward_batch)
        t = x.shape[0]
        qkv, _ = self.qkv_proj(x)
        q, k, v = qkv.split(
            [
                self.num_heads * self.head_dim,
                self.num_kv * self.head_dim,
                self.num_kv * self.head_dim,
            ],
            dim=-1,
        )
        cs = self._cos_sin(x, positions)
        q = self._norm_rope(self.q_norm, q.view(t, self.num_heads, self.head_dim), positions, cs)
        k = self._norm_rope(self.k_norm, k.view(t, self.num_kv, self.head_dim), positions, cs)
        v = v.view(t, self.num_kv, self.head_dim)
        if not self.sparse:
            out = self.attn(q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1), forward_batch)
        else:
            iq, _ = self.index_q_proj(x)
            ik, _ = self.index_k_proj(x)
            iq = iq.view(t, self.idx_heads, self.idx_dim)[
                :, self.kv_start : self.kv_start + self.num_kv
            ]
            iq = self._norm_rope(self.index_q_norm, iq, positions, cs)
            ik = self._norm_rope(self.index_k_norm, ik.view(t, 1, self.idx_dim), positions, cs)
            _, out = self.attn(q, k, v, forward_batch, idx_q=iq, idx_k=ik, idx_v=None)
        out, _ = self.o_proj(out.reshape(t, -1))
        return out


def _rope_theta(config: Any) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        params = getattr(config, "rope_parameters", None) or {}
        theta = params.get("rope_theta", 5_000_000.0)
    return float(theta)


class M3DecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_id: int, prefix: str) -> None:
        super().__init__()
        sparse, moe = layer_id in sparse_layer_ids(config), layer_id in moe_layer_ids(config)
        self.self_attn = M3Attention(config, layer_id, sparse, f"{prefix}.self_attn")
        self.mlp: nn.Module = (
            M3SparseMoE(config, f"{prefix}.mlp")
            if moe
            else M3MLP(config, config.dense_intermediate_size, f"{prefix}.mlp", True)
        )
        self.input_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, h: torch.Tensor, forward_batch: Any) -> torch.Tensor:
        h = h + self.self_attn(positions, self.input_layernorm(h), forward_batch)
        return h + self.mlp(self.post_attention_layernorm(h))


class M3TextModel(nn.Module):
    def __init__(self, config: Any, prefix: str = "") -> None:
        super().__init__()
        from sglang.srt.layers.vocab_parallel_embedding import VocabParallelEmbedding

        self.config = config
        self.embed_tokens = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, prefix=f"{prefix}.embed_tokens"
        )
        self.layers = nn.ModuleList(
            M3DecoderLayer(config, i, f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.start_layer, self.end_layer = 0, config.num_hidden_layers

    def get_input_embeddings(self) -> nn.Module:
        return self.embed_tokens

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        forward_batch: Any,
        input_embeds: torch.Tensor | None = None,
        pp_proxy_tensors: Any = None,
    ) -> torch.Tensor:
        h = self.embed_tokens(input_ids) if input_embeds is None else input_embeds
        for layer in self.layers:
            h = layer(positions, h, forward_batch)
        return self.norm(h)


_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.(w[123])\.weight$")
_STACKED = [
    (".qkv_proj.", ".q_proj.", "q"),
    (".qkv_proj.", ".k_proj.", "k"),
    (".qkv_proj.", ".v_proj.", "v"),
    (".gate_up_proj.", ".gate_proj.", 0),
    (".gate_up_proj.", ".up_proj.", 1),
]


class StrictLoader:
    """Routes checkpoint tensors (already renamed to our module tree) to parameters.

    Strict in both directions: a tensor with no parameter, or a parameter no tensor reached, is
    an error — name drift between a real checkpoint and this model must not pass silently.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = dict(model.named_parameters())
        self.modules = dict(model.named_modules())
        self.loaded: set[str] = set()
        self.unexpected: list[str] = []

    def load(self, name: str, tensor: torch.Tensor) -> None:
        m = _EXPERT.search(name)
        if m:
            experts_name = name[: m.start()] + ".mlp.experts"
            experts = self.modules.get(experts_name)
            if not isinstance(experts, M3Experts):
                self.unexpected.append(name)
                return
            experts.load_expert(m.group(2), int(m.group(1)), tensor)
            self.loaded |= {experts_name + ".w13_weight", experts_name + ".w2_weight"}
            return
        for packed, part, shard in _STACKED:
            if part in name and ".index_" not in name:
                target = name.replace(part, packed)
                if target in self.params:
                    param = self.params[target]
                    param.weight_loader(param, tensor, shard)
                    self.loaded.add(target)
                    return
        if name not in self.params:
            self.unexpected.append(name)
            return
        param = self.params[name]
        loader = getattr(param, "weight_loader", None)
        if loader is not None:
            loader(param, tensor)
        else:
            assert param.shape == tensor.shape, (
                f"{name}: {tuple(param.shape)} vs {tuple(tensor.shape)}"
            )
            param.data.copy_(tensor.to(param.dtype))
        self.loaded.add(name)

    def finish(self) -> set[str]:
        missing = sorted(set(self.params) - self.loaded)
        if self.unexpected or missing:
            raise ValueError(
                f"M3 checkpoint does not match the model: unexpected {self.unexpected[:20]}, "
                f"missing {missing[:20]}"
            )
        for m in self.model.modules():  # per-shard weights of the TP-invariant mode
            if hasattr(m, "m3_after_load"):
                m.m3_after_load()
        lm_head = getattr(self.model, "lm_head", None)
        n = inv.rank_shards(tp_rank_size()[1])
        if lm_head is not None and n:
            w = lm_head.weight  # vocabulary shards are row blocks: a view, no copy
            lm_head.shard_weights = w.view(n, w.shape[0] // n, w.shape[1])
            lm_head.quant_method = inv.ShardedLMHeadMethod()
        return self.loaded


def text_weight_name(name: str) -> str | None:
    """Checkpoint text-model name (without the ``language_model.`` prefix) → our name, or None to skip."""
    if "rotary_emb.inv_freq" in name or name.startswith("model.mtp."):
        return None
    name = name.replace(".block_sparse_moe.", ".mlp.")
    return name.replace(".mlp.e_score_correction_bias", ".mlp.e_score_correction_bias")


class MiniMaxM3SparseForCausalLM(nn.Module):
    """Text-only M3 (checkpoint names ``model.*`` / ``lm_head``)."""

    def __init__(self, config: Any, quant_config: Any = None, prefix: str = "") -> None:
        super().__init__()
        from sglang.srt.layers.logits_processor import LogitsProcessor
        from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead

        assert quant_config is None, "m3serve's M3 serves bf16 checkpoints only (for now)"
        self.config = config
        self.model = M3TextModel(config, prefix="model")
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix="lm_head")
        self.logits_processor = LogitsProcessor(config)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: Any, **_: Any
    ) -> Any:
        h = self.model(input_ids, positions, forward_batch)
        return self.logits_processor(input_ids, h, self.lm_head, forward_batch)

    @property
    def start_layer(self) -> int:
        return 0

    @property
    def end_layer(self) -> int:
        return self.config.num_hidden_layers

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loader = StrictLoader(self)
        for name, tensor in weights:
            ours = text_weight_name(name)
            if ours is not None:
                loader.load(ours, tensor)
        return loader.finish()


EntryClass = [MiniMaxM3SparseForCausalLM]
