"""Issue 8's concurrency-1 question: the msa backend's decode step, ours vs SGLang's in-tree ops.

The clean serving rerun (e2e_serving.md, session 10 run H) has our server decoding 128K at
concurrency 1 in 2.28 ms per token vs 2.04 ms for the same server with SGLang 0.5.23's in-tree MSA
ops, although the kernel benchmark has our sparse step far faster. This times the backend part of
that step alone, as the server runs it: the backend built for each implementation over the pool
the server gives it (ours: page-major HND; SGLang's ops: token-major), one request of N tokens,
one dense layer (FlashInfer, both sides) and L MSA layers, each layer writing its K/V (and index
key) and attending, captured in one CUDA graph per implementation and replayed (CUDA events,
median), plus the host time of the per-step metadata refill before a replay, the GPU time of
refill + replay (what the server serialises on its stream), a back-to-back refill + replay loop
(wall per step), and an eager torch.profiler listing of the GPU kernels of one step. Prints a
table per batch size. (Session 10's H100 run predates the last two measures.)
Usage: python scripts/gpu/backend_decode_ab.py [--context 131072] [--batches 1,8] [--msa-layers 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from types import SimpleNamespace
from typing import Any

import torch

BLOCK, TOPK, HQ, HKV, D, DI = 128, 16, 64, 4, 128, 128


class Pool:
    """Per-layer K/V, HND [pages, H, block, D] (ours) or token-major [slots, H, D] (SGLang's)."""

    def __init__(self, pages: int, layers: int, hnd: bool) -> None:
        shape = (pages, HKV, BLOCK, D) if hnd else (pages * BLOCK, HKV, D)
        self.hnd = hnd
        self.k = [torch.randn(shape, device="cuda").bfloat16() for _ in range(layers)]
        self.v = [torch.randn(shape, device="cuda").bfloat16() for _ in range(layers)]

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.k[layer_id]

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self.v[layer_id]

    def write(self, layer_id: int, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.hnd:
            p, o = loc // BLOCK, loc % BLOCK
            self.k[layer_id][p, :, o], self.v[layer_id][p, :, o] = k, v
        else:
            self.k[layer_id][loc], self.v[layer_id][loc] = k, v


def build(impl: str, bs: int, context: int, msa_layers: int) -> tuple[Any, Any]:
    from m3serve.backend.msa_backend import MSAAttnBackend

    pages_per_req = (context + BLOCK) // BLOCK + 1
    pages = 1 + bs * pages_per_req
    layers = 1 + msa_layers
    pool = Pool(pages, layers, hnd=impl != "sglang")
    g = torch.Generator(device="cuda").manual_seed(0)
    perm = torch.randperm(pages - 1, device="cuda", generator=g) + 1
    tok = torch.arange(pages_per_req * BLOCK, device="cuda")
    r2t = torch.zeros(bs + 1, pages_per_req * BLOCK, dtype=torch.int32, device="cuda")
    for r in range(bs):
        r2t[r + 1] = (perm[r * pages_per_req + tok // BLOCK] * BLOCK + tok % BLOCK).int()
    b = object.__new__(MSAAttnBackend)
    b.setup(
        device="cuda", kv_pool=pool, req_to_token_pool=SimpleNamespace(req_to_token=r2t),
        block=BLOCK, topk=TOPK, index_dim=DI, sparse_layers=set(range(1, layers)),
        num_q_heads=HQ, num_kv_heads=HKV, q_dtype=torch.bfloat16,
        context_len=pages_per_req * BLOCK, impl=impl, index_dtype="bf16",
    )  # fmt: skip
    for cache in b.index_k.values():
        cache.copy_(torch.randn(cache.shape, device="cuda", generator=g))
    b._save_kv = lambda layer, fb, k, v: pool.write(layer.layer_id, fb.out_cache_loc.long(), k, v)
    return b, r2t


def batch(r2t: torch.Tensor, bs: int, context: int) -> SimpleNamespace:
    reqs = torch.arange(1, bs + 1, device="cuda")
    lens = torch.full((bs,), context + 1, dtype=torch.int64, device="cuda")
    loc = r2t[reqs, lens - 1].long()
    mode = SimpleNamespace(is_decode_or_idle=lambda: True, is_extend=lambda: False)
    return SimpleNamespace(
        batch_size=bs, forward_mode=mode, req_pool_indices=reqs, seq_lens=lens,
        seq_lens_cpu=lens.cpu(), out_cache_loc=loc,
    )  # fmt: skip


def step(b: Any, fb: Any, x: dict[str, torch.Tensor], msa_layers: int) -> torch.Tensor:
    lay = [SimpleNamespace(layer_id=i, tp_q_head_num=HQ, tp_k_head_num=HKV, head_dim=D,
                           scaling=D**-0.5) for i in range(1 + msa_layers)]  # fmt: skip
    out = b._run(x["q"], x["k"], x["v"], lay[0], fb, True, None, None).view(-1, HQ, D)
    for layer in lay[1:]:
        out = out + b._run(x["q"].view(-1, HQ, D), x["k"], x["v"], layer, fb, True, x["iq"],
                           x["ik"])[1]  # fmt: skip
    return out


def kernels_of_one_step(b: Any, fb: Any, x: dict[str, torch.Tensor], msa_layers: int) -> list:
    from torch.profiler import ProfilerActivity, profile

    b.init_forward_metadata(fb)
    step(b, fb, x, msa_layers)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        b.init_forward_metadata(fb)
        step(b, fb, x, msa_layers)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us > 0 and e.count:
            rows.append((e.key[:70], e.count, us))
    return sorted(rows, key=lambda r: -r[2])


def time_graph(b: Any, fb: Any, x: dict[str, torch.Tensor], msa_layers: int, bs: int) -> dict:
    b.init_cuda_graph_state(bs, bs)
    b.init_forward_metadata_out_graph(fb, in_capture=True)
    step(b, fb, x, msa_layers)
    torch.cuda.synchronize()
    b.init_forward_metadata_out_graph(fb, in_capture=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(b, fb, x, msa_layers)
    host, gpu = [], []
    for _ in range(20):
        graph.replay()
    torch.cuda.synchronize()
    for _ in range(100):
        t = time.perf_counter()
        b.init_forward_metadata_out_graph(fb)
        host.append((time.perf_counter() - t) * 1e3)
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        graph.replay()
        e1.record()
        torch.cuda.synchronize()
        gpu.append(e0.elapsed_time(e1))
    # the refill's own GPU work (copies, the page-table gather, plans' uploads) as the server
    # serialises it before each replay: events around refill + replay, the host kept ahead by a
    # long first kernel so host time does not show
    both = []
    for _ in range(30):
        torch.cuda.synchronize()
        torch.cuda._sleep(2_000_000)  # ~1 ms of GPU work ahead of the timed region
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        b.init_forward_metadata_out_graph(fb)
        graph.replay()
        e1.record()
        torch.cuda.synchronize()
        both.append(e0.elapsed_time(e1))
    # a server-like loop: refill + replay back to back, no sync (host and GPU overlap as far
    # as the stream lets them): wall time per step
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(100):
        b.init_forward_metadata_out_graph(fb)
        graph.replay()
    torch.cuda.synchronize()
    loop = (time.perf_counter() - t) * 10
    return {"replay_ms": statistics.median(gpu), "refill_host_ms": statistics.median(host),
            "refill_plus_replay_gpu_ms": statistics.median(both), "loop_ms_per_step": loop}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--msa-layers", type=int, default=3)
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    for bs in [int(s) for s in args.batches.split(",")]:
        res = {}
        for impl in ("auto", "sglang"):
            b, r2t = build(impl, bs, args.context, args.msa_layers)
            fb = batch(r2t, bs, args.context)
            g = torch.Generator(device="cuda").manual_seed(1)

            def r(*shape: int) -> torch.Tensor:
                return torch.randn(*shape, device="cuda", generator=g).bfloat16()  # noqa: B023

            x = dict(q=r(bs, HQ * D), k=r(bs, HKV, D), v=r(bs, HKV, D), iq=r(bs, HKV, DI),
                     ik=r(bs, 1, DI))  # fmt: skip
            name = "ours" if impl == "auto" else "sglang-ops"
            res[name] = time_graph(b, fb, x, args.msa_layers, bs)
            print(f"\n== B{bs} x {args.context} {name}: eager kernels of one step "
                  f"(1 dense + {args.msa_layers} MSA layers), GPU us ==")  # fmt: skip
            for key, n, us in kernels_of_one_step(b, fb, x, args.msa_layers)[:14]:
                print(f"  {us:9.1f}  x{n:<3d} {key}")
            del b, r2t
            torch.cuda.empty_cache()
        o, s = res["ours"], res["sglang-ops"]
        print(f"\nB{bs} x {args.context}, 1 dense + {args.msa_layers} MSA layers, graph replay ms: "
              f"ours {o['replay_ms']:.4f} / sglang-ops {s['replay_ms']:.4f} = "
              f"{s['replay_ms'] / o['replay_ms']:.2f}x; host refill before replay ms: ours "
              f"{o['refill_host_ms']:.3f} / sglang-ops {s['refill_host_ms']:.3f}; refill + replay "
              f"on the GPU ms: ours {o['refill_plus_replay_gpu_ms']:.4f} / sglang-ops "
              f"{s['refill_plus_replay_gpu_ms']:.4f}; back-to-back loop ms per step: ours "
              f"{o['loop_ms_per_step']:.4f} / sglang-ops {s['loop_ms_per_step']:.4f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
