"""Request checks SGLang 0.5.23 leaves out, added to its tokenizer manager by the plugin.

Token ids outside [0, vocab_size) in ``input_ids`` reach the embedding unchecked: on a GPU that is
a device-side assert that kills the scheduler (seen on an H200 with ids past a tiny checkpoint's
vocabulary), on CPU an IndexError in the scheduler. Either way one bad request takes the server
down for everyone. The check runs in the tokenizer manager's per-request validation, whose
ValueErrors SGLang already answers with HTTP 400, before anything is scheduled.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any


def check_token_ids(input_ids: Sequence[int] | None, vocab_size: int) -> None:
    """Raise ValueError naming the first id outside [0, vocab_size)."""
    if not input_ids or vocab_size <= 0:
        return
    lo, hi = min(input_ids), max(input_ids)
    if lo >= 0 and hi < vocab_size:
        return
    pos = next(i for i, t in enumerate(input_ids) if t < 0 or t >= vocab_size)
    bad = input_ids[pos]
    raise ValueError(
        f"input_ids[{pos}] = {bad} is outside the model's vocabulary: token ids must be in "
        f"[0, {vocab_size})"
    )


def validate_one_request_with_vocab(
    original: Callable[..., Any], self: Any, obj: Any, input_ids: Any, *args: Any, **kwargs: Any
) -> Any:
    """AROUND hook for TokenizerManager._validate_one_request."""
    vocab = int(getattr(getattr(self, "model_config", None), "vocab_size", 0) or 0)
    if isinstance(input_ids, list) and input_ids and isinstance(input_ids[0], int):
        check_token_ids(input_ids, vocab)
    return original(self, obj, input_ids, *args, **kwargs)


def register() -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request",
        validate_one_request_with_vocab,
        HookType.AROUND,
    )
