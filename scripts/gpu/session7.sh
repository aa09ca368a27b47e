#!/usr/bin/env bash
# Session 7's GPU runs (issues 4 and 6: the decode step's launch structure — top-k fused into the
# scoring launch, programmatic dependent launch between the step's kernels). Lanes run in
# parallel, one card each, each writing $OUT/<lane>.txt; results are packed into
# $OUT/session7_<CALL>.tgz.
#
#   carry: [".dev-s6"]   timeout_s: 600   (wheels: see session6.sh)
#
#   call 1 (4 GPUs):  lane kt   the kernel GPU tests (decode step under PDL + graph, index
#                               selection incl. the fused top-k, sparse decode);
#                     lane itk  bench_index_topk decode rows over the issue's grid (fused top-k vs
#                               two launches at every context, vs SGLang's selection);
#                     lane dec8 / dec  bench_sparse_decode B8 x 128K / 1M and B32, B1 (steps with
#                               the fused default, with PDL, FP8 index keys).
#   call 2 (4 GPUs):  bench_sparse_decode with per-step times inside 8-step graphs (ours, SGLang's
#                     step, dense): lanes d8 (B8 x 128K, 1M), d32 (B32 x 128K, B64 x 128K),
#                     d1 (B1 x 1M, B32 x 32K), dm (MTP rows after B8 x 128K).
#   call 3 (H100):    kind nvidia-h100-x1: the decode scoring sweep with balanced split-K grids
#                     (FP8 at 3 programs per SM), then B8 x 128K / 1M and B32 x 128K the same way.
#   call 4 (4 GPUs):  the split kernel's fused merge unrolled over the splits ("u" configs): lanes
#                     kt (sparse decode + decode step GPU tests), ds (decode-split sweep, B 8 / 32),
#                     d8 / d32 (bench_sparse_decode B8 x 128K, 1M / B32, B64 x 128K).
#   call 5 (H100):    kind nvidia-h100-x1: the decode-split sweep at B8 / B32 and the B8 x 128K step.
#   call 6 (4 GPUs):  decode scoring with a register cap (maxnreg → more programs per SM): lane sw the
#                     decode-select sweep; lanes d8 / d8m / d8n the B8 x 128K + 1M steps with the
#                     default launches / FP8 (4,5,4) + bf16 (4,3,4) capped at 128 / 96 registers /
#                     both at 96 registers and 5 programs per SM (M3SERVE_DECODE_SCORE_LAUNCH(_FP8)).
#   call 7 (4 GPUs):  register-capped split attention ("r" configs: 4 programs per SM, so a
#                     batch-8 step's 512 programs fit one wave): lanes ds (decode-split sweep B8/B32),
#                     d8 (B8 x 128K / 1M), d32 (B32, B64 x 128K), kt (sparse decode GPU tests).
#   call 8 (4 GPUs):  issue 4's prefill selection rows again (bench_index_topk --only prefill), on two
#                     cards at once (two samples of the FP8 3x edge).
set -uo pipefail
cd "$(dirname "$0")/../.."
CALL="${1:?usage: session7.sh 1..8}"
source scripts/gpu/lanes.sh
git log --oneline -1 2>/dev/null || true
case "$CALL" in
1)
    lane kt 0 "timeout 540 $GT tests/kernels/test_decode_step.py tests/kernels/test_index_select.py \
        tests/kernels/test_sparse_decode.py tests/kernels/test_topk.py 2>&1 | tail -n 30"
    lane itk 1 "timeout 560 python3 benchmarks/bench_index_topk.py --only decode --out \$OUT 2>&1 | tail -n 60"
    lane dec8 2 "timeout 560 $DEC --batches 8 --contexts 131072,1048576 --no-mtp --out \$OUT 2>&1 | tail -n 30"
    lane dec 3 "timeout 560 $DEC --batches 32,1 --contexts 131072,1048576 --no-mtp --out \$OUT 2>&1 | tail -n 30"
    ;;
2)
    lane d8 0 "timeout 560 $DEC --batches 8 --contexts 131072,1048576 --no-mtp --out \$OUT 2>&1 | tail -n 40"
    lane d32 1 "timeout 560 $DEC --batches 32,64 --contexts 131072 --no-mtp --out \$OUT 2>&1 | tail -n 40"
    lane d1 2 "timeout 560 $DEC --batches 1,32 --contexts 1048576,32768 --no-mtp --out \$OUT 2>&1 | tail -n 40"
    lane dm 3 "timeout 560 $DEC --batches 8 --contexts 131072 --out \$OUT 2>&1 | tail -n 40"
    ;;
3)  # one H100 (nvidia-h100-x1)
    lane h100 0 "timeout 230 python3 benchmarks/sweep_kernels.py decode-select --budget-s 190 --out \$OUT;
        timeout 300 $DEC --batches 8,32 --contexts 131072,1048576 --no-mtp --out \$OUT 2>&1 | tail -n 40"
    ;;
4)
    lane kt 0 "timeout 400 $GT tests/kernels/test_sparse_decode.py tests/kernels/test_decode_step.py 2>&1 | tail -n 20"
    lane ds 1 "timeout 420 python3 benchmarks/sweep_kernels.py decode-split --batches 8,32 --budget-s 360 --out \$OUT"
    lane d8 2 "timeout 500 $DEC --batches 8 --contexts 131072,1048576 --no-mtp --out \$OUT 2>&1 | tail -n 40"
    lane d32 3 "timeout 500 $DEC --batches 32,64 --contexts 131072 --no-mtp --out \$OUT 2>&1 | tail -n 40"
    ;;
5)  # one H100 (nvidia-h100-x1)
    lane h100 0 "timeout 250 python3 benchmarks/sweep_kernels.py decode-split --batches 8,32 --budget-s 200 --out \$OUT;
        timeout 250 $DEC --batches 8 --contexts 131072 --no-mtp --out \$OUT 2>&1 | tail -n 40"
    ;;
6)
    lane sw 0 "timeout 400 python3 benchmarks/sweep_kernels.py decode-select --budget-s 330 --out \$OUT"
    lane d8 1 "timeout 400 $DEC --batches 8 --contexts 131072,1048576 --no-mtp --out \$OUT 2>&1 | tail -n 40"
    lane d8m 2 "M3SERVE_DECODE_SCORE_LAUNCH_FP8=4,5,4,1,128 M3SERVE_DECODE_SCORE_LAUNCH=4,3,4,1,96 \
        timeout 400 $DEC --batches 8 --contexts 131072,1048576 --no-mtp --out \$OUT 2>&1 | tail -n 40"
    lane d8n 3 "M3SERVE_DECODE_SCORE_LAUNCH_FP8=4,5,5,1,96 M3SERVE_DECODE_SCORE_LAUNCH=4,3,5,1,96 \
        timeout 400 $DEC --batches 8 --contexts 131072,1048576 --no-mtp --out \$OUT 2>&1 | tail -n 40"
    ;;
7)
    lane ds 0 "timeout 260 python3 benchmarks/sweep_kernels.py decode-split --batches 8,32 --budget-s 200 --out \$OUT"
    lane d8 1 "timeout 300 $DEC --batches 8 --contexts 131072,1048576 --no-mtp --out \$OUT 2>&1 | tail -n 40"
    lane d32 2 "timeout 300 $DEC --batches 32,64 --contexts 131072 --no-mtp --out \$OUT 2>&1 | tail -n 40"
    lane kt 3 "timeout 300 $GT tests/kernels/test_sparse_decode.py tests/kernels/test_index_select.py 2>&1 | tail -n 12"
    ;;
8)
    lane itk0 0 "timeout 300 python3 benchmarks/bench_index_topk.py --only prefill --out \$OUT 2>&1 | tail -n 12"
    lane itk1 1 "timeout 300 python3 benchmarks/bench_index_topk.py --only prefill --out \$OUT 2>&1 | tail -n 12"
    ;;
*) echo "CALL must be 1..8" >&2; exit 2 ;;
esac
wait
echo "[all lanes done after $(( $(date +%s) - t0 )) s]"
for f in "$OUT"/*.txt; do echo "===== $f"; tail -n 45 "$f"; done
tar czf "/tmp/session7_$CALL.tgz" -C "$OUT" . && mv "/tmp/session7_$CALL.tgz" "$OUT/"
