"""MSA paged sparse decode: row layout, kv_indices rewrite, split-KV kernel, FlashInfer wrapper.

CPU: the row mapping (one row per (query, KV head) on the one-head view, last_page_len as the
causal limit) is checked by a torch emulation of FlashInfer's paged decode against the oracle
(reference.ref_sparse_attention); the Triton kernels run under TRITON_INTERPRET=1 at small sizes.
GPU: both backends eager vs the oracle, odd lengths, Q > 1, and CUDA-graph replay vs eager.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():  # before the kernels are imported: triton.jit reads it then
    os.environ.setdefault("TRITON_INTERPRET", "1")

from m3serve.kernels.msa.sparse_decode import SparseDecodeWrapper, sparse_decode_attention
from m3serve.kernels.msa.sparse_decode_indices import (
    decode_row_layout,
    ref_rewrite_kv_indices,
    rewrite_kv_indices,
)
from m3serve.kernels.msa.sparse_decode_split import (
    SPLIT_CONFIGS,
    default_split_config,
    sparse_decode_split,
)

from .decode_cases import make_case, oracle

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def emulate_flashinfer_decode(q_rows, k_view, v_view, indptr, indices, last, sm_scale):
    """What FlashInfer's paged decode computes per row: softmax over the row's pages, the last
    page cut to last_page_len tokens (torch, float32)."""
    out = torch.empty(q_rows.shape, dtype=torch.float32)
    for r in range(q_rows.shape[0]):
        pages = indices[int(indptr[r]) : int(indptr[r + 1])].long()
        keys = k_view[pages, 0].flatten(0, 1).float()
        vals = v_view[pages, 0].flatten(0, 1).float()
        n = (len(pages) - 1) * k_view.shape[2] + int(last[r])
        s = q_rows[r].float() @ keys[:n].T * sm_scale
        out[r] = torch.softmax(s, -1) @ vals[:n]
    return out


CASES = [  # seq_lens, Q, H_kv, group, D, block, topk
    ([1, 17, 16, 33], 1, 2, 4, 32, 16, 4),
    ([127, 129, 333], 1, 2, 4, 32, 16, 4),
    ([16, 50, 111], 3, 2, 2, 32, 16, 4),
    ([1111, 64], 4, 1, 4, 64, 32, 8),
]


def test_row_layout_matches_definition():
    indptr, last, pages = decode_row_layout([2, 128, 129, 5000], 2, 4, 128, 16)
    assert indptr.dtype == torch.int32 and indptr.numel() == 4 * 2 * 4 + 1
    # request 1 (seq 128, Q 2): positions 126, 127 → one page, fills 127 and 128
    assert pages.view(4, 2, 4)[1].tolist() == [[1] * 4, [1] * 4]
    assert last.view(4, 2, 4)[1].tolist() == [[127] * 4, [128] * 4]
    # request 2 (seq 129): position 128 opens block 1 with one token
    assert (
        pages.view(4, 2, 4)[2, 1].tolist() == [2] * 4
        and last.view(4, 2, 4)[2, 1].tolist() == [1] * 4
    )
    assert pages.view(4, 2, 4)[3].max() == 16
    assert torch.equal(indptr[1:] - indptr[:-1], pages)
    assert pages.view(4, 2, 4)[0].tolist() == [[1] * 4] * 2 and last.view(4, 2, 4)[
        0, :, 0
    ].tolist() == [1, 2]
    with pytest.raises(AssertionError):
        decode_row_layout([1], 2, 1, 128, 16)


@pytest.mark.parametrize("case", CASES)
def test_row_mapping_reproduces_sparse_attention(case):
    """The FlashInfer mapping (rows, one-head view, rewritten kv_indices, last_page_len) is exact."""
    seq_lens, qn, hkv, group, d, block, topk = case
    q, k, v, pt, sel, seq = make_case(seq_lens, qn, hkv, group, d, block, topk)
    indptr, last, _ = decode_row_layout(seq, qn, hkv, block, topk)
    indices = torch.full((int(indptr[-1]) + 3,), -7, dtype=torch.int32)
    ref_rewrite_kv_indices(sel, pt, indptr, qn, indices)
    assert (indices[: int(indptr[-1])] >= 0).all() and (indices[int(indptr[-1]) :] == -7).all()
    k_view = k.reshape(-1, 1, block, d)
    v_view = v.reshape(-1, 1, block, d)
    scale = 1 / math.sqrt(d)
    rows = emulate_flashinfer_decode(
        q.view(-1, group, d), k_view, v_view, indptr, indices, last, scale
    )
    want = oracle(q, k, v, pt, sel, seq, qn, scale)
    torch.testing.assert_close(rows.view_as(want), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES[:3])
def test_rewrite_kernel_matches_reference(case):
    seq_lens, qn, hkv, _group, _d, block, topk = case
    _q, _k, _v, pt, sel, seq = make_case(seq_lens, qn, hkv, 1, 16, block, topk, seed=3)
    indptr, _last, _ = decode_row_layout(seq, qn, hkv, block, topk)
    if torch.cuda.is_available():  # compiled kernel on GPU, interpreter on CPU
        pt, sel, indptr = pt.cuda(), sel.cuda(), indptr.cuda()
    want = ref_rewrite_kv_indices(
        sel, pt, indptr, qn, torch.full((sel.numel(),), -9, dtype=torch.int32)
    )
    got = rewrite_kv_indices(
        sel, pt, indptr, qn, torch.full((sel.numel(),), -9, dtype=torch.int32, device=sel.device)
    )
    assert torch.equal(got.cpu(), want.cpu())


@pytest.mark.parametrize(
    "num_splits,config,topk",
    [
        (1, "n64s2", 4), (3, "n64s2", 4), (3, "n64s2f", 4), (8, "n64s3f-w1", 8),
        (3, "n64s2u", 4), (8, "n64s3u-w1", 8), (16, "n64s2u", 16),
    ],
)  # fmt: skip
def test_split_kernel(num_splits, config, topk):
    """Interpreter on CPU (float32), compiled on GPU (bf16); block 128 so n64 walks 2 sub-tiles.
    8 splits of topk 8 leave some rows' splits empty (fewer pages than splits); the unrolled
    merge at 3 splits (one partial step of 3) and at 16 (two steps of 8)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype, tol = (torch.bfloat16, 2e-2) if dev == "cuda" else (torch.float32, 2e-5)
    seq_lens, qn, hkv, group, d, block = [2, 300, 700, 1200], 2, 2, 4, 32, 128
    q, k, v, pt, sel, seq = make_case(
        seq_lens, qn, hkv, group, d, block, topk, seed=5, dtype=dtype, device=dev
    )
    rows = q.shape[0] * hkv
    o_part = torch.full((num_splits * rows * group * d,), float("nan"), device=dev)
    lse_part = torch.full((num_splits * rows * group,), float("nan"), device=dev)
    out = torch.full_like(q, float("nan"))
    scale = 0.7 / math.sqrt(d)
    counters = torch.zeros(rows, dtype=torch.int32, device=dev)
    want = oracle(q, k, v, pt, sel, seq, qn, scale)
    for _ in range(1 if SPLIT_CONFIGS[config].merge == "kernel" else 2):  # tickets back to zero
        sparse_decode_split(
            q, k, v, pt, sel, seq, qn, scale, num_splits, o_part, lse_part, out, config, counters
        )
        torch.testing.assert_close(out.float().cpu(), want, atol=tol, rtol=tol)
        assert not counters.any()


@pytest.mark.parametrize("qn", [1, 3])
def test_wrapper_split_backend_cpu(qn):
    """plan/run through the wrapper (split backend, the default config for its row count)."""
    if torch.cuda.is_available():
        pytest.skip("the GPU tests cover the wrapper there")
    seq_lens, hkv, group, d, block, topk = [3, 200, 513], 2, 2, 16, 64, 4
    q, k, v, pt, sel, seq = make_case(seq_lens, qn, hkv, group, d, block, topk, seed=11)
    w = SparseDecodeWrapper("cpu", backend="triton")
    w.plan(seq, qn, hkv * group, hkv, d, block, topk)
    assert w.planned_backend == "triton"
    assert w._split_config() == default_split_config(len(seq_lens) * qn * hkv)
    assert default_split_config(32) == "n64s2" and default_split_config(128) == "n64s3u-w2"
    out = w.run(q, k, v, pt, sel, 0.3)
    torch.testing.assert_close(out, oracle(q, k, v, pt, sel, seq, qn, 0.3), atol=2e-5, rtol=2e-5)


def test_flashinfer_workspace_covers_graph_reservation():
    """FlashInfer 0.6.18 reserved a 134 MB tmp_v + 1 MB tmp_s at 512 rows on H200 (132 SMs)."""
    w = SparseDecodeWrapper("cpu", backend="flashinfer")
    w._num_sms = 132
    assert w._fi_workspace_bytes(512, 16, 128) >= 16 * 1023 * 16 * (128 + 1) * 4
    assert w._fi_workspace_bytes(4096, 16, 128) >= 16 * 4096 * 16 * (128 + 1) * 4


def test_cpu_fallback_is_reference():
    seq_lens, qn, hkv, group, d, block, topk = [5, 300], 2, 2, 2, 16, 16, 4
    q, k, v, pt, sel, seq = make_case(seq_lens, qn, hkv, group, d, block, topk, seed=7)
    got = sparse_decode_attention(q, k, v, pt, seq, qn, sel, 0.25)
    torch.testing.assert_close(got, oracle(q, k, v, pt, sel, seq, qn, 0.25))


# -- GPU --------------------------------------------------------------------------------------

GPU_CASES = [  # seq_lens, Q, H_kv, group, D, block, topk  (M3: H_kv 4, group 16, D 128, 128, 16)
    ([1, 127, 128, 129, 333, 1111, 2048, 2049, 5000], 1, 4, 16, 128, 128, 16),
    ([16, 129, 4097, 20000], 4, 4, 16, 128, 128, 16),
    ([300, 2100], 16, 4, 16, 128, 128, 16),
    ([77] * 3 + [50_000], 1, 4, 16, 128, 128, 16),
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    "backend,config",
    [("flashinfer", "n64s2"), *(("triton", c) for c in SPLIT_CONFIGS)],
)
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_eager_matches_reference(case, backend, config):
    seq_lens, qn, hkv, group, d, block, topk = case
    q, k, v, pt, sel, seq = make_case(
        seq_lens, qn, hkv, group, d, block, topk, dtype=torch.bfloat16, device="cuda"
    )
    scale = 1 / math.sqrt(d)
    w = SparseDecodeWrapper("cuda", backend=backend, split_config=config)
    w.plan(seq.cpu(), qn, hkv * group, hkv, d, block, topk)
    out = torch.full_like(q, float("nan"))
    w.run(q, k, v, pt, sel, scale, out=out)
    torch.testing.assert_close(
        out.float().cpu(), oracle(q, k, v, pt, sel, seq, qn, scale), atol=2e-2, rtol=2e-2
    )
    # a different sm_scale goes through FlashInfer's k_scale
    out2 = w.run(q, k, v, pt, sel, 0.5 * scale)
    torch.testing.assert_close(
        out2.float().cpu(), oracle(q, k, v, pt, sel, seq, qn, 0.5 * scale), atol=2e-2, rtol=2e-2
    )


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(
    "backend,config", [("flashinfer", "n64s2"), ("triton", "n64s2"), ("triton", "n64s2f")]
)
def test_gpu_cuda_graph_replay_matches_eager(backend, config):
    """Capture plan-free run() of 2 layers; re-plan with new lengths and selections; replay."""
    qn, hkv, group, d, block, topk = 2, 4, 16, 128, 128, 16
    lens_a, lens_b = [130, 999, 4096, 2], [5000, 17, 129, 3000]
    case_a = make_case(
        lens_a, qn, hkv, group, d, block, topk, seed=1, dtype=torch.bfloat16, device="cuda"
    )
    case_b = make_case(
        lens_b, qn, hkv, group, d, block, topk, seed=2, dtype=torch.bfloat16, device="cuda"
    )
    q, k, v, pt, sel, _ = (x.clone() for x in case_a)
    pt = torch.zeros(4, 64, dtype=torch.int32, device="cuda")
    k = torch.randn(200, hkv, block, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)

    def load(case):
        cq, ck, cv, cpt, csel, cseq = case
        q.copy_(cq)
        k[: ck.shape[0]].copy_(ck)
        v[: cv.shape[0]].copy_(cv)
        pt.zero_()
        pt[:, : cpt.shape[1]].copy_(cpt.clamp(max=ck.shape[0] - 1))
        sel.copy_(csel)
        return cseq.cpu()

    scale = 1 / math.sqrt(d)
    w = SparseDecodeWrapper("cuda", backend=backend, max_rows=4 * qn * hkv, split_config=config)
    out = torch.empty_like(q)
    out2 = torch.empty_like(q)

    def step():
        w.run(q, k, v, pt, sel, scale, out=out)
        w.run(out, k, v, pt, sel, scale, out=out2)  # a second "layer" reading the first's output

    w.plan(load(case_a), qn, hkv * group, hkv, d, block, topk)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up: JIT and autotune outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for case in (case_b, case_a):
        w.plan(load(case), qn, hkv * group, hkv, d, block, topk)
        out.fill_(float("nan"))
        out2.fill_(float("nan"))
        graph.replay()
        got = out2.clone()
        step()
        assert torch.equal(got, out2), "graph replay differs from eager"
        _, ck, cv, cpt, csel, cseq = case
        want = oracle(out, ck, cv, cpt, csel, cseq, qn, scale)
        torch.testing.assert_close(got.float().cpu(), want, atol=2e-2, rtol=2e-2)


def test_row_layout_python_path_equals_torch_path(monkeypatch):
    """Small batches take the plain-Python layout (host time per decode step), larger ones the
    vectorised torch one: both give the same tensors."""
    import m3serve.kernels.msa.sparse_decode_indices as sdi

    g = torch.Generator().manual_seed(3)
    for _ in range(30):
        qn = int(torch.randint(1, 17, (1,), generator=g))
        b = int(torch.randint(1, 40, (1,), generator=g))
        seq = (torch.randint(0, 300_000, (b,), generator=g) + qn).tolist()
        args = (
            int(torch.randint(1, 9, (1,), generator=g)),
            128,
            int(torch.randint(1, 33, (1,), generator=g)),
        )
        py = sdi.decode_row_layout(seq, qn, *args)
        monkeypatch.setattr(sdi, "_PY_ROWS", 0)
        vec = sdi.decode_row_layout(torch.tensor(seq), qn, *args)
        monkeypatch.setattr(sdi, "_PY_ROWS", 4096)
        for a, v in zip(py, vec, strict=True):
            assert a.dtype == v.dtype == torch.int32 and torch.equal(a, v)
    with pytest.raises(AssertionError):
        sdi.decode_row_layout([3, 1], 2, 1, 128, 16)
