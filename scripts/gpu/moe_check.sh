#!/usr/bin/env bash
# On a GPU machine (H100/H200): the GPU tests of tests/model/test_moe.py, then bench_moe.py.
# Writes under $OUT (default ./gpu-out): moe_tests.log, moe_bench.log, moe.json, moe.md.
# Needs torch + triton; pytest is taken from .dev-index/index_topk_wheels when not installed.
# Usage (repo root): bash scripts/gpu/moe_check.sh   [env: TEST_S, BENCH_S, BENCH_ARGS]
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-$PWD/gpu-out}"
. scripts/gpu/pytest_env.sh

echo "== GPU tests (tests/model/test_moe.py -m gpu) =="
timeout "${TEST_S:-300}" python3 -m pytest -q -m gpu tests/model/test_moe.py -p no:cacheprovider \
    2>&1 | tee "$OUT/moe_tests.log" | tail -n 25
tests_rc=${PIPESTATUS[0]}
echo "gpu tests exit $tests_rc"

echo "== bench_moe =="
timeout "${BENCH_S:-400}" python3 benchmarks/bench_moe.py --out "$OUT" ${BENCH_ARGS:-} 2>&1 \
    | tee "$OUT/moe_bench.log"
bench_rc=${PIPESTATUS[0]}
echo "bench exit $bench_rc"
exit $(( tests_rc != 0 || bench_rc != 0 ))
