"""The SGLang plugin entry point (group ``sglang.srt.plugins``, see pyproject.toml).

SGLang calls ``register()`` early in every process it starts (engine, tokenizer manager,
scheduler/TP workers, detokenizer), so everything that must be visible to SGLang — our model
classes, the ``msa`` attention backend, the M3 multimodal processor — is registered here.
Set ``M3SERVE_DISABLE_PLUGIN=1`` to run SGLang without m3serve's overrides (baseline runs).
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

_registered = False


def register() -> None:
    """Register m3serve's model, attention backend and multimodal processor with SGLang."""
    global _registered
    if _registered:
        return
    _registered = True
    if os.environ.get("M3SERVE_DISABLE_PLUGIN", "") == "1":
        logger.info("m3serve plugin disabled by M3SERVE_DISABLE_PLUGIN=1")
        return
    from m3serve import backend, models, processor, validation

    models.register()
    backend.register()
    processor.register()
    validation.register()
    logger.info("m3serve plugin registered (pid %d)", os.getpid())
