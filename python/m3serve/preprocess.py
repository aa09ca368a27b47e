"""The one Python entry point to m3serve's Rust image preprocessing (``m3serve._smg``).

Same bytes in, same tensors out as the gateway: decode (PIL-equal), EXIF orientation,
``convert("RGB")``, MiniMax-M3 sizing (transformers' ``smart_resize`` + torchvision's uint8
antialiased bicubic, or SGLang's ``max_long_side_pixel`` rule + Pillow bicubic), CLIP
normalisation, bf16, 2x2-merge-block-major patches ``[N, 1176]``.

The GIL is released during the Rust work, so a thread pool scales with cores.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from m3serve import _smg

ImageInput = bytes | bytearray | memoryview | str | os.PathLike[str]

# Re-exported error classes: all subclass ValueError (bad client input, not a server fault).
SmgError = _smg.SmgError
InvalidImageError = _smg.InvalidImageError
UnsupportedImageFormatError = _smg.UnsupportedImageFormatError
ImageTooLargeError = _smg.ImageTooLargeError
ImageAspectRatioError = _smg.ImageAspectRatioError
InvalidImageOptionError = _smg.InvalidImageOptionError
ImageUrlError = _smg.ImageUrlError

PATCH_DIM: int = _smg.PATCH_DIM  # 3 channels x 2 frames x 14 x 14


@dataclass(frozen=True)
class StageTimings:
    """Wall time of each stage, microseconds. With ``resize_fused`` the resampling ran inside
    normalise + patchify and is counted in ``normalize_patchify_us`` (``resize_us`` is then only
    the sizing); the sum of the two is always the whole resize + normalise + patchify."""

    decode_us: int
    resize_us: int
    normalize_patchify_us: int
    resize_fused: bool = False


@dataclass(frozen=True)
class PreprocessedImage:
    """One image, model-ready.

    ``patches_bf16_bits`` is a uint16 numpy array ``[num_patches, 1176]`` of bf16 bit patterns;
    ``pixel_values`` views the same memory as a ``torch.bfloat16`` tensor (no copy).
    """

    patches_bf16_bits: np.ndarray
    grid_thw: tuple[int, int, int]
    hash: str
    num_image_tokens: int
    timings: StageTimings

    @property
    def num_patches(self) -> int:
        return int(self.patches_bf16_bits.shape[0])

    @property
    def pixel_values(self) -> Any:
        """``torch.bfloat16`` tensor ``[num_patches, 1176]`` sharing memory with the array."""
        import torch

        return torch.from_numpy(self.patches_bf16_bits.view(np.int16)).view(torch.bfloat16)


def preprocess(
    image: ImageInput,
    *,
    max_long_side_pixel: int | None = None,
    min_pixels: int = 3136,
    max_pixels: int = 451_584,
    max_input_pixels: int | None = None,
    max_input_bytes: int | None = None,
) -> PreprocessedImage:
    """Preprocess one encoded image (bytes) or image file (path) for MiniMax-M3.

    Raises a ``SmgError`` (``ValueError``) subclass on bad input; the message starts with the
    stable error code in brackets, e.g. ``[image_too_large]``.
    """
    if isinstance(image, memoryview):
        image = image.tobytes()
    out = _smg.preprocess(
        image,
        max_long_side_pixel=max_long_side_pixel,
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        max_input_pixels=max_input_pixels,
        max_input_bytes=max_input_bytes,
    )
    t = out["timings_us"]
    return PreprocessedImage(
        patches_bf16_bits=out["patches"],
        grid_thw=tuple(out["grid_thw"]),
        hash=out["hash"],
        num_image_tokens=out["num_image_tokens"],
        timings=StageTimings(
            t["decode"], t["resize"], t["normalize_patchify"], bool(t.get("resize_fused"))
        ),
    )


def resize_rgb(image: ImageInput, *, max_long_side_pixel: int | None = None) -> np.ndarray:
    """The resized uint8 ``[h, w, 3]`` image before normalisation (for parity checks)."""
    if isinstance(image, memoryview):
        image = image.tobytes()
    return _smg.resize_rgb(image, max_long_side_pixel=max_long_side_pixel)


def decode_rgb(image: ImageInput) -> np.ndarray:
    """Decoded, EXIF-oriented uint8 ``[h, w, 3]``, equal to PIL's ``convert("RGB")``."""
    if isinstance(image, memoryview):
        image = image.tobytes()
    return _smg.decode_rgb(image)


def target_size(
    height: int,
    width: int,
    *,
    max_long_side_pixel: int | None = None,
    min_pixels: int = 3136,
    max_pixels: int = 451_584,
) -> tuple[int, int]:
    """``(h, w)`` an image of this size is resized to."""
    return tuple(
        _smg.target_size(
            height,
            width,
            max_long_side_pixel=max_long_side_pixel,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
        )
    )
