#!/usr/bin/env bash
# Session 8's GPU runs (issue 6: the decode step's top-k ranked inside the split-KV attention
# launch instead of its own launch). Lanes run in parallel, one card each, each writing
# $OUT/<lane>.txt.
#
#   carry: [".dev-s8"]   timeout_s: 600
#   .dev-s8/wheels   python scripts/gpu/make_wheelhouse.py --out .dev-s8/wheels (slim sglang + its
#                    start-up deps + FlashInfer 0.6.18.post1), plus pytest and its deps
#
#   call 1 (4 GPUs):  lane kt  kernel GPU tests (rank in attention, decode step graphs, sparse
#                              decode, decode selection);
#                     lane bt  backend GPU tests (graph replay = eager, fast paths) with the top-k
#                              ranked in the attention (the default) and as its own launch;
#                     lanes r8 / r32  bench_decode_rank.py (B 8 / 1 and B 32, 64, 8 x 256K).
#   call 2 (4 GPUs):  after call 1, the ranked step takes its own split configs ("-w1": fewer
#                     programs rank each row): lanes r8 / r8b / r32 bench_decode_rank.py again
#                     (B8 / B1 twice, B32 / B64), lane bt the backend GPU tests with them.
#   call 3 (H100):    kind nvidia-h100-x1: bench_decode_rank.py B8 x 128K / 32K and B32 x 128K.
#   call 4 (4 GPUs):  ranking walks rows in chunks of 2048 blocks (any width up to 1M tokens):
#                     lane kt the GPU tests; lane w1 contexts of 128K in a 1M-wide page table (a
#                     serving graph at M3's context limit); lane m1 1M contexts; lane r8 B8 / B64
#                     x 128K again (one chunk: must not have moved).
#   call 5 (4 GPUs):  the decode scoring cuts each request's visible blocks over the grid at run
#                     time (was: the page-table width's chunk); the wrapper ranks in the attention
#                     up to 2048-block widths: lanes kt (GPU tests), bt (backend GPU tests),
#                     w1 (128K in a 1M-wide table, and 128K exact), m1 (1M, B8 x 128K).
#   call 6 (4 GPUs):  the top-k launch ranks a 2048-block tile for rows that fit it in a wider
#                     table: lane kt every decode-kernel GPU test (top-k, selection, sparse
#                     decode, rank in attention, step graphs); w1 / m1 as in call 5.
#   call 7 (4 GPUs):  call 6's B1 x 1M step read 20 % slower than calls 4-5: the top-k's short-row
#                     path on (then the default) vs off (M3SERVE_TOPK_SHORT_BLOCKS=0; off is the default since), side by side, for
#                     1M rows and 128K rows in a 1M-wide table.
#   call 8 (H100):    kind nvidia-h100-x1: bench_sparse_decode.py B8 x 128K with its step as the
#                     backend runs it (top-k ranked in the attention), beside SGLang's step.
#                     Not run in session 8 (its device time was spent): the next session's first.
set -uo pipefail
cd "$(dirname "$0")/../.."
CALL="${1:?usage: session8.sh 1..8}"
WHEELS=.dev-s8/wheels
SITE=/tmp/m3serve-site8
source scripts/gpu/lanes.sh
BT="$GT tests/backend"  # with tests/sgl_kernel_standin first on PYTHONPATH (lane bt)
RANK="python3 benchmarks/bench_decode_rank.py --out \$OUT"
case "$CALL" in
1)
    lane kt 0 "timeout 500 $GT tests/kernels/test_decode_rank_in_attention.py \
        tests/kernels/test_decode_step.py tests/kernels/test_sparse_decode.py \
        tests/kernels/test_index_select.py 2>&1 | tail -n 30"
    lane bt 1 "export PYTHONPATH=$PWD/tests/sgl_kernel_standin:\$PYTHONPATH; \
        timeout 250 $BT 2>&1 | tail -n 15; M3SERVE_DECODE_RANK=launch timeout 230 $BT 2>&1 | tail -n 8"
    lane r8 2 "timeout 540 $RANK --cases 8x131072,8x32768,8x8192,1x131072 2>&1 | tail -n 40"
    lane r32 3 "timeout 540 $RANK --cases 32x131072,64x131072,8x262144 2>&1 | tail -n 40"
    ;;
2)
    lane r8 0 "timeout 400 $RANK --cases 8x131072,1x131072,8x32768 2>&1 | tail -n 30"
    lane r8b 1 "timeout 400 $RANK --cases 8x131072,8x8192,8x262144 2>&1 | tail -n 30"
    lane r32 2 "timeout 400 $RANK --cases 32x131072,64x131072 2>&1 | tail -n 30"
    lane bt 3 "export PYTHONPATH=$PWD/tests/sgl_kernel_standin:\$PYTHONPATH; timeout 300 $BT \
        tests/kernels/test_decode_rank_in_attention.py 2>&1 | tail -n 12"
    ;;
4)
    lane kt 0 "timeout 400 $GT tests/kernels/test_decode_rank_in_attention.py \
        tests/kernels/test_decode_step.py 2>&1 | tail -n 12"
    lane w1 1 "timeout 400 $RANK --cases 8x131072w1048576,1x131072w1048576,32x131072w1048576 2>&1 | tail -n 30"
    lane m1 2 "timeout 400 $RANK --cases 8x1048576,1x1048576 2>&1 | tail -n 30"
    lane r8 3 "timeout 400 $RANK --cases 8x131072,64x131072 2>&1 | tail -n 30"
    ;;
5)
    lane kt 0 "timeout 400 $GT tests/kernels/test_index_select.py tests/kernels/test_decode_rank_in_attention.py \
        tests/kernels/test_decode_step.py 2>&1 | tail -n 12"
    lane bt 1 "export PYTHONPATH=$PWD/tests/sgl_kernel_standin:\$PYTHONPATH; timeout 300 $BT 2>&1 | tail -n 12"
    lane w1 2 "timeout 400 $RANK --cases 8x131072w1048576,8x131072,1x131072w1048576,32x131072w1048576 2>&1 | tail -n 30"
    lane m1 3 "timeout 400 $RANK --cases 8x1048576,1x1048576,8x131072 2>&1 | tail -n 30"
    ;;
6)
    lane kt 0 "timeout 500 $GT tests/kernels/test_topk.py tests/kernels/test_index_select.py \
        tests/kernels/test_sparse_decode.py tests/kernels/test_decode_rank_in_attention.py \
        tests/kernels/test_decode_step.py 2>&1 | tail -n 12"
    lane w1 1 "timeout 400 $RANK --cases 8x131072w1048576,8x131072,1x131072w1048576 2>&1 | tail -n 30"
    lane w32 2 "timeout 400 $RANK --cases 32x131072w1048576,64x131072w1048576 2>&1 | tail -n 30"
    lane m1 3 "timeout 400 $RANK --cases 8x1048576,1x1048576 2>&1 | tail -n 30"
    ;;
7)
    lane on 0 "timeout 300 $RANK --cases 1x1048576,8x1048576 2>&1 | grep '^|' | head -n 4"
    lane off 1 "M3SERVE_TOPK_SHORT_BLOCKS=0 timeout 300 $RANK --cases 1x1048576,8x1048576 2>&1 | grep '^|' | head -n 4"
    lane onw 2 "timeout 300 $RANK --cases 8x131072w1048576,1x131072w1048576 2>&1 | grep '^|' | head -n 4"
    lane offw 3 "M3SERVE_TOPK_SHORT_BLOCKS=0 timeout 300 $RANK --cases 8x131072w1048576,1x131072w1048576 2>&1 | grep '^|' | head -n 4"
    ;;
8)  # one H100 (nvidia-h100-x1)
    lane h100 0 "timeout 330 python3 benchmarks/bench_sparse_decode.py --batches 8 --contexts 131072 \
        --no-mtp --out \$OUT 2>&1 | tail -n 40"
    ;;
3)  # one H100 (nvidia-h100-x1)
    lane h100 0 "timeout 540 $RANK --cases 8x131072,8x32768,32x131072 2>&1 | tail -n 40"
    ;;
*) echo "unknown call $CALL"; exit 2 ;;
esac
wait
for f in "$OUT"/*.txt; do echo "===== $(basename "$f")"; tail -n 45 "$f"; done
# one archive of the lanes' folders (the run returns a limited number of files)
(cd "$OUT" && tar czf "session8_$CALL.tgz" --remove-files */ 2>/dev/null)
echo "[total $(( $(date +%s) - t0 )) s]"
