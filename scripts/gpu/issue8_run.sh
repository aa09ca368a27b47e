#!/usr/bin/env bash
# Issue 7/8 on the GPU machine, one call: install the carried wheels, run the GPU tests of the
# backend (CUDA-graph replay, fast paths, FP8 index keys) and the MoE, then the serving benchmark
# (scripts/gpu/e2e_serving.py: our kernels vs SGLang's in-tree MSA ops in the same server),
# and print a short table last. Writes under $OUT.
#
# Carry: .dev-e2e/wheels (python scripts/gpu/make_wheelhouse.py: slim sglang + start-up deps +
# flashinfer 0.6.18.post1) and .dev-index/index_topk_wheels (pytest and its deps).
# Env: STAGES (default "tests e2e"; "setup": install + checkpoint only; "moe": the MoE bench; "long": the 1M-token request; "tp": tensor
# parallel, scripts/gpu/tp_serving.py), TEST_S, E2E_S, LONG_S, TP_S (stage limits), E2E_ARGS,
# LONG_ARGS, TP_ARGS (the scripts' arguments after the checkpoint), CKPT_ARGS (checkpoint sizes),
# CKPT (checkpoint path, default /tmp/m3-gpu), WHEELS (wheel folders, default the two above).
# NCCL_NVLS_ENABLE=0 etc. (NVLink multicast off) come from the machine's environment and are kept.
set -uo pipefail
OUT="${OUT:-$PWD/gpu-out}"; mkdir -p "$OUT"
SITE=/tmp/m3serve-site
STAGES="${STAGES:-tests e2e}"
t0=$(date +%s)
if [ ! -f "$SITE/.done" ]; then
    # WHEELS: the wheel folders (default: the two this script was written with)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        $(for d in ${WHEELS:-.dev-e2e/wheels .dev-index/index_topk_wheels}; do echo "$d"/*.whl; done) \
        > "$OUT/pip.log" 2>&1 \
        || { tail -20 "$OUT/pip.log"; exit 1; }
    # SGLang finds plugins through package metadata: declare m3serve's entry point (no Rust here)
    mkdir -p "$SITE/m3serve-0.1.0.dist-info"
    printf 'Metadata-Version: 2.1\nName: m3serve\nVersion: 0.1.0\n' > "$SITE/m3serve-0.1.0.dist-info/METADATA"
    printf '[sglang.srt.plugins]\nm3serve = m3serve.plugin:register\n' > "$SITE/m3serve-0.1.0.dist-info/entry_points.txt"
    touch "$SITE/.done"
fi
export PYTHONPATH="$SITE:$PWD/python" PYTHONUNBUFFERED=1
export SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "import torch, triton, flashinfer, sglang; print('torch', torch.__version__, 'triton', triton.__version__, 'flashinfer', flashinfer.__version__, 'sglang', sglang.__version__)" 2>&1 | tail -1 | tee "$OUT/versions.txt"
echo "[setup $(( $(date +%s) - t0 )) s]"

if [[ " $STAGES " == *" tests "* ]]; then
    echo "== GPU tests: backend (graphs, fast paths), MoE =="
    PYTHONPATH="$PWD/tests/sgl_kernel_standin:$PYTHONPATH" timeout "${TEST_S:-240}" \
        python3 -m pytest -q -m gpu tests/backend tests/model/test_moe.py ${TEST_ARGS:-} \
        -p no:cacheprovider -x > "$OUT/gpu_tests.log" 2>&1
    echo "gpu tests exit $?"; grep -E "Error|error:|assert|FAILED" "$OUT/gpu_tests.log" | head -30; tail -n 5 "$OUT/gpu_tests.log"
fi
if [[ " $STAGES " == *" moe "* ]] && [ -f benchmarks/bench_moe.py ]; then
    echo "== MoE benchmark =="
    timeout "${MOE_S:-120}" python3 benchmarks/bench_moe.py --out "$OUT" > "$OUT/moe_bench.log" 2>&1
    echo "moe bench exit $?"; tail -n 25 "$OUT/moe_bench.log"
fi
# serve_stage NAME SCRIPT LIMIT ARGS LOGS_GLOB: run one serving script on the M3-shaped checkpoint
CKPT="${CKPT:-/tmp/m3-gpu}"  # a different CKPT_ARGS needs its own CKPT path
make_ckpt() { [ -f "$CKPT/config.json" ] || python3 scripts/gpu/make_m3_gpu_checkpoint.py "$CKPT" ${CKPT_ARGS:-}; }
# "setup" alone: install + checkpoint, so that several runs of this script can then go in parallel
# (each with its own OUT and --gpus) without racing on either
if [[ " $STAGES " == *" setup "* ]]; then make_ckpt || exit 1; fi
serve_stage() {
    local name=$1 script=$2 limit=$3 args=$4 logs=$5
    make_ckpt || return 1
    timeout "$limit" python3 "$script" "$CKPT" $args > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name exit $rc"
    if [ $rc -ne 0 ]; then
        for f in $logs; do echo "-- $f"; grep -E "Error|Traceback" "$f" | head -5; tail -n 25 "$f"; done
    fi
    grep -vE '^\{' "$OUT/$name.log" | tail -n 40
}
if [[ " $STAGES " == *" e2e "* ]]; then
    echo "== serving: ours vs SGLang's in-tree MSA ops =="
    serve_stage e2e scripts/gpu/e2e_serving.py "${E2E_S:-480}" "${E2E_ARGS:-}" "$OUT/server_*.log"
fi
if [[ " $STAGES " == *" long "* ]]; then
    echo "== one request at the context limit: ours vs SGLang's in-tree MSA ops =="
    serve_stage long scripts/gpu/long_request.py "${LONG_S:-540}" "${LONG_ARGS:-}" "$OUT/server_long_*.log"
fi
if [[ " $STAGES " == *" tp "* ]]; then
    echo "== tensor parallel: greedy tokens vs TP 1, throughput =="
    serve_stage tp scripts/gpu/tp_serving.py "${TP_S:-540}" "${TP_ARGS:-}" "$OUT/server_tp_*.log"
fi
echo "[total $(( $(date +%s) - t0 )) s]"
