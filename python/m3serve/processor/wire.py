"""Worker side of the gateway → worker wire format (docs/wire-format.md): ``m3serve.patches.v2``
(one temporal frame per row, ``[N, 588]``, what the gateway sends) and ``v1`` (``[N, 1176]``).

``parse_items`` validates every item and its placement in ``input_ids`` before any payload is
decoded, then decodes the bf16 patches (inline base64 or a shared-memory file). Every rejection is
a ``WireFormatError`` (a ValueError, which SGLang answers with HTTP 400) carrying the error code
the shared test vectors name.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

FORMAT = "m3serve.patches.v1"
FORMAT_V2 = "m3serve.patches.v2"
PATCH_DIM = 1176  # 3 channels × 2 frames × 14 × 14
FRAME_DIM = 588  # v2 rows: 3 channels × 14 × 14 (the two frames of a still image are equal)
_COLS = {FORMAT: PATCH_DIM, FORMAT_V2: FRAME_DIM}
MAX_ROWS = 131_072
MERGE = 2
_FIELDS = {"format", "dtype", "shape", "grid_thw", "hash", "offset", "length", "data", "shm"}
_REQUIRED = _FIELDS - {"data", "shm"}
_HASH = re.compile(r"^[A-Za-z0-9_:.\-]{1,128}$")
_SHM = re.compile(r"^/dev/shm/m3serve-[^/]+$")


class WireFormatError(ValueError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"image_data: {code}: {message}")
        self.code = code


@dataclass(frozen=True)
class WireImage:
    pixel_values: torch.Tensor  # [N, 1176] bfloat16
    grid_thw: tuple[int, int, int]
    hash: str
    offset: int
    length: int


def is_wire_item(item: Any) -> bool:
    return isinstance(item, dict) and "format" in item


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_schema(i: int, item: Any) -> None:
    if not isinstance(item, dict):
        raise WireFormatError("bad_schema", f"item {i} is not an object")
    unknown = set(item) - _FIELDS
    if unknown:
        raise WireFormatError("bad_schema", f"item {i} has unknown fields {sorted(unknown)}")
    missing = _REQUIRED - set(item)
    if missing:
        raise WireFormatError("bad_schema", f"item {i} lacks {sorted(missing)}")
    ok = (
        isinstance(item["format"], str)
        and isinstance(item["dtype"], str)
        and isinstance(item["hash"], str)
        and isinstance(item["shape"], list) and len(item["shape"]) == 2
        and all(_int(x) for x in item["shape"])
        and isinstance(item["grid_thw"], list) and len(item["grid_thw"]) == 3
        and all(_int(x) for x in item["grid_thw"])
        and _int(item["offset"]) and _int(item["length"])
        and ("data" not in item or isinstance(item["data"], str))
    )  # fmt: skip
    shm = item.get("shm")
    if shm is not None and not (
        isinstance(shm, dict)
        and set(shm) == {"path", "nbytes"}
        and isinstance(shm["path"], str)
        and _int(shm["nbytes"])
    ):
        ok = False
    if not ok:
        raise WireFormatError("bad_schema", f"item {i} has a field of the wrong type or sign")


def validate_item(i: int, item: Any) -> None:
    """Everything checkable without touching the payload (vector codes 1–7, 9 w/o file)."""
    _check_schema(i, item)
    cols = _COLS.get(item["format"])
    if cols is None:
        raise WireFormatError("bad_format", f"item {i}: unknown format {item['format']!r}")
    if item["dtype"] != "bfloat16":
        raise WireFormatError("bad_dtype", f"item {i}: dtype {item['dtype']!r} (v1: bfloat16)")
    t, h, w = item["grid_thw"]
    if t != 1 or h < 2 or w < 2 or h % MERGE or w % MERGE:
        raise WireFormatError("bad_grid", f"item {i}: grid_thw {item['grid_thw']}")
    rows = t * h * w
    if item["shape"] != [rows, cols] or rows > MAX_ROWS:
        raise WireFormatError(
            "bad_shape", f"item {i}: shape {item['shape']} for grid {item['grid_thw']}"
        )
    if item["length"] != rows // (MERGE * MERGE):
        raise WireFormatError(
            "bad_length", f"item {i}: length {item['length']}, grid gives {rows // 4} tokens"
        )
    if not _HASH.match(item["hash"]):
        raise WireFormatError("bad_hash", f"item {i}: hash must be 1-128 of [A-Za-z0-9_:.-]")
    if ("data" in item) == ("shm" in item):
        raise WireFormatError("no_payload", f"item {i}: exactly one of data and shm is needed")
    nbytes = rows * cols * 2
    if "data" in item and len(item["data"]) != 4 * math.ceil(nbytes / 3):
        raise WireFormatError("bad_data", f"item {i}: data has {len(item['data'])} characters")
    if "shm" in item:
        shm = item["shm"]
        if not _SHM.match(shm["path"]) or ".." in shm["path"]:
            raise WireFormatError("bad_shm", f"item {i}: shm path {shm['path']!r}")
        if shm["nbytes"] != nbytes:
            raise WireFormatError("bad_shm", f"item {i}: nbytes {shm['nbytes']} != {nbytes}")


def validate_placement(
    items: list[dict[str, Any]], input_ids: list[int], image_token_id: int
) -> None:
    """Runs in prompt order, inside input_ids, made of image tokens, covering all of them."""
    covered = 0
    end = 0
    for i, item in enumerate(items):
        a, n = item["offset"], item["length"]
        if a < end:
            raise WireFormatError("bad_offset", f"item {i}: offset {a} overlaps or is out of order")
        if a + n > len(input_ids):
            raise WireFormatError("bad_offset", f"item {i}: run {a}+{n} past {len(input_ids)} ids")
        if any(t != image_token_id for t in input_ids[a : a + n]):
            raise WireFormatError("bad_offset", f"item {i}: run {a}+{n} holds non-image tokens")
        covered += n
        end = a + n
    total = sum(1 for t in input_ids if t == image_token_id)
    if total != covered:
        raise WireFormatError(
            "bad_offset", f"{total} image tokens in input_ids, items cover {covered}"
        )


def _decode(i: int, item: dict[str, Any]) -> bytes:
    nbytes = item["shape"][0] * item["shape"][1] * 2
    if "data" in item:
        try:
            raw = base64.b64decode(item["data"], validate=True)
        except (binascii.Error, ValueError) as e:
            raise WireFormatError("bad_data", f"item {i}: not base64 ({e})") from None
        if len(raw) != nbytes:
            raise WireFormatError("bad_data", f"item {i}: {len(raw)} bytes, expected {nbytes}")
        return raw
    path = item["shm"]["path"]
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size != nbytes:
                raise WireFormatError("bad_shm", f"item {i}: file has {size} bytes, not {nbytes}")
            return f.read(nbytes)
    except OSError as e:
        raise WireFormatError("bad_shm", f"item {i}: cannot read {path}: {e.strerror}") from None


def parse_items(items: list[Any], input_ids: list[int], image_token_id: int) -> list[WireImage]:
    """Validate all items (schema, then placement), then decode payloads."""
    for i, item in enumerate(items):
        validate_item(i, item)
    validate_placement(items, input_ids, image_token_id)
    out = []
    for i, item in enumerate(items):
        raw = bytearray(_decode(i, item))  # writable: torch.frombuffer warns on read-only bytes
        rows = item["shape"][0]
        pixels = torch.frombuffer(raw, dtype=torch.bfloat16)
        if item["format"] == FORMAT_V2:  # repeat each channel's frame: T = 2 of a still image
            pixels = pixels.view(rows, 3, 1, FRAME_DIM // 3).expand(rows, 3, 2, FRAME_DIM // 3)
        pixels = pixels.reshape(rows, PATCH_DIM)
        out.append(
            WireImage(pixels, tuple(item["grid_thw"]), item["hash"], item["offset"], item["length"])
        )
    return out
