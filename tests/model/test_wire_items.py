"""The worker accepts exactly the valid wire vectors and rejects each invalid one by its code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from m3serve.processor.wire import WireFormatError, parse_items

VECTORS = sorted((Path(__file__).parents[1] / "wire_vectors").glob("*_*.json"))


def _fnv1a64(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def _shm_files(items: list, tmp: Path) -> list:
    """Valid shm vectors name a file the gateway would have written: write it (values as inline)."""
    for item in items:
        shm = item.get("shm") if isinstance(item, dict) else None
        if (
            shm
            and isinstance(shm.get("nbytes"), int)
            and Path(shm["path"]).parent == Path("/dev/shm")
        ):
            rows = shm["nbytes"] // 2
            vals = ((torch.arange(rows) % 251) - 125).float() / 64
            Path(shm["path"]).write_bytes(
                vals.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
            )
    return items


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_wire_vector(path: Path, tmp_path: Path) -> None:
    vec = json.loads(path.read_text())
    req, expect = vec["request"], vec["expect"]
    items = req["image_data"]
    written = [i["shm"]["path"] for i in items if isinstance(i, dict) and "shm" in i]
    try:
        if expect["valid"]:
            _shm_files(items, tmp_path)
            images = parse_items(items, req["input_ids"], vec["image_token_id"])
            assert len(images) == len(items)
            for k, (img, exp) in enumerate(zip(images, expect.get("images", []), strict=False)):
                assert list(img.grid_thw) == exp["grid_thw"]
                bits = img.pixel_values.view(torch.int16).flatten().to(torch.int32) & 0xFFFF
                assert bits[:8].tolist() == exp["first8"] and bits[-8:].tolist() == exp["last8"]
                if "data" in items[k]:
                    raw = img.pixel_values.view(torch.int16).numpy().tobytes()
                    assert _fnv1a64(raw) == exp["fnv1a64"]
        else:
            with pytest.raises(WireFormatError) as err:
                parse_items(items, req["input_ids"], vec["image_token_id"])
            assert err.value.code == expect["error"], str(err.value)
    finally:
        if expect["valid"]:
            for p in written:
                Path(p).unlink(missing_ok=True)
