#!/usr/bin/env bash
# On a GPU machine (H100/H200): the GPU top-k tests, then the top-k benchmark alone (torch.topk vs
# every variant — auto, slots, rounds, filter — and a sweep of slot-list launch shapes, same run,
# on five row shapes; each result checked bit for bit against the reference order).
# Writes under $OUT (default ./gpu-out): topk_tests.log, topk_bench.log, index_topk.{json,md}.
# The caller sets PYTHONPATH (torch + triton); pytest comes from .dev-index/index_topk_wheels when
# missing. ~2-4 min: first compiles dominate (on an H200 the GPU tests needed more than 40 s; the
# tests and the benchmark share the kernels; the bench writes its results after every shape, so a
# cut-off run still leaves the first ones).
# Usage (repo root): bash scripts/gpu/topk_check.sh   [env: TEST_S, BENCH_S]
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/gpu-out}"
. scripts/gpu/pytest_env.sh

echo "== GPU top-k tests (tests/kernels/test_topk.py -m gpu) =="
timeout "${TEST_S:-150}" python3 -m pytest -q -m gpu tests/kernels/test_topk.py -p no:cacheprovider \
    --durations=5 2>&1 | tee "$OUT/topk_tests.log" | tail -n 30
tests_rc=${PIPESTATUS[0]}
echo "gpu tests exit $tests_rc"

echo "== bench_index_topk --only topk =="
timeout "${BENCH_S:-55}" python3 benchmarks/bench_index_topk.py --only topk --out "$OUT" 2>&1 \
    | tee "$OUT/topk_bench.log"
bench_rc=${PIPESTATUS[0]}
echo "bench exit $bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
