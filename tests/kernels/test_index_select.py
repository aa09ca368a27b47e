"""MSA block selection (index scoring + block max + top-k), prefill and decode, vs the reference.

CPU: the Triton kernels run under TRITON_INTERPRET=1 on seeded random paged batches: lengths 1,
127, 128, 129, 333, 1111, 4099, fewer blocks than k, chunked-prefill offsets, mixed batches,
Q = 1..16, all-equal scores, bf16 and FP8 (+ per-token scale) keys. The kernels rank exactly, but
their dot products sum in another order than the float32 einsum of the reference, so a near-tie
may swap: results must equal the reference or pass DESIGN.md's tolerance gate with a float-rounding
tolerance (the gate itself is tested below). GPU: 32K–1M contexts, poisoned outputs, CUDA graphs.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before the kernels are imported: triton.jit reads it then
    os.environ.setdefault("TRITON_INTERPRET", "1")

from m3serve.kernels.msa import reference as ref
from m3serve.kernels.msa.index_select import (
    DecodeSelectWorkspace,
    decode_blocks_per_program,
    prefill_block_scores,
    score_blocks_decode,
    select_blocks_decode,
    select_blocks_prefill,
)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
LENGTHS = [1, 127, 128, 129, 333, 1111, 4099]
TOL = 1e-3  # float32 accumulation-order rounding on scores of magnitude ~10


def make_paged_index_cache(
    seq_lens: list[int], block: int, d: int, gen: torch.Generator, fp8: bool, spare: int = 3
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Random index-K cache on shuffled pages (+ spare pages never referenced)."""
    pages_per = [(n + block - 1) // block for n in seq_lens]
    num_pages = sum(pages_per) + spare
    perm = torch.randperm(num_pages, generator=gen).to(torch.int32)
    page_table = torch.zeros(len(seq_lens), max(max(pages_per), 1), dtype=torch.int32)
    at = 0
    for r, p in enumerate(pages_per):
        page_table[r, :p] = perm[at : at + p]
        at += p
    keys = torch.randn(num_pages * block, d, generator=gen)
    if fp8:
        q, s = ref.quantize_index_k_fp8(keys)
        return q.view(num_pages, block, d), s.view(num_pages, block), page_table
    return keys.to(torch.bfloat16).view(num_pages, block, d), None, page_table


def reference_rows(
    index_q: torch.Tensor,
    cache: torch.Tensor,
    scale: torch.Tensor | None,
    page_table: torch.Tensor,
    cu_q: torch.Tensor,
    prefix_lens: torch.Tensor,
    seq_lens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference block scores [G, T, nb_max] (−inf padded) and local blocks [T] of a batch."""
    block = cache.shape[1]
    total_q, groups, _ = index_q.shape
    keys_all = ref.dequant_index_k(cache, scale)
    nb_max = max(1, (int(seq_lens.max()) + block - 1) // block)
    scores = torch.full((groups, total_q, nb_max), float("-inf"), device=index_q.device)
    local = torch.zeros(total_q, dtype=torch.long, device=index_q.device)
    cu = cu_q.tolist()
    for r in range(len(cu) - 1):
        q0, q1 = cu[r], cu[r + 1]
        if q1 == q0:
            continue
        n = int(seq_lens[r])
        keys = ref.gather_request_tokens(keys_all, page_table[r], n)
        pos = int(prefix_lens[r]) + torch.arange(q1 - q0, device=index_q.device)
        s = ref.ref_block_scores(index_q[q0:q1].float(), keys, pos, block)
        scores[:, q0:q1, : s.shape[-1]] = s
        local[q0:q1] = pos // block
    return scores, local


def gate_violations(
    ids: torch.Tensor, scores: torch.Tensor, local: torch.Tensor, topk: int, tol: float
) -> list[str]:
    """DESIGN.md's tolerance gate for a fast selection against exact block scores.

    ids [R, k] int32, scores [R, nb] float, local [R]. Exact where it must be: the forced local
    block in the last slot and the dense (≤ k visible) rows. Ranked slots: distinct earlier blocks,
    scores non-increasing within ``tol``, and every earlier block scoring above the (k−1)-th
    selected score + ``tol`` selected. Returns a description of each violation (empty: passes).
    """
    bad: list[str] = []
    ids = ids.cpu().long()
    scores = scores.cpu().double()
    local = local.cpu().long()
    slots = torch.arange(topk)
    for r in range(ids.shape[0]):
        loc = int(local[r])
        row = ids[r]
        if loc + 1 <= topk:
            want = torch.where(slots <= loc, slots, torch.full_like(slots, -1))
            if not torch.equal(row, want):
                bad.append(f"row {r}: dense row {row.tolist()} != {want.tolist()}")
            continue
        if int(row[-1]) != loc:
            bad.append(f"row {r}: last slot {int(row[-1])} is not the local block {loc}")
            continue
        ranked = row[:-1]
        if ((ranked < 0) | (ranked >= loc)).any() or ranked.unique().numel() != topk - 1:
            bad.append(f"row {r}: ranked ids {ranked.tolist()} not distinct blocks < {loc}")
            continue
        s = scores[r, ranked]
        if (s[1:] > s[:-1] + tol).any():
            bad.append(f"row {r}: ranked scores increase beyond tol: {s.tolist()}")
        kth = float(s.min())
        earlier = scores[r, :loc]
        must = (earlier > kth + tol).nonzero().flatten()
        missing = set(must.tolist()) - set(ranked.tolist())
        if missing:
            bad.append(f"row {r}: blocks {sorted(missing)} above the k-th score + tol not selected")
    return bad


# -- the tolerance gate itself ----------------------------------------------------------------


def test_gate_accepts_exact_and_tie_swaps_rejects_wrong_selections():
    scores = torch.tensor([[3.0, 1.0, 3.0 + 1e-6, 2.0, 9.0, 0.0, 0.5]])
    local = torch.tensor([6])
    exact = ref.ref_topk_from_scores(scores, local, 4)
    assert exact[0].tolist() == [4, 2, 0, 6]
    assert gate_violations(exact, scores, local, 4, TOL) == []
    # a swap of two scores equal within tol passes; without tol it fails
    swapped = torch.tensor([[4, 0, 2, 6]], dtype=torch.int32)
    assert gate_violations(swapped, scores, local, 4, TOL) == []
    assert gate_violations(swapped, scores, local, 4, 0.0) != []
    # missing a block above the k-th score, local not last, duplicate ids, bad dense row
    assert gate_violations(torch.tensor([[4, 0, 3, 6]], dtype=torch.int32), scores, local, 4, TOL)
    assert gate_violations(torch.tensor([[6, 4, 0, 2]], dtype=torch.int32), scores, local, 4, TOL)
    assert gate_violations(torch.tensor([[4, 4, 0, 6]], dtype=torch.int32), scores, local, 4, TOL)
    dense_local = torch.tensor([2])
    assert (
        gate_violations(
            torch.tensor([[0, 1, 2, -1]], dtype=torch.int32), scores, dense_local, 4, 0.0
        )
        == []
    )
    assert gate_violations(
        torch.tensor([[2, 1, 0, -1]], dtype=torch.int32), scores, dense_local, 4, 0.0
    )


# -- CPU (interpreter) and GPU fuzz -------------------------------------------------------------


def _check(got, index_q, cache, scale, page_table, cu_q, prefix, seq, topk, tol=TOL, q_fp8=False):
    expect = ref.ref_select_blocks(
        index_q, cache, scale, page_table, cu_q, prefix, seq, topk, q_fp8=q_fp8
    )
    assert got.shape == expect.shape and got.dtype == torch.int32
    if torch.equal(got.cpu(), expect.cpu()):
        return
    if q_fp8:  # the gate ranks the scores of the queries the kernel scored
        index_q = ref.dequant_index_q_fp8(index_q)
    scores, local = reference_rows(index_q, cache, scale, page_table, cu_q, prefix, seq)
    groups = index_q.shape[1]
    bad = gate_violations(got.flatten(0, 1), scores.flatten(0, 1), local.repeat(groups), topk, tol)
    assert not bad, bad[:5]


def _to(dev, *ts):
    return [t.to(dev) if isinstance(t, torch.Tensor) else t for t in ts]


@pytest.mark.parametrize(("topk", "fp8"), [(4, False), (16, False), (16, True)])
def test_prefill_mixed_batch_chunked(topk, fp8):
    gen = torch.Generator().manual_seed(11 + topk + fp8)
    # (seq_len, q_len): fresh prompts, chunked prefill at odd offsets, single tokens
    reqs = [(333, 45), (1111, 20), (4099, 5), (1, 1), (129, 2), (128, 17), (127, 3)]
    seq_lens = [n for n, _ in reqs]
    q_lens = [q for _, q in reqs]
    block, groups, d = 128, 4, 64
    cache, scale, pt = make_paged_index_cache(seq_lens, block, d, gen, fp8)
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    prefix = seq - torch.tensor(q_lens, dtype=torch.int32)
    iq = torch.randn(int(cu_q[-1]), groups, d, generator=gen).to(torch.bfloat16)
    args = _to(DEV, iq, cache, scale, pt, cu_q, prefix, seq)
    got = select_blocks_prefill(*args, topk, k_major=fp8)  # FP8 cases take the other orientation
    _check(got, *args, topk)


def test_decode_torch_path_checks_inputs(monkeypatch):
    """Without Triton (CPU, no interpreter) decode selection is the torch reference, after the
    same input checks as the kernel path; the scores-only entry point needs the kernel."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    gen = torch.Generator().manual_seed(3)
    cache, _, pt = make_paged_index_cache([300, 77], 128, 16, gen, False)
    iq = torch.randn(2, 2, 16, generator=gen).to(torch.bfloat16)
    seq = torch.tensor([300, 77], dtype=torch.int32)
    got = select_blocks_decode(iq, cache, None, pt, seq, 1, 4)
    cu_q = torch.arange(3, dtype=torch.int32)
    _check(got, iq, cache, None, pt, cu_q, seq - 1, seq, 4)
    with pytest.raises(AssertionError, match=r"q_per_req must be in 1\.\.16"):
        select_blocks_decode(iq.repeat(17, 1, 1), cache, None, pt, seq, 17, 4)
    with pytest.raises(AssertionError, match="index_q has 2 rows, expected B·Q = 2·2"):
        select_blocks_decode(iq, cache, None, pt, seq, 2, 4)
    with pytest.raises(AssertionError, match="score_blocks_decode runs the Triton kernel"):
        score_blocks_decode(iq, cache, None, pt, seq, 1, 4)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("q_per_req", [1, 3, 16])
def test_decode_lengths(fp8, q_per_req):
    gen = torch.Generator().manual_seed(7 * q_per_req + fp8)
    seq_lens = [max(n, q_per_req) for n in LENGTHS]
    block, groups, d, topk = 128, 4, 64, 4 if q_per_req == 3 else 16
    cache, scale, pt = make_paged_index_cache(seq_lens, block, d, gen, fp8)
    batch = len(seq_lens)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    iq = torch.randn(batch * q_per_req, groups, d, generator=gen).to(torch.bfloat16)
    iq_, cache_, scale_, pt_, seq_ = _to(DEV, iq, cache, scale, pt, seq)
    out = torch.full((groups, batch * q_per_req, topk), 12345, dtype=torch.int32, device=DEV)
    got = select_blocks_decode(iq_, cache_, scale_, pt_, seq_, q_per_req, topk, out=out)
    assert got.data_ptr() == out.data_ptr()
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=DEV) * q_per_req
    _check(got, iq_, cache_, scale_, pt_, cu_q, seq_ - q_per_req, seq_, topk)


@pytest.mark.parametrize("fp8", [False, True])
def test_decode_both_mma_orientations(fp8):
    gen = torch.Generator().manual_seed(13)
    seq_lens, q_per_req, block, groups, d, topk = [2500, 1111], 4, 128, 4, 64, 8
    cache, scale, pt = make_paged_index_cache(seq_lens, block, d, gen, fp8)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    iq = torch.randn(2 * q_per_req, groups, d, generator=gen).to(torch.bfloat16)
    args = _to(DEV, iq, cache, scale, pt, seq)
    cu_q = torch.arange(3, dtype=torch.int32, device=DEV) * q_per_req
    for k_major in (False, True):
        got = select_blocks_decode(*args, q_per_req, topk, k_major=k_major)
        iq_, cache_, scale_, pt_, seq_ = args
        _check(got, iq_, cache_, scale_, pt_, cu_q, seq_ - q_per_req, seq_, topk)


def test_decode_split_k_chunks_fill_the_slots_once():
    """Balanced chunks: ⌊slots / B⌋ programs per request at most, so the grid never spills into a
    partial second wave, and every program has ≥ 4 blocks; the power-of-two rule is kept too."""
    for sms, waves in ((132, 3), (132, 4), (114, 3), (4, 4)):
        slots = int(waves * sms)
        for batch in (1, 2, 7, 8, 32, 64, 500, 1000):
            for nb in (1, 5, 64, 1000, 1024, 8192):
                per = decode_blocks_per_program(batch, nb, sms, waves)
                progs = batch * -(-nb // per)
                assert per >= 4
                assert progs <= max(slots, batch), (sms, waves, batch, nb, per)
                if batch <= slots and nb >= 4 * (slots // batch):  # enough blocks to fill
                    assert progs > slots // 2, (sms, waves, batch, nb, per)
    assert decode_blocks_per_program(8, 1024, 132, 4, balanced=False) == 16
    assert decode_blocks_per_program(8, 1024, 132, 3) == 21  # 49 programs x 8 = 392 <= 396


@pytest.mark.parametrize("fp8", [False, True])
def test_decode_launch_configs_agree(fp8):
    """``launch=`` (warps, stages, programs per SM) moves the split-K chunk boundaries (and with
    FP8 keys the scale prefetch's last, masked block); every launch gives the reference's ids."""
    gen = torch.Generator().manual_seed(17 + fp8)
    seq_lens, block, groups, d, topk = [5000, 777, 129], 128, 4, 32, 8
    cache, scale, pt = make_paged_index_cache(seq_lens, block, d, gen, fp8)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    iq = torch.randn(len(seq_lens), groups, d, generator=gen).to(torch.bfloat16)
    args = _to(DEV, iq, cache, scale, pt, seq)
    cu_q = torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=DEV)
    iq_, cache_, scale_, pt_, seq_ = args
    for launch in ((4, 3, 4), (4, 5, 1), (8, 2, 8), (4, 5, 3, False), (4, 3, 6, True, 128)):
        got = select_blocks_decode(*args, 1, topk, launch=launch)
        _check(got, iq_, cache_, scale_, pt_, cu_q, seq_ - 1, seq_, topk)


@pytest.mark.parametrize("fp8", [False, True])
def test_decode_page_table_wider_than_the_requests(fp8):
    """A page table (and so a grid) sized for a context limit far above the requests' lengths,
    as a CUDA graph captures it: the kernel cuts each request's visible blocks over the grid's
    programs at run time, and the ids are still the reference's (poisoned pages past the end)."""
    gen = torch.Generator().manual_seed(41 + fp8)
    seq_lens, block, groups, d, topk = [5000, 777, 129, 1], 128, 4, 32, 8
    cache, scale, pt = make_paged_index_cache(seq_lens, block, d, gen, fp8)
    wide = torch.full((len(seq_lens), 16 * pt.shape[1]), 10**6, dtype=torch.int32)
    wide[:, : pt.shape[1]] = pt
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    iq = torch.randn(len(seq_lens), groups, d, generator=gen).to(torch.bfloat16)
    iq_, cache_, scale_, pt_, seq_ = _to(DEV, iq, cache, scale, wide, seq)
    cu_q = torch.arange(len(seq_lens) + 1, dtype=torch.int32, device=DEV)
    got = select_blocks_decode(iq_, cache_, scale_, pt_, seq_, 1, topk, launch=(4, 3, 2))
    _check(got, iq_, cache_, scale_, pt_, cu_q, seq_ - 1, seq_, topk)


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("q_per_req", [1, 4])
def test_decode_fused_topk_equals_separate_launch(fp8, q_per_req):
    """fuse_topk=True (each request's last scoring program ranks its rows, one launch) and the
    separate top-k launch give the same ids, equal to the reference's; the per-request tickets
    are back to 0 after every launch (a CUDA graph replays them), so a second call is exact too.
    Odd lengths: one block, a partial last block, fewer blocks than k, many split-K programs."""
    gen = torch.Generator().manual_seed(29 + fp8 + q_per_req)
    seq_lens = [max(n, q_per_req) for n in (1, 129, 1111, 4099, 333, 9000)]
    block, groups, d, topk = 128, 4, 32, 8
    cache, scale, pt = make_paged_index_cache(seq_lens, block, d, gen, fp8)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    batch = len(seq_lens)
    iq = torch.randn(batch * q_per_req, groups, d, generator=gen).to(torch.bfloat16)
    args = _to(DEV, iq, cache, scale, pt, seq)
    iq_, cache_, scale_, pt_, seq_ = args
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=DEV) * q_per_req
    ws = DecodeSelectWorkspace(batch * q_per_req * groups, pt.shape[1], DEV)
    sep = select_blocks_decode(*args, q_per_req, topk, workspace=ws, fuse_topk=False)
    _check(sep, iq_, cache_, scale_, pt_, cu_q, seq_ - q_per_req, seq_, topk)
    for _ in range(2):
        out = torch.full_like(sep, 12345)
        got = select_blocks_decode(
            *args, q_per_req, topk, out=out, workspace=ws, fuse_topk=True, launch=(4, 2, 8)
        )
        assert torch.equal(got.cpu(), sep.cpu())
        assert int(ws.counters.abs().sum()) == 0


def test_all_equal_scores_pick_lowest_ids():
    # every key identical → every block score identical → ties resolve to the lowest block ids
    block, groups, d, topk = 128, 2, 32, 4
    seq_lens = [1111, 700]
    gen = torch.Generator().manual_seed(3)
    cache, _, pt = make_paged_index_cache(seq_lens, block, d, gen, fp8=False)
    cache[:] = torch.randn(d, generator=gen).to(torch.bfloat16)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    iq = torch.randn(2, groups, d, generator=gen).to(torch.bfloat16)
    got = select_blocks_decode(*_to(DEV, iq, cache, None, pt, seq), 1, topk)
    assert got[:, 0].tolist() == [[0, 1, 2, 8]] * groups
    assert got[:, 1].tolist() == [[0, 1, 2, 5]] * groups
    cu_q = torch.tensor([0, 3, 4], dtype=torch.int32)
    iqp = torch.randn(4, groups, d, generator=gen).to(torch.bfloat16)
    prefix = torch.tensor([1108, 699], dtype=torch.int32)
    got = select_blocks_prefill(*_to(DEV, iqp, cache, None, pt, cu_q, prefix, seq), topk)
    assert got[0].tolist() == [[0, 1, 2, 8]] * 3 + [[0, 1, 2, 5]]


def test_fewer_blocks_than_k_is_dense():
    block, groups, d, topk = 128, 4, 32, 16
    seq_lens = [1, 129, 16 * 128]  # 1, 2 and exactly 16 blocks
    gen = torch.Generator().manual_seed(5)
    cache, _, pt = make_paged_index_cache(seq_lens, block, d, gen, fp8=False)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    iq = torch.randn(3, groups, d, generator=gen).to(torch.bfloat16)
    got = select_blocks_decode(*_to(DEV, iq, cache, None, pt, seq), 1, topk).cpu()
    assert got[:, 0, 0].tolist() == [0] * groups and (got[:, 0, 1:] == -1).all()
    assert got[:, 1, :2].tolist() == [[0, 1]] * groups and (got[:, 1, 2:] == -1).all()
    assert got[:, 2].tolist() == [list(range(16))] * groups


def test_launcher_names_the_failed_constraint():
    iq = torch.zeros(2, 4, 64, dtype=torch.float32)
    cache = torch.zeros(4, 128, 64, dtype=torch.bfloat16)
    pt = torch.zeros(2, 2, dtype=torch.int32)
    seq = torch.ones(2, dtype=torch.int32)
    with pytest.raises(AssertionError, match="index_q must be bf16"):
        select_blocks_decode(iq, cache, None, pt, seq, 1, 16)
    fp8 = cache.to(torch.float8_e4m3fn)
    with pytest.raises(AssertionError, match="per-token scale"):
        select_blocks_decode(iq.bfloat16(), fp8, None, pt, seq, 1, 16)
    with pytest.raises(AssertionError, match="B·Q"):
        select_blocks_decode(iq.bfloat16(), cache, None, pt, seq, 2, 16)


# -- GPU: long contexts, poisoned outputs, CUDA graphs -------------------------------------------


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_decode_long_contexts_and_graph(fp8):
    gen = torch.Generator().manual_seed(21)
    seq_lens = [32768 + 77, 131072, 4099, 2, 262144 - 5]  # ≥ Q = 2
    q_per_req, block, groups, d, topk = 2, 128, 4, 128, 16
    cache, scale, pt = make_paged_index_cache(seq_lens, block, d, gen, fp8)
    batch = len(seq_lens)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    iq = torch.randn(batch * q_per_req, groups, d, generator=gen).to(torch.bfloat16)
    iq, cache, scale, pt, seq = _to("cuda", iq, cache, scale, pt, seq)
    out = torch.full((groups, batch * q_per_req, topk), 12345, dtype=torch.int32, device="cuda")
    ws = DecodeSelectWorkspace(batch * q_per_req * groups, pt.shape[1], "cuda")
    select_blocks_decode(iq, cache, scale, pt, seq, q_per_req, topk, out=out, workspace=ws)
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device="cuda") * q_per_req
    _check(out, iq, cache, scale, pt, cu_q, seq - q_per_req, seq, topk)
    eager = out.clone()
    # CUDA graph: capture once, change the inputs in place, replay
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        select_blocks_decode(iq, cache, scale, pt, seq, q_per_req, topk, out=out, workspace=ws)
    out.fill_(12345)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    iq.copy_(torch.randn(iq.shape, generator=gen).to(torch.bfloat16))
    seq[0] -= 300
    graph.replay()
    torch.cuda.synchronize()
    _check(out, iq, cache, scale, pt, cu_q, seq - q_per_req, seq, topk)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_prefill_chunk_at_32k(fp8):
    gen = torch.Generator().manual_seed(22)
    reqs = [(32768 + 129, 1024), (4099, 4099), (333, 1)]
    seq_lens = [n for n, _ in reqs]
    q_lens = [q for _, q in reqs]
    block, groups, d, topk = 128, 4, 128, 16
    cache, scale, pt = make_paged_index_cache(seq_lens, block, d, gen, fp8)
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    prefix = seq - torch.tensor(q_lens, dtype=torch.int32)
    iq = torch.randn(int(cu_q[-1]), groups, d, generator=gen).to(torch.bfloat16)
    args = _to("cuda", iq, cache, scale, pt, cu_q, prefix, seq)
    for k_major in (False, True):
        out = torch.full((groups, int(cu_q[-1]), topk), 12345, dtype=torch.int32, device="cuda")
        got = select_blocks_prefill(*args, topk, out=out, k_major=k_major)
        _check(got, *args, topk)


# -- opt-in FP8 queries (q_fp8=True: e4m3 × e4m3 scoring against an FP8 key cache) ------------
#
# The kernel quantizes each (token, group) query row exactly as the reference does, and every
# e4m3 × e4m3 product is exact in float32: block scores may differ from the reference's only by
# summation order (and Hopper's FP8 MMA accumulation on GPUs), so they are compared within a
# tight tolerance and the selections exactly, except where reference scores tie within it.

Q8_SCORE_TOL = 1e-4  # block-score error on the reference's 1/sqrt(d) scale (relative above 1)


def _q8_batch(gen, reqs, groups, d, block=128):
    seq_lens = [n for n, _ in reqs]
    q_lens = [q for _, q in reqs]
    cache, scale, pt = make_paged_index_cache(seq_lens, block, d, gen, fp8=True)
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    prefix = seq - torch.tensor(q_lens, dtype=torch.int32)
    iq = torch.randn(int(cu_q[-1]), groups, d, generator=gen)
    iq[0, 0] = 0.0  # an all-zero row: scale 1
    iq[-1, -1] *= 30.0  # a row far from O(1): its own scale
    return iq.to(torch.bfloat16), cache, scale, pt, cu_q, prefix, seq


def _q8_scores_check(scores_k, local_k, iq, cache, scale, pt, cu_q, prefix, seq, tol):
    """Kernel block scores (unscaled, [T·G, nb]) vs the reference's (/sqrt(d)) on the columns the
    kernel writes (blocks before each row's local block)."""
    d = iq.shape[-1]
    groups = iq.shape[1]
    ref_s, ref_local = reference_rows(
        ref.dequant_index_q_fp8(iq), cache, scale, pt, cu_q, prefix, seq
    )
    want = ref_s.transpose(0, 1).flatten(0, 1)  # [T·G, nb] rows t·G + g
    local = ref_local.repeat_interleave(groups)
    assert torch.equal(local_k.long().cpu(), local.cpu())
    nb = min(want.shape[1], scores_k.shape[1])
    cols = torch.arange(nb, device=want.device)
    valid = cols[None, :] < local[:, None].to(want.device)
    got = scores_k[:, :nb].to(want.device).double() / d**0.5
    want = want[:, :nb].double()
    err = ((got - want).abs() / want.abs().clamp(min=1.0))[valid]  # relative above 1
    assert valid.any() and float(err.max()) <= tol, float(err.max())


def test_quantize_index_q_fp8_is_the_key_rule_per_row():
    gen = torch.Generator().manual_seed(31)
    iq = torch.randn(5, 4, 64, generator=gen).to(torch.bfloat16)
    iq[2, 1] = 0.0
    q8, s = ref.quantize_index_q_fp8(iq)
    assert q8.shape == iq.shape and q8.dtype == torch.float8_e4m3fn and s.shape == (5, 4)
    k8, ks = ref.quantize_index_k_fp8(iq.view(20, 64))
    assert torch.equal(q8.view(20, 64).view(torch.uint8), k8.view(torch.uint8))
    assert torch.equal(s.view(20), ks)
    assert float(s[2, 1]) == 1.0 and (q8[2, 1].float() == 0).all()
    deq = ref.dequant_index_q_fp8(iq)
    torch.testing.assert_close(deq, iq.float(), atol=0.0, rtol=0.07)  # e4m3: 3 mantissa bits


@pytest.mark.parametrize("topk", [4, 16])
def test_prefill_q_fp8_matches_reference(topk):
    gen = torch.Generator().manual_seed(41 + topk)
    reqs = [(333, 45), (1111, 20), (4099, 5), (1, 1), (129, 2), (128, 17)]
    batch = _q8_batch(gen, reqs, groups=4, d=64)
    args = _to(DEV, *batch)
    got = select_blocks_prefill(*args, topk, q_fp8=True)
    _check(got, *args, topk, tol=Q8_SCORE_TOL, q_fp8=True)
    scores, local = prefill_block_scores(*args, topk, q_fp8=True)
    _q8_scores_check(scores, local, *args, tol=Q8_SCORE_TOL)


@pytest.mark.parametrize("q_per_req", [1, 3])
def test_decode_q_fp8_matches_reference(q_per_req):
    gen = torch.Generator().manual_seed(43 + q_per_req)
    reqs = [(max(n, q_per_req), q_per_req) for n in LENGTHS]
    iq, cache, scale, pt, cu_q, prefix, seq = _to(DEV, *_q8_batch(gen, reqs, groups=4, d=64))
    topk = 4 if q_per_req == 3 else 16
    batch = pt.shape[0]
    ws = DecodeSelectWorkspace(batch * q_per_req * 4, pt.shape[1], DEV)
    got = select_blocks_decode(iq, cache, scale, pt, seq, q_per_req, topk, workspace=ws, q_fp8=True)
    _check(got, iq, cache, scale, pt, cu_q, prefix, seq, topk, tol=Q8_SCORE_TOL, q_fp8=True)
    rows = batch * q_per_req * 4
    _q8_scores_check(
        ws.scores[:rows], ws.local[:rows], iq, cache, scale, pt, cu_q, prefix, seq, Q8_SCORE_TOL
    )


def test_q_fp8_needs_fp8_keys_and_queries_as_a():
    gen = torch.Generator().manual_seed(47)
    iq, cache, scale, pt, cu_q, prefix, seq = _q8_batch(gen, [(300, 2)], groups=2, d=32)
    bf16 = cache.float().bfloat16()
    with pytest.raises(ValueError, match="float8_e4m3fn index-K cache"):
        select_blocks_prefill(iq, bf16, None, pt, cu_q, prefix, seq, 4, q_fp8=True)
    with pytest.raises(ValueError, match="float8_e4m3fn index-K cache"):
        select_blocks_decode(iq, bf16, None, pt, seq, 2, 4, q_fp8=True)
    with pytest.raises(ValueError, match="queries-as-A"):
        select_blocks_prefill(iq, cache, scale, pt, cu_q, prefix, seq, 4, k_major=True, q_fp8=True)


@gpu
@pytest.mark.gpu
def test_gpu_q_fp8_prefill_and_decode_long_contexts():
    """FP8 queries at 32K–256K: block scores within the tolerance, selections exact or gated."""
    gen = torch.Generator().manual_seed(49)
    # Hopper's FP8 MMA accumulates with fewer than 24 mantissa bits: block scores within 2e-3
    # relative (an H100 run measured 1.08e-3 at most); the selection gate's tolerance is
    # absolute and scores of these rows reach ~4.5, so it gets 2e-3 x 5 (that run also saw an
    # order swap of 1.1e-3 at 3.46)
    tol = 2e-3
    gate_tol = 1e-2
    reqs = [(32768 + 129, 1024), (131072, 64), (4099, 4099), (333, 1)]
    args = _to("cuda", *_q8_batch(gen, reqs, groups=4, d=128))
    topk = 16
    out = torch.full((4, int(args[4][-1]), topk), 12345, dtype=torch.int32, device="cuda")
    got = select_blocks_prefill(*args, topk, out=out, q_fp8=True)
    _check(got, *args, topk, tol=gate_tol, q_fp8=True)
    scores, local = prefill_block_scores(*args, topk, q_fp8=True)
    _q8_scores_check(scores, local, *args, tol=tol)
    # decode, Q = 2, up to 256K
    reqs = [(32768 + 77, 2), (131072, 2), (262144 - 5, 2), (2, 2)]
    iq, cache, scale, pt, cu_q, prefix, seq = _to("cuda", *_q8_batch(gen, reqs, groups=4, d=128))
    ws = DecodeSelectWorkspace(len(reqs) * 2 * 4, pt.shape[1], "cuda")
    got = select_blocks_decode(iq, cache, scale, pt, seq, 2, topk, workspace=ws, q_fp8=True)
    _check(got, iq, cache, scale, pt, cu_q, prefix, seq, topk, tol=gate_tol, q_fp8=True)
    rows = len(reqs) * 2 * 4
    _q8_scores_check(
        ws.scores[:rows], ws.local[:rows], iq, cache, scale, pt, cu_q, prefix, seq, tol
    )
