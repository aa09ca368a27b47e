#!/usr/bin/env bash
# The GPU runs still owed (issues 4, 5, 8), as two calls on one 4-GPU machine (nvidia-h200-x4 or
# nvidia-h100-x4): issue call 2 right after call 1 returns, while the machine is warm (the set-up
# is then skipped). Lanes run in parallel, each on its own cards, each writing its own log; the
# results are packed into $OUT/pending<CALL>.tgz because the device returns at most 8 files.
#
#   carry: [".dev-e2e/wheels", ".dev-index/index_topk_wheels"]   timeout_s: 600
#   call 1: bash scripts/gpu/pending.sh 1
#     lane mix  (GPUs 0,1): serving at M3's own layer mix. M3 has 3 dense of 60 layers; the
#               checkpoint of the earlier runs had 1 dense of 4, so the dense layer's full 128K
#               attention, the same on both sides, weighed 5x more than in M3. Here 1 dense + 19
#               MSA layers (M3's 5 %; ~23 GB of weights), 128K input, concurrency 1 and 8 (8
#               prompts: a 128K prefill through 20 layers takes seconds), ours vs SGLang's ops.
#     lane kern (GPU 2): top-k GPU tests (incl. the (2048, 2048) "rounds" tile fixed after the
#               last run) + top-k bench; the index-selection GPU tests incl. the opt-in FP8 queries
#               (never compiled on a GPU yet) + the prefill selection bench (fp8 q+k rows).
#     lane sp   (GPU 3): sparse prefill + decode GPU tests (unchanged code: a regression check).
#   call 2: bash scripts/gpu/pending.sh 2
#     lane long (GPUs 0,1): the 1M-token request again (the last run had the top-k tile bug).
#     lane tp   (GPUs 2,3): ours TP 2 throughput and greedy tokens / prompt logprobs vs ours TP 1.
# Each lane has its own time limit inside the 600 s of a call; what a lane left is packed anyway.
set -uo pipefail
cd "$(dirname "$0")/../.."
CALL="${1:?usage: pending.sh 1|2}"
OUT="${OUT:-$PWD/gpu-out}"; mkdir -p "$OUT"
S=scripts/gpu/issue8_run.sh
t0=$(date +%s)
STAGES=setup OUT="$OUT/setup" bash $S > "$OUT/setup.txt" 2>&1 || { tail -30 "$OUT/setup.txt"; exit 1; }
export PYTHONPATH="/tmp/m3serve-site:$PWD/python" PYTHONUNBUFFERED=1
lane() {  # lane NAME COMMAND...: run in the background, output in $OUT/NAME.txt
    local name=$1; shift
    mkdir -p "$OUT/$name"
    ( OUT="$OUT/$name" "$@" > "$OUT/$name.txt" 2>&1; echo "[lane $name exit $? after $(( $(date +%s) - t0 )) s]" >> "$OUT/$name.txt" ) &
}
kernels() {
    bash scripts/gpu/topk_check.sh
    . scripts/gpu/pytest_env.sh
    timeout 200 python3 -m pytest -q -m gpu tests/kernels/test_index_select.py -p no:cacheprovider \
        --durations=5 2>&1 | tail -n 30
    timeout 150 python3 benchmarks/bench_index_topk.py --only prefill --out "$OUT" 2>&1 | tail -n 30
}
sparse() {
    . scripts/gpu/pytest_env.sh
    timeout 400 python3 -m pytest -q -m gpu tests/kernels/test_sparse_prefill.py \
        tests/kernels/test_sparse_decode.py -p no:cacheprovider --durations=5 2>&1 | tail -n 30
}
case "$CALL" in
1)
    lane mix env STAGES=e2e CKPT=/tmp/m3-gpu-mix CKPT_ARGS="--dense-layers 1 --sparse-layers 19" \
        E2E_S=560 E2E_ARGS="--gpus 0,1 --workloads random:131072:512:1,8 --prompts-per-conc 1 --tag mix128k --deadline 400" \
        bash $S
    lane kern env CUDA_VISIBLE_DEVICES=2 bash -c "$(declare -f kernels); kernels"
    lane sp env CUDA_VISIBLE_DEVICES=3 bash -c "$(declare -f sparse); sparse"
    ;;
2)
    lane long env STAGES=long LONG_S=560 LONG_ARGS="--gpus 0,1" bash $S
    lane tp env STAGES=tp TP_S=560 \
        TP_ARGS="--gpus 2,3 --configs ours:1,ours:2 --workloads random:32768:512:32 --deadline 420" \
        bash $S
    ;;
*) echo "CALL must be 1 or 2" >&2; exit 2 ;;
esac
wait
echo "[all lanes done after $(( $(date +%s) - t0 )) s]"
for f in "$OUT"/*.txt; do echo "===== $f"; tail -n 25 "$f"; done
tar czf "/tmp/pending$CALL.tgz" -C "$OUT" . && mv "/tmp/pending$CALL.tgz" "$OUT/"
