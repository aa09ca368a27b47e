"""``m3serve make-tiny``: a tiny random-weight MiniMax-M3 checkpoint in Hugging Face layout.

Files: config.json (MiniMax-M3's field names), model safetensors (the real weight names),
tokenizer.json + tokenizer_config.json (trained locally, M3's special tokens, a chat template
that places image tokens), preprocessor_config.json, generation_config.json. Same seed → same bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

PRESETS = ("tiny",)


def make_tiny(out_dir: str | os.PathLike[str], preset: str = "tiny", seed: int = 0) -> Path:
    """Write the checkpoint into ``out_dir`` (created if needed) and return its path."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    from m3serve.checkpoint.m3 import write_m3_checkpoint
    from m3serve.checkpoint.tokenizer import write_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = write_tokenizer(out)
    write_m3_checkpoint(out, tok, preset=preset, seed=seed)
    return out
