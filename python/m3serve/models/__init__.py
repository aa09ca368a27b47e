"""m3serve's MiniMax-M3 model classes for SGLang (text + vision), registered under M3's real
architecture names so that they, not SGLang's in-tree M3, serve MiniMax-M3 checkpoints."""

from __future__ import annotations

ARCHITECTURES = ("MiniMaxM3SparseForConditionalGeneration", "MiniMaxM3SparseForCausalLM")


def register() -> None:
    """Make SGLang's model registry resolve M3's architecture names to our classes.

    ``resolve_model_cls`` looks an architecture up in ``ModelRegistry.models`` first, so an entry
    put there wins over the in-tree class of the same name. Set ``M3SERVE_MODEL=sglang`` to keep
    SGLang's in-tree M3 (A/B runs against the baseline in the same server build).
    """
    import os
    import sys

    if os.environ.get("M3SERVE_MODEL", "") == "sglang":
        return
    if (
        "sglang.srt.models.registry" not in sys.modules
        and os.environ.get("SGLANG_EXTERNAL_MODEL_PACKAGE", __name__) == __name__
    ):
        # Not imported yet: SGLang's documented external-model hook. The registry then imports
        # only this package at first use, and SGLang's ~300 model modules only if an
        # architecture outside it is asked for (importing them all costs tens of seconds on a
        # small CPU, in every SGLang process).
        os.environ["SGLANG_EXTERNAL_MODEL_PACKAGE"] = __name__
        return
    from sglang.srt.models.registry import ModelRegistry

    from m3serve.models.m3_text import MiniMaxM3SparseForCausalLM
    from m3serve.models.m3_vl import MiniMaxM3SparseForConditionalGeneration

    ModelRegistry.models[MiniMaxM3SparseForConditionalGeneration.__name__] = (
        MiniMaxM3SparseForConditionalGeneration
    )
    ModelRegistry.models[MiniMaxM3SparseForCausalLM.__name__] = MiniMaxM3SparseForCausalLM
