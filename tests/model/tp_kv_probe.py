"""What each tensor-parallel rank of our M3 attention computes, for tests/model/test_tp_kv_replication.py.

Run as a script (``python tp_kv_probe.py CKPT_DIR OUT.pt TP...``), in a subprocess because it needs
the stand-in ``sgl_kernel`` on ``sys.path`` and publishes SGLang's process-wide runtime context.
For each TP size and each rank it publishes that rank's topology (no process group is needed: the
parallel layers only read rank and size while being built and loaded), builds one MSA layer's
``M3Attention``, loads the checkpoint's tensors for it through our ``StrictLoader`` (the path the
server uses), runs its forward on fixed hidden states and records the tensors it hands to the
attention backend: q, k, v [T, heads, D] and the index branch's idx_q [T, G, d], idx_k [T, 1, d].
The o_proj all-reduce is never reached (the backend call is replaced by a recorder).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

LAYER = "model.layers.{}.self_attn"


class _Recorder(nn.Module):
    def __init__(self, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.seen: dict[str, torch.Tensor] = {}

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fb: Any, **idx: Any):
        t = q.shape[0]
        self.seen = {
            "q": q.reshape(t, -1, self.head_dim).clone(),
            "k": k.reshape(t, -1, self.head_dim).clone(),
            "v": v.reshape(t, -1, self.head_dim).clone(),
            "idx_q": idx["idx_q"].clone(),
            "idx_k": idx["idx_k"].clone(),
        }
        return None, torch.zeros(t, self.heads * self.head_dim)


def run(ckpt_dir: Path, tp_sizes: list[int]) -> dict[str, Any]:
    from safetensors.torch import load_file
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.test.test_utils import publish_build_topology

    from m3serve.models.m3_text import M3Attention, StrictLoader, sparse_layer_ids, text_weight_name

    publish_build_topology(world_rank=0, tp_size=1)
    cfg = ModelConfig(str(ckpt_dir), dtype="float32").hf_config.text_config
    layer = min(sparse_layer_ids(cfg))
    prefix = LAYER.format(layer)
    ckpt = {
        text_weight_name(n[len("language_model.") :]): t.float()
        for n, t in load_file(str(ckpt_dir / "model.safetensors")).items()
        if n.startswith(f"language_model.{prefix}.")
    }
    x = torch.randn(7, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(7) * 5
    out: dict[str, Any] = {"layer": layer, "ranks": {}}
    for tp in tp_sizes:
        for rank in range(tp):
            publish_build_topology(world_rank=rank, tp_size=tp)
            attn = M3Attention(cfg, layer, True, prefix)
            holder = nn.Module()
            holder.self_attn = attn
            loader = StrictLoader(holder)
            for name, tensor in ckpt.items():
                loader.load(name[len(f"model.layers.{layer}.") :], tensor)
            loader.finish()
            rec = _Recorder(attn.num_heads, attn.head_dim)
            del attn.attn, attn.o_proj
            attn.attn = rec
            attn.o_proj = lambda y: (y, None)
            with torch.no_grad():
                attn(positions, x, None)
            out["ranks"][(tp, rank)] = {"kv_start": attn.kv_start, **rec.seen}
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sgl_kernel_standin"))
    result = run(Path(sys.argv[1]), [int(a) for a in sys.argv[3:]])
    torch.save(result, sys.argv[2])
