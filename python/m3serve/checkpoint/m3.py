"""MiniMax-M3 tiny checkpoints: config.json and safetensors with the real field and weight names.

The names are the ones a published MiniMax-M3 checkpoint uses, i.e. what three independent
loaders read: transformers 5.19's ``minimax_m3_vl`` (config ``__post_init__`` maps the legacy
``sparse_attention_config`` / ``moe_layer_freq`` keys; ``conversion_mapping.py`` renames
``language_model.model.*``, ``block_sparse_moe``, ``experts.E.w1/w2/w3``, ``index_*_proj``,
``vision_tower.vision_model.*``, ``patch_merge_mlp``), SGLang 0.5.23's in-tree
``MiniMaxM3SparseForConditionalGeneration`` (``configs/minimax_vl.py`` + ``load_weights``), and
ours (m3serve.models.m3). Where the two upstream readers look for a value under different keys
(e.g. the vision tower's merge size), the config carries both, with equal values.

Structure follows M3 (DESIGN.md): dense-attention + dense-MLP layers first, then MSA + MoE
layers; GQA with one index head per KV head; Gemma RMSNorms (stored as ``w``, applied as
``1 + w``); partial NeoX RoPE; swigluoai; sigmoid router with correction bias; one shared
expert; CLIP-style ViT with Conv3d 14×14×2 patches, 3-D RoPE and a 2×2 merge. Sizes are tiny;
block size and top-k are small so 100-token prompts already cross many MSA blocks.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ARCHITECTURE = "MiniMaxM3SparseForConditionalGeneration"
TEXT_ARCHITECTURE = "MiniMaxM3SparseForCausalLM"


@dataclass(frozen=True)
class M3Sizes:
    """The knobs a preset sets; everything else in the config is derived or fixed as in M3."""

    hidden: int = 128
    dense_layers: int = 2
    sparse_layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    rotary_dim: int = 16
    index_dim: int = 32
    block: int = 16
    topk_blocks: int = 4
    experts: int = 4
    experts_per_tok: int = 2
    expert_ffn: int = 64
    dense_ffn: int = 192
    vision_hidden: int = 64
    vision_heads: int = 2
    vision_ffn: int = 128
    vision_layers: int = 2
    max_positions: int = 65536
    weight_std: float = 0.06


PRESETS: dict[str, M3Sizes] = {
    "tiny": M3Sizes(),
    # same shapes as "tiny" but M3's block size and top-k: for tests of the real block geometry
    "tiny-block128": M3Sizes(block=128, topk_blocks=16),
}


def m3_config(tok: dict[str, Any], sizes: M3Sizes) -> dict[str, Any]:
    """The config.json dict for a MiniMax-M3 checkpoint of the given sizes."""
    layers = sizes.dense_layers + sizes.sparse_layers
    per_layer = [0] * sizes.dense_layers + [1] * sizes.sparse_layers
    text = {
        "model_type": "minimax_m2",
        "architectures": [TEXT_ARCHITECTURE],
        "vocab_size": tok["vocab_size"],
        "hidden_size": sizes.hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": sizes.heads,
        "num_key_value_heads": sizes.kv_heads,
        "head_dim": sizes.head_dim,
        "rotary_dim": sizes.rotary_dim,
        "partial_rotary_factor": sizes.rotary_dim / sizes.head_dim,
        "rope_theta": 5_000_000.0,
        "max_position_embeddings": sizes.max_positions,
        "rms_norm_eps": 1e-6,
        "use_qk_norm": True,
        "qk_norm_type": "per_head",
        "use_gemma_norm": True,
        "hidden_act": "swigluoai",
        "swiglu_alpha": 1.702,
        "swiglu_limit": 7.0,
        "intermediate_size": sizes.expert_ffn,
        "dense_intermediate_size": sizes.dense_ffn,
        "shared_intermediate_size": sizes.expert_ffn,
        "n_shared_experts": 1,
        "num_local_experts": sizes.experts,
        "num_experts_per_tok": sizes.experts_per_tok,
        "scoring_func": "sigmoid",
        "use_routing_bias": True,
        "routed_scaling_factor": 2.0,
        "moe_layer_freq": per_layer,
        "sparse_attention_config": {
            "sparse_attention_freq": per_layer,
            "sparse_num_index_heads": sizes.kv_heads,
            "sparse_index_dim": sizes.index_dim,
            "sparse_block_size": sizes.block,
            "sparse_topk_blocks": sizes.topk_blocks,
            "sparse_local_block": 1,
            "sparse_disable_index_value": per_layer,
            "sparse_score_type": "max",
        },
        "num_mtp_modules": 0,
        "tie_word_embeddings": False,
        "bos_token_id": tok["bos_token_id"],
        "eos_token_id": tok["eos_token_id"],
        "pad_token_id": tok["pad_token_id"],
        "torch_dtype": "bfloat16",
    }
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": sizes.vision_hidden,
        "intermediate_size": sizes.vision_ffn,
        "num_hidden_layers": sizes.vision_layers,
        "num_attention_heads": sizes.vision_heads,
        "num_channels": 3,
        "image_size": 2016,
        "patch_size": 14,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "img_token_compression_config": {"temporal_patch_size": 2, "spatial_merge_size": 2},
        "position_embedding_type": "rope",
        "rope_mode": "3d",
        "rope_theta": 10000.0,
        "rope_parameters": {"rope_type": "axial", "rope_theta": 10000.0},
        "vision_segment_max_frames": None,
    }
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "minimax_m3_vl",
        "text_config": text,
        "vision_config": vision,
        "image_token_index": tok["image_token_id"],
        "video_token_index": tok["video_token_id"],
        "projector_hidden_size": sizes.hidden,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "patch_merge_bias": True,
        "process_image_mode": "dynamic_res",
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "full",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def m3_weight_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name → shape, in a fixed order (the write order, hence the bytes)."""
    t, v = config["text_config"], config["vision_config"]
    hidden, hd = t["hidden_size"], t["head_dim"]
    sparse = t["sparse_attention_config"]
    idx_heads, idx_dim = sparse["sparse_num_index_heads"], sparse["sparse_index_dim"]
    shapes: dict[str, tuple[int, ...]] = {}
    lm = "language_model.model."
    shapes[lm + "embed_tokens.weight"] = (t["vocab_size"], hidden)
    for i in range(t["num_hidden_layers"]):
        p = f"{lm}layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (t["num_attention_heads"] * hd, hidden),
            p + "self_attn.k_proj.weight": (t["num_key_value_heads"] * hd, hidden),
            p + "self_attn.v_proj.weight": (t["num_key_value_heads"] * hd, hidden),
            p + "self_attn.o_proj.weight": (hidden, t["num_attention_heads"] * hd),
            p + "self_attn.q_norm.weight": (hd,),
            p + "self_attn.k_norm.weight": (hd,),
        }
        if sparse["sparse_attention_freq"][i]:
            shapes |= {
                p + "self_attn.index_q_proj.weight": (idx_heads * idx_dim, hidden),
                p + "self_attn.index_k_proj.weight": (idx_dim, hidden),
                p + "self_attn.index_q_norm.weight": (idx_dim,),
                p + "self_attn.index_k_norm.weight": (idx_dim,),
            }
        if t["moe_layer_freq"][i]:
            m = p + "block_sparse_moe."
            ffn, shared = t["intermediate_size"], t["shared_intermediate_size"]
            shapes[m + "gate.weight"] = (t["num_local_experts"], hidden)
            shapes[m + "e_score_correction_bias"] = (t["num_local_experts"],)
            for e in range(t["num_local_experts"]):
                shapes |= {
                    f"{m}experts.{e}.w1.weight": (ffn, hidden),
                    f"{m}experts.{e}.w2.weight": (hidden, ffn),
                    f"{m}experts.{e}.w3.weight": (ffn, hidden),
                }
            shapes |= {
                m + "shared_experts.gate_proj.weight": (shared, hidden),
                m + "shared_experts.up_proj.weight": (shared, hidden),
                m + "shared_experts.down_proj.weight": (hidden, shared),
            }
        else:
            ffn = t["dense_intermediate_size"]
            shapes |= {
                p + "mlp.gate_proj.weight": (ffn, hidden),
                p + "mlp.up_proj.weight": (ffn, hidden),
                p + "mlp.down_proj.weight": (hidden, ffn),
            }
    shapes[lm + "norm.weight"] = (hidden,)
    shapes["language_model.lm_head.weight"] = (t["vocab_size"], hidden)

    vh, vf = v["hidden_size"], v["intermediate_size"]
    merge = v["img_token_compression_config"]["spatial_merge_size"]
    vm = "vision_tower.vision_model."
    shapes[vm + "embeddings.patch_embedding.weight"] = (
        vh, v["num_channels"], v["temporal_patch_size"], v["patch_size"], v["patch_size"],
    )  # fmt: skip
    shapes[vm + "pre_layrnorm.weight"] = (vh,)
    shapes[vm + "pre_layrnorm.bias"] = (vh,)
    for i in range(v["num_hidden_layers"]):
        p = f"{vm}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{p}self_attn.{proj}.weight"] = (vh, vh)
            shapes[f"{p}self_attn.{proj}.bias"] = (vh,)
        shapes |= {
            p + "layer_norm1.weight": (vh,),
            p + "layer_norm1.bias": (vh,),
            p + "mlp.fc1.weight": (vf, vh),
            p + "mlp.fc1.bias": (vf,),
            p + "mlp.fc2.weight": (vh, vf),
            p + "mlp.fc2.bias": (vh,),
            p + "layer_norm2.weight": (vh,),
            p + "layer_norm2.bias": (vh,),
        }
    proj_hidden = config["projector_hidden_size"]
    shapes |= {
        "multi_modal_projector.linear_1.weight": (proj_hidden, vh),
        "multi_modal_projector.linear_1.bias": (proj_hidden,),
        "multi_modal_projector.linear_2.weight": (hidden, proj_hidden),
        "multi_modal_projector.linear_2.bias": (hidden,),
        "patch_merge_mlp.linear_1.weight": (proj_hidden, hidden * merge * merge),
        "patch_merge_mlp.linear_1.bias": (proj_hidden,),
        "patch_merge_mlp.linear_2.weight": (hidden, proj_hidden),
        "patch_merge_mlp.linear_2.bias": (hidden,),
    }
    return shapes


def _init_tensor(name: str, shape: tuple[int, ...], gen: Any, std: float) -> Any:
    """Random but well-scaled: Gemma norms near 0 (scale 1 + w), LayerNorms near 1, biases small."""
    import torch

    x = torch.randn(*shape, generator=gen)
    if name.endswith("e_score_correction_bias"):
        return (x * 0.1).to(torch.float32)  # M3 keeps the router bias in float32
    if "layer_norm" in name or "layrnorm" in name:
        base = 1.0 if name.endswith(".weight") else 0.0
        return (base + 0.05 * x).to(torch.bfloat16)
    if "norm" in name:  # Gemma RMSNorm weights: applied as (1 + w)
        return (0.1 * x).to(torch.bfloat16)
    if name.endswith(".bias"):
        return (0.02 * x).to(torch.bfloat16)
    if name.endswith("embed_tokens.weight"):
        return x.to(torch.bfloat16)
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    # unit-variance activations through each projection, so the tiny model is not trivially flat
    scale = max(std, fan_in**-0.5)
    return (x * scale).to(torch.bfloat16)


def write_m3_checkpoint(
    out_dir: str | os.PathLike[str], tok: dict[str, Any], preset: str = "tiny", seed: int = 0
) -> dict[str, Any]:
    """Write config.json, model.safetensors, preprocessor_config.json, generation_config.json.

    ``tok`` is what m3serve.checkpoint.tokenizer.write_tokenizer returned (vocab size and special
    token ids). Same (tok, preset, seed) → same bytes. Returns the config dict.
    """
    import torch
    from safetensors.torch import save_file

    if preset not in PRESETS:
        raise ValueError(f"unknown M3 preset {preset!r}; choose one of {', '.join(PRESETS)}")
    sizes = PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = m3_config(tok, sizes)
    gen = torch.Generator().manual_seed(seed)
    tensors = {
        name: _init_tensor(name, shape, gen, sizes.weight_std)
        for name, shape in m3_weight_shapes(config).items()
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", config)
    _write_json(out / "preprocessor_config.json", preprocessor_config())
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": tok["bos_token_id"],
            "eos_token_id": tok["eos_token_id"],
            "pad_token_id": tok["pad_token_id"],
        },
    )
    _write_json(out / "m3serve_tiny.json", {"preset": preset, "seed": seed, **asdict(sizes)})
    return config


def preprocessor_config() -> dict[str, Any]:
    """transformers 5.19's MiniMaxM3VLImageProcessor settings (M3's published values)."""
    return {
        "image_processor_type": "MiniMaxM3VLImageProcessor",
        "processor_class": "MiniMaxM3VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "do_convert_rgb": True,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "min_pixels": 3136,
        "max_pixels": 451584,
    }


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
