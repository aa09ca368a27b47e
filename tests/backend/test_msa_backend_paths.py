"""The msa backend's per-layer code, driven without a server: its paths agree with the references.

A backend object is assembled by hand (no SGLang model runner) over a paged HND KV pool stand-in,
then ``_run`` serves a chunked-prefill batch and a decode batch for one dense and one MSA layer.
CPU: the torch path against the reference composition (store → select → sparse attention).
GPU (marked): the fast kernels against the same references.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from m3serve.kernels.msa import reference as ref

# importing SGLang's attention base class on a machine without CUDA warns from its quant modules
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning:sglang.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

BLOCK, TOPK, HQ, HKV, D, DI = 16, 4, 4, 2, 32, 32


@dataclass(frozen=True)
class Shape:
    block: int = BLOCK
    topk: int = TOPK
    hq: int = HQ
    hkv: int = HKV
    d: int = D
    di: int = DI


SMALL = Shape()
# M3's page (128 tokens) and GQA group (16), head_dim 128: on Hopper the fast path's sparse
# prefill runs the CUDA main kernel here (the small shape runs Triton); top-k 2 so that the
# requests' 2-3 blocks are not all selected
M3_PAGES = Shape(block=128, topk=2, hq=16, hkv=1, d=128, di=128)


class _Pool:
    """HND [pages, H, block, D] K/V per layer with SGLang's set_kv_buffer signature."""

    def __init__(
        self, pages: int, device: str, dtype: torch.dtype, heads: int = HKV, d: int = D,
        block: int = BLOCK,
    ) -> None:  # fmt: skip
        self.block = block
        shape = (pages, heads, block, d)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(2)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(2)]

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.k[layer_id]

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self.v[layer_id]

    def set_kv_buffer(self, layer: Any, loc: Any, k: torch.Tensor, v: torch.Tensor) -> None:
        slots = loc.loc.long()
        p, o = slots // self.block, slots % self.block
        self.k[layer.layer_id][p, :, o] = k.to(self.k[0].dtype)
        self.v[layer.layer_id][p, :, o] = v.to(self.v[0].dtype)


def _backend(
    device: str, dtype: torch.dtype, fast: bool, index_dtype: str = "bf16", *,
    pool_heads: int | None = None, d: int | None = None, dense_impl: str = "torch",
    tp_invariant: bool = False, s: Shape = SMALL,
) -> Any:  # fmt: skip
    from m3serve.backend.msa_backend import MSAAttnBackend

    pool_heads = s.hkv if pool_heads is None else pool_heads
    d = s.d if d is None else d
    b = object.__new__(MSAAttnBackend)
    b.setup(
        device=device, kv_pool=_Pool(64, device, dtype, pool_heads, d, s.block),
        req_to_token_pool=None, block=s.block, topk=s.topk, index_dim=s.di, sparse_layers={1},
        num_q_heads=s.hq, num_kv_heads=s.hkv, q_dtype=dtype, context_len=64 * s.block,
        impl="auto" if fast else "reference", index_dtype=index_dtype, dense_impl=dense_impl,
        tp_invariant=tp_invariant,
    )  # fmt: skip
    assert b.use_fast == fast
    return b


def _batch(b: Any, q_lens: list[int], prefixes: list[int], decode: bool, table: torch.Tensor,
           block: int = BLOCK):  # fmt: skip
    from m3serve.backend.msa_backend import MSAMetadata

    dev = table.device
    seq = [p + q for p, q in zip(prefixes, q_lens, strict=True)]
    cu = torch.zeros(len(seq) + 1, dtype=torch.int32, device=dev)
    cu[1:] = torch.cumsum(torch.tensor(q_lens, device=dev), 0)
    locs = torch.cat([
        table[r].long().repeat_interleave(block) * block + torch.arange(block, device=dev).repeat(table.shape[1])
        for r in range(len(seq))
    ]).view(len(seq), -1)  # fmt: skip
    out_loc = torch.cat(
        [locs[r, p : p + q] for r, (p, q) in enumerate(zip(prefixes, q_lens, strict=True))]
    )
    seq_t = torch.tensor(seq, dtype=torch.int32, device=dev)
    md = MSAMetadata(cu, torch.tensor(prefixes, dtype=torch.int32, device=dev), seq_t, table, out_loc,
                     is_decode=decode, max_q_len=max(q_lens), max_seq_len=max(seq))  # fmt: skip
    b.forward_metadata = md
    if b.use_fast:
        b._plan_fast(md, seq_t.cpu())
    return md, SimpleNamespace(out_cache_loc=out_loc, out_cache_loc_is_physical=True)


def _serve(
    device: str, fast: bool, dtype: torch.dtype = torch.bfloat16, index_dtype: str = "bf16",
    s: Shape = SMALL, backends: list | None = None,
) -> list[torch.Tensor]:  # fmt: skip
    """Two prefill chunks and a decode step through one dense and one MSA layer; the backend is
    appended to ``backends`` if given."""
    g = torch.Generator().manual_seed(0)
    b = _backend(device, dtype, fast, index_dtype, s=s)
    if backends is not None:
        backends.append(b)
    hq, hkv, d, di = s.hq, s.hkv, s.d, s.di
    table = torch.randperm(60, generator=g)[:40].view(2, 20).to(torch.int32).to(device)
    outs = []
    # prefill in two chunks, then one decode step; request lengths cross many blocks
    steps = (([150, 37], [0, 0], False), ([90, 64], [150, 37], False), ([1, 1], [240, 101], True))
    for q_lens, prefixes, decode in steps:
        _md, fb = _batch(b, q_lens, prefixes, decode, table, s.block)
        t = sum(q_lens)
        for layer_id in (0, 1):
            layer = SimpleNamespace(
                layer_id=layer_id, tp_q_head_num=hq, tp_k_head_num=hkv, head_dim=d, scaling=d**-0.5
            )
            q = torch.randn(t, hq * d, generator=g).to(device, dtype)
            k = torch.randn(t, hkv, d, generator=g).to(device, dtype)
            v = torch.randn(t, hkv, d, generator=g).to(device, dtype)
            iq = torch.randn(t, hkv, di, generator=g).to(device, dtype)
            ik = torch.randn(t, 1, di, generator=g).to(device, dtype)
            if layer_id == 0:
                outs.append(b._run(q, k, v, layer, fb, True, None, None).float().cpu())
            else:
                outs.append(
                    b._run(q.view(t, hq, d), k, v, layer, fb, True, iq, ik)[1].float().cpu()
                )
    return outs


def _reference_serve(
    dtype: torch.dtype = torch.bfloat16, index_dtype: str = "bf16", s: Shape = SMALL
) -> list[torch.Tensor]:
    """Same inputs, composed from the reference functions only."""
    import m3serve.backend.msa_backend as mb

    saved = mb.paged_attention
    mb.paged_attention = lambda q, kc, vc, pt, cu, pre, sl, scale, topk_ids=None: (
        ref.ref_dense_causal_attention(q, kc, vc, pt, cu, pre, sl, scale)
        if topk_ids is None
        else ref.ref_sparse_attention(q, kc, vc, pt, cu, pre, sl, topk_ids, scale)
    ).to(q.dtype)
    try:
        return _serve("cpu", fast=False, dtype=dtype, index_dtype=index_dtype, s=s)
    finally:
        mb.paged_attention = saved


@pytest.mark.parametrize("index_dtype", ["bf16", "fp8"])
def test_torch_path_matches_reference_composition(index_dtype: str) -> None:
    ours_all = _serve("cpu", fast=False, index_dtype=index_dtype)
    for ours, want in zip(ours_all, _reference_serve(index_dtype=index_dtype), strict=True):
        torch.testing.assert_close(ours, want, atol=2e-2, rtol=2e-2)


def test_fp8_index_keys_are_stored_quantized() -> None:
    """M3SERVE_INDEX_K_DTYPE=fp8: e4m3 caches with a per-token scale, written on store."""
    b = _backend("cpu", torch.bfloat16, fast=False, index_dtype="fp8")
    assert b.index_k[1].dtype == torch.float8_e4m3fn
    assert b.index_k_scale[1].shape == b.index_k[1].shape[:2]
    keys = torch.randn(5, 1, DI)
    slots = torch.tensor([0, 17, 18, 40, 1023])
    b._store_index_k(1, keys, slots)
    got = ref.dequant_index_k(b.index_k[1], b.index_k_scale[1]).view(-1, DI)[slots]
    torch.testing.assert_close(got, keys.view(5, DI), atol=0.0, rtol=0.07)  # e4m3: 3 mantissa bits


def test_index_q_fp8_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """M3SERVE_INDEX_Q_FP8=1: FP8 queries, only over FP8 index keys; default off; bad values named."""
    assert _backend("cpu", torch.bfloat16, fast=False, index_dtype="fp8").index_q_fp8 is False
    monkeypatch.setenv("M3SERVE_INDEX_Q_FP8", "1")
    assert _backend("cpu", torch.bfloat16, fast=False, index_dtype="fp8").index_q_fp8 is True
    with pytest.raises(ValueError, match="M3SERVE_INDEX_K_DTYPE=fp8"):
        _backend("cpu", torch.bfloat16, fast=False, index_dtype="bf16")
    monkeypatch.setenv("M3SERVE_INDEX_Q_FP8", "yes")
    with pytest.raises(ValueError, match="must be 0 or 1"):
        _backend("cpu", torch.bfloat16, fast=False, index_dtype="fp8")


@pytest.mark.gpu
@pytest.mark.parametrize("index_dtype", ["bf16", "fp8"])
def test_fast_path_matches_reference_composition(index_dtype: str) -> None:
    ours_all = _serve("cuda", fast=True, index_dtype=index_dtype)
    for ours, want in zip(ours_all, _reference_serve(index_dtype=index_dtype), strict=True):
        torch.testing.assert_close(ours, want, atol=3e-2, rtol=3e-2)


def test_m3_pages_torch_path_matches_reference_composition() -> None:
    """The 128-token-page, group-16 shape of the GPU test below, on the CPU torch path: checks
    the harness at that shape (the top-k of 2 leaves blocks out)."""
    ours_all = _serve("cpu", fast=False, s=M3_PAGES)
    for ours, want in zip(ours_all, _reference_serve(s=M3_PAGES), strict=True):
        torch.testing.assert_close(ours, want, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_fast_path_m3_pages_matches_reference_composition() -> None:
    """M3's 128-token pages and GQA group 16: the fast path's sparse prefill runs the CUDA main
    kernel on Hopper (the default "auto"; Triton elsewhere), through the backend's own plan and
    buffers, and matches the reference composition."""
    backends: list = []
    ours_all = _serve("cuda", fast=True, s=M3_PAGES, backends=backends)
    for ours, want in zip(ours_all, _reference_serve(s=M3_PAGES), strict=True):
        torch.testing.assert_close(ours, want, atol=3e-2, rtol=3e-2)
    wrapper = backends[0]._prefill_wrapper
    hopper = torch.cuda.get_device_capability()[0] == 9
    assert wrapper.p.main_kernel == ("cuda" if hopper else "triton")


def test_rank_heads_must_match_the_plan() -> None:
    """A layer whose per-rank head counts differ from what the backend planned (e.g. heads not
    divided by the TP size) is refused with the numbers, not served with a mis-shaped plan."""
    b = _backend("cpu", torch.float32, fast=False)
    table = torch.arange(20, dtype=torch.int32).view(1, 20)
    _md, fb = _batch(b, [20], [0], False, table)
    layer = SimpleNamespace(
        layer_id=0, tp_q_head_num=2 * HQ, tp_k_head_num=HKV, head_dim=D, scaling=D**-0.5
    )
    q = torch.randn(20, 2 * HQ * D)
    k, v = torch.randn(20, HKV, D), torch.randn(20, HKV, D)
    with pytest.raises(ValueError, match=rf"{2 * HQ} q / {HKV} KV heads .* planned {HQ} / {HKV}"):
        b._run(q, k, v, layer, fb, True, None, None)


def _serve_shards(device: str, fast: bool, dtype: torch.dtype, d: int, dense_impl: str):
    """TP-invariant mode (m3serve.models.invariant): the same two shards served (a) by one
    backend over a pool of both shards' KV heads, called once per shard with the shard's head
    offset (TP 1), (b) by one backend per shard over a pool of its KV heads alone (the TP 2
    ranks). Returns each side's outputs and its K/V pools, shard by shard."""
    g = torch.Generator().manual_seed(5)
    kw = dict(d=d, dense_impl=dense_impl, tp_invariant=True)
    whole = _backend(device, dtype, fast, pool_heads=2 * HKV, **kw)
    ranks = [_backend(device, dtype, fast, pool_heads=HKV, **kw) for _ in range(2)]
    assert whole.decode_backend == "triton", "shard calls stay on the split-KV decode kernel"
    table = torch.randperm(60, generator=g)[:40].view(2, 20).to(torch.int32).to(device)
    out_whole: list[torch.Tensor] = []
    out_ranks: list[torch.Tensor] = []
    steps = (([150, 37], [0, 0], False), ([90, 64], [150, 37], False), ([1, 1], [240, 101], True))
    for q_lens, prefixes, decode in steps:
        fbs = [_batch(b, q_lens, prefixes, decode, table)[1] for b in (whole, *ranks)]
        t = sum(q_lens)
        ik = torch.randn(t, 1, DI, generator=g).to(device, dtype)
        for layer_id in (0, 1):
            for j in range(2):
                q = torch.randn(t, HQ, d, generator=g).to(device, dtype)
                k, v = (torch.randn(t, HKV, d, generator=g).to(device, dtype) for _ in range(2))
                iq = torch.randn(t, HKV, DI, generator=g).to(device, dtype)
                idx = (iq, ik) if layer_id else (None, None)
                for b, fb, h0, outs in ((whole, fbs[0], j * HKV, out_whole),
                                        (ranks[j], fbs[1 + j], 0, out_ranks)):  # fmt: skip
                    layer = SimpleNamespace(
                        layer_id=layer_id, tp_q_head_num=HQ, tp_k_head_num=HKV, head_dim=d,
                        scaling=d**-0.5, m3_kv_head_offset=h0,
                    )  # fmt: skip
                    o = b._run(q.view(t, -1) if layer_id == 0 else q, k, v, layer, fb, True, *idx)
                    outs.append((o if layer_id == 0 else o[1]).reshape(t, HQ, d).cpu())
    pools = [
        [torch.stack([p.k[i], p.v[i]]).cpu() for i in (0, 1)]
        for p in (whole.token_to_kv_pool, *(r.token_to_kv_pool for r in ranks))
    ]
    return out_whole, out_ranks, pools


def _check_shards_bitwise(device: str, fast: bool, dtype: torch.dtype, d: int, dense: str) -> None:
    out_whole, out_ranks, pools = _serve_shards(device, fast, dtype, d, dense)
    for n, (a, b) in enumerate(zip(out_whole, out_ranks, strict=True)):
        assert torch.equal(a, b), f"call {n}: max |diff| {(a.float() - b.float()).abs().max()}"
    assert any(o.abs().sum() > 0 for o in out_whole)
    for i in (0, 1):  # the shared pool holds shard j's heads at j·HKV..; each rank its own
        for j in range(2):
            assert torch.equal(pools[0][i][:, :, j * HKV : (j + 1) * HKV], pools[1 + j][i])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tp_invariant_shard_calls_equal_rank_backends(dtype: torch.dtype) -> None:
    """CPU (torch paths): a shard call on the shared pool = the TP 2 rank's call, bit for bit."""
    _check_shards_bitwise("cpu", False, dtype, D, "torch")


@pytest.mark.gpu
def test_tp_invariant_shard_calls_equal_rank_backends_gpu() -> None:
    """GPU: the fast kernels (MSA selection, block-major prefill, split-KV decode) and FlashInfer
    dense attention on a head slice of the pool = on a pool of those heads, bit for bit."""
    pytest.importorskip("flashinfer")
    _check_shards_bitwise("cuda", True, torch.bfloat16, 128, "auto")
