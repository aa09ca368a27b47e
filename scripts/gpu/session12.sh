#!/usr/bin/env bash
# Session 12's GPU runs (lanes.sh: wheels installed once, lanes in parallel, one card each).
#
#   carry: [".dev-s8"]   timeout_s: 600
#   .dev-s8/wheels   python scripts/gpu/make_wheelhouse.py --out .dev-s8/wheels (slim sglang + its
#                    start-up deps + FlashInfer 0.6.18.post1), plus pytest and its deps
#
#   call 1 (4 GPUs):  kind nvidia-h100-x4.
#                     lane e2e (cards 0, 1): what the fused norm / RoPE kernels (session 11,
#                     fused_ops.md) give in serving: the same server with M3SERVE_FUSED_OPS=0
#                     ("unfused", card 0) and default ("ours", card 1), the 1 dense + 3 MSA
#                     checkpoint, 128K input, c 1 / 8, card parity measured first;
#                     lane pre (card 2): bench_sparse_prefill.py --sweep: the prefill main branch
#                     with the combine fused into the main kernel vs the combine launch, side by
#                     side at 128K, then 32K / 128K main and full prefill vs SGLang with the fastest;
#                     lane kt (card 3): the sparse-prefill GPU tests (fused combine included) and
#                     the fused-ops tests.
#   call 2 (4 GPUs):  kind nvidia-h100-x4.
#                     lane tp (cards 0, 1): the TP-invariant mode with the fused kernels in
#                     (inv TP 1 vs inv TP 2: greedy tokens and logprobs equal?);
#                     lane cost (cards 2, 3): its cost at TP 1 against the plain server, side by
#                     side on the TP run's workload (8K in, 128 out, c 8) and at 128K c 8.
#   call 3 (1 GPU):   the prefill main branch with one main launch per KV head and each head's
#                     combine on a side stream beside the next head's tiles (overlap=True), vs the
#                     one-launch form, in bench_sparse_prefill.py's sweep (then 32K / 128K main and
#                     full prefill with the fastest); the sparse-prefill GPU tests first.
#   call 4 (1 GPU):   issue 6's B8 question: what a kernel that only reads the bytes reaches at
#                     each size (bench_read_ceiling.py: random pages as the decode reads them,
#                     contiguous, persistent), timed as the decode attention is, beside the split
#                     attention's B8 / B32 sweep (sweep_kernels.py decode-split) in the same call.
#   call 5 (1 GPU):   issue 8's ratio after the fused kernels: ours vs SGLang's in-tree MSA ops
#                     in the same server, both servers on the one card (each cell run by one server
#                     after the other), 128K input, 512 output, c 1 / 8.
#   call 6 (1 GPU):   the split decode attention with each split's first page hoisted above the
#                     seq_lens load, and whole-page (n128) tiles: sweep_kernels.py decode-split
#                     --focus at B8 / B32 (hoisted and not, side by side); the decode GPU tests first.
#   call 7 (1 GPU):   for the next session's issue 5 work: Nsight Compute on the prefill main
#                     kernel and the combine at 128K, 64 / 4 (stall reasons, occupancy, memory),
#                     if ncu is on the machine and may read the counters; else which tools are.
#   call 8 (1 GPU):   every GPU test of the kernels, the backend and the model on the final tree.
set -uo pipefail
cd "$(dirname "$0")/../.."
CALL="${1:?usage: session12.sh 1..}"
WHEELS=.dev-s8/wheels
SITE=/tmp/m3serve-site12
source scripts/gpu/lanes.sh
K=tests/kernels
setup_ckpt() {  # issue8_run.sh's install + checkpoint, once, before the serving lanes
    STAGES=setup WHEELS=.dev-s8/wheels OUT="$OUT/setup" CKPT=/tmp/m3-gpu \
        bash scripts/gpu/issue8_run.sh > "$OUT/setup.txt" 2>&1 || { tail -20 "$OUT/setup.txt"; exit 1; }
}
case "$CALL" in
1)  # four GPUs (nvidia-h100-x4)
    lane pre 2 "timeout 540 python3 benchmarks/bench_sparse_prefill.py --sweep --out \$OUT \
        --contexts 32768,131072 --full-contexts 32768,131072 2>&1 | grep -v Warning | tail -n 45"
    lane kt 3 "timeout 400 $GT $K/test_sparse_prefill.py $K/test_fused_ops.py 2>&1 | tail -n 15"
    setup_ckpt
    STAGES=e2e WHEELS=.dev-s8/wheels OUT="$OUT/e2e" CKPT=/tmp/m3-gpu E2E_S=500 \
        E2E_ARGS="--servers unfused,ours --gpus 0,1 --workloads random:131072:512:1,8 \
        --prompts-per-conc 1 --tag s12_fused --deadline 400" \
        bash scripts/gpu/issue8_run.sh > "$OUT/e2e.txt" 2>&1 &
    ;;
2)  # four GPUs (nvidia-h100-x4)
    setup_ckpt
    STAGES=tp WHEELS=.dev-s8/wheels OUT="$OUT/tp" CKPT=/tmp/m3-gpu TP_S=500 \
        TP_ARGS="--gpus 0,1 --configs inv:1,inv:2 --workloads random:8192:128:8 \
        --deadline 300 --tag s12_inv" \
        bash scripts/gpu/issue8_run.sh > "$OUT/tp.txt" 2>&1 &
    (CUDA_VISIBLE_DEVICES=2,3 STAGES=e2e WHEELS=.dev-s8/wheels OUT="$OUT/cost" CKPT=/tmp/m3-gpu \
        E2E_S=500 E2E_ARGS="--servers inv,ours --gpus 0,1 \
        --workloads random:8192:128:8 random:131072:512:8 --prompts-per-conc 1 --tag s12_invcost \
        --deadline 380" bash scripts/gpu/issue8_run.sh > "$OUT/cost.txt" 2>&1) &
    ;;
3)  # one GPU
    timeout 200 $GT $K/test_sparse_prefill.py 2>&1 | tail -n 12 > "$OUT/kt.txt"
    mkdir -p "$OUT/pre"
    timeout 380 python3 benchmarks/bench_sparse_prefill.py --sweep --out "$OUT/pre" \
        --contexts 32768,131072 --full-contexts 32768,131072 2>&1 | grep -v Warning | tail -n 45 \
        > "$OUT/pre.txt"
    ;;
4)  # one GPU
    timeout 120 $GT $K/test_read_ceiling.py 2>&1 | tail -n 3 > "$OUT/kt.txt"
    mkdir -p "$OUT/rc" "$OUT/ds"
    timeout 200 python3 benchmarks/bench_read_ceiling.py --out "$OUT/rc" 2>&1 | grep -v Warning \
        | tail -n 14 > "$OUT/rc.txt"
    timeout 260 python3 benchmarks/sweep_kernels.py decode-split --batches 8,32 --budget-s 200 \
        --out "$OUT/ds" 2>&1 | grep -v Warning | tail -n 24 > "$OUT/ds.txt"
    cp "$OUT"/rc/read_ceiling.* "$OUT/" 2>/dev/null
    ;;
5)  # one GPU
    STAGES="setup e2e" WHEELS=.dev-s8/wheels OUT="$OUT/e2e" CKPT=/tmp/m3-gpu E2E_S=540 \
        E2E_ARGS="--servers ours,sglang --workloads random:131072:512:1,8 --prompts-per-conc 1 \
        --tag s12_ab --deadline 430" \
        bash scripts/gpu/issue8_run.sh > "$OUT/e2e.txt" 2>&1
    ;;
6)  # one GPU
    timeout 200 $GT $K/test_sparse_decode.py 2>&1 | tail -n 6 > "$OUT/kt.txt"
    mkdir -p "$OUT/ds"
    timeout 300 python3 benchmarks/sweep_kernels.py decode-split --focus --batches 8,32 \
        --out "$OUT/ds" 2>&1 | grep -v Warning | tail -n 20 > "$OUT/ds.txt"
    cp "$OUT"/ds/sweep_*.json "$OUT/" 2>/dev/null
    ;;
7)  # one GPU
    NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
    { echo "ncu: ${NCU:-none}"; ls /usr/local/cuda*/bin 2>/dev/null | grep -i -E "ncu|nsys|nsight" ; } \
        > "$OUT/tools.txt"
    if [ -n "$NCU" ]; then
        for k in _block_major_kernel _combine_kernel; do
            timeout 240 "$NCU" --profile-from-start off -k "regex:$k" -c 1 --section SpeedOfLight \
                --section Occupancy --section LaunchStats --section WarpStateStats \
                --section MemoryWorkloadAnalysis --section SchedulerStats \
                python3 scripts/gpu/ncu_prefill.py > "$OUT/ncu_$k.txt" 2>&1
            grep -v "^==PROF==" "$OUT/ncu_$k.txt" | tail -n 120 > "$OUT/ncu_${k}_tail.txt"
        done
    fi
    ;;
8)  # one GPU
    PYTHONPATH="$PWD/tests/sgl_kernel_standin:$PYTHONPATH" timeout 540 $GT tests/kernels \
        tests/backend tests/model 2>&1 | tail -n 15 > "$OUT/gpu_tests.txt"
    ;;
*) echo "unknown call $CALL"; exit 2 ;;
esac
wait
cp "$OUT"/tp/tp_*.json "$OUT"/e2e/e2e_*.json "$OUT"/cost/e2e_*.json "$OUT"/pre/sparse_prefill.* \
    "$OUT/" 2>/dev/null
for f in "$OUT"/*.txt; do echo "===== $(basename "$f")"; tail -n 45 "$f"; done
(cd "$OUT" && tar czf "session12_$CALL.tgz" --remove-files */ 2>/dev/null)
echo "[total $(( $(date +%s) - t0 )) s]"
