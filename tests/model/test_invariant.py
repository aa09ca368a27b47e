"""The TP-invariant mode's building blocks (m3serve.models.invariant): the switch, the shard
layouts a TP-2 rank would hold, and float32 partial GEMMs."""

from __future__ import annotations

import pytest
import torch

from m3serve.models import invariant as inv


def test_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(inv.ENV, raising=False)
    assert inv.invariant_shards() == 0 and inv.local_shards(1) == 1 and inv.local_shards(4) == 1
    assert inv.rank_shards(1) == 0 and inv.rank_shards(4) == 0
    for on in ("2", "on", "true"):
        monkeypatch.setenv(inv.ENV, on)
        assert inv.invariant_shards() == 2
        assert (inv.local_shards(1), inv.local_shards(2)) == (2, 1)
        assert (inv.rank_shards(1), inv.rank_shards(2)) == (2, 1)
    with pytest.raises(ValueError, match="use TP 1 or TP 2"):
        inv.local_shards(4)
    monkeypatch.setenv(inv.ENV, "4")
    with pytest.raises(ValueError, match="exactly 2 shards"):
        inv.invariant_shards()


def test_shard_rows_are_the_rank_slices() -> None:
    """Packed q | k | v rows: shard j = the j-th half of each segment, in order."""
    q, k, v = (torch.randn(n, 6) for n in (8, 4, 4))
    shards = inv.shard_rows(torch.cat([q, k, v]), [8, 4, 4], 2)
    assert shards.shape == (2, 8, 6) and shards.is_contiguous()
    for j in range(2):
        want = torch.cat([q[4 * j : 4 * j + 4], k[2 * j : 2 * j + 2], v[2 * j : 2 * j + 2]])
        assert torch.equal(shards[j], want)
    with pytest.raises(AssertionError, match="does not split"):
        inv.shard_rows(torch.randn(7, 2), [7], 2)


def test_shard_cols_sum_to_the_whole_product() -> None:
    w, x = torch.randn(5, 12, dtype=torch.float64), torch.randn(3, 12, dtype=torch.float64)
    shards = inv.shard_cols(w, 2)
    assert shards.shape == (2, 5, 6) and torch.equal(shards[1], w[:, 6:])
    parts = [x[:, 6 * j : 6 * j + 6] @ shards[j].T for j in range(2)]
    torch.testing.assert_close(parts[0] + parts[1], x @ w.T)


def test_mm_f32_keeps_float32() -> None:
    x, w = torch.randn(4, 32).bfloat16(), torch.randn(8, 32).bfloat16()
    out = inv.mm_f32(x, w)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, x.float() @ w.float().T)
