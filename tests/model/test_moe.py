"""Routed experts (m3serve.models.moe): the reference loop vs a dense formula on CPU; the grouped
path vs the loop on CPU (``torch._grouped_mm`` runs there through its fallback) and on the GPU in
bf16 at M3 sizes; CUDA-graph capture and replay with new routing; no host sync on the GPU path.
"""

from __future__ import annotations

import pytest
import torch

from m3serve.models.moe import (
    grouped_mm_supported,
    moe_experts,
    moe_experts_grouped,
    moe_experts_reference,
)
from m3serve.models.ops import swigluoai

ALPHA, LIMIT = 1.702, 7.0


def _weights(
    num_experts: int, hidden: int, inter: int, dtype: torch.dtype, device: str, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    # gate/up pre-activations of a few units, so the ±LIMIT clamps are hit sometimes
    """Drawn on ``gen``'s device (M3-sized stacks are slow to draw on the CPU)."""
    dev = gen.device
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen, device=dev)
    w13 = w13.mul_(4.0 / hidden**0.5).to(device, dtype)
    w2 = torch.randn(num_experts, hidden, inter, generator=gen, device=dev)
    return w13, w2.mul_(1.0 / inter**0.5).to(device, dtype)


def _routing(
    tokens: int, num_experts: int, top_k: int, gen: torch.Generator, used: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token (as top-k gives), drawn from the first ``used`` experts only
    when given, so the others receive no tokens; renormalised positive weights."""
    used = num_experts if used is None else used
    scores = torch.rand(tokens, num_experts, generator=gen)
    scores[:, used:] = -1.0
    ids = scores.topk(top_k, dim=-1).indices
    w = torch.rand(tokens, top_k, generator=gen) + 0.05
    return ids, w / w.sum(dim=-1, keepdim=True)


def _dense(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, ids: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    """Every token through every expert in float64, masked by the routing."""
    x, w13, w2 = x.double(), w13.double(), w2.double()
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64)
    for e in range(w13.shape[0]):
        y = swigluoai(x @ w13[e].t(), ALPHA, LIMIT) @ w2[e].t()
        gate = ((ids == e).double() * w.double()).sum(dim=-1, keepdim=True)
        out += gate * y
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# (tokens, experts, top_k, experts that receive tokens or None for all)
CPU_CASES = [
    (1, 1, 1, None),
    (1, 8, 8, None),
    (2, 4, 2, None),
    (7, 32, 8, 9),
    (33, 16, 1, 3),
    (64, 32, 4, None),
    (127, 8, 2, 2),
    (129, 32, 6, 20),
    (300, 32, 8, None),
    (300, 5, 3, None),
]


@pytest.mark.parametrize(("tokens", "experts", "top_k", "used"), CPU_CASES)
def test_reference_equals_dense_formula(
    tokens: int, experts: int, top_k: int, used: int | None
) -> None:
    gen = torch.Generator().manual_seed(tokens * 1000 + experts * 10 + top_k)
    hidden, inter = 24, 10
    x = torch.randn(tokens, hidden, generator=gen)
    w13, w2 = _weights(experts, hidden, inter, torch.float32, "cpu", gen)
    ids, w = _routing(tokens, experts, top_k, gen, used)
    out = moe_experts_reference(x, w13, w2, ids, w, ALPHA, LIMIT)
    assert out.dtype == torch.float32 and out.shape == (tokens, hidden)
    torch.testing.assert_close(out.double(), _dense(x, w13, w2, ids, w), rtol=1e-5, atol=1e-5)


def test_reference_bf16_close_to_dense() -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(50, 64, generator=gen).bfloat16()
    w13, w2 = _weights(16, 64, 32, torch.bfloat16, "cpu", gen)
    ids, w = _routing(50, 16, 4, gen, used=11)
    out = moe_experts_reference(x, w13, w2, ids, w, ALPHA, LIMIT)
    assert _rel(out, _dense(x, w13, w2, ids, w)) < 2e-2


@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize(("tokens", "experts", "top_k", "used"), CPU_CASES)
def test_grouped_equals_reference_cpu(
    tokens: int, experts: int, top_k: int, used: int | None, ids_dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(tokens + 31 * experts + top_k)
    hidden, inter = 24, 16
    x = torch.randn(tokens, hidden, generator=gen)
    w13, w2 = _weights(experts, hidden, inter, torch.float32, "cpu", gen)
    ids, w = _routing(tokens, experts, top_k, gen, used)
    ids = ids.to(ids_dtype)
    ref = moe_experts_reference(x, w13, w2, ids, w, ALPHA, LIMIT)
    torch.testing.assert_close(
        moe_experts_grouped(x, w13, w2, ids, w, ALPHA, LIMIT), ref, rtol=1e-5, atol=1e-5
    )


def test_cpu_takes_reference_path_and_handles_no_tokens() -> None:
    gen = torch.Generator().manual_seed(3)
    w13, w2 = _weights(4, 16, 8, torch.bfloat16, "cpu", gen)
    x = torch.randn(5, 16, generator=gen).bfloat16()
    ids, w = _routing(5, 4, 2, gen)
    assert not grouped_mm_supported(x, w13, w2)
    assert torch.equal(
        moe_experts(x, w13, w2, ids, w, ALPHA, LIMIT),
        moe_experts_reference(x, w13, w2, ids, w, ALPHA, LIMIT),
    )
    empty = moe_experts_grouped(x[:0], w13, w2, ids[:0], w[:0], ALPHA, LIMIT)
    assert empty.shape == (0, 16) and empty.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# GPU: bf16 at M3 sizes (H = 6144; I = 1536 / TP for TP 1 and 8)

H = 6144


def _gpu_inputs(
    tokens: int, experts: int, top_k: int, inter: int, seed: int, used: int | None = None
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=gen).to("cuda", torch.bfloat16)
    ids, w = _routing(tokens, experts, top_k, gen, used)
    gpu_gen = torch.Generator(device="cuda").manual_seed(seed)
    w13, w2 = _weights(experts, H, inter, torch.bfloat16, "cuda", gpu_gen)
    return x, w13, w2, ids.cuda(), w.cuda()


def _require_grouped(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> None:
    if not grouped_mm_supported(x, w13, w2):
        pytest.skip(f"grouped path not supported on {torch.cuda.get_device_name()}")


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 64, 4096])
@pytest.mark.parametrize(
    ("experts", "top_k", "inter"), [(8, 4, 1536), (32, 8, 192), (128, 4, 1536), (128, 8, 192)]
)
def test_gpu_fast_equals_reference(tokens: int, experts: int, top_k: int, inter: int) -> None:
    used = experts // 2 if tokens == 4096 else None  # half the experts idle at 4096 tokens
    x, w13, w2, ids, w = _gpu_inputs(tokens, experts, top_k, inter, tokens + experts, used)
    _require_grouped(x, w13, w2)
    ref = moe_experts_reference(x, w13, w2, ids, w, ALPHA, LIMIT)
    out = moe_experts(x, w13, w2, ids, w, ALPHA, LIMIT)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.isfinite(out).all()
    # same bf16 roundings as the loop; only the GEMMs' accumulation order differs
    assert _rel(out, ref) < 1e-2
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))


@pytest.mark.gpu
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32])
def test_gpu_no_host_sync(ids_dtype: torch.dtype) -> None:
    x, w13, w2, ids, w = _gpu_inputs(64, 32, 4, 192, 5)
    _require_grouped(x, w13, w2)
    ids = ids.to(ids_dtype)
    moe_experts(x, w13, w2, ids, w, ALPHA, LIMIT)  # warm-up: lazy init may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        moe_experts(x, w13, w2, ids, w, ALPHA, LIMIT)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize(("tokens", "experts", "top_k"), [(1, 8, 4), (32, 128, 8), (256, 64, 4)])
def test_gpu_cuda_graph_replays_new_routing(tokens: int, experts: int, top_k: int) -> None:
    x, w13, w2, ids, w = _gpu_inputs(tokens, experts, top_k, 192, 11 + tokens)
    _require_grouped(x, w13, w2)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            moe_experts(x, w13, w2, ids, w, ALPHA, LIMIT)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_experts(x, w13, w2, ids, w, ALPHA, LIMIT)

    gen = torch.Generator().manual_seed(99 + tokens)
    # new routings in place: uniform, all tokens on the last few experts, and new activations
    for used in (None, top_k):
        new_ids, new_w = _routing(tokens, experts, top_k, gen, used)
        if used is not None:
            new_ids = experts - 1 - new_ids  # the top experts only, the rest idle
        ids.copy_(new_ids)
        w.copy_(new_w)
        x.copy_(torch.randn(tokens, H, generator=gen).to(torch.bfloat16))
        out.fill_(float("nan"))  # poisoned: replay must write every element
        graph.replay()
        eager = moe_experts(x, w13, w2, ids, w, ALPHA, LIMIT)
        torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
        ref = moe_experts_reference(x, w13, w2, ids, w, ALPHA, LIMIT)
        assert _rel(out, ref) < 1e-2
