"""A tiny random-weight Llama checkpoint (a family SGLang already serves) for platform tests.

It exercises the real SGLang runtime on CPU (scheduler, KV pool, HTTP API) independently of our
M3 model: when an M3 test fails and this one passes, the fault is ours, not the platform's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from m3serve.checkpoint.tokenizer import write_tokenizer


def make_tiny_llama(out_dir: str | os.PathLike[str], seed: int = 0) -> Path:
    """Write config.json, model.safetensors and the tokenizer files; same seed → same bytes."""
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    tok = write_tokenizer(out)
    hidden, layers, heads, kv_heads, inter = 64, 2, 4, 2, 128
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "vocab_size": tok["vocab_size"],
        "bos_token_id": tok["bos_token_id"],
        "eos_token_id": tok["eos_token_id"],
        "pad_token_id": tok["pad_token_id"],
        "torch_dtype": "bfloat16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    gen = torch.Generator().manual_seed(seed)

    def w(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.05).to(torch.bfloat16)

    weights = {"model.embed_tokens.weight": w(tok["vocab_size"], hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        weights |= {
            p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": w(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": w(inter, hidden),
            p + "mlp.up_proj.weight": w(inter, hidden),
            p + "mlp.down_proj.weight": w(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        }
    weights["model.norm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    weights["lm_head.weight"] = w(tok["vocab_size"], hidden)
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": tok["bos_token_id"], "eos_token_id": tok["eos_token_id"]}) + "\n"
    )
    return out
