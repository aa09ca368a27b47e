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
#                    forms in the sweep (-DSTORE_DIRECT), ITEM_Q 64 / 128 / 256.
set -uo pipefail
cd "$(dirname "$0")/../.."
CALL="${1:?usage: session14.sh 1..}"
WHEELS=.dev-s8/wheels
SITE=/tmp/m3serve-site14
source scripts/gpu/lanes.sh
K=tests/kernels
case "$CALL" in
1|2)
    timeout 200 $GT $K/test_sparse_prefill.py -k cuda 2>&1 | tail -n 30 > "$OUT/kt.txt"
    mkdir -p "$OUT/pre"
    timeout 360 python3 benchmarks/bench_sparse_prefill.py --sweep --out "$OUT/pre" \
        --contexts 32768,131072 --full-contexts 32768,131072 2>&1 | grep -v Warning | tail -n 45 \
        > "$OUT/pre.txt"
    cp "$OUT"/pre/sparse_prefill.json "$OUT/pre_s14.json" 2>/dev/null
    ;;
esac
echo "[call $CALL done after $(( $(date +%s) - t0 )) s]"
