"""Stage timings of the Rust preprocessing: where the resampling runs fused with normalise +
patchify (AVX2 machines, the default sizing) it has no time of its own, and the report says so
instead of showing a resize of ~0 ms."""

from __future__ import annotations

import numpy as np

from m3serve import preprocess as pp

from .reference import encode, noise_rgb


def test_fused_flag_and_stage_times_add_up() -> None:
    jpeg = encode(noise_rgb(960, 1280, seed=3), "JPEG")
    out = pp.preprocess(jpeg)
    t = out.timings
    assert isinstance(t.resize_fused, bool)
    assert t.decode_us > 0 and t.normalize_patchify_us > 0
    if t.resize_fused:
        # the resampling is inside normalise + patchify: that stage is the bulk of the work
        assert t.normalize_patchify_us > t.resize_us
    else:
        assert t.resize_us > 0
    # same patches either way: the fused path is exact (tests/smg_preprocess/test_parity.py)
    assert out.patches_bf16_bits.dtype == np.uint16 and out.num_patches > 0


def test_max_long_side_pixel_is_never_fused() -> None:
    """Pillow's resampler (max_long_side_pixel) has no fused form: its resize time is its own."""
    jpeg = encode(noise_rgb(960, 1280, seed=4), "JPEG")
    t = pp.preprocess(jpeg, max_long_side_pixel=560).timings
    assert t.resize_fused is False and t.resize_us > 0
