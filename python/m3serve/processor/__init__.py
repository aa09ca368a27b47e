"""m3serve's MiniMax-M3 multimodal processor for SGLang (gateway tensors, or raw images through
the Rust preprocessing), registered for M3's architecture name."""

from __future__ import annotations

from typing import Any


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
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.entrypoints.api_contract.generate_contract_error",
        _contract_error_admitting_wire_items,
        HookType.AROUND,
    )

    from m3serve.processor.m3_processor import M3MultimodalProcessor

    for model_cls in list(mp.PROCESSOR_MAPPING):
        if model_cls.__name__ in {m.__name__ for m in M3MultimodalProcessor.models}:
            del mp.PROCESSOR_MAPPING[model_cls]
    for model_cls in M3MultimodalProcessor.models:
        mp.PROCESSOR_MAPPING[model_cls] = M3MultimodalProcessor


def _contract_error_admitting_wire_items(original: Any, body: Any) -> Any:
    """SGLang's /generate schema gate, with m3serve wire items (docs/wire-format.md) admitted.

    The gate knows only SGLang's own image-item fields, so it would refuse the gateway's items
    before our processor sees them. Wire items are swapped for a placeholder string for the
    schema check of the rest of the body; the processor validates them fully (400 on failure).
    """
    from m3serve.processor.wire import is_wire_item

    images = body.get("image_data") if isinstance(body, dict) else None
    if isinstance(images, list) and images and any(is_wire_item(i) for i in images):
        body = {
            **body,
            "image_data": ["m3serve-wire-item" if is_wire_item(i) else i for i in images],
        }
    return original(body)
