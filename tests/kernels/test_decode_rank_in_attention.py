"""The decode top-k ranked inside the split-KV attention launch (``sparse_decode_split(scores=)``).

Each (row, split) program ranks the row's block scores itself (the "rounds" rules, cut off after
its own slots) instead of reading a top-k launch's ids. CPU (interpreter, float32) and GPU (bf16):
the ids it writes equal the reference top-k (ties to the lower id, NaN above +inf, −0.0 == +0.0,
dense rows, the local block last), columns at or past a row's local block are never read (NaN
poison there), and the attention equals the same kernel run on those ids, bit for bit, and the
oracle within tolerance; through the wrapper, with scores from the scoring kernel, the step equals
the two-launch step; rows wider than the cap fall back to the top-k launch.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():  # before the kernels are imported: triton.jit reads it then
    os.environ.setdefault("TRITON_INTERPRET", "1")

from m3serve.kernels.msa import reference as ref
from m3serve.kernels.msa import sparse_decode as sd_mod
from m3serve.kernels.msa import sparse_decode_split as split_mod
from m3serve.kernels.msa.index_select import (
    DecodeSelectWorkspace,
    score_blocks_decode,
    select_blocks_decode,
)
from m3serve.kernels.msa.sparse_decode import SparseDecodeWrapper
from m3serve.kernels.msa.sparse_decode_split import (
    RANK_MAX_BLOCKS,
    default_split_config,
    sparse_decode_split,
)

from .decode_cases import make_case, oracle

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def awkward_scores(rows: int, n_cols: int, local: torch.Tensor, seed: int) -> torch.Tensor:
    """Scores with many ties (few distinct values), ±0.0, ±inf and NaN below each row's local
    block, and NaN poison from the local block on (must never be read)."""
    gen = torch.Generator().manual_seed(seed)
    s = torch.randint(-3, 4, (rows, n_cols), generator=gen).float() * 0.5
    s[s == 0.5] = -0.0
    s[0::3, 1] = float("inf")
    s[1::4, 2] = float("-inf")
    s[2::5, 3] = float("nan")
    cols = torch.arange(n_cols)
    s[cols[None, :] >= local[:, None]] = float("nan")
    return s


def row_locals(seq_lens: list[int], qn: int, hkv: int, block: int) -> torch.Tensor:
    """Local block of row t·H_kv + g (query t = b·Q + i sits at seq_lens[b] − Q + i)."""
    loc = [(n - qn + i) // block for n in seq_lens for i in range(qn) for _ in range(hkv)]
    return torch.tensor(loc, dtype=torch.int32)


@pytest.mark.parametrize(
    "num_splits,config,topk,chunk",
    [
        (16, "n64s2", 16, None), (8, "n64s2", 16, None), (3, "n64s2u", 4, None),
        (1, "n64s2f", 4, None), (5, "n64s2", 8, None),
        # rows walked in chunks of 16 / 32 blocks (the set of the earlier chunks' best keys)
        (16, "n64s2", 16, 16), (3, "n64s2u", 4, 16), (4, "n64s2", 8, 32),
    ],
)  # fmt: skip
def test_split_kernel_ranks_scores_exactly(num_splits, config, topk, chunk, monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(split_mod, "RANK_CHUNK", chunk)
    dtype, tol = (torch.bfloat16, 2e-2) if DEV == "cuda" else (torch.float32, 2e-5)
    # lengths give dense rows (≤ k visible blocks), rows at the edge (local + 1 == k) and long ones
    seq_lens, qn, hkv, group, d, block = [2, 300, 1900, 2100, 5000, 9000], 2, 2, 4, 32, 128
    q, k, v, pt, _, seq = make_case(
        seq_lens, qn, hkv, group, d, block, topk, seed=7, dtype=dtype, device=DEV
    )
    rows = q.shape[0] * hkv
    local = row_locals(seq_lens, qn, hkv, block)
    n_cols = pt.shape[1]
    scores = awkward_scores(rows, n_cols, local, seed=num_splits)
    want = ref.ref_topk_from_scores(scores, local, topk)
    want = want.view(q.shape[0], hkv, topk).transpose(0, 1).contiguous()
    o_part = torch.full((num_splits * rows * group * d,), float("nan"), device=DEV)
    lse_part = torch.full((num_splits * rows * group,), float("nan"), device=DEV)
    counters = torch.zeros(rows, dtype=torch.int32, device=DEV)
    scale = 0.6 / math.sqrt(d)
    ids = torch.full((hkv, q.shape[0], topk), -7, dtype=torch.int32, device=DEV)
    out = torch.full_like(q, float("nan"))
    sparse_decode_split(
        q, k, v, pt, ids, seq, qn, scale, num_splits, o_part, lse_part, out, config, counters,
        scores=scores.to(DEV),
    )  # fmt: skip
    assert torch.equal(ids.cpu(), want), "ids ranked in the attention differ from the reference"
    assert not counters.any()
    # the same kernel on those ids (the two-launch form) computes the same output, bit for bit
    out_ids = torch.full_like(q, float("nan"))
    sparse_decode_split(
        q, k, v, pt, want.to(DEV), seq, qn, scale, num_splits, o_part, lse_part, out_ids, config,
        counters,
    )  # fmt: skip
    assert torch.equal(out, out_ids)
    want_out = oracle(q, k, v, pt, want.to(DEV), seq, qn, scale)
    torch.testing.assert_close(out.float().cpu(), want_out, atol=tol, rtol=tol)


def test_split_kernel_rejects_wide_rows_and_bad_scores():
    seq_lens, qn, hkv, group, d, block, topk = [300], 1, 1, 2, 16, 128, 4
    q, k, v, pt, sel, seq = make_case(seq_lens, qn, hkv, group, d, block, topk, device=DEV)
    scratch = torch.empty(64 * 16, device=DEV)
    args = (q, k, v, pt, sel, seq, qn, 0.1, 2, scratch, scratch, torch.empty_like(q))
    wide = torch.zeros(1, RANK_MAX_BLOCKS + 1, device=DEV)  # past 1M tokens
    with pytest.raises(AssertionError, match=f"≤ {RANK_MAX_BLOCKS} blocks"):
        sparse_decode_split(*args, scores=wide)
    with pytest.raises(AssertionError, match="float32"):
        sparse_decode_split(*args, scores=torch.zeros(1, 8, device=DEV, dtype=torch.float16))


class StepCase:
    """One decode step's inputs at small shapes (interpreter-sized on CPU)."""

    def __init__(self, seq_lens, qn, hkv, group, d, block, topk, didx, seed, dtype):
        q, k, v, pt, _, seq = make_case(
            seq_lens, qn, hkv, group, d, block, topk, seed=seed, dtype=dtype, device=DEV
        )
        gen = torch.Generator().manual_seed(seed + 1)
        self.q, self.k, self.v, self.pt, self.seq = q, k, v, pt, seq
        # index queries and keys are bf16 everywhere (tensor-core scoring; float32 dots on CPU)
        bf16 = torch.bfloat16
        self.idx_q = torch.randn(q.shape[0], hkv, didx, generator=gen).to(bf16).to(DEV)
        self.idx_k = torch.randn(k.shape[0], block, didx, generator=gen).to(bf16).to(DEV)
        self.shape = (seq_lens, qn, hkv, group, d, block, topk)
        self.ws = DecodeSelectWorkspace(q.shape[0] * hkv, pt.shape[1], DEV)

    def wrapper(self, backend: str = "triton") -> SparseDecodeWrapper:
        seq_lens, qn, hkv, group, d, block, topk = self.shape
        w = SparseDecodeWrapper(DEV, backend=backend)
        w.plan(seq_lens, qn, hkv * group, hkv, d, block, topk)
        return w

    def ids_buffer(self) -> torch.Tensor:
        _, _, hkv, _, _, _, topk = self.shape
        return torch.full((hkv, self.q.shape[0], topk), -7, dtype=torch.int32, device=DEV)

    def two_launch(self, w: SparseDecodeWrapper, scale: float):
        qn, topk = self.shape[1], self.shape[6]
        ids = select_blocks_decode(
            self.idx_q, self.idx_k, None, self.pt, self.seq, qn, topk, workspace=self.ws,
            fuse_topk=False,
        )  # fmt: skip
        return ids, w.run(self.q, self.k, self.v, self.pt, ids, scale)

    def assert_forms_agree(self, w: SparseDecodeWrapper, scale: float) -> None:
        """The two-launch step and the step with scores handed to the attention: same ids, same
        outputs bit for bit."""
        want_ids, want_out = self.two_launch(w, scale)
        want_out = want_out.clone()
        got_ids, got_out = self.ranked_in_attention(w, scale)
        assert torch.equal(got_ids, want_ids)
        assert torch.equal(got_out, want_out)

    def ranked_in_attention(self, w: SparseDecodeWrapper, scale: float):
        qn, topk = self.shape[1], self.shape[6]
        sc = score_blocks_decode(
            self.idx_q, self.idx_k, None, self.pt, self.seq, qn, topk, workspace=self.ws
        )
        assert sc.scores.shape == (self.q.shape[0] * self.shape[2], self.pt.shape[1])
        ids = self.ids_buffer()
        return ids, w.run(self.q, self.k, self.v, self.pt, ids, scale, scores=sc)


@pytest.mark.parametrize("qn", [1, 2])
def test_wrapper_step_ranked_in_attention_equals_two_launches(qn):
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    case = StepCase([5, 700, 2500, 1300], qn, 2, 4, 32, 128, 8, 32, seed=3, dtype=dtype)
    w = case.wrapper()
    assert w.ranks_in_attention(case.pt.shape[1])
    ranked = SparseDecodeWrapper(DEV, backend="triton", ranked=True)
    assert ranked._split_config(8) == default_split_config(8, ranked=True) != w._split_config(8)
    case.assert_forms_agree(w, 0.2)


def test_wrapper_wide_rows_fall_back_to_the_topk_launch(monkeypatch):
    """Rows past the cap (here lowered to 4 blocks) are ranked by the top-k launch first."""
    dtype = torch.bfloat16 if DEV == "cuda" else torch.float32
    case = StepCase([900, 1500], 1, 2, 4, 32, 128, 4, 32, seed=4, dtype=dtype)
    w = case.wrapper()
    monkeypatch.setattr(sd_mod, "RANK_DEFAULT_MAX_BLOCKS", 4)
    assert not w.ranks_in_attention(case.pt.shape[1])
    case.assert_forms_agree(w, 0.3)


@pytest.mark.gpu
@pytest.mark.skipif(DEV != "cuda", reason="needs a CUDA device (and FlashInfer)")
def test_gpu_flashinfer_backend_ranks_before_its_run():
    pytest.importorskip("flashinfer")
    case = StepCase([700, 2500, 1300], 1, 2, 8, 64, 128, 8, 64, seed=5, dtype=torch.bfloat16)
    w = case.wrapper("flashinfer")
    assert not w.ranks_in_attention(case.pt.shape[1])
    case.assert_forms_agree(w, 0.2)
