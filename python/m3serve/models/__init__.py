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

    if os.environ.get("M3SERVE_MODEL", "") == "sglang":
        return
    from sglang.srt.models.registry import ModelRegistry

    from m3serve.models.m3_text import MiniMaxM3SparseForCausalLM
    from m3serve.models.m3_vl import MiniMaxM3SparseForConditionalGeneration

    ModelRegistry.models[MiniMaxM3SparseForConditionalGeneration.__name__] = (
        MiniMaxM3SparseForConditionalGeneration
    )
    ModelRegistry.models[MiniMaxM3SparseForCausalLM.__name__] = MiniMaxM3SparseForCausalLM
