"""Where the time of the fused-combine CUDA sparse prefill goes (session 15 diagnostics):
run() fused vs unfused, the fused main kernel alone, the rest kernel alone, how many combine
units the main grid took, and a torch-profiler kernel table of one fused run()."""

import math
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_sparse_prefill as b

from m3serve.kernels.msa.sparse_prefill_cuda import FusedCombine, launch_combine_cuda

ctx = int(sys.argv[1]) if len(sys.argv) > 1 else 131072
x = b.make_inputs(ctx, b.CHUNK, 64, 4)
ids = b.select(x)
sm = 1 / math.sqrt(b.D)
q, k, v = x["q"], x["k"], x["v"]
res = {}
for mk, fuse in (("triton", False), ("cuda", False), ("cuda", True)):
    w, _ = b.wrapper(x, main_kernel=mk, fuse_combine=fuse)
    out = w.run(q, k, v, ids, sm)
    res[f"run {mk} fused={fuse}"] = b.bench(lambda w=w, out=out: w.run(q, k, v, ids, sm, out=out))
p, m = w.p, w.p.meta
fc = FusedCombine(p.sync, ids, out, None)


def fused_main():
    p.sync.zero_()
    w.launch_main(q, k, v, sm, fc)


def unfused_main():
    w.launch_main(q, k, v, sm)


def rest_all():  # the rest kernel doing every unit
    p.sync.zero_()
    launch_combine_cuda(p.o_part, p.lse_part, m.q_pos, fc)


res["fused main only"] = b.bench(fused_main)
from m3serve.kernels.msa import sparse_prefill_cuda as spc  # noqa: E402

_get = spc.cuda_rtc.get_kernel
for cap in (2, 4):
    spc.cuda_rtc.get_kernel = lambda *a, c=cap: _get(*a, options=(f"-DMAIN_GRID_UNITS={c}",))
    res[f"run fused, {cap} units per CTA"] = b.bench(lambda: w.run(q, k, v, ids, sm, out=out))
spc.cuda_rtc.get_kernel = _get
res["unfused main only"] = b.bench(unfused_main)
res["rest kernel, all units"] = b.bench(rest_all)
fused_main()
torch.cuda.synchronize()
uq, n = fc.units(16)
print("units per head", n, "tickets after the main grid", p.sync[:4].tolist(), "done", p.sync[4:].tolist())
for key, val in res.items():
    print(f"{key:28s} {val:8.3f} ms")
with profile(activities=[ProfilerActivity.CUDA]) as prof:
    for _ in range(3):
        w.run(q, k, v, ids, sm, out=out)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))

# -- per-CTA timeline of one fused main grid (kernel built with -DM3_TRACE) --
spc.cuda_rtc.get_kernel = lambda *a: _get(*a, options=("-DM3_TRACE",))
grid = p.work_row.numel()
fc.trace = torch.zeros(grid, 6, dtype=torch.int64, device="cuda")
for _ in range(2):
    fused_main()
torch.cuda.synchronize()
tr = fc.trace.cpu().double()
n_items = int(p.item_ptr[-1])
t0 = tr[:, 0].min()
start, main_end, sig_end, units, end = (tr[:, i] - (t0 if i != 3 else 0) for i in range(5))
real = slice(0, n_items)
print(f"grid {grid} CTAs, {n_items} items; kernel span {float(end.max()) / 1e3:.1f} us")
print(f"main item us: median {float((main_end[real] - start[real]).median()) / 1e3:.1f} "
      f"max {float((main_end[real] - start[real]).max()) / 1e3:.1f}")
print(f"signal us: median {float((sig_end[real] - main_end[real]).median()) / 1e3:.2f} "
      f"max {float((sig_end[real] - main_end[real]).max()) / 1e3:.2f}")
u = units
has = u > 0
print(f"CTAs with units {int(has.sum())}, units {int(u.sum())}, max per CTA {int(u.max())}")
after = end - torch.where(torch.arange(grid) < n_items, sig_end, start)
print(f"post-item us per CTA with units: median {float(after[has].median()) / 1e3:.1f} "
      f"max {float(after[has].max()) / 1e3:.1f}; per unit {float((after[has] / u[has]).median()) / 1e3:.1f}")
print(f"post-item us without units: median {float(after[~has].median()) / 1e3:.2f}")
for g in range(4):
    lo, hi = int(p.item_ptr[g * m.num_blocks]), int(p.item_ptr[(g + 1) * m.num_blocks])
    print(f"head {g}: items {lo}..{hi} start {float(start[lo:hi].min()) / 1e3:.0f}-"
          f"{float(start[lo:hi].max()) / 1e3:.0f} us, last main end {float(main_end[lo:hi].max()) / 1e3:.0f} us")
order = torch.argsort(start)
print("first 8 CTAs by start:", order[:8].tolist(), "starts", [int(x) for x in start[order[:8]] / 1e3])
print("CTA starts by blockIdx decile (us):", [int(start[int(i)] / 1e3) for i in torch.linspace(0, grid - 1, 11)])
