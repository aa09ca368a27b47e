#!/usr/bin/env bash
# On the GPU test machine (the device tool): install the carried wheels, run the MSA kernels' GPU
# tests and the decode benchmark, print a short table last. Writes under $OUT (default ./gpu-out).
#
# Carry (built here beforehand; git-ignored):
#   .dev-decode/dl               flashinfer-python 0.6.18.post1 + apache-tvm-ffi  (bench_sparse_decode's author)
#   .dev-decode/sglang_site      SGLang 0.5.23's decode ops  (python benchmarks/sglang_decode_baseline_site.py)
#   .dev-index/index_topk_wheels pytest and its deps
# Env: DECODE_BENCH_S / TEST_S (stage time limits), BENCH_ARGS (extra bench_sparse_decode args),\n# SKIP_BENCH=1 (tests only).
set -uo pipefail
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
SITE=/tmp/m3serve-site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .dev-decode/dl/*.whl .dev-index/index_topk_wheels/*.whl >/dev/null 2>&1 || { echo "wheel install failed"; exit 1; }
export PYTHONPATH="$SITE:$PWD/python" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "import torch, triton, flashinfer; print('torch', torch.__version__, 'triton', triton.__version__, 'flashinfer', flashinfer.__version__)" | tee "$OUT/versions.txt"

if [ "${SKIP_BENCH:-0}" != 1 ]; then
    echo "== decode benchmark =="
    timeout "${DECODE_BENCH_S:-330}" python3 benchmarks/bench_sparse_decode.py \
        --sglang-site .dev-decode/sglang_site --out "$OUT" ${BENCH_ARGS:-} > "$OUT/decode_bench.log" 2>&1
    echo "decode bench exit $?"; tail -n 40 "$OUT/decode_bench.log"
fi

echo "== GPU tests (tests/kernels, -m gpu) =="
timeout "${TEST_S:-200}" python3 -m pytest -q -m gpu tests/kernels -p no:cacheprovider \
    > "$OUT/gpu_tests.log" 2>&1
echo "gpu tests exit $?"; tail -n 15 "$OUT/gpu_tests.log"

echo "== summary =="
cat "$OUT/card.txt" "$OUT/versions.txt"
grep -E "passed|failed" "$OUT/gpu_tests.log" | tail -n 1
[ -f "$OUT/sparse_decode.md" ] && head -n 40 "$OUT/sparse_decode.md"
