"""m3serve's MiniMax-M3 multimodal processor for SGLang (gateway tensors, or raw images through
the Rust preprocessing), registered for M3's architecture name."""

from __future__ import annotations


def register() -> None:
    """Map our M3 model class to our processor in SGLang's processor registry.

    SGLang matches processors to models by class *name*, so our entry replaces the in-tree M3
    processor (which, besides, cannot be imported without a working sgl_kernel).
    """
    import os

    if os.environ.get("M3SERVE_MODEL", "") == "sglang":
        return
    # SGLang's tokenizer manager imports its own processors later, then this package with
    # overwrite=True (which drops same-named in-tree entries): ours wins in either order.
    os.environ.setdefault("SGLANG_EXTERNAL_MM_PROCESSOR_PACKAGE", __name__)
    from sglang.srt.managers import multimodal_processor as mp

    from m3serve.processor.m3_processor import M3MultimodalProcessor

    for model_cls in list(mp.PROCESSOR_MAPPING):
        if model_cls.__name__ in {m.__name__ for m in M3MultimodalProcessor.models}:
            del mp.PROCESSOR_MAPPING[model_cls]
    for model_cls in M3MultimodalProcessor.models:
        mp.PROCESSOR_MAPPING[model_cls] = M3MultimodalProcessor
