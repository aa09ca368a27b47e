"""Co-residency test (session 15): the CUDA main kernel (unfused: it counts nothing) beside the
side-stream combine kernel, which then finds no KV head finished and sleeps until its deadline
(3 ms). Beside each other: max(main, 3 ms); one after the other: main + 3 ms."""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import bench_sparse_prefill as b

from m3serve.kernels.msa.sparse_prefill_cuda import FusedCombine, launch_combine_poll

x = b.make_inputs(131072, b.CHUNK, 64, 4)
ids = b.select(x)
sm = 1 / math.sqrt(b.D)
q, k, v = x["q"], x["k"], x["v"]
w, _ = b.wrapper(x, main_kernel="cuda", combine="stream")
out = w.run(q, k, v, ids, sm)
p, m = w.p, w.p.meta
fc = FusedCombine(p.sync, ids, out, None, 0)
side = torch.cuda.Stream()


def main():
    w.launch_main(q, k, v, sm)  # unfused: no counting


def poll():
    p.sync.zero_()
    launch_combine_poll(p.o_part, p.lse_part, m.q_pos, p.item_ptr, m.num_blocks, fc, 3.0)


def both(first_main=True):
    cur = torch.cuda.current_stream()
    p.sync.zero_()
    side.wait_stream(cur)
    if first_main:
        main()
    with torch.cuda.stream(side):
        launch_combine_poll(p.o_part, p.lse_part, m.q_pos, p.item_ptr, m.num_blocks, fc, 3.0)
    if not first_main:
        main()
    cur.wait_stream(side)


print(f"main alone {b.bench(main, rep=20):.3f} ms, poll alone {b.bench(poll, rep=20):.3f} ms")
print(f"main then poll launched: {b.bench(both, rep=20):.3f} ms")
print(f"poll then main launched: {b.bench(lambda: both(False), rep=20):.3f} ms")
