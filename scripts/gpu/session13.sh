#!/usr/bin/env bash
# Session 13's GPU runs (lanes.sh: wheels installed once; one card).
#
#   carry: [".dev-s8"]   timeout_s: 600   kind: nvidia-h200 (issue 6's FP8 8x is short on H200)
#
#   call 1 (1 GPU):  issue 6: the decode index scoring with its keys through a TMA descriptor
#                    (launch option tma; bulk async copies staged in shared memory) beside the
#                    pointer-load defaults: the index-select GPU tests (TMA + CUDA graph), the
#                    decode-select sweep, then the B8 x 128K decode step per step in an 8-step
#                    graph (bf16 / FP8 keys, each with and without TMA) against dense FlashInfer.
#   call 2 (1 GPU):  issue 5: the prefill main kernel deciding its causal mask once per work
#                    item (ITEM_MASK) vs per tile, in bench_sparse_prefill.py's sweep, then main
#                    and full prefill at 32K / 128K vs SGLang's ops with the winner; the
#                    sparse-prefill GPU tests first.
set -uo pipefail
cd "$(dirname "$0")/../.."
CALL="${1:?usage: session13.sh 1..}"
WHEELS=.dev-s8/wheels
SITE=/tmp/m3serve-site13
source scripts/gpu/lanes.sh
K=tests/kernels
case "$CALL" in
1)
    timeout 150 $GT $K/test_index_select.py -k "gpu_decode or launch_configs" 2>&1 | tail -n 8 \
        > "$OUT/kt.txt"
    mkdir -p "$OUT/ds" "$OUT/dec"
    timeout 210 python3 benchmarks/sweep_kernels.py decode-select --budget-s 170 --out "$OUT/ds" \
        2>&1 | grep -v Warning | tail -n 40 > "$OUT/ds.txt"
    cp "$OUT"/ds/*.json "$OUT/" 2>/dev/null
    timeout 200 $DEC --batches 8 --contexts 131072 --no-mtp --out "$OUT/dec" 2>&1 \
        | grep -v Warning | tail -n 12 > "$OUT/dec.txt"
    cp "$OUT"/dec/sparse_decode.json "$OUT/dec_s13.json" 2>/dev/null
    ;;
2)
    timeout 150 $GT $K/test_sparse_prefill.py 2>&1 | tail -n 8 > "$OUT/kt.txt"
    mkdir -p "$OUT/pre"
    timeout 420 python3 benchmarks/bench_sparse_prefill.py --sweep --out "$OUT/pre" \
        --contexts 32768,131072 --full-contexts 32768,131072 2>&1 | grep -v Warning | tail -n 45 \
        > "$OUT/pre.txt"
    cp "$OUT"/pre/sparse_prefill.json "$OUT/pre_s13.json" 2>/dev/null
    ;;
esac
echo "[call $CALL done after $(( $(date +%s) - t0 )) s]"
