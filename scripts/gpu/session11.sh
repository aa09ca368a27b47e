#!/usr/bin/env bash
# Session 11's GPU runs (lanes.sh: wheels installed once, lanes in parallel, one card each).
#
#   carry: [".dev-s8"]   timeout_s: 600
#   .dev-s8/wheels   python scripts/gpu/make_wheelhouse.py --out .dev-s8/wheels (slim sglang + its
#                    start-up deps + FlashInfer 0.6.18.post1), plus pytest and its deps
#
#   call 1 (1 H100):  kind nvidia-h100-x1: session 10's unrun call 6, with the time it needs: issue
#                     8's concurrency-1 decode gap inside the servers, scripts/gpu/profile_decode.py
#                     (both servers on the card, one 128K request each, SGLang's profiler over 30
#                     decode steps: GPU only, then with host stacks). Both servers take ~7 min to
#                     come up one after the other, so nothing else runs in this call.
#                     As run: the first server's host trace was read half-written, the script
#                     stopped before the second server (load_trace now retries until it parses).
#   call 2 (2 H100):  kind nvidia-h100-x2: issue 8's "TP 2 greedy tokens identical to TP 1" with the
#                     TP-invariant mode (M3SERVE_TP_INVARIANT=2, m3serve.models.invariant): the
#                     backend's shard calls = rank backends bit for bit on the fast kernels (GPU
#                     test), then tp_serving.py inv:1 then inv:2 on the M3-shaped checkpoint
#                     (greedy tokens, logprobs, a short throughput run).
#                     As run (2x H200): inv TP 2 = inv TP 1 on all 5 prompts (32 greedy tokens each,
#                     output and 315 prompt logprobs: max |diff| 0.0); the GPU test stopped on an
#                     sgl_kernel import (the lane lacked the stand-in on PYTHONPATH).
#   call 3 (1 H100):  kind nvidia-h100-x1: call 1 again (the c1 profile, both servers), and beside
#                     it on the same card, while the servers come up, the backend's GPU path tests
#                     (the invariant one with the stand-in sgl_kernel this time).
#   call 4 (1 H100):  kind nvidia-h100-x1: the fused RMSNorm / norm + RoPE Triton kernels
#                     (m3serve.models.fused_ops): their GPU tests and benchmarks/bench_fused_ops.py
#                     (torch ops vs fused, CUDA-graph replays, kernels per call).
set -uo pipefail
cd "$(dirname "$0")/../.."
CALL="${1:?usage: session11.sh 1..}"
WHEELS=.dev-s8/wheels
SITE=/tmp/m3serve-site11
source scripts/gpu/lanes.sh
case "$CALL" in
1)  # one H100 (nvidia-h100-x1)
    profile_c1 520
    ;;
3)  # one H100 (nvidia-h100-x1)
    lane bt 0 "PYTHONPATH=$PWD/tests/sgl_kernel_standin:\$PYTHONPATH timeout 200 $GT \
        tests/backend/test_msa_backend_paths.py 2>&1 | tail -n 12"
    profile_c1 470
    ;;
4)  # one H100 (nvidia-h100-x1)
    timeout 150 $GT tests/kernels/test_fused_ops.py 2>&1 | grep -E "^E |passed|failed" | head -n 30 \
        | tee "$OUT/tests.txt"
    [ -n "${NO_BENCH:-}" ] || timeout 150 python3 benchmarks/bench_fused_ops.py --out "$OUT" \
        2>&1 | grep -v Warning | tail -n 16 | tee "$OUT/bench.txt"
    ;;
2)  # two H100 (nvidia-h100-x2)
    lane inv 0 "timeout 150 $GT tests/backend/test_msa_backend_paths.py -k invariant 2>&1 | tail -n 12"
    STAGES=setup WHEELS=.dev-s8/wheels OUT="$OUT/setup" CKPT=/tmp/m3-gpu \
        bash scripts/gpu/issue8_run.sh > "$OUT/setup.txt" 2>&1 || { tail -20 "$OUT/setup.txt"; exit 1; }
    wait
    STAGES=tp WHEELS=.dev-s8/wheels OUT="$OUT/tp" CKPT=/tmp/m3-gpu TP_S=470 \
        TP_ARGS="--gpus 0,1 --configs inv:1,inv:2 --workloads random:8192:128:8 --deadline 280 \
        --tag s11_inv" \
        bash scripts/gpu/issue8_run.sh > "$OUT/tp.txt" 2>&1
    cp "$OUT"/tp/tp_*.json "$OUT/" 2>/dev/null
    ;;
*) echo "unknown call $CALL"; exit 2 ;;
esac
wait
for f in "$OUT"/*.txt; do echo "===== $(basename "$f")"; tail -n 60 "$f"; done
(cd "$OUT" && tar czf "session11_$CALL.tgz" --remove-files */ 2>/dev/null)
echo "[total $(( $(date +%s) - t0 )) s]"
