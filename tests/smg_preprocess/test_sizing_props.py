"""Hypothesis properties of M3 sizing (smart_resize and the long-side rule)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.minimax_m3_vl.image_processing_minimax_m3_vl import smart_resize

from m3serve import preprocess as pp

from .reference import sglang_aligned_size

sides = st.integers(min_value=1, max_value=20000)


@settings(max_examples=400, deadline=None)
@given(h=sides, w=sides)
def test_smart_resize_matches_transformers_and_bounds(h: int, w: int) -> None:
    if max(h, w) / min(h, w) > 200:
        with pytest.raises(pp.ImageAspectRatioError):
            pp.target_size(h, w)
        return
    ours = pp.target_size(h, w)
    assert ours == tuple(smart_resize(h, w, factor=28, min_pixels=3136, max_pixels=451_584))
    rh, rw = ours
    assert rh % 28 == 0 and rw % 28 == 0 and rh >= 28 and rw >= 28
    assert rh * rw <= 451_584 or min(rh, rw) == 28  # only the 28-floor can exceed the cap
    assert rh * rw >= 3136


@settings(max_examples=300, deadline=None)
@given(h=sides, w=sides, cap=st.integers(min_value=4, max_value=128).map(lambda k: 28 * k))
def test_long_side_rule_matches_sglang(h: int, w: int, cap: int) -> None:
    if max(h, w) / min(h, w) > 200:
        with pytest.raises(pp.ImageAspectRatioError):
            pp.target_size(h, w, max_long_side_pixel=cap)
        return
    ref = sglang_aligned_size(h, w, cap)
    if ref[0] * ref[1] > 12_845_056:
        with pytest.raises(pp.InvalidImageOptionError):
            pp.target_size(h, w, max_long_side_pixel=cap)
        return
    ours = pp.target_size(h, w, max_long_side_pixel=cap)
    assert ours == ref
    assert ours[0] % 28 == 0 and ours[1] % 28 == 0
    assert max(ours) <= max(cap, 28 * math.ceil(max(h, w) / 28))
