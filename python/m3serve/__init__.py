"""m3serve: fast MiniMax-M3 serving on Hopper (SGLang plugin + Rust multimodal gateway)."""

__version__ = "0.1.0"
