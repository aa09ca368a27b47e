"""The M3 multimodal processor: SGLang's tokenizer-side step that turns a request's images into
model inputs.

Two inputs, one output:

- gateway requests (``image_data`` items in the ``m3serve.patches.v1`` wire format,
  docs/wire-format.md): ``input_ids`` already expanded; every item is validated (schema, shape,
  grid, token counts against the placeholders) and its bf16 patches decoded — no image work here;
- anything else (OpenAI ``image_url`` data URIs, raw bytes, file paths): preprocessed by the Rust
  code the gateway runs (m3serve.preprocess → m3serve._smg, one implementation), then each
  ``]<]image[>[`` placeholder is expanded to the image's merged-token count.

Each image becomes one ``MultimodalDataItem`` (feature = bf16 patches [N, 1176], image_grid_thw,
inclusive token offsets, identity from the content hash so the radix cache and TP ranks never
rehash). Malformed input raises ValueError, which SGLang answers with HTTP 400.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
from pathlib import Path
from typing import Any

import torch
from sglang.srt.multimodal.processors.base_processor import BaseMultimodalProcessor

from m3serve.models.m3_vl import MiniMaxM3SparseForConditionalGeneration
from m3serve.processor.wire import is_wire_item, parse_items

IMAGE_START = "]<]start of image[>["
IMAGE_END = "]<]end of image[>["
MAX_IMAGES_PER_REQUEST = 64


def image_bytes(item: Any) -> bytes:
    """The encoded image of one non-wire ``image_data`` entry (data URI, base64, bytes, path)."""
    url = getattr(item, "url", item)  # SGLang's ImageData (OpenAI image_url parts) or a plain value
    if isinstance(url, dict):
        url = url.get("url", url.get("image_url"))
    if isinstance(url, bytes | bytearray | memoryview):
        return bytes(url)
    if not isinstance(url, str) or not url:
        raise ValueError(f"unsupported image_data entry of type {type(url).__name__}")
    if url.startswith("data:"):
        head, _, payload = url.partition(",")
        if ";base64" not in head:
            raise ValueError("image data URIs must be base64-encoded")
        return _b64(payload)
    if url.startswith(("http://", "https://")):
        raise ValueError("image URLs are fetched by the gateway, not the worker; send a data URI")
    if url.startswith("file://") or url.startswith("/"):
        path = Path(url.removeprefix("file://"))
        try:
            return path.read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read image file {path}: {e.strerror}") from None
    return _b64(url)


def _b64(s: str) -> bytes:
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("image data is not valid base64") from None


def identity(content_hash: str) -> bytes:
    """A 32-byte item identity from a content hash string (the wire's, or smg-core's hex)."""
    return hashlib.sha256(content_hash.encode()).digest()


def expand_image_tokens(
    ids: list[int],
    image_token_id: int,
    counts: list[int],
    start_id: int | None = None,
    end_id: int | None = None,
) -> tuple[list[int], list[tuple[int, int]]]:
    """Replace the i-th single image placeholder with counts[i] image tokens; inclusive runs.

    As transformers' M3 processor does, each run is wrapped in the image start/end tokens; a
    placeholder that already sits between them (ids built by hand) is not wrapped twice.
    """
    slots = [i for i, t in enumerate(ids) if t == image_token_id]
    if len(slots) != len(counts):
        raise ValueError(f"the prompt has {len(slots)} image placeholders for {len(counts)} images")
    out: list[int] = []
    runs: list[tuple[int, int]] = []
    prev = 0
    for slot, n in zip(slots, counts, strict=True):
        out.extend(ids[prev:slot])
        wrap = (
            start_id is not None
            and end_id is not None
            and not (slot > 0 and ids[slot - 1] == start_id)
            and not (slot + 1 < len(ids) and ids[slot + 1] == end_id)
        )
        if wrap:
            out.append(start_id)
        runs.append((len(out), len(out) + n - 1))
        out.extend([image_token_id] * n)
        if wrap:
            out.append(end_id)
        prev = slot + 1
    out.extend(ids[prev:])
    return out, runs


class M3MultimodalProcessor(BaseMultimodalProcessor):
    models = [MiniMaxM3SparseForConditionalGeneration]  # noqa: RUF012 (SGLang's class attribute)
    gpu_image_decode = False

    def __init__(
        self, hf_config: Any, server_args: Any, _processor: Any, *args: Any, **kwargs: Any
    ):
        super().__init__(hf_config, server_args, _processor, *args, **kwargs)
        self.tokenizer = getattr(_processor, "tokenizer", None) or _processor
        self.image_token_id = int(hf_config.image_token_index)
        self.video_token_id = int(getattr(hf_config, "video_token_index", -1))
        self.im_start_id = self._optional_id(IMAGE_START)
        self.im_end_id = self._optional_id(IMAGE_END)

    def _optional_id(self, token: str) -> int | None:
        tid = self.tokenizer.convert_tokens_to_ids(token)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        return None if tid is None or tid == unk else int(tid)

    def _ids(self, input_text: Any) -> list[int]:
        if isinstance(input_text, str):
            return list(self.tokenizer.encode(input_text, add_special_tokens=False))
        if isinstance(input_text, torch.Tensor):
            return input_text.flatten().tolist()
        return [int(t) for t in input_text]

    async def process_mm_data_async(
        self, image_data: Any, audio_data: Any, input_text: Any, request_obj: Any, **kwargs: Any
    ) -> Any:
        from sglang.srt.managers.schedule_batch import (
            Modality,
            MultimodalDataItem,
            MultimodalProcessorOutput,
        )

        if audio_data or getattr(request_obj, "video_data", None):
            raise ValueError("m3serve serves images only (no audio, no video yet)")
        items = list(image_data or [])
        if len(items) > MAX_IMAGES_PER_REQUEST:
            raise ValueError(f"at most {MAX_IMAGES_PER_REQUEST} images per request")
        ids = self._ids(input_text)
        if not items:
            if self.image_token_id in ids:
                raise ValueError("the prompt has image placeholders but no image_data")
            return MultimodalProcessorOutput(input_ids=ids, mm_items=[])
        wire = [is_wire_item(it) for it in items]
        if any(wire) and not all(wire):
            raise ValueError("image_data mixes wire-format items with raw images")

        images: list[tuple[torch.Tensor, tuple[int, int, int], str]] = []
        if all(wire):
            parsed = parse_items(items, ids, self.image_token_id)
            runs = [(p.offset, p.offset + p.length - 1) for p in parsed]
            images = [(p.pixel_values, p.grid_thw, p.hash) for p in parsed]
        else:
            from m3serve import preprocess

            pre = await asyncio.gather(
                *(asyncio.to_thread(preprocess.preprocess, image_bytes(it)) for it in items)
            )
            ids, runs = expand_image_tokens(
                ids,
                self.image_token_id,
                [p.num_image_tokens for p in pre],
                self.im_start_id,
                self.im_end_id,
            )
            images = [(p.pixel_values, tuple(p.grid_thw), p.hash) for p in pre]

        mm_items = []
        for (pixels, grid, content_hash), run in zip(images, runs, strict=True):
            item = MultimodalDataItem(modality=Modality.IMAGE, feature=pixels, offsets=[run])
            item.image_grid_thw = torch.tensor([list(grid)], dtype=torch.long)
            item.set_identity(identity(content_hash))
            mm_items.append(item)
        return MultimodalProcessorOutput(
            input_ids=ids,
            mm_items=mm_items,
            im_token_id=self.image_token_id,
            im_start_id=self.im_start_id,
            im_end_id=self.im_end_id,
            video_token_id=self.video_token_id,
        )
