"""Tiny random-weight checkpoints in Hugging Face layout, made locally (no downloads here)."""
