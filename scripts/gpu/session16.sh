#!/usr/bin/env bash
# Session 16's GPU runs (lanes.sh: wheels installed once; one card).
#
#   carry: [".dev-s8", ".dev-s16"]   timeout_s: 600   kind: nvidia-h200
#
# .dev-s16/old/msa_old is the kernels package of the commit before the change under test
# (git archive <commit> python/m3serve/kernels/msa), loaded beside the tree's own.
#
#   call 1 (1 GPU):  issue 5: the main kernels' per-tile instruction diet (scale folded into the
#                    exp2's FFMA, the GQA group a compile-time constant, O stored unnormalised
#                    with its row max beside the lse so the combine divides once per query).
#                    The sparse-prefill GPU tests, then ab_sparse_prefill.py: old vs new run()
#                    (Triton and CUDA main kernels) and full prefill, SGLang's full prefill as
#                    the yardstick, interleaved in one process, 32K and 128K.
#   call 2 (1 GPU):  ablate_prefill_main.py: the Triton main kernel with its partial stores
#                    predicated off, its query-row gathers kept in L1/L2, or both: what the
#                    traffic costs against the compute.
#   call 3 (1 GPU):  the CUDA main kernel's instruction diet at GP 16 (one query per warp: per-warp
#                    row bookkeeping, per-lane gather / store offsets computed once, 16-byte
#                    stores, descriptors as base + offset): GPU tests, A/B against call 2's tree
#                    (.dev-s16/old), the ablation.
#   call 4 (1 GPU):  call 3 plus a cheaper CUDA launch on the host (cached arch, no device
#                    switch): GPU tests, A/B with CUDA-graph replays and host cost per run().
#   call 5 (1 GPU):  TMA stores of O (GP 16, whole groups): GPU tests, A/B against call 4's tree.
#   call 6 (1 GPU):  record run: the CUDA main kernel is the default where it applies
#                    (main_kernel="auto"): the sparse-prefill and MSA backend GPU tests, then
#                    bench_sparse_prefill.py (main branch and full prefill, 32K / 128K).
set -uo pipefail
cd "$(dirname "$0")/../.."
CALL="${1:?usage: session16.sh 1..}"
WHEELS=.dev-s8/wheels
SITE=/tmp/m3serve-site16
source scripts/gpu/lanes.sh
K=tests/kernels
case "$CALL" in
1|3|4|5)
    timeout -k 10 200 $GT $K/test_sparse_prefill.py 2>&1 | tail -n 30 > "$OUT/kt.txt"
    timeout -k 10 300 python3 scripts/gpu/ab_sparse_prefill.py --old .dev-s16/old 2>&1 \
        | grep -v Warning | tail -n 20 > "$OUT/ab.txt"
    [ "$CALL" = 3 ] && timeout -k 10 200 python3 scripts/gpu/ablate_prefill_main.py 2>&1 \
        | grep -v Warning | tail -n 12 > "$OUT/ablate.txt"
    ;;
6)
    timeout -k 10 100 $GT $K/test_sparse_prefill.py 2>&1 | tail -n 30 > "$OUT/kt.txt"
    mkdir -p "$OUT/pre"
    timeout -k 10 240 python3 benchmarks/bench_sparse_prefill.py --out "$OUT/pre" \
        --contexts 32768,131072 --full-contexts 32768,131072 2>&1 | grep -v Warning | tail -n 40 \
        > "$OUT/pre.txt"
    PYTHONPATH="$PWD/tests/sgl_kernel_standin:$PYTHONPATH" timeout -k 10 90 $GT \
        tests/backend/test_msa_backend_paths.py 2>&1 | tail -n 12 > "$OUT/bt.txt"
    ;;
2)
    timeout -k 10 400 python3 scripts/gpu/ablate_prefill_main.py 2>&1 | grep -v Warning \
        | tail -n 12 > "$OUT/ablate.txt"
    ;;
esac
echo "[call $CALL done after $(( $(date +%s) - t0 )) s]"
