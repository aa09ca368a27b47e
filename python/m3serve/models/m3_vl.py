"""MiniMax-M3 with its vision tower: ``MiniMaxM3SparseForConditionalGeneration`` for SGLang.

The class carries the real architecture name, so SGLang's model registry (where m3serve.models
.register puts it) and its multimodal-processor mapping (keyed by class name) pick it for real
M3 checkpoints. Vision tower (CLIP-style ViT, Conv3d 14×14×2 patch embed, 3-D RoPE over
(t, h, w) on the first 3·2⌊hd/6⌋ channels, per-image bidirectional attention), GELU projector to
the text width, then a 2×2 patch-merge MLP. The module tree mirrors the checkpoint names
(``vision_tower.vision_model.*``, ``multi_modal_projector.*``, ``patch_merge_mlp.*``), so loading
is a name match. The tower is replicated across TP ranks (small next to the MoE text model).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from m3serve.models.m3_text import M3TextModel, StrictLoader, text_weight_name


def _vision_cfg(config: Any) -> dict[str, Any]:
    v = config.vision_config
    return v.to_dict() if hasattr(v, "to_dict") else dict(v)


class VisionAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu: list[int]
    ) -> torch.Tensor:
        n = x.shape[0]
        q = _rope_3d(self.q_proj(x).view(n, self.heads, self.head_dim), cos, sin)
        k = _rope_3d(self.k_proj(x).view(n, self.heads, self.head_dim), cos, sin)
        v = self.v_proj(x).view(n, self.heads, self.head_dim)
        out = torch.empty_like(q)
        for a, b in itertools.pairwise(cu):  # one image (or video segment) at a time
            out[a:b] = F.scaled_dot_product_attention(
                q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)
            ).transpose(0, 1)
        return self.out_proj(out.reshape(n, -1))


def _rope_3d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rot = cos.shape[-1]
    xr = x[..., :rot].float()
    half = rot // 2
    rotated = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)
    out = xr * cos[:, None] + rotated * sin[:, None]
    return torch.cat((out.to(x.dtype), x[..., rot:]), dim=-1)


class VisionMLP(nn.Module):
    def __init__(self, dim: int, ffn: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int, eps: float) -> None:
        super().__init__()
        self.self_attn = VisionAttention(dim, heads)
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.mlp = VisionMLP(dim, ffn)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu: list[int]):
        x = x + self.self_attn(self.layer_norm1(x), cos, sin, cu)
        return x + self.mlp(self.layer_norm2(x))


class VisionEmbeddings(nn.Module):
    def __init__(self, dim: int, channels: int, temporal: int, patch: int) -> None:
        super().__init__()
        self.shape = (channels, temporal, patch, patch)
        self.patch_embedding = nn.Conv3d(
            channels, dim, kernel_size=(temporal, patch, patch), stride=(temporal, patch, patch),
            bias=False,
        )  # fmt: skip

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        # a stride == kernel Conv3d over one patch is a matmul with the flattened kernel
        w = self.patch_embedding.weight
        return patches.to(w.dtype) @ w.reshape(w.shape[0], -1).t()


class VisionEncoder(nn.Module):
    def __init__(self, dim: int, heads: int, ffn: int, layers: int, eps: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(dim, heads, ffn, eps) for _ in range(layers))


class VisionTransformer(nn.Module):
    def __init__(self, v: dict[str, Any]) -> None:
        super().__init__()
        comp = v.get("img_token_compression_config") or {}
        self.temporal = int(comp.get("temporal_patch_size", v.get("temporal_patch_size", 2)))
        self.merge = int(comp.get("spatial_merge_size", v.get("spatial_merge_size", 2)))
        dim, heads = v["hidden_size"], v["num_attention_heads"]
        eps = v.get("layer_norm_eps", 1e-5)
        self.embeddings = VisionEmbeddings(
            dim, v.get("num_channels", 3), self.temporal, v["patch_size"]
        )
        self.pre_layrnorm = nn.LayerNorm(dim, eps=eps)  # sic: the checkpoint's spelling
        self.encoder = VisionEncoder(
            dim, heads, v["intermediate_size"], v["num_hidden_layers"], eps
        )
        theta = v.get("rope_theta") or (v.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        axis = 2 * ((dim // heads // 3) // 2)  # channels per axis (t, h, w)
        inv = 1.0 / (float(theta) ** (torch.arange(0, axis, 2, dtype=torch.float64) / axis))
        self.register_buffer("inv_freq", inv.float(), persistent=False)

    def positions(self, grid_thw: list[list[int]], device: torch.device) -> torch.Tensor:
        """(t, h, w) index of each patch, spatial order 2×2-merge-block-major (as patchified)."""
        out = []
        m = self.merge
        for t, h, w in grid_thw:
            hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            hh = hh.reshape(h // m, m, w // m, m).transpose(1, 2).flatten()
            ww = ww.reshape(h // m, m, w // m, m).transpose(1, 2).flatten()
            tt = torch.arange(t).repeat_interleave(h * w)
            out.append(torch.stack([tt, hh.repeat(t), ww.repeat(t)], dim=-1))
        return torch.cat(out).to(device)

    def forward(self, patches: torch.Tensor, grid_thw: list[list[int]]) -> torch.Tensor:
        x = self.pre_layrnorm(self.embeddings(patches))
        pos = self.positions(grid_thw, x.device).float()
        freqs = (pos[..., None] * self.inv_freq[None, None]).flatten(1)  # [N, 3 · axis/2]
        freqs = torch.cat([freqs, freqs], dim=-1)
        cos, sin = freqs.cos(), freqs.sin()
        cu = [0]
        for t, h, w in grid_thw:
            cu.append(cu[-1] + t * h * w)
        for layer in self.encoder.layers:
            x = layer(x, cos, sin, cu)
        return x


class VisionTower(nn.Module):
    def __init__(self, v: dict[str, Any]) -> None:
        super().__init__()
        self.vision_model = VisionTransformer(v)


class TwoLayerGelu(nn.Module):
    def __init__(self, d_in: int, d_mid: int, d_out: int) -> None:
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(d_in, d_mid), nn.Linear(d_mid, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


class MiniMaxM3SparseForConditionalGeneration(nn.Module):
    def __init__(self, config: Any, quant_config: Any = None, prefix: str = "") -> None:
        super().__init__()
        from sglang.srt.layers.logits_processor import LogitsProcessor
        from sglang.srt.layers.vocab_parallel_embedding import ParallelLMHead

        assert quant_config is None, "m3serve's M3 serves bf16 checkpoints only (for now)"
        self.config = config
        text = config.text_config
        v = _vision_cfg(config)
        self.vision_tower = VisionTower(v)
        self.merge = self.vision_tower.vision_model.merge
        proj = getattr(config, "projector_hidden_size", None) or text.hidden_size
        self.multi_modal_projector = TwoLayerGelu(v["hidden_size"], proj, text.hidden_size)
        self.patch_merge_mlp = TwoLayerGelu(
            text.hidden_size * self.merge**2, proj, text.hidden_size
        )
        self.model = M3TextModel(text, prefix="language_model.model")
        self.lm_head = ParallelLMHead(
            text.vocab_size, text.hidden_size, prefix="language_model.lm_head"
        )
        self.logits_processor = LogitsProcessor(text)

    # -- multimodal hooks SGLang calls ------------------------------------------------------
    def pad_input_ids(self, input_ids: list[int], mm_inputs: Any) -> list[int]:
        from sglang.srt.managers.mm_utils import pad_mm_tokens

        return pad_mm_tokens(input_ids, mm_inputs)

    def encode_images(self, patches: torch.Tensor, grid_thw: list[list[int]]) -> torch.Tensor:
        """bf16 patches [N, C·T·P·P] → merged image embeddings [N / merge², text hidden]."""
        x = self.vision_tower.vision_model(patches, grid_thw)
        x = self.multi_modal_projector(x)
        return self.patch_merge_mlp(x.reshape(x.shape[0] // self.merge**2, -1))

    def get_image_feature(self, items: list[Any]) -> torch.Tensor:
        w = self.vision_tower.vision_model.embeddings.patch_embedding.weight
        patches = torch.cat([it.feature for it in items]).to(device=w.device, dtype=w.dtype)
        grids: list[list[int]] = []
        for it in items:
            grids.extend(it.image_grid_thw.tolist())
        return self.encode_images(patches, grids)

    def get_video_feature(self, items: list[Any]) -> torch.Tensor:
        w = self.vision_tower.vision_model.embeddings.patch_embedding.weight
        patches = torch.cat([it.feature for it in items]).to(device=w.device, dtype=w.dtype)
        grids: list[list[int]] = []
        for it in items:
            grids.extend(it.video_grid_thw.tolist())
        return self.encode_images(patches, grids)

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: Any, **_: Any
    ) -> Any:
        from sglang.srt.managers.mm_utils import general_mm_embed_routine

        h = general_mm_embed_routine(
            input_ids=input_ids,
            forward_batch=forward_batch,
            language_model=self.model,
            multimodal_model=self,
            positions=positions,
        )
        return self.logits_processor(input_ids, h, self.lm_head, forward_batch)

    @property
    def start_layer(self) -> int:
        return 0

    @property
    def end_layer(self) -> int:
        return self.config.text_config.num_hidden_layers

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loader = StrictLoader(self)
        for name, tensor in weights:
            if name.startswith("language_model."):
                ours = text_weight_name(name[len("language_model.") :])
                if ours is None:
                    continue
                ours = "lm_head." + ours[len("lm_head.") :] if ours.startswith("lm_head.") else ours
                loader.load(ours, tensor)
            elif name.startswith("mtp.") or "rotary_emb.inv_freq" in name:
                continue
            else:
                loader.load(name, tensor)
        return loader.finish()


EntryClass = [MiniMaxM3SparseForConditionalGeneration]
