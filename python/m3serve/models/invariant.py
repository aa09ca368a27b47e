"""Opt-in TP-invariant numerics (``M3SERVE_TP_INVARIANT=2``): TP 1 and TP 2 give the same bits.

Why TP 2 and TP 1 differ at all: a row-parallel layer (o_proj, an MLP's down_proj, the experts'
down projection) sums its reduction dimension in one GEMM at TP 1, but as two half sums plus an
all-reduce at TP 2, in bf16; and every kernel may pick a different tiling (so a different
summation order) for a different shape: the column-parallel GEMMs, the attention kernels' KV
splits and the norms all see half the heads at TP 2.

The mode runs every TP-split piece of the model as S = 2 *shards*, each shaped exactly like one
TP 2 rank's share: its query and KV heads, its slice of every FFN, its slice of the vocabulary.
A rank holds S / tp shards (two at TP 1, one at TP 2) and runs them one after another:

    column-parallel GEMMs   one GEMM per shard on a contiguous per-shard weight (same shape,
                            same kernel, same bits as the TP 2 rank's)
    attention               one call per shard with the shard's heads; the msa backend plans for
                            shard heads and reads the shard's KV heads out of the rank's pool
    row-parallel GEMMs      per-shard partial sums kept in float32 (``mm_f32``), added in
                            float32: at TP 1 ``p0 + p1`` here, at TP 2 by the all-reduce, which
                            for two operands is the same single addition (float addition is
                            commutative), then rounded to the activation dtype once
    LM head                 logits per vocabulary shard, concatenated (TP 2: all-gathered)

Everything else (embedding, norms on the hidden state, router, residual adds, sampling) is
replicated and sees identical inputs. So with S = 2 the two configurations are bit-identical by
construction, on any device where a kernel's result depends only on its inputs and shapes. Only
S = 2 is offered: with more shards the all-reduce's order of additions is the library's choice.

Cost: more, smaller launches at TP 1, float32 partial outputs, and the sparse decode on the
split-KV kernel at every batch size (``msa_backend``). Off by default.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

ENV = "M3SERVE_TP_INVARIANT"
SHARDS = 2


def invariant_shards() -> int:
    """0 when the mode is off, else the shard count S (only 2 is accepted)."""
    raw = os.environ.get(ENV, "").strip().lower()
    if raw in ("", "0", "off", "false", "no"):
        return 0
    if raw not in ("2", "on", "true", "yes", "1"):
        raise ValueError(f"{ENV}={raw!r}: the TP-invariant mode has exactly 2 shards; set it to 2")
    return SHARDS


def local_shards(tp_size: int) -> int:
    """Shards this rank runs: S / tp (checked), or 1 with the mode off."""
    s = invariant_shards()
    if not s:
        return 1
    if tp_size > s or s % tp_size:
        raise ValueError(
            f"{ENV}={s} shards cannot be split over --tp-size {tp_size}: use TP 1 or TP {s}"
        )
    return s // tp_size


def rank_shards(tp_size: int) -> int:
    """Shards this rank runs in the mode (S / tp), or 0 with the mode off: what the model's
    layers and the backend branch on."""
    return local_shards(tp_size) if invariant_shards() else 0


def shard_rows(w: torch.Tensor, segments: Sequence[int], n: int) -> torch.Tensor:
    """A column-parallel weight [sum(segments), K] → [n, sum(segments) / n, K], contiguous.

    ``segments`` are the packed outputs (q, k, v or gate, up); shard j takes the j-th n-th of
    every segment, in order: the rows a TP-n rank j would hold."""
    assert w.shape[0] == sum(segments), f"weight rows {w.shape[0]} != segments {list(segments)}"
    parts = torch.split(w, list(segments), dim=0)
    for seg in segments:
        assert seg % n == 0, f"segment of {seg} rows does not split into {n} shards"
    shards = [torch.cat([p.chunk(n, dim=0)[j] for p in parts]) for j in range(n)]
    return torch.stack(shards).contiguous()


def shard_cols(w: torch.Tensor, n: int) -> torch.Tensor:
    """A row-parallel weight [N, K] → [n, N, K / n], contiguous (shard j: columns j·K/n..)."""
    k = w.shape[-1]
    assert k % n == 0, f"reduction dim {k} does not split into {n} shards"
    return torch.stack([w[..., j * (k // n) : (j + 1) * (k // n)] for j in range(n)]).contiguous()


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, K] · w [N, K]ᵀ in x's dtype: the one GEMM call both TP sizes use per shard."""
    return torch.nn.functional.linear(x, w)


def mm_f32(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [T, K] · w [N, K]ᵀ → float32 [T, N], not rounded to x's dtype (a row-parallel partial).

    CUDA bf16/fp16: one GEMM writing its float32 accumulators (``out_dtype``). Elsewhere (CPU,
    float32 models) the operands are widened first."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(x, w.t(), out_dtype=torch.float32)
    return torch.mm(x.float(), w.float().t())


class ShardedLMHeadMethod:
    """The LM head as per-shard GEMMs, for SGLang's LogitsProcessor (its quant-method hook).

    ``layer.shard_weights`` [n, V_local / n, H]: logits = concat over shards of x · W_jᵀ, in the
    activation dtype, as the unquantized head computes each rank's slice."""

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """SGLang's loader calls this on every quant method; the shards are views, ready."""

    def apply(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        w = layer.shard_weights
        x = x.to(w.dtype)
        out = torch.cat([torch.matmul(x, w[j].T) for j in range(w.shape[0])], dim=-1)
        return out if bias is None else out + bias
