"""m3serve.validation.check_token_ids: every id in [0, vocab) passes; the first bad one is named."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from m3serve.validation import check_token_ids


@given(st.lists(st.integers(0, 639), max_size=50))
def test_ids_in_vocab_pass(ids: list[int]) -> None:
    check_token_ids(ids, 640)


@pytest.mark.parametrize(("ids", "msg"), [([1, 640], "input_ids[1] = 640"),
                                          ([-3, 2, 700], "input_ids[0] = -3")])  # fmt: skip
def test_first_out_of_vocab_id_is_named(ids: list[int], msg: str) -> None:
    with pytest.raises(ValueError, match=r"\[0, 640\)") as e:
        check_token_ids(ids, 640)
    assert msg in str(e.value)
