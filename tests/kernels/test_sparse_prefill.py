"""KV-block-major sparse prefill (and its query-major twin) against the float32 torch reference.

Without a GPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1, set here before
the kernel modules are imported, since triton.jit reads it at decoration time) at small sizes:
block 16, head_dim 32. With a GPU the same tests run compiled on it, plus M3-sized cases.
"""

from __future__ import annotations

import itertools
import math
import os
import weakref

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from m3serve.kernels.msa import reference as ref
from m3serve.kernels.msa.sparse_prefill import (
    SparsePrefillWrapper,
    sparse_prefill_attention,
)

from .decode_cases import paged_kv

DEV = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_batch(seq_lens, q_lens, block, hq, hkv, d, seed, dtype=torch.bfloat16, device=DEV):
    """Random HND caches behind a shuffled page table, q, and the ragged metadata."""
    gen = torch.Generator().manual_seed(seed)
    pages_per = [(n + block - 1) // block for n in seq_lens]
    page_table, k, v = paged_kv(pages_per, hkv, block, d, gen, dtype, spare=3, pad=0, fill=0)
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    prefix = seq - torch.tensor(q_lens, dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), hq, d, generator=gen).to(dtype)
    t = [x.to(device) for x in (q, k, v, page_table, cu_q, prefix, seq)]
    return t, gen


def realistic_topk(gen, page_table, cu_q, prefix, seq, block, hkv, topk, d_index=16):
    """MSA selections from random index queries/keys (ref_select_blocks), [H_kv, T, k] int32."""
    num_pages = int(page_table.max()) + 4
    iq = torch.randn(int(cu_q[-1]), hkv, d_index, generator=gen)
    ik = torch.randn(num_pages, block, d_index, generator=gen)
    c = [x.cpu() for x in (page_table, cu_q, prefix, seq)]
    return ref.ref_select_blocks(iq, ik, None, c[0], c[1], c[2], c[3], topk).to(page_table.device)


def check(out, expect, atol=3e-2, rtol=2e-2):
    """bf16 bounds vs the float32 reference: elementwise and on average."""
    assert not out.isnan().any(), "NaN in output (unwritten or poisoned element read)"
    err = (out.float() - expect).abs()
    bound = atol + rtol * expect.abs()
    worst = (err - bound).max()
    assert worst <= 0, f"max error {err.max():.4g} exceeds the bf16 bound by {worst:.4g}"
    assert err.mean() < 4e-3, f"mean error {err.mean():.4g} too large for bf16"


def run_wrapper(variant, tensors, topk_ids, block, k, poison=True, lse=None, **kw):
    q, kc, vc, pt, cu_q, prefix, seq = tensors
    w = SparsePrefillWrapper(variant=variant, **kw)
    p = w.plan(cu_q, prefix, seq, pt, q.shape[1], kc.shape[1], q.shape[2], block, k)
    if poison:
        p.o_part.fill_(float("nan"))
        p.lse_part.fill_(float("nan"))
    out = torch.full_like(q, float("nan"))
    w.run(q, kc, vc, topk_ids, 1 / math.sqrt(q.shape[2]), out=out, lse=lse)
    return out, w


# (seq_lens, q_lens, hq, hkv, block): odd lengths 1/127/129/333/1111, partial last blocks,
# ≤ k blocks visible (dense), chunked prefill after a prefix, an empty request in the middle;
# GQA groups 2, 16, 1 and 3 (not a power of two: padded rows). The interpreter pays per op,
# so blocks are 32/64 tokens here to keep the inverse index small; the GPU tests use 128.
FUZZ = [
    ([1, 127, 129], [1, 127, 129], 4, 2, 32),
    ([333], [333], 16, 1, 64),
    ([40, 1111], [40, 95], 3, 3, 64),
    ([300, 5, 200], [17, 0, 200], 6, 2, 32),
]


@pytest.mark.parametrize("case", range(len(FUZZ)))
def test_block_major_fuzz(case):
    seq_lens, q_lens, hq, hkv, block = FUZZ[case]
    d, k = 32, 4
    tensors, gen = make_batch(seq_lens, q_lens, block, hq, hkv, d, seed=case * 31 + hq)
    q, kc, vc, pt, cu_q, prefix, seq = tensors
    topk_ids = realistic_topk(gen, pt, cu_q, prefix, seq, block, hkv, k)
    lse = torch.full((q.shape[0], hq), float("nan"), device=DEV)
    # odd cases also run the unrolled combine (off by default: slower on the GPU)
    out, _ = run_wrapper(
        "block_major", tensors, topk_ids, block, k, lse=lse, combine_unroll=case % 2 == 1
    )
    expect, expect_lse = ref.ref_sparse_attention(
        q, kc, vc, pt, cu_q, prefix, seq, topk_ids, 1 / math.sqrt(d), return_lse=True
    )
    check(out, expect)
    torch.testing.assert_close(lse, expect_lse, atol=2e-2, rtol=1e-3)


def test_plan_reused_across_layers_and_tiles():
    """One plan, several layers (different selections): the counts must come back to zero."""
    block, d, k, hq, hkv = 32, 32, 4, 8, 2
    tensors, gen = make_batch([150, 40], [70, 40], block, hq, hkv, d, seed=7)
    q, kc, vc, pt, cu_q, prefix, seq = tensors
    # 4 queries per tile, 4 tiles per item; the plain loops (K/V per tile, no prefetch, rolled combine)
    w = SparsePrefillWrapper(
        block_m=32, item_q=16, hoist_kv=False, prefetch=False, combine_unroll=False
    )
    w.plan(cu_q, prefix, seq, pt, hq, hkv, d, block, k)
    for layer in range(2):
        topk_ids = realistic_topk(gen, pt, cu_q, prefix, seq, block, hkv, k)
        out = w.run(q, kc, vc, topk_ids, 1 / math.sqrt(d))
        expect = ref.ref_sparse_attention(
            q, kc, vc, pt, cu_q, prefix, seq, topk_ids, 1 / math.sqrt(d)
        )
        check(out, expect)
        assert int(w.p.counts.abs().sum()) == 0, f"layer {layer}: counts not re-zeroed"


def adversarial_ids(kind, hkv, t, k, local):
    """[H_kv, T, k] selections every kernel must survive (local: each query's own block)."""
    ids = torch.full((hkv, t, k), -1, dtype=torch.int32)
    if kind == "all_same_block":  # one row of the inverse index holds every query
        ids[:, :, 0] = 0
    elif kind == "all_same_list":  # blocks 0..k-1, clipped to what each query can see
        cand = torch.arange(k, dtype=torch.int32)[None, :].expand(t, k)
        ids[:] = torch.where(cand <= local[:, None], cand, -1)
    elif kind == "all_different":  # only the local block: rows of ≤ block queries each
        ids[:, :, 0] = local
    else:  # ids past the local block or past the sequence are ignored (not visible)
        ids[:, :, 0] = local
        ids[:, :, 1] = local + 1
        ids[:, :, 2] = 10_000
    return ids.to(DEV)


# (main kernel, block = head_dim, k, q heads, KV heads, seq_lens, q_lens): the Triton kernel
# under the interpreter at small sizes (compiled on a GPU), the CUDA kernel at its M3 shapes
ADVERSARIAL = [
    pytest.param("triton", 32, 4, 4, 2, [200, 64], [200, 33], id="triton"),
    pytest.param(
        "cuda", 128, 16, 64, 4, [5000, 700], [3000, 700], id="cuda", marks=[pytest.mark.gpu, gpu]
    ),
]


@pytest.mark.parametrize("main_kernel,block,k,hq,hkv,seq_lens,q_lens", ADVERSARIAL)
@pytest.mark.parametrize(
    "kind", ["all_same_block", "all_same_list", "all_different", "invalid_ids"]
)
def test_adversarial_selections(kind, main_kernel, block, k, hq, hkv, seq_lens, q_lens):
    d = block
    tensors, _ = make_batch(seq_lens, q_lens, block, hq, hkv, d, seed=3)
    q, kc, vc, pt, cu_q, prefix, seq = tensors
    t = q.shape[0]
    pos = torch.cat([torch.arange(int(p), int(s)) for p, s in zip(prefix, seq, strict=True)])
    local = (pos // block).to(torch.int32)
    ids = adversarial_ids(kind, hkv, t, k, local)
    out, _ = run_wrapper("block_major", tensors, ids, block, k, main_kernel=main_kernel)
    visible = torch.where(ids <= local.to(DEV)[None, :, None], ids, -1)
    expect = ref.ref_sparse_attention(q, kc, vc, pt, cu_q, prefix, seq, visible, 1 / math.sqrt(d))
    check(out, expect)


def test_query_major_matches_reference():
    block, d, k, hq, hkv = 16, 32, 4, 4, 2
    tensors, gen = make_batch([129, 40], [9, 4], block, hq, hkv, d, seed=11)
    q, kc, vc, pt, cu_q, prefix, seq = tensors
    topk_ids = realistic_topk(gen, pt, cu_q, prefix, seq, block, hkv, k)
    out, _ = run_wrapper("query_major", tensors, topk_ids, block, k)
    expect = ref.ref_sparse_attention(q, kc, vc, pt, cu_q, prefix, seq, topk_ids, 1 / math.sqrt(d))
    check(out, expect)


def test_public_function_and_errors():
    block, d, k, hq, hkv = 16, 32, 4, 4, 2
    tensors, gen = make_batch([70], [70], block, hq, hkv, d, seed=5)
    q, kc, vc, pt, cu_q, prefix, seq = tensors
    topk_ids = realistic_topk(gen, pt, cu_q, prefix, seq, block, hkv, k)
    out = sparse_prefill_attention(q, kc, vc, pt, cu_q, prefix, seq, topk_ids, 1 / math.sqrt(d))
    expect = ref.ref_sparse_attention(q, kc, vc, pt, cu_q, prefix, seq, topk_ids, 1 / math.sqrt(d))
    assert out.dtype == q.dtype
    check(out, expect)
    w = SparsePrefillWrapper()
    with pytest.raises(AssertionError, match="call plan"):
        w.run(q, kc, vc, topk_ids, 1.0)
    w.plan(cu_q, prefix, seq, pt, hq, hkv, d, block, k)
    with pytest.raises(AssertionError, match="topk_ids"):
        w.run(q, kc, vc, topk_ids.long(), 1.0)
    with pytest.raises(AssertionError, match="HND"):
        w.run(q, kc.transpose(1, 2), vc, topk_ids, 1.0)
    with pytest.raises(AssertionError, match="q "):
        w.run(q[:-1], kc, vc, topk_ids[:, :-1], 1.0)
    with pytest.raises(AssertionError, match="power of two"):
        SparsePrefillWrapper().plan(cu_q, prefix, seq, pt, hq, hkv, d, 24, k)


# ---------------------------------------------------------------- GPU: M3 shapes, CUDA graphs
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("hq,hkv", [(64, 4), (16, 1), (8, 8)])
@pytest.mark.parametrize("variant", ["block_major", "block_major_plain", "query_major"])
def test_gpu_m3_shapes(variant, hq, hkv):
    block, d, k = 128, 128, 16
    seq_lens, q_lens = [6000, 1111, 3000], [1024, 1111, 333]  # chunk after a prefix, odd tails
    tensors, gen = make_batch(seq_lens, q_lens, block, hq, hkv, d, seed=hq)
    q, kc, vc, pt, cu_q, prefix, seq = tensors
    topk_ids = realistic_topk(gen, pt, cu_q, prefix, seq, block, hkv, k)
    kw = {}
    if variant == "block_major_plain":
        variant, kw = "block_major", dict(prefetch=False, combine_unroll=False, hoist_kv=False)
    out, _ = run_wrapper(variant, tensors, topk_ids, block, k, **kw)
    expect = ref.ref_sparse_attention(q, kc, vc, pt, cu_q, prefix, seq, topk_ids, 1 / math.sqrt(d))
    check(out, expect)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("main_kernel", ["triton", "cuda"])
def test_gpu_cuda_graph_capture(main_kernel):
    block, d, k, hq, hkv = 128, 128, 16, 64, 4
    tensors, gen = make_batch([4000, 900], [2048, 900], block, hq, hkv, d, seed=1)
    q, kc, vc, pt, cu_q, prefix, seq = tensors
    ids = [realistic_topk(gen, pt, cu_q, prefix, seq, block, hkv, k) for _ in range(2)]
    w = SparsePrefillWrapper(main_kernel=main_kernel)
    w.plan(cu_q, prefix, seq, pt, hq, hkv, d, block, k)
    sel = ids[0].clone()
    out = torch.empty_like(q)
    # compile (+ autotune, or NVRTC for the CUDA kernel) outside the capture
    w.run(q, kc, vc, sel, 1 / math.sqrt(d), out=out)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w.run(q, kc, vc, sel, 1 / math.sqrt(d), out=out)
    for layer_ids in ids:  # new selections through the same fixed buffers
        sel.copy_(layer_ids)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        expect = ref.ref_sparse_attention(
            q, kc, vc, pt, cu_q, prefix, seq, layer_ids, 1 / math.sqrt(d)
        )
        check(out, expect)


# ------------------------------------------------ the CUDA (wgmma) main kernel, sm_90a only
def _nvrtc_or_skip():
    from m3serve.kernels.msa import cuda_rtc

    try:
        cuda_rtc._nvrtc()
    except cuda_rtc.CudaRtcError as e:
        pytest.skip(f"no NVRTC here: {e}")
    return cuda_rtc


@pytest.mark.parametrize("gp,item_q", [(16, 64), (1, 64), (16, 128)])
def test_cuda_main_kernel_compiles_for_hopper(gp, item_q):
    """NVRTC builds the kernel for sm_90a without a GPU: no spills, ≤ 255 registers (two CTAs
    of 128 threads per SM), and no wgmma serialisation (ptxas C7514 / C7515: a non-wgmma
    instruction reading or defining an in-flight accumulator, e.g. a loop-carried copy, makes
    every MMA wait for the previous one; session 14's first two forms had it)."""
    cuda_rtc = _nvrtc_or_skip()
    from m3serve.kernels.msa import sparse_prefill_cuda as spc

    c = cuda_rtc.compile_cubin(
        spc.source(), spc.kernel_name(gp, item_q), "sm_90a", ("-Xptxas", "-v")
    )
    assert c.image[:4] == b"\x7fELF" and c.lowered_name.startswith("_Z16msa_prefill_main")
    regs = [int(x.split("Used ")[1].split()[0]) for x in c.log.splitlines() if "Used " in x]
    assert regs and regs[0] <= 255, c.log
    assert "0 bytes spill stores, 0 bytes spill loads" in c.log, c.log
    assert "C751" not in c.log, c.log  # C7514 / C7515: wgmma serialised
    if item_q == 64:
        assert 2 * (spc.smem_bytes(item_q) + 1024) <= 228 * 1024, "two CTAs per SM must fit"


def test_cuda_main_kernel_rejects_unsupported_shapes():
    from m3serve.kernels.msa import sparse_prefill_cuda as spc

    q = torch.zeros(4, 16, 128, dtype=torch.bfloat16)
    kc = torch.zeros(2, 1, 128, 128, dtype=torch.bfloat16)
    assert spc.check_supported(q, kc, 16, 64, 64) == 16
    with pytest.raises(ValueError, match="bf16"):
        spc.check_supported(q.half(), kc.half(), 16, 64, 64)
    with pytest.raises(ValueError, match="head_dim 128 and block 128"):
        spc.check_supported(q[..., :64], kc[..., :64, :], 16, 64, 64)
    with pytest.raises(ValueError, match="BLOCK_M 64"):
        spc.check_supported(q, kc, 16, 128, 64)
    with pytest.raises(ValueError, match="multiple of 4 queries"):
        spc.check_supported(q, kc, 16, 64, 66)
    with pytest.raises(AssertionError, match="main_kernel"):
        SparsePrefillWrapper(main_kernel="cutlass")
    if not torch.cuda.is_available():  # the interpreter's CPU tensors: a clear error, no crash
        block, d, k, hq, hkv = 128, 128, 2, 16, 1
        tensors, gen = make_batch([300], [300], block, hq, hkv, d, seed=4)
        pt, cu_q, prefix, seq = tensors[3:]
        ids = realistic_topk(gen, pt, cu_q, prefix, seq, block, hkv, k)
        with pytest.raises(ValueError, match="one CUDA device"):
            run_wrapper("block_major", tensors, ids, block, k, main_kernel="cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("hq,hkv", [(64, 4), (16, 1), (8, 8), (12, 4), (48, 4)])
@pytest.mark.parametrize("item_q", [64, 128])
def test_gpu_cuda_main_kernel(hq, hkv, item_q):
    """The CUDA main kernel against the float32 reference: chunk after a prefix, odd tails,
    partial last blocks, groups 16 (TMA stores of O) / 1 / 3 / 12 (padded rows: per-lane
    stores), poisoned partials and output."""
    block, d, k = 128, 128, 16
    seq_lens, q_lens = [6000, 1111, 3000, 77], [1024, 1111, 333, 1]
    tensors, gen = make_batch(seq_lens, q_lens, block, hq, hkv, d, seed=hq + item_q)
    q, kc, vc, pt, cu_q, prefix, seq = tensors
    topk_ids = realistic_topk(gen, pt, cu_q, prefix, seq, block, hkv, k)
    lse = torch.full((q.shape[0], hq), float("nan"), device=DEV)
    out, w = run_wrapper(
        "block_major", tensors, topk_ids, block, k, lse=lse, main_kernel="cuda", item_q=item_q
    )
    assert w.p.main_kernel == "cuda"
    expect, expect_lse = ref.ref_sparse_attention(
        q, kc, vc, pt, cu_q, prefix, seq, topk_ids, 1 / math.sqrt(d), return_lse=True
    )
    check(out, expect)
    torch.testing.assert_close(lse, expect_lse, atol=2e-2, rtol=1e-3)
    triton_out, _ = run_wrapper("block_major", tensors, topk_ids, block, k)
    assert (out.float() - triton_out.float()).abs().max() < 2e-2


def test_auto_main_kernel_resolves_per_device_and_shape():
    """main_kernel="auto" (the default) plans the CUDA kernel only for its shapes on a Hopper
    card; anywhere else (this CPU run, head_dim 64, a tile it runs badly) Triton."""
    block, k = 64, 4
    tensors, _ = make_batch([300], [200], block, 16, 1, 64, seed=11)
    pt, cu_q, prefix, seq = tensors[3:]
    w = SparsePrefillWrapper()
    p = w.plan(cu_q, prefix, seq, pt, 16, 1, 64, block, k)
    assert p.auto and p.main_kernel == "triton"  # head_dim 64 / block 64: not the CUDA shapes
    w = SparsePrefillWrapper(main_kernel="triton")
    assert not w.plan(cu_q, prefix, seq, pt, 16, 1, 64, block, k).auto


@pytest.mark.gpu
@gpu
def test_gpu_auto_main_kernel():
    """On Hopper the default runs the CUDA kernel for bf16 (ITEM_Q 64), falls back to Triton for
    an fp16 run of the same plan, and keeps Triton for a tile the CUDA kernel runs badly; every
    output matches the float32 reference."""
    block, d, k, hq, hkv = 128, 128, 16, 64, 4
    tensors, gen = make_batch([3000, 700], [1024, 700], block, hq, hkv, d, seed=5)
    q, kc, vc, pt, cu_q, prefix, seq = tensors
    ids = realistic_topk(gen, pt, cu_q, prefix, seq, block, hkv, k)
    expect = ref.ref_sparse_attention(q, kc, vc, pt, cu_q, prefix, seq, ids, 1 / math.sqrt(d))
    hopper = torch.cuda.get_device_capability()[0] == 9
    out, w = run_wrapper("block_major", tensors, ids, block, k)
    assert w.p.auto and w.p.main_kernel == ("cuda" if hopper else "triton")
    assert w.p.item_q == (64 if hopper else 128)
    check(out, expect)
    half = (q.half(), kc.half(), vc.half(), pt, cu_q, prefix, seq)
    out16 = torch.full_like(half[0], float("nan"))
    w.run(half[0], half[1], half[2], ids, 1 / math.sqrt(d), out=out16)
    check(out16, expect)
    _, w128 = run_wrapper("block_major", tensors, ids, block, k, item_q=128)
    assert w128.p.main_kernel == "triton"


def test_plan_releases_the_previous_plans_buffers_first(monkeypatch):
    """plan() drops the previous step's partial buffers before allocating the next step's, so
    the two are never alive together (2.1 GB each for an 8K chunk at 64 heads)."""
    block, k = 64, 4
    tensors, _ = make_batch([300], [200], block, 16, 1, 64, seed=12)
    pt, cu_q, prefix, seq = tensors[3:]
    w = SparsePrefillWrapper()
    w.plan(cu_q, prefix, seq, pt, 16, 1, 64, block, k)
    old = weakref.ref(w.p.o_part)
    alive_at_alloc = []
    real_empty = torch.empty

    def spy(*shape, **kw):
        if kw.get("dtype") == torch.bfloat16 and len(shape) == 3:  # the o_part allocation
            alive_at_alloc.append(old() is not None)
        return real_empty(*shape, **kw)

    monkeypatch.setattr(torch, "empty", spy)
    w.plan(cu_q, prefix, seq, pt, 16, 1, 64, block, k)
    assert alive_at_alloc == [False]


@pytest.mark.parametrize("item_q", [4, 64])
def test_fused_index_build_matches_the_default(item_q):
    """build_inverse_index(fused_offsets=True) (the two prefix sums and the work list in one
    program) gives the default's offsets and work list and the same entries per row, also past
    one 2048-row chunk of the scan (a long prefix: 4 KV heads × 563 blocks)."""
    from m3serve.kernels.msa.sparse_prefill_plan import build_inverse_index

    block, k, hkv = 16, 8, 4
    tensors, gen = make_batch([9000, 300], [50, 300], block, 8, hkv, 32, seed=13)
    pt, cu_q, prefix, seq = tensors[3:]
    ids = realistic_topk(gen, pt, cu_q, prefix, seq, block, hkv, k)
    got = []
    for fused in (False, True):
        w = SparsePrefillWrapper(item_q=item_q, block_m=16)
        p = w.plan(cu_q, prefix, seq, pt, 8, hkv, 32, block, k)
        assert p.counts.numel() > 2048
        p.work_row.fill_(-7)
        p.work_start.fill_(-7)
        build_inverse_index(ids, p.meta, block, item_q, p.counts, p.row_ptr, p.item_ptr,
                            p.entries, p.work_row, p.work_start, fused)  # fmt: skip
        assert int(p.counts.abs().sum()) == 0, "counts must be zero again for the next layer"
        n = int(p.item_ptr[-1])
        bounds = p.row_ptr.tolist()
        rows = [sorted(p.entries[a:b].tolist()) for a, b in itertools.pairwise(bounds)]
        got.append((p.row_ptr.clone(), p.item_ptr.clone(), p.work_row[:n].clone(),
                    p.work_start[:n].clone(), rows))  # fmt: skip
    (rp0, ip0, wr0, ws0, rows0), (rp1, ip1, wr1, ws1, rows1) = got
    assert torch.equal(rp0, rp1) and torch.equal(ip0, ip1)
    assert torch.equal(wr0, wr1) and torch.equal(ws0, ws1)
    assert rows0 == rows1
    assert int(ip0[-1]) > int((rp0[1:] - rp0[:-1] > 0).sum())  # some rows hold several items


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("main_kernel", ["triton", "cuda"])
def test_gpu_fused_index_build(main_kernel):
    """The fused inverse-index build (fused_build=True) through run(), at M3's shapes, against
    the float32 reference."""
    block, d, k, hq, hkv = 128, 128, 16, 64, 4
    tensors, gen = make_batch([6000, 700], [1024, 700], block, hq, hkv, d, seed=14)
    q, kc, vc, pt, cu_q, prefix, seq = tensors
    ids = realistic_topk(gen, pt, cu_q, prefix, seq, block, hkv, k)
    out, _ = run_wrapper("block_major", tensors, ids, block, k, main_kernel=main_kernel,
                         fused_build=True)  # fmt: skip
    check(out, ref.ref_sparse_attention(q, kc, vc, pt, cu_q, prefix, seq, ids, 1 / math.sqrt(d)))
