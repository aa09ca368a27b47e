"""Can the combine run beside the main kernel (session 15)? Times the main kernel and a combine
alone and launched together on two streams (the combine on a high- or normal-priority stream,
as a regular grid or a persistent one of one CTA per SM), on independent buffers, 128K / 64-4.
Also prints the Triton kernels' registers and shared memory (room for co-resident CTAs)."""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_sparse_prefill as b

from m3serve.kernels.msa import sparse_prefill_cuda as spc
from m3serve.kernels.msa import sparse_prefill_triton as spt
from m3serve.kernels.msa.sparse_prefill_cuda import FusedCombine

x = b.make_inputs(131072, b.CHUNK, 64, 4)
ids = b.select(x)
sm = 1 / math.sqrt(b.D)
q, k, v = x["q"], x["k"], x["v"]
NSM = torch.cuda.get_device_properties(0).multi_processor_count
res: dict[str, float] = {}


def combines(w2, out2):
    """Combine launchers over a second plan's partials (independent of the main kernel's)."""
    p2, m2 = w2.p, w2.p.meta
    fc = FusedCombine(p2.sync, ids, out2, None)
    kern = spc.cuda_rtc.get_kernel(spc.source(), spc.COMBINE_KERNEL, spc.cuda_rtc.device_arch(), 0)

    def triton_combine():
        spt.launch_combine(p2.o_part, p2.lse_part, ids, m2.q_pos, out2, None, 4, 128, False)

    def cuda_combine(grid):
        p2.sync.zero_()
        args = [p2.o_part, p2.lse_part, p2.sync, fc.args(m2.q_pos, 16), 4, 16, 16,
                p2.o_part.stride(0), p2.o_part.stride(1), p2.lse_part.stride(0)]  # fmt: skip
        kern.launch(grid, 128, 0, args, "pppsiiilll")

    return {"triton combine": triton_combine,
            "cuda combine 4/SM": lambda: cuda_combine(4 * NSM),
            "cuda combine 1/SM": lambda: cuda_combine(NSM)}  # fmt: skip


def together(main, side_fn, prio):
    side = torch.cuda.Stream(priority=prio)

    def both():
        cur = torch.cuda.current_stream()
        side.wait_stream(cur)  # both start after the previous iteration
        main()
        with torch.cuda.stream(side):
            side_fn()
        cur.wait_stream(side)

    return both


for mk in ("triton", "cuda"):
    w, _ = b.wrapper(x, main_kernel=mk, fuse_combine=False)
    w.run(q, k, v, ids, sm)
    w2, _ = b.wrapper(x, main_kernel=mk, fuse_combine=False)
    out2 = w2.run(q, k, v, ids, sm)

    def main(w=w):
        w.launch_main(q, k, v, sm)

    res[f"{mk} main alone"] = b.bench(main)
    for name, fn in combines(w2, out2).items():
        if mk == "triton":
            res[f"{name} alone"] = b.bench(fn)
        for prio in (-1, 0):
            res[f"{mk} main + {name} (prio {prio})"] = b.bench(together(main, fn, prio))
    w = w2 = out2 = None
    torch.cuda.empty_cache()

for kern in (spt._block_major_kernel, spt._combine_kernel):
    jf = getattr(kern, "fn", kern)
    try:
        for entry in jf.device_caches.values():
            for c in entry[0].values():
                print(jf.__name__, "regs", c.n_regs, "shared", c.metadata.shared,
                      "warps", c.metadata.num_warps)  # fmt: skip
    except Exception as e:  # introspection only
        print("no cache introspection:", type(e).__name__, e)
for key, val in res.items():
    print(f"{key:52s} {val:8.3f} ms")
