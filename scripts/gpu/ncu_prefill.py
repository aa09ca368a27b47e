"""Run the sparse-prefill main branch once at 128K context (8K-query chunk, 64 q / 4 KV heads) so
that Nsight Compute can profile its kernels: `ncu -k regex:_block_major_kernel -c 1 ... python
scripts/gpu/ncu_prefill.py [triton|cuda]` (session12.sh call 7, session14.sh call 3: the main
kernel in Triton, the default, or CUDA). Warms up (compile + autotune) first, then one run()
under a CUDA profiler range."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_sparse_prefill import make_inputs, select, wrapper

x = make_inputs(131072, 8192, 64, 4)
ids = select(x)
w, _ = wrapper(x, main_kernel=sys.argv[1] if len(sys.argv) > 1 else "triton")
sm = 1 / math.sqrt(x["q"].shape[-1])
out = w.run(x["q"], x["k"], x["v"], ids, sm)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
w.run(x["q"], x["k"], x["v"], ids, sm, out=out)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
print("ran the main branch once under the profiler range", flush=True)
