"""Paged index-K cache writes (bf16, FP8 e4m3 + per-token scale) vs ``reference.ref_store_index_k``.

Bit-exact: the FP8 kernel rounds to the e4m3 grid itself (ties to even) before the cast, so the
Triton interpreter and the GPU agree with torch's conversion. Untouched slots stay poisoned.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before the kernels are imported: triton.jit reads it then
    os.environ.setdefault("TRITON_INTERPRET", "1")

from m3serve.kernels.msa import reference as ref
from m3serve.kernels.msa.index_cache import store_index_k

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _case(n_tokens, num_pages, block, d, fp8, seed, dev=DEV):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, d, generator=gen) * torch.rand(n_tokens, 1, generator=gen) * 50
    x[-1] = 0.0  # all-zero row: scale 1
    if n_tokens > 1:  # a huge outlier next to tiny and subnormal values in one row
        x[1, :3] = torch.tensor([448.0 * 3, -1e-9, 1e-30])
    x = x.to(torch.bfloat16)
    slots = torch.randperm(num_pages * block, generator=gen)[:n_tokens]
    dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    cache = torch.full((num_pages, block, d), 3.0).to(dtype)
    scale = torch.full((num_pages, block), -7.0) if fp8 else None
    return x.to(dev), slots.to(dev), cache.to(dev), None if scale is None else scale.to(dev)


def _bits(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t.view(torch.int16)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize(
    ("n_tokens", "slots_dtype"), [(1, torch.int64), (129, torch.int32), (333, torch.int64)]
)
def test_store_matches_reference(fp8, n_tokens, slots_dtype):
    x, slots, cache, scale = _case(n_tokens, 5, 128, 128, fp8, seed=n_tokens)
    slots = slots.to(slots_dtype)
    cache_ref, scale_ref = cache.clone(), None if scale is None else scale.clone()
    store_index_k(cache, scale, x, slots)
    ref.ref_store_index_k(cache_ref, scale_ref, x, slots)
    assert torch.equal(_bits(cache), _bits(cache_ref))
    if fp8:
        assert torch.equal(scale, scale_ref)


def test_negative_slots_are_skipped():
    x, slots, cache, scale = _case(40, 2, 64, 64, True, seed=1)
    slots[::3] = -1
    cache_ref, scale_ref = cache.clone(), scale.clone()
    store_index_k(cache, scale, x, slots)
    keep = slots >= 0
    ref.ref_store_index_k(cache_ref, scale_ref, x[keep], slots[keep])
    assert torch.equal(_bits(cache), _bits(cache_ref)) and torch.equal(scale, scale_ref)


def test_launcher_names_the_failed_constraint():
    x, slots, cache, _ = _case(4, 2, 64, 64, True, seed=2)
    with pytest.raises(AssertionError, match="per-token scale"):
        store_index_k(cache, None, x, slots)
    with pytest.raises(AssertionError, match="index_k must be"):
        store_index_k(cache, torch.zeros(2, 64), x[:, :32], slots)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_store_large(fp8):
    x, slots, cache, scale = _case(8192 + 77, 100, 128, 128, fp8, seed=3, dev="cuda")
    cache_ref, scale_ref = cache.clone(), None if scale is None else scale.clone()
    store_index_k(cache, scale, x, slots)
    ref.ref_store_index_k(cache_ref, scale_ref, x, slots)
    assert torch.equal(_bits(cache), _bits(cache_ref))
    if fp8:
        assert torch.equal(scale, scale_ref)
