"""Reference pipelines the Rust preprocessing must match, and test images.

- default path: PIL open -> exif_transpose -> convert("RGB") -> transformers 5.19
  ``MiniMaxM3VLImageProcessor`` (torchvision backend);
- ``max_long_side_pixel``: SGLang 0.5.23's ``_resize_image_to_long_side`` (Pillow bicubic), then
  the same processor with ``do_resize=False``.

Importing SGLang's processor module pulls in the whole server (~1 min on the dev box), so the
two SGLang functions are loaded from its installed source file with ``ast`` and executed
against PIL: the code that runs is SGLang's own, nothing is re-implemented here.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers.image_utils import SizeDict
from transformers.models.minimax_m3_vl.image_processing_minimax_m3_vl import (
    MiniMaxM3VLImageProcessor,
)


@functools.cache
def processor() -> MiniMaxM3VLImageProcessor:
    return MiniMaxM3VLImageProcessor()


def pil_rgb(data: bytes) -> Image.Image:
    """What both references feed the processor: oriented, RGB."""
    im = Image.open(io.BytesIO(data))
    im = ImageOps.exif_transpose(im)
    return im.convert("RGB")


def hf_resized_uint8(data: bytes) -> np.ndarray:
    """transformers' resized uint8 image [h, w, 3] (before rescale/normalise)."""
    from torchvision.transforms.v2 import functional as tvF

    proc = processor()
    t = tvF.pil_to_tensor(pil_rgb(data)).unsqueeze(0)
    out = proc.resize(
        t,
        size=SizeDict(
            shortest_edge=proc.size["shortest_edge"], longest_edge=proc.size["longest_edge"]
        ),
        resample=proc.resample,
        factor=proc.patch_size * proc.merge_size,
    )
    return out[0].permute(1, 2, 0).contiguous().numpy()


def hf_pixel_values(image: Image.Image, *, do_resize: bool = True) -> torch.Tensor:
    """transformers' float32 pixel_values [N, 1176] for an RGB PIL image."""
    out = processor()(images=image, return_tensors="pt", do_resize=do_resize)
    return out["pixel_values"]


@functools.cache
def _sglang_namespace() -> dict[str, Any]:
    spec = importlib.util.find_spec("sglang")
    assert spec is not None and spec.submodule_search_locations
    src = (
        Path(next(iter(spec.submodule_search_locations)))
        / "srt/multimodal/processors/minimax_m3_vl.py"
    )
    tree = ast.parse(src.read_text())
    wanted_funcs = {"_compute_aligned_size", "_resize_image_to_long_side"}
    body: list[ast.stmt] = []
    for node in tree.body:
        if (isinstance(node, ast.FunctionDef) and node.name in wanted_funcs) or (
            isinstance(node, ast.Assign)
            and all(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets)
        ):
            body.append(node)
    ns: dict[str, Any] = {"Image": Image, "Tuple": tuple, "math": math}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(src), "exec"), ns)
    return ns


def sglang_long_side_uint8(data: bytes, max_long_side_pixel: int) -> np.ndarray:
    """SGLang's Pillow-bicubic resize for ``max_long_side_pixel`` as uint8 [h, w, 3]."""
    ns = _sglang_namespace()
    im = ns["_resize_image_to_long_side"](pil_rgb(data), 28, max_long_side_pixel)
    return np.asarray(im.convert("RGB"))


def sglang_aligned_size(height: int, width: int, max_long_side_pixel: int) -> tuple[int, int]:
    return _sglang_namespace()["_compute_aligned_size"](height, width, 28, max_long_side_pixel)


# -- test images -----------------------------------------------------------------------------

SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry")


@functools.cache
def photo(name: str) -> np.ndarray:
    from skimage import data

    return getattr(data, name)()


def encode(arr_or_img: np.ndarray | Image.Image, fmt: str, **kw: Any) -> bytes:
    im = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def noise_rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth-ish random RGB (noise plus gradients): exercises every weight of the kernels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = (xx * 255 // max(w - 1, 1) + yy * 127 // max(h - 1, 1))[..., None]
    arr = base + rng.integers(-60, 60, size=(h, w, 3))
    return np.clip(arr, 0, 255).astype(np.uint8)


def with_exif_orientation(arr: np.ndarray, orientation: int, fmt: str = "JPEG") -> bytes:
    im = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
