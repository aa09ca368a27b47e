"""Bit-exact parity of m3serve's Rust preprocessing with the reference processors.

uint8 pixels after resize must be identical; normalised patches must equal the bf16 rounding
of transformers' float32 pixel_values bit for bit.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from m3serve import preprocess as pp

from .reference import (
    SKIMAGE_PHOTOS,
    encode,
    hf_pixel_values,
    hf_resized_uint8,
    noise_rgb,
    photo,
    pil_rgb,
    sglang_aligned_size,
    sglang_long_side_uint8,
    with_exif_orientation,
)


def _rgb(name: str) -> np.ndarray:
    a = photo(name)
    return np.stack([a] * 3, axis=-1) if a.ndim == 2 else a[..., :3]


JPEG_VARIANTS = {
    "q90_420": {"quality": 90},
    "q75_444": {"quality": 75, "subsampling": 0},
    "q95_422": {"quality": 95, "subsampling": 1},
    "progressive": {"quality": 85, "progressive": True},
}


@pytest.mark.parametrize("name", SKIMAGE_PHOTOS)
@pytest.mark.parametrize("variant", sorted(JPEG_VARIANTS))
def test_jpeg_decode_equals_pil(name: str, variant: str) -> None:
    data = encode(photo(name), "JPEG", **JPEG_VARIANTS[variant])
    np.testing.assert_array_equal(pp.decode_rgb(data), np.asarray(pil_rgb(data)))


@pytest.mark.parametrize("name", SKIMAGE_PHOTOS)
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "WEBP_LOSSLESS", "GIF"])
def test_photos_resize_bit_exact(name: str, fmt: str) -> None:
    kw = {"WEBP_LOSSLESS": {"lossless": True}, "JPEG": {"quality": 90}}.get(fmt, {})
    data = encode(photo(name), fmt.split("_")[0], **kw)
    np.testing.assert_array_equal(pp.decode_rgb(data), np.asarray(pil_rgb(data)))
    np.testing.assert_array_equal(pp.resize_rgb(data), hf_resized_uint8(data))


@pytest.mark.parametrize(
    "h,w",
    [
        (1, 1),
        (29, 27),
        (27, 29),
        (56, 56),
        (100, 3000),
        (3000, 100),
        (480, 640),
        (960, 1280),
        (1000, 1001),
        (2, 399),
        (777, 333),
        (15, 2900),
    ],
)
def test_awkward_sizes_bit_exact(h: int, w: int) -> None:
    data = encode(noise_rgb(h, w, seed=h * 7 + w), "PNG")
    ours = pp.resize_rgb(data)
    np.testing.assert_array_equal(ours, hf_resized_uint8(data))
    assert (ours.shape[0], ours.shape[1]) == pp.target_size(h, w)


@pytest.mark.parametrize("name", ["astronaut", "coffee", "chelsea"])
def test_patches_equal_bf16_of_reference(name: str) -> None:
    data = encode(photo(name), "JPEG", quality=90)
    ours = pp.preprocess(data)
    ref = hf_pixel_values(pil_rgb(data))
    assert ours.pixel_values.shape == ref.shape
    assert torch.equal(ours.pixel_values, ref.to(torch.bfloat16))
    h, w = ours.grid_thw[1], ours.grid_thw[2]
    assert ours.num_image_tokens == h * w // 4 == ref.shape[0] // 4


@pytest.mark.parametrize("cap", [112, 448, 1008, 2016, 3584])
@pytest.mark.parametrize("name", ["astronaut", "coffee", "rocket"])
def test_max_long_side_pixel_matches_sglang(name: str, cap: int) -> None:
    data = encode(photo(name), "JPEG", quality=90)
    ours = pp.resize_rgb(data, max_long_side_pixel=cap)
    np.testing.assert_array_equal(ours, sglang_long_side_uint8(data, cap))
    # and the normalised patches are the processor's with do_resize=False
    pre = pp.preprocess(data, max_long_side_pixel=cap)
    ref = hf_pixel_values(Image.fromarray(ours), do_resize=False)
    assert torch.equal(pre.pixel_values, ref.to(torch.bfloat16))


@pytest.mark.parametrize(
    "h,w", [(1, 1), (29, 27), (50, 9000), (3000, 3001), (111, 113), (17, 3000)]
)
def test_long_side_sizes_match_sglang(h: int, w: int) -> None:
    for cap in (112, 1008, 3584):
        assert pp.target_size(h, w, max_long_side_pixel=cap) == sglang_aligned_size(h, w, cap)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation(orientation: int, fmt: str) -> None:
    data = with_exif_orientation(noise_rgb(40, 70, seed=orientation), orientation, fmt)
    np.testing.assert_array_equal(pp.decode_rgb(data), np.asarray(pil_rgb(data)))
    np.testing.assert_array_equal(pp.resize_rgb(data), hf_resized_uint8(data))


def _modes() -> dict[str, bytes]:
    rgb = noise_rgb(61, 45, seed=3)
    gray = rgb[..., 0]
    out = {
        "L": encode(gray, "PNG"),
        "LA": encode(Image.fromarray(np.dstack([gray, rgb[..., 1]]), "LA"), "PNG"),
        "RGBA": encode(Image.fromarray(np.dstack([rgb, gray]), "RGBA"), "PNG"),
        "RGBA_webp": encode(Image.fromarray(np.dstack([rgb, gray]), "RGBA"), "WEBP"),
        "P": encode(
            Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=200), "PNG"
        ),
        "P_4bit": encode(
            Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=16),
            "PNG",
            bits=4,
        ),
        "P_trns": encode(Image.fromarray(rgb).quantize(64), "PNG", transparency=5),
        "1bit": encode(Image.fromarray(gray > 128), "PNG"),
        "I16": encode(Image.fromarray(gray.astype(np.uint16) * 3), "PNG"),
        "I16_big": encode(Image.fromarray(gray.astype(np.uint16) * 257), "PNG"),
        "gray_jpeg": encode(gray, "JPEG", quality=88),
        "GIF": encode(Image.fromarray(rgb).quantize(100), "GIF"),
        "GIF_gray": encode(Image.fromarray(gray), "GIF"),
    }
    # 16-bit RGB(A) PNG: PIL can't write them, so build with numpy via PNG chunks.
    out["RGB16"] = _png16(np.dstack([rgb, gray]).astype(np.uint16) * 257 + 3, color_type=6)
    out["RGB16_noalpha"] = _png16(rgb.astype(np.uint16) * 250, color_type=2)
    # animated GIF: first frame only
    frames = [Image.fromarray(noise_rgb(30, 30, seed=s)).quantize(32) for s in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    out["GIF_anim"] = buf.getvalue()
    return out


def _png16(arr: np.ndarray, color_type: int) -> bytes:
    import struct
    import zlib

    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


MODES = _modes()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_modes_convert_like_pil(mode: str) -> None:
    data = MODES[mode]
    np.testing.assert_array_equal(pp.decode_rgb(data), np.asarray(pil_rgb(data)))
    np.testing.assert_array_equal(pp.resize_rgb(data), hf_resized_uint8(data))


def test_path_and_bytes_agree(tmp_path) -> None:
    data = encode(photo("chelsea"), "JPEG", quality=90)
    p = tmp_path / "chelsea.jpg"
    p.write_bytes(data)
    a, b = pp.preprocess(data), pp.preprocess(p)
    assert a.hash == b.hash and a.grid_thw == b.grid_thw
    assert np.array_equal(a.patches_bf16_bits, b.patches_bf16_bits)
    assert pp.preprocess(bytearray(data)).hash == a.hash
    assert pp.preprocess(memoryview(data)).hash == a.hash
