"""How the ways of merging sparse-prefill partials compare (session 15 diagnostics): run() at
128K / 64-4 with the Triton main kernel + Triton combine and the CUDA main kernel with each
`combine` mode, then a torch-profiler kernel table of one "stream" run() and how many combine
units the main grid and the side-stream kernel took before the rest kernel."""

import math
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_sparse_prefill as b

from m3serve.kernels.msa import sparse_prefill_cuda as spc

ctx = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
x = b.make_inputs(ctx, b.CHUNK, 64, 4)
ids = b.select(x)
sm = 1 / math.sqrt(b.D)
q, k, v = x["q"], x["k"], x["v"]
res = {}
ref = None
for mk, comb in (("triton", "separate"), ("cuda", "separate"), ("cuda", "grid"),
                 ("cuda", "stream"), ("cuda", "grid+stream"), ("triton", "separate")):  # fmt: skip
    w, _ = b.wrapper(x, main_kernel=mk, combine=comb)
    out = w.run(q, k, v, ids, sm)
    ref = out.clone() if ref is None else ref
    err = b.max_err(out, ref)
    ms = b.bench(lambda w=w, out=out: w.run(q, k, v, ids, sm, out=out))
    res[f"run {mk} {comb}"] = min(ms, res.get(f"run {mk} {comb}", 1e9))
    print(f"run {mk:6s} {comb:12s} {ms:8.3f} ms  err vs first {err:.4f}", flush=True)
    if comb == "stream":
        ws, outs = w, out
    else:
        w = out = None
        torch.cuda.empty_cache()
# units taken before the rest kernel: replay main + side kernel without the rest
p, m = ws.p, ws.p.meta
real = spc.launch_combine_cuda
spc_calls = []
import m3serve.kernels.msa.sparse_prefill as sp  # noqa: E402

sp.launch_combine_cuda = lambda *a, **kw: spc_calls.append(1)
ws.run(q, k, v, ids, sm, out=outs)
torch.cuda.synchronize()
print("tickets before the rest kernel", p.sync[:4].tolist(), "of", -(-q.shape[0] // 8), "each")
sp.launch_combine_cuda = real
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(3):
        ws.run(q, k, v, ids, sm, out=outs)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=6))
