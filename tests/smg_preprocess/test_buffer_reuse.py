"""The per-thread buffer pool (smg-core image/buffers.rs) never leaks one image into the next.

Decoded pixels come from a reused buffer (the small slots up to 8 MiB, and since session 10 one
large slot up to 40 MiB for photos of up to 12.6 megapixels; on Linux, since session 13, a
huge-page mapping), so a decoder or resampler that left bytes unwritten would show the previous
image's pixels. Each case preprocesses B alone,
then a different A (which leaves its buffers in the pool), then B again: B's patches and its
resized pixels must be identical both times.
"""

from __future__ import annotations

import numpy as np
import pytest

from m3serve import preprocess as pp

from .reference import encode, noise_rgb, photo


def _smooth(h: int, w: int, seed: int) -> np.ndarray:
    """A photo tiled to h × w with a seeded offset: real image content at any size."""
    base = photo("chelsea")
    rng = np.random.default_rng(seed)
    reps = (h // base.shape[0] + 2, w // base.shape[1] + 2, 1)
    tiled = np.tile(base, reps)
    y, x = (int(v) for v in rng.integers(0, 50, 2))
    return np.ascontiguousarray(tiled[y : y + h, x : x + w])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize(
    ("size_a", "size_b"),
    [
        ((1700, 2100), (1650, 1800)),  # both decoded buffers above 8 MiB: the large slot
        ((1700, 2100), (300, 400)),  # a small image after a large one: the small slots
        ((600, 800), (1650, 1800)),  # a large image after small ones
    ],
)
def test_a_reused_buffer_does_not_show_the_previous_image(
    fmt: str, size_a: tuple[int, int], size_b: tuple[int, int]
) -> None:
    a = encode(noise_rgb(*size_a, seed=1), fmt)
    b = encode(_smooth(*size_b, seed=2), fmt)
    first, first_rgb = pp.preprocess(b), pp.resize_rgb(b)
    pp.preprocess(a)
    pp.resize_rgb(a)
    again, again_rgb = pp.preprocess(b), pp.resize_rgb(b)
    assert first.grid_thw == again.grid_thw
    np.testing.assert_array_equal(first.patches_bf16_bits, again.patches_bf16_bits)
    np.testing.assert_array_equal(first_rgb, again_rgb)
