"""Building blocks of the M3 model: Gemma RMSNorm, partial NeoX RoPE, swigluoai.

The torch code here is the reference and the CPU path: SGLang's own RMSNorm / rotary /
activation layers dispatch to ``sgl_kernel`` ops on CUDA, and neither the CPU CI machine nor the
GPU test machine has a working ``sgl_kernel`` (DESIGN.md). The math follows transformers 5.19's
``minimax_m3_vl`` reference. On CUDA the norms, and a head norm with its RoPE, run as one Triton
kernel each (``fused_ops``; ``M3SERVE_FUSED_OPS=0`` keeps these torch ops there too).
"""

from __future__ import annotations

import os

import torch
from torch import nn


def fused_ok(x: torch.Tensor) -> bool:
    """Whether ``x`` takes the Triton kernels of ``fused_ops`` (CUDA, last dim contiguous)."""
    return (
        x.is_cuda
        and x.dim() in (2, 3)
        and x.stride(-1) == 1
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and os.environ.get("M3SERVE_FUSED_OPS", "1") != "0"
    )


class GemmaRMSNorm(nn.Module):
    """RMSNorm in float32 scaled by ``1 + w`` (checkpoints store ``w`` centred on 0)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused_ok(x):
            from m3serve.models import fused_ops

            return fused_ops.rmsnorm(x, self.weight, self.eps)
        return self.reference(x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


class PartialRope(nn.Module):
    """NeoX-style RoPE on the first ``rotary_dim`` channels of each head; the rest pass through."""

    def __init__(self, rotary_dim: int, max_position: int, base: float) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        inv_freq = 1.0 / (
            base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
        )
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.max_position = max_position

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        return freqs.cos(), freqs.sin()  # [T, rotary_dim / 2]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, H, D]; cos/sin [T, rotary_dim / 2] from ``cos_sin``."""
        half = self.rotary_dim // 2
        rot = x[..., : self.rotary_dim].float()
        x1, x2 = rot[..., :half], rot[..., half:]
        c, s = cos[:, None, :], sin[:, None, :]
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)
        return torch.cat((out, x[..., self.rotary_dim :]), dim=-1)


def swigluoai(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """MiniMax's clamped SwiGLU on a ``[gate | up]`` (not interleaved) tensor: (up + 1)·g·σ(αg)."""
    gate, up = gate_up.chunk(2, dim=-1)
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1.0) * (gate * torch.sigmoid(gate * alpha))


def norm_rope(
    norm: GemmaRMSNorm,
    rope: PartialRope,
    x: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``rope.apply(norm(x), cos, sin)`` for x [T, H, D]: one Triton kernel on CUDA, else the torch
    ops (with ``cos_sin`` from ``rope.cos_sin(positions)`` when the caller has it)."""
    if fused_ok(x):
        from m3serve.models import fused_ops

        inv = rope.inv_freq.to(x.device)
        return fused_ops.norm_rope(x, norm.weight, norm.eps, positions, inv, rope.rotary_dim)
    cos, sin = cos_sin if cos_sin is not None else rope.cos_sin(positions)
    return rope.apply(norm.reference(x), cos, sin)
