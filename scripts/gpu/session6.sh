#!/usr/bin/env bash
# Session 6's GPU runs (issues 4 and 6: kernel launch configs, FP8 queries in the decode step,
# FlashInfer 0.7.2), as calls on one 4-GPU machine (nvidia-h100-x4 or nvidia-h200-x4). Lanes run in
# parallel, one card each, each writing $OUT/<lane>.txt; results are packed into
# $OUT/session6_<CALL>.tgz.
#
#   carry: [".dev-s6"]   timeout_s: 600
#   .dev-s6/wheels          flashinfer-python 0.6.18.post1, apache-tvm-ffi, pytest and its deps
#   .dev-s6/fi072_site.tar.xz  flashinfer 0.7.2 + apache-tvm-ffi 0.1.11 installed (SGLang's pin)
#   .dev-s6/sglang_site     SGLang 0.5.23's in-tree MSA ops (the baselines)
#
#   call 1 (explore): lane ds8 / ds  decode split-config sweep at B 8 / B 32, 64 (GPU 0 / 1);
#                     lane psel      prefill selection config sweep, bf16 + FP8 q (GPU 2);
#                     lane dec       sparse decode + index-select GPU tests with FlashInfer 0.7.2,
#                                    then bench_sparse_decode B8 x 128K / 1M with FP8-query rows
#                                    (FlashInfer 0.6.18) (GPU 3).
#   call 2 (graphs):  call 1 timed the attention alone eagerly, and its launch cost (host) was
#                     most of a batch-8 attention's time; the decode-split sweep again under CUDA
#                     graphs (ds), the decode scoring launch sweep (dsel), bench_sparse_decode with
#                     graph-timed attention rows at B8 (FlashInfer 0.6.18, then 0.7.2) and at
#                     B64 x 128K / B32 x 32K (dec, dec64).
#   call 3 (results): lane dec1 / dec2  bench_sparse_decode over the issue's grid (B 1, 8 / 32, 64)
#                     with the new defaults; lane itk  bench_index_topk prefill, then decode rows;
#                     lane dsel  the decode scoring sweep with deeper FP8 pipelines (stages 3-8),
#                     then every kernel GPU test.
#   call 4 (H100):    kind nvidia-h100-x1; the B8 x 128K / 1M decode cells (issue 6's FP8 8x is
#                     closest on this card), the split sweep, the decode selection rows (--quick).
#   call 5 (H100):    B8 / B32 x 128K again with SGLang's step replayed from a graph too; B8 with
#                     FlashInfer 0.7.2.
#   call 6 (explore): FP8 scales loaded a block ahead (the pipeliner left them synchronous):
#                     prefill / decode scoring sweeps with deeper pipelines, GPU tests, B8 step.
#   call 7 (results): bench_index_topk prefill rows, bench_sparse_prefill at 32K / 128K (2 cards).
#   call 8 (H100):    kind nvidia-h100-x1; bench_index_topk prefill rows on that card.
#   call 9 (H100):    after the scoring loops were merged into one helper: GPU tests, prefill rows.
set -uo pipefail
cd "$(dirname "$0")/../.."
CALL="${1:?usage: session6.sh 1..9}"
source scripts/gpu/lanes.sh
FI072=/tmp/m3serve-fi072
if [ ! -d "$FI072/flashinfer" ]; then mkdir -p "$FI072" && tar xJf .dev-s6/fi072_site.tar.xz -C "$FI072"; fi
PYTHONPATH="$FI072:$BASE" python3 -c "import flashinfer; print('flashinfer (0.7.2 lane)', flashinfer.__version__)"
SW="python3 benchmarks/sweep_kernels.py"
case "$CALL" in
1)
    lane ds8 0 "timeout 560 $SW decode-split --batches 8 --budget-s 480 --out \$OUT"
    lane ds 1 "timeout 560 $SW decode-split --batches 32,64 --budget-s 480 --out \$OUT"
    lane psel 2 "timeout 560 $SW prefill-select --budget-s 470 --out \$OUT"
    lane dec 3 "PYTHONPATH=$FI072:$BASE timeout 260 $GT tests/kernels/test_sparse_decode.py \
        tests/kernels/test_index_select.py 2>&1 | tail -n 25;
        timeout 280 $DEC --batches 8 --contexts 131072,1048576 --no-mtp --out \$OUT 2>&1 | tail -n 30"
    ;;
2)
    lane ds 0 "timeout 560 $SW decode-split --budget-s 470 --out \$OUT"
    lane dsel 1 "timeout 560 $SW decode-select --budget-s 470 --out \$OUT"
    lane dec 2 "timeout 300 $DEC --batches 8 --contexts 131072,1048576 --no-mtp --out \$OUT 2>&1 | tail -n 30;
        mkdir -p \$OUT/fi072; PYTHONPATH=$FI072:$BASE timeout 200 $DEC --batches 8,32 --contexts 131072 \
        --no-mtp --out \$OUT/fi072 2>&1 | tail -n 30"
    lane dec64 3 "timeout 560 $DEC --batches 64,32 --contexts 131072,32768 --no-mtp --out \$OUT 2>&1 | tail -n 30"
    ;;
3)
    lane dec1 0 "timeout 570 $DEC --batches 8,1 --out \$OUT 2>&1 | tail -n 40"
    lane dec2 1 "timeout 570 $DEC --batches 32,64 --no-mtp --out \$OUT 2>&1 | tail -n 40"
    lane itk 2 "timeout 260 python3 benchmarks/bench_index_topk.py --only prefill --out \$OUT 2>&1 | tail -n 30;
        mkdir -p \$OUT/dec; timeout 280 python3 benchmarks/bench_index_topk.py --only decode --out \$OUT/dec 2>&1 | tail -n 40"
    lane dsel 3 "timeout 250 $SW decode-select --budget-s 200 --out \$OUT;
        timeout 320 $GT tests/kernels 2>&1 | tail -n 25"
    ;;
4)  # one H100 (nvidia-h100-x1): the issue-6 B8 cells and the decode selection rows on that card
    lane h100 0 "timeout 240 $DEC --batches 8 --contexts 131072,1048576 --no-mtp --out \$OUT 2>&1 | tail -n 30;
        timeout 120 $SW decode-split --batches 8,32,64 --budget-s 90 --out \$OUT;
        mkdir -p \$OUT/itk; timeout 200 python3 benchmarks/bench_index_topk.py --only decode --quick \
        --out \$OUT/itk 2>&1 | tail -n 30"
    ;;
5)  # one H100 again: SGLang's step also from a CUDA graph (its GPU time alone); FlashInfer 0.7.2
    lane h100b 0 "timeout 200 $DEC --batches 8,32 --contexts 131072 --no-mtp --out \$OUT 2>&1 | tail -n 30;
        mkdir -p \$OUT/fi072; PYTHONPATH=$FI072:$BASE timeout 200 $DEC --batches 8 --contexts 131072 \
        --no-mtp --out \$OUT/fi072 2>&1 | tail -n 20"
    ;;
6)  # the FP8 scale loads now travel one block ahead: prefill / decode scoring sweeps incl. deeper
    # pipelines (stages 4-6), the index-selection GPU tests, the B8 decode step
    lane psel 0 "timeout 420 $SW prefill-select --budget-s 360 --out \$OUT"
    lane dsel 1 "timeout 200 $SW decode-select --budget-s 150 --out \$OUT;
        timeout 200 $GT tests/kernels/test_index_select.py 2>&1 | tail -n 15"
    lane dec 2 "timeout 300 $DEC --batches 8 --contexts 131072,1048576 --no-mtp --out \$OUT 2>&1 | tail -n 22"
    lane kt 3 "timeout 400 $GT tests/kernels 2>&1 | tail -n 15"
    ;;
7)  # results with the FP8 scale prefetch and the BM 32 / 5-stage prefill config
    lane itk 0 "timeout 240 python3 benchmarks/bench_index_topk.py --only prefill --out \$OUT 2>&1 | tail -n 12"
    lane pre 1 "timeout 300 python3 benchmarks/bench_sparse_prefill.py --contexts 131072 \
        --full-contexts 32768,131072 --out \$OUT 2>&1 | tail -n 30"
    ;;
8)  # one H100 (nvidia-h100-x1): the prefill selection rows on that card
    lane itk 0 "timeout 240 python3 benchmarks/bench_index_topk.py --only prefill --out \$OUT 2>&1 | tail -n 12"
    ;;
9)  # one H100: the scoring loops now share one helper (_score_blocks): GPU tests + prefill rows
    lane chk 0 "timeout 150 $GT tests/kernels/test_index_select.py 2>&1 | tail -n 8;
        timeout 200 python3 benchmarks/bench_index_topk.py --only prefill --out \$OUT 2>&1 | tail -n 9"
    ;;
*) echo "CALL must be 1..9" >&2; exit 2 ;;
esac
wait
echo "[all lanes done after $(( $(date +%s) - t0 )) s]"
for f in "$OUT"/*.txt; do echo "===== $f"; tail -n 40 "$f"; done
tar czf "/tmp/session6_$CALL.tgz" -C "$OUT" . && mv "/tmp/session6_$CALL.tgz" "$OUT/"
