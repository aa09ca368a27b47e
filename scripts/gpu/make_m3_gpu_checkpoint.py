"""An M3-shaped random-weight checkpoint for GPU serving runs (issue 8): M3's real attention shapes.

64 query heads, 4 KV heads, head_dim 128, index dim 128, block 128, top-k 16, hidden 6144, with
fewer layers and experts than M3 so that it fits one GPU. Uses the tiny-checkpoint writer
(m3serve.checkpoint.m3) with a size preset defined here. Usage:
python scripts/gpu/make_m3_gpu_checkpoint.py OUT_DIR [--dense-layers 1] [--sparse-layers 3] [--experts 8]
"""

from __future__ import annotations

import argparse
import time

from m3serve.checkpoint import m3
from m3serve.checkpoint.tokenizer import write_tokenizer


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--dense-layers", type=int, default=1)
    ap.add_argument("--sparse-layers", type=int, default=3)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--experts-per-tok", type=int, default=2)
    ap.add_argument("--expert-ffn", type=int, default=3072)
    ap.add_argument("--max-positions", type=int, default=1048576 + 4096)
    args = ap.parse_args()
    sizes = m3.M3Sizes(
        hidden=6144, dense_layers=args.dense_layers, sparse_layers=args.sparse_layers,
        heads=64, kv_heads=4, head_dim=128, rotary_dim=64, index_dim=128, block=128,
        topk_blocks=16, experts=args.experts, experts_per_tok=args.experts_per_tok,
        expert_ffn=args.expert_ffn, dense_ffn=12288, vision_hidden=256, vision_heads=4,
        vision_ffn=512, vision_layers=1, max_positions=args.max_positions, weight_std=0.02,
    )  # fmt: skip
    m3.PRESETS["gpu-m3-attn"] = sizes
    t0 = time.time()
    tok = write_tokenizer(args.out)
    m3.write_m3_checkpoint(args.out, tok, preset="gpu-m3-attn", seed=0)
    print(f"wrote M3-shaped checkpoint to {args.out} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
