"""m3serve.argv: flag values in both spellings, in order; presence with or without a value."""

from __future__ import annotations

from m3serve.argv import argv_has, argv_values


def test_values_in_both_spellings_in_order() -> None:
    argv = ["--tp", "2", "--device=cpu", "--tp-size=4", "--x", "--tp"]
    assert argv_values(argv, "--tp-size", "--tp") == ["2", "4"]  # a trailing bare flag: no value
    assert argv_values(argv, "--device") == ["cpu"]
    assert argv_values(argv, "--missing") == []


def test_presence() -> None:
    assert argv_has(["--a", "--cuda-graph-backend-decode=disabled"], "--cuda-graph-backend-decode")
    assert argv_has(["--flag"], "--flag")
    assert not argv_has(["--flag-more", "v"], "--flag")
