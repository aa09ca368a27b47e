"""The model's fused per-token kernels (m3serve.models.fused_ops) against their torch references
(ops.GemmaRMSNorm.reference, ops.PartialRope): CPU under TRITON_INTERPRET=1 at small sizes, GPU at
M3's sizes. Inputs are strided views like the model's (q / k slices of a fused QKV output), odd
token counts, partial and full rotary dims; outputs must agree to the activation dtype's rounding
(the kernels add the mean's squares in another order), exactly in shape and position."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before the kernels are imported: triton.jit reads it then
    os.environ.setdefault("TRITON_INTERPRET", "1")

from m3serve.models import fused_ops
from m3serve.models.ops import GemmaRMSNorm, PartialRope, fused_ok, norm_rope

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.gpu  # skipped without CUDA (tests/conftest.py)
# the CPU interpreter truncates float32 → bf16 casts (round-to-nearest on the GPU): bf16 there only
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=gpu)]


def _close(got: torch.Tensor, want: torch.Tensor, mag: torch.Tensor | None = None) -> None:
    """Equal up to one rounding step of a 16-bit dtype at the magnitude ``mag`` (default: the
    values'), most elements exactly. For norm + RoPE ``mag`` is the rotated pair's |y1| + |y2|:
    a step in the norm's own rounding moves the output by that much, whatever its size."""
    assert got.shape == want.shape and got.dtype == want.dtype and got.is_contiguous()
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
        return
    # 16-bit: a different fp32 rounding may move an output by one step of the format, rarely
    g, w = got.float(), want.float()
    step = 2.0**-7 if want.dtype == torch.bfloat16 else 2.0**-10
    m = torch.maximum(w.abs(), g.abs()) if mag is None else torch.maximum(mag, w.abs())
    ulp = m.clamp_min(1e-3) * step
    assert ((g - w).abs() <= ulp + 1e-6).all(), f"max |diff| {(g - w).abs().max()}"
    assert (g == w).float().mean() > 0.97, "most outputs must round to the same value"


def _pair_mag(y: torch.Tensor, rot: int) -> torch.Tensor:
    """|y1| + |y2| of each element's rotation pair (the pass-through dims: |y|)."""
    y = y.float().abs()
    a = y[..., : rot // 2] + y[..., rot // 2 : rot]
    return torch.cat([a, a, y[..., rot:]], dim=-1)


def _norm(d: int, dtype: torch.dtype, seed: int) -> GemmaRMSNorm:
    n = GemmaRMSNorm(d, eps=1e-6).to(DEV)
    with torch.no_grad():
        n.weight.copy_(torch.randn(d, generator=torch.Generator().manual_seed(seed)) * 0.3)
    return n.to(dtype) if dtype != torch.float32 else n


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("t", "d"), [(1, 64), (7, 96), (33, 256)])
def test_rmsnorm_matches_reference(dtype: torch.dtype, t: int, d: int) -> None:
    g = torch.Generator().manual_seed(t * d)
    x = (torch.randn(t, d, generator=g) * 3).to(DEV, dtype)
    norm = _norm(d, dtype, 1)
    _close(fused_ops.rmsnorm(x, norm.weight, norm.eps), norm.reference(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("t", "h", "d", "rot"), [(5, 4, 32, 16), (3, 2, 32, 32), (9, 1, 64, 48)])
def test_norm_rope_matches_reference_on_strided_heads(
    dtype: torch.dtype, t: int, h: int, d: int, rot: int
) -> None:
    g = torch.Generator().manual_seed(t + h + d + rot)
    qkv = (torch.randn(t, (h + 2) * d, generator=g) * 2).to(DEV, dtype)  # q | k | v packed
    q = qkv[:, : h * d].view(t, h, d)  # a strided view, as the model's split gives
    assert not q.is_contiguous()
    positions = torch.randint(0, 200_000, (t,), generator=g).to(DEV)
    norm, rope = _norm(d, dtype, 2), PartialRope(rot, 8192, 5_000_000.0).to(DEV)
    want = rope.apply(norm.reference(q), *rope.cos_sin(positions))
    got = fused_ops.norm_rope(q, norm.weight, norm.eps, positions, rope.inv_freq, rot)
    _close(got, want, _pair_mag(norm.reference(q), rot))
    # the plain heads (2-D rows through the rmsnorm kernel, 3-D head rows too)
    _close(fused_ops.rmsnorm(q, norm.weight, norm.eps), norm.reference(q))


def test_shape_errors_are_named() -> None:
    x = torch.randn(4, 8, 32, device=DEV)
    w = torch.zeros(32, device=DEV)
    with pytest.raises(AssertionError, match="last dim contiguous"):
        fused_ops.rmsnorm(x.transpose(1, 2), torch.zeros(8, device=DEV), 1e-6)
    with pytest.raises(AssertionError, match="rotary_dim"):
        fused_ops.norm_rope(x, w, 1e-6, torch.zeros(4, dtype=torch.long, device=DEV),
                            torch.zeros(17, device=DEV), 34)  # fmt: skip


def test_dispatch_is_cuda_only_and_switchable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not fused_ok(torch.randn(3, 8))  # CPU tensors keep the torch ops
    if CUDA:
        x = torch.randn(3, 8, device="cuda")
        assert fused_ok(x)
        monkeypatch.setenv("M3SERVE_FUSED_OPS", "0")
        assert not fused_ok(x)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_m3_sizes_on_gpu(dtype: torch.dtype) -> None:
    """M3's shapes: hidden 6144 rows; 64 q heads of 128 with rotary 64 from a packed QKV; the
    module-level entry points (GemmaRMSNorm.forward, ops.norm_rope) take the kernels; and the
    kernels replay from a CUDA graph to the eager result."""
    g = torch.Generator().manual_seed(0)
    for t in (1, 8, 8192):
        h = (torch.randn(t, 6144, generator=g) * 4).to("cuda", dtype)
        norm = _norm(6144, dtype, 3)
        _close(norm(h), norm.reference(h))
        qkv = torch.randn(t, 72 * 128, generator=g).to("cuda", dtype)
        q = qkv[:, : 64 * 128].view(t, 64, 128)
        pos = torch.randint(0, 1 << 20, (t,), generator=g).cuda()
        hn, rope = _norm(128, dtype, 4), PartialRope(64, 8192, 5_000_000.0).cuda()
        want = rope.apply(hn.reference(q), *rope.cos_sin(pos))
        _close(norm_rope(hn, rope, q, pos), want, _pair_mag(hn.reference(q), 64))
    x = torch.randn(4, 64, 128, device="cuda", dtype=dtype)
    p = torch.arange(4, device="cuda") * 1000
    eager = norm_rope(hn, rope, x, p)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = norm_rope(hn, rope, x, p)
    x.copy_(torch.randn_like(x))
    p.copy_(p + 7)
    graph.replay()
    assert torch.equal(out, norm_rope(hn, rope, x, p)) and not torch.equal(out, eager)
