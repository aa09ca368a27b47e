"""Does the per-step host work of a decode step wait for the GPU? (issue 8: TPOT at concurrency 1)

With SGLang's overlap scheduler the host prepares step N+1 while the GPU runs step N; any call in
that preparation that waits for the stream (a pageable host→device copy may, depending on the
driver) serialises the two. Each probe runs with the stream kept busy ~50 ms ahead
(torch.cuda._sleep): a host time of ~50 ms means the call waited for the GPU, microseconds that it
did not. Prints one line per probe. Usage: python scripts/gpu/host_sync_probe.py
"""

from __future__ import annotations

import time

import torch

from m3serve.backend.dense_flashinfer import DenseFlashInfer
from m3serve.kernels.msa.sparse_decode import SparseDecodeWrapper

DEV = torch.device("cuda")
CYCLES_50MS = int(50e-3 * 2.0e9)


def probe(name: str, fn, n: int = 5) -> None:
    fn()
    torch.cuda.synchronize()
    idle, busy = [], []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        idle.append((time.perf_counter() - t) * 1e3)
        torch.cuda.synchronize()
        torch.cuda._sleep(CYCLES_50MS)
        t = time.perf_counter()
        fn()
        busy.append((time.perf_counter() - t) * 1e3)
        torch.cuda.synchronize()
    print(f"{name:58s} host ms: idle {min(idle):7.3f}   GPU busy {min(busy):7.3f} / {max(busy):7.3f}",
          flush=True)  # fmt: skip


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    dst = torch.zeros(64, dtype=torch.int32, device=DEV)
    pageable = torch.arange(64, dtype=torch.int32)
    pinned = pageable.pin_memory()
    probe("pageable int32[64] -> device, copy_(non_blocking)", lambda: dst.copy_(pageable, non_blocking=True))
    probe("pinned int32[64] -> device, copy_(non_blocking)", lambda: dst.copy_(pinned, non_blocking=True))
    probe("torch.tensor(list).to(device, non_blocking)", lambda: torch.tensor([1, 2, 3]).to(DEV, non_blocking=True))
    src_dev = torch.ones(64, dtype=torch.int32, device=DEV)
    probe("device -> device copy_", lambda: dst.copy_(src_dev))
    hq, hkv, d, block, topk = 64, 4, 128, 128, 16
    for batch, ctx in ((1, 131072), (8, 131072), (64, 32768)):
        lens = [ctx] * batch
        for ranked in (True, False):
            w = SparseDecodeWrapper(DEV, ranked=ranked)
            w.reserve(64 * hkv, topk, hq // hkv, d)
            probe(f"SparseDecodeWrapper.plan B{batch} ranked={ranked}",
                  lambda w=w, lens=lens: w.plan(lens, 1, hq, hkv, d, block, topk, torch.bfloat16, torch.bfloat16))  # fmt: skip
        pages = 1056
        pt = torch.arange(batch * pages, dtype=torch.int32, device=DEV).view(batch, pages)
        dense = DenseFlashInfer(DEV)
        dense.reserve_graphs(64, pages)
        for graph in (True, False):
            probe(f"DenseFlashInfer.plan decode B{batch} graph={graph}",
                  lambda dense=dense, lens=lens, pt=pt, graph=graph, batch=batch: dense.plan(
                      [1] * batch, lens, pt, hq, hkv, d, block, d**-0.5, torch.bfloat16,
                      torch.bfloat16, True, graph=graph))  # fmt: skip


if __name__ == "__main__":
    main()
