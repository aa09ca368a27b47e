"""scripts/gpu/serving_common.physical_gpus: ``--gpus`` ids count within the visible devices.

Session 9's call 4 pinned servers with raw ids in a lane that saw other cards, so two lanes'
servers shared cards; the serving scripts now translate the ids. CPU only."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts" / "gpu"))
from serving_common import physical_gpus


def test_ids_pass_through_without_a_visible_set(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert physical_gpus(["0", "1"]) == ["0", "1"]
    assert physical_gpus([]) == []


def test_ids_count_within_the_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert physical_gpus(["0", "1"]) == ["2", "3"]
    assert physical_gpus(["1"]) == ["3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa, GPU-bbbb")
    assert physical_gpus(["1", "0"]) == ["GPU-bbbb", "GPU-aaaa"]


def test_an_id_past_the_visible_devices_is_refused(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with pytest.raises(SystemExit, match="only 2 devices are visible"):
        physical_gpus(["2"])
