"""L2 residency hints in the CUDA main kernel (session 15): run() and the main kernel alone at
128K and 32K, 64-4, with the kernel built plain, with -DM3_L2_HINTS=1 (partial stores
evict-first) and =2 (and query-row gathers evict-last), beside the Triton default."""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_sparse_prefill as b

from m3serve.kernels.msa import sparse_prefill_cuda as spc

_get = spc.cuda_rtc.get_kernel
SM = 1 / math.sqrt(b.D)


def case(ctx: int) -> None:
    x = b.make_inputs(ctx, b.CHUNK, 64, 4)
    ids = b.select(x)
    q, k, v, sm = x["q"], x["k"], x["v"], SM
    ref = None
    for mk, opt in (("triton", ""), ("cuda", ""), ("cuda", "-DM3_L2_HINTS=1"),
                    ("cuda", "-DM3_L2_HINTS=2"), ("triton", "")):  # fmt: skip
        spc.cuda_rtc.get_kernel = lambda *a, o=opt: _get(*a, options=(o,) if o else ())
        w, _ = b.wrapper(x, main_kernel=mk)
        out = w.run(q, k, v, ids, sm)
        ref = out.clone() if ref is None else ref
        ms = b.bench(lambda w=w, out=out: w.run(q, k, v, ids, sm, out=out))
        mk_ms = b.bench(lambda w=w: w.launch_main(q, k, v, sm))
        print(f"{ctx // 1024}K {mk:6s} {opt or 'plain':16s} run {ms:7.3f} ms  main kernel {mk_ms:7.3f} ms"
              f"  err {b.max_err(out, ref):.4f}", flush=True)
        w = out = None
        torch.cuda.empty_cache()
    spc.cuda_rtc.get_kernel = _get


for c in (131072, 32768):
    case(c)
