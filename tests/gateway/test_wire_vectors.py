"""The shared wire-format vectors (tests/wire_vectors/) checked from Python.

A small reference receiver for ``m3serve.patches.v1`` and ``v2`` (docs/wire-format.md): the
worker-side processor must accept and reject exactly what this does, with the same codes. Decoded
images are ``[N, 1176]`` rows (v2's single frame repeated for T = 2).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from pathlib import Path
from typing import Any

import pytest

VECTORS = Path(__file__).resolve().parents[1] / "wire_vectors"
FIELDS = {"format", "dtype", "shape", "grid_thw", "hash", "offset", "length", "data", "shm"}
REQUIRED = FIELDS - {"data", "shm"}
HASH_RE = re.compile(r"^[A-Za-z0-9_:.\-]{1,128}$")
SHM_RE = re.compile(r"^/dev/shm/m3serve-[^/]{1,200}$")


class WireError(ValueError):
    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def _is_uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def check_item(it: Any) -> bytes | None:
    if not isinstance(it, dict) or set(it) - FIELDS or not set(it) >= REQUIRED:
        raise WireError("bad_schema")
    shape, grid = it["shape"], it["grid_thw"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(map(_is_uint, shape))):
        raise WireError("bad_schema")
    if not (isinstance(grid, list) and len(grid) == 3 and all(map(_is_uint, grid))):
        raise WireError("bad_schema")
    if not (_is_uint(it["offset"]) and _is_uint(it["length"]) and isinstance(it["hash"], str)):
        raise WireError("bad_schema")
    cols = {"m3serve.patches.v1": 1176, "m3serve.patches.v2": 588}.get(it["format"])
    if cols is None:
        raise WireError("bad_format")
    if it["dtype"] != "bfloat16":
        raise WireError("bad_dtype")
    t, h, w = grid
    if t != 1 or h < 2 or w < 2 or h % 2 or w % 2:
        raise WireError("bad_grid")
    rows = h * w
    if shape != [rows, cols] or rows > 131072:
        raise WireError("bad_shape")
    if it["length"] != rows // 4:
        raise WireError("bad_length")
    if not HASH_RE.match(it["hash"]):
        raise WireError("bad_hash")
    nbytes = rows * cols * 2
    has_data, has_shm = "data" in it, "shm" in it
    if has_data == has_shm:
        raise WireError("no_payload")
    if has_shm:
        shm = it["shm"]
        if not (isinstance(shm, dict) and set(shm) == {"path", "nbytes"}):
            raise WireError("bad_schema")
        if not (isinstance(shm["path"], str) and SHM_RE.match(shm["path"])) or ".." in shm["path"]:
            raise WireError("bad_shm")
        if shm["nbytes"] != nbytes:
            raise WireError("bad_shm")
        return None
    data = it["data"]
    if not isinstance(data, str):
        raise WireError("bad_schema")
    if len(data) != -(-nbytes // 3) * 4:
        raise WireError("bad_data")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise WireError("bad_data") from None
    if len(raw) != nbytes:
        raise WireError("bad_data")
    if cols == 588:  # v2: each channel's 196 values (392 bytes) twice
        raw = b"".join(raw[o : o + 392] * 2 for o in range(0, len(raw), 392))
    return raw


def check_request(input_ids: list[int], items: Any, image_token_id: int) -> list[bytes]:
    if not isinstance(items, list):
        raise WireError("bad_schema")
    decoded = [check_item(it) for it in items]
    end = 0
    for it in items:
        if it["offset"] < end:
            raise WireError("bad_offset")
        stop = it["offset"] + it["length"]
        if stop > len(input_ids) or any(t != image_token_id for t in input_ids[it["offset"]:stop]):
            raise WireError("bad_offset")
        end = stop
    if sum(t == image_token_id for t in input_ids) != sum(it["length"] for it in items):
        raise WireError("bad_offset")
    return [d for d in decoded if d is not None]


def fnv1a64(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def _vectors() -> list[Path]:
    return sorted(VECTORS.glob("*valid_*.json"))


def test_there_are_vectors() -> None:
    names = [p.name for p in _vectors()]
    assert sum(n.startswith("valid_") for n in names) >= 3
    assert sum(n.startswith("invalid_") for n in names) >= 20


@pytest.mark.parametrize("path", _vectors(), ids=lambda p: p.stem)
def test_vector(path: Path) -> None:
    v = json.loads(path.read_text())
    assert v["wire_format"] in ("m3serve.patches.v1", "m3serve.patches.v2")
    req = v["request"]
    if v["expect"]["valid"]:
        decoded = check_request(req["input_ids"], req["image_data"], v["image_token_id"])
        for raw, want in zip(decoded, v["expect"].get("images", []), strict=False):
            assert fnv1a64(raw) == want["fnv1a64"]
            first8 = [int.from_bytes(raw[i : i + 2], "little") for i in range(0, 16, 2)]
            assert first8 == want["first8"]
    else:
        with pytest.raises(WireError) as exc:
            check_request(req["input_ids"], req["image_data"], v["image_token_id"])
        assert exc.value.code == v["expect"]["error"]


def test_schema_file_is_json() -> None:
    schema = json.loads((VECTORS / "schema.v1.json").read_text())
    assert set(schema["properties"]) == FIELDS
