#!/usr/bin/env bash
# Session 14's GPU runs (lanes.sh: wheels installed once; one card).
#
#   carry: [".dev-s8"]   timeout_s: 600   kind: nvidia-h200 (issue 5's earlier runs are on H200)
#
#   call 1 (1 GPU):  issue 5: the CUDA (wgmma, NVRTC-compiled) main kernel of sparse prefill,
#                    sparse_prefill_main.cu: its GPU tests (against the float32 reference, CUDA
#                    graph capture), then bench_sparse_prefill.py's sweep (Triton and CUDA main
#                    kernels, both readings of the transposed-V descriptor) and main / full
#                    prefill at 32K / 128K vs SGLang's ops with the winner.
#   call 2 (1 GPU):  the same after the kernel's second form (S(i+1) issued before O(i-1)'s
#                    stores; slimmer softmax; O staged with stmatrix, 16-byte stores), both store
#                    forms in the sweep (-DSTORE_DIRECT, removed since), ITEM_Q 64 / 128 / 256.
#   call 3 (1 GPU):  Nsight Compute stall / traffic metrics of the CUDA and Triton main kernels.
#   call 4 (1 GPU):  as call 2, after fixing what ncu + the SASS showed: ptxas had serialised
#                    every wgmma (C7515, a wgmma in flight across the loop's back edge); now
#                    S(i) and O(i-1) issue together, three query-row buffers.
#   call 5 (1 GPU):  the inverse index split by query range (query_range 2048 / 4096: the items
#                    running together gather one range's query rows), Triton and CUDA; tree
#                    reductions in the CUDA softmax. All the sparse-prefill GPU tests first.
#                    (Query ranges were slower, 2.486 / 2.568 ms vs 2.357 / 2.429 without, and
#                    were taken out again; the code is in the commit before that.)
#   call 6 (1 GPU):  the record run on the final tree: GPU tests, sweep (Triton ITEM_Q 64 / 128,
#                    CUDA), main and full prefill at 32K / 128K (sparse_prefill_s14_cuda.json).
#   call 8 (1 GPU):  the sparse-prefill GPU tests on the final tree.
#   call 7 (1 GPU):  the CUDA kernel rewritten warp-specialised and persistent (a producer
#                    warpgroup with mbarriers, two consumer warpgroups sharing each K/V block,
#                    K/V double-buffered across items); same tests and benchmark. Slower than
#                    the two-CTA form (2.504 vs 2.436 ms in call 6; Triton 2.349 in the same
#                    call): reverted, the code is in commit 33e41b0.
set -uo pipefail
cd "$(dirname "$0")/../.."
CALL="${1:?usage: session14.sh 1..}"
WHEELS=.dev-s8/wheels
SITE=/tmp/m3serve-site14
source scripts/gpu/lanes.sh
K=tests/kernels
case "$CALL" in
1|2|4|5|6|7)
    timeout -k 10 200 $GT $K/test_sparse_prefill.py 2>&1 | tail -n 30 > "$OUT/kt.txt"
    mkdir -p "$OUT/pre"
    timeout -k 10 330 python3 benchmarks/bench_sparse_prefill.py --sweep --out "$OUT/pre" \
        --contexts 32768,131072 --full-contexts 32768,131072 2>&1 | grep -v Warning | tail -n 45 \
        > "$OUT/pre.txt"
    cp "$OUT"/pre/sparse_prefill.json "$OUT/pre_s14.json" 2>/dev/null
    ;;
3)  # Nsight Compute on both main kernels at 128K, 64/4 (one run() each after warm-up)
    NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
    M=dram__bytes_read.sum,dram__bytes_write.sum,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum,sm__pipe_tensor_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed.sum,smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio,smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_short_scoreboard_per_issue_active.ratio,smsp__average_warps_issue_stalled_wait_per_issue_active.ratio,smsp__average_warps_issue_stalled_gmma_per_issue_active.ratio,smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_lg_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_math_pipe_throttle_per_issue_active.ratio,smsp__average_warps_issue_stalled_not_selected_per_issue_active.ratio,smsp__average_warps_issue_stalled_selected_per_issue_active.ratio,smsp__average_warps_issue_stalled_dispatch_stall_per_issue_active.ratio,smsp__average_warps_issue_stalled_membar_per_issue_active.ratio,smsp__average_warps_issue_stalled_sleeping_per_issue_active.ratio,smsp__issue_active.avg.pct_of_peak_sustained_active,gpu__time_duration.sum,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active
    for v in cuda:msa_prefill_main triton:_block_major_kernel; do
        timeout 200 "$NCU" --profile-from-start off -k "regex:${v#*:}" -c 1 --metrics "$M" \
            python3 scripts/gpu/ncu_prefill.py "${v%%:*}" 2>&1 | grep -v "^==PROF==" | tail -n 40 \
            > "$OUT/ncu_${v%%:*}.txt"
    done
    ;;
8)  # the sparse-prefill GPU tests after their refactor (shared adversarial cases, graph capture
    # parametrised by main kernel)
    timeout -k 10 300 $GT $K/test_sparse_prefill.py 2>&1 | tail -n 12 > "$OUT/kt.txt"
    ;;
esac
echo "[call $CALL done after $(( $(date +%s) - t0 )) s]"
