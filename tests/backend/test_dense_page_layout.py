"""The dense layers' host-side page layout (DenseFlashInfer.plan's kv_indptr, last page lengths
and page-table positions), against a per-request loop. CPU only: no FlashInfer needed."""

from __future__ import annotations

import random

import pytest
import torch

from m3serve.backend.dense_flashinfer import page_layout


def loop_layout(seq_lens, page_size, cols):
    flat, indptr, last = [], [0], []
    for r, n in enumerate(seq_lens):
        pages = -(-n // page_size)
        flat += [r * cols + j for j in range(pages)]
        indptr.append(indptr[-1] + pages)
        last.append(n - (pages - 1) * page_size if pages else 0)
    return flat, indptr, last


@pytest.mark.parametrize("page_size", [1, 16, 128])
def test_page_layout_matches_a_loop(page_size):
    rng = random.Random(page_size)
    for batch in (1, 2, 7, 64):
        cols = 40
        lens = [rng.choice([0, 1, page_size, page_size + 1, rng.randint(0, cols * page_size)])
                for _ in range(batch)]  # fmt: skip
        flat, indptr, last = page_layout(lens, page_size, cols)
        want_flat, want_indptr, want_last = loop_layout(lens, page_size, cols)
        assert flat.dtype == torch.int64 and indptr.dtype == last.dtype == torch.int32
        assert flat.tolist() == want_flat, (lens, page_size)
        assert indptr.tolist() == want_indptr
        assert last.tolist() == want_last
        # every position is inside its request's row of the page table
        rows = flat // cols
        assert torch.equal(rows, torch.repeat_interleave(torch.arange(batch), indptr.diff().long()))


def test_page_layout_names_its_constraints():
    with pytest.raises(AssertionError, match="more than the page table's 3 pages"):
        page_layout([4 * 128], 128, 3)
    with pytest.raises(AssertionError, match=">= 0"):
        page_layout([-1], 128, 3)
    flat, indptr, last = page_layout([], 128, 3)
    assert flat.numel() == 0 and indptr.tolist() == [0] and last.numel() == 0
