#!/usr/bin/env bash
# Planned GPU runs for the session after 11 (written in session 11, NOT RUN: its device time was spent).
# lanes.sh: wheels installed once, lanes in parallel, one card each.
#
#   carry: [".dev-s8"]   timeout_s: 600
#   .dev-s8/wheels   python scripts/gpu/make_wheelhouse.py --out .dev-s8/wheels (slim sglang + its
#                    start-up deps + FlashInfer 0.6.18.post1), plus pytest and its deps
#
#   call 1 (2 GPUs):  kind nvidia-h100-x2: what the fused norm / RoPE kernels (session 11,
#                     fused_ops.md: ~400 of a decode graph's 599 nodes) give in serving: the same
#                     server with M3SERVE_FUSED_OPS=0 ("unfused", card 0) and default ("ours",
#                     card 1), the 1 dense + 3 MSA checkpoint, 128K input, c 1 / 8, card parity
#                     measured first.
#   call 2 (2 GPUs):  kind nvidia-h100-x2: the TP-invariant mode again with the fused kernels in
#                     (inv TP 1 vs inv TP 2: greedy tokens and logprobs equal?), and its cost at
#                     TP 1 against the plain server on the same workload (ours:1 first).
set -uo pipefail
cd "$(dirname "$0")/../.."
CALL="${1:?usage: session12.sh 1..}"
WHEELS=.dev-s8/wheels
SITE=/tmp/m3serve-site12
source scripts/gpu/lanes.sh
case "$CALL" in
1)  # two GPUs (nvidia-h100-x2)
    STAGES=e2e WHEELS=.dev-s8/wheels OUT="$OUT/e2e" CKPT=/tmp/m3-gpu E2E_S=540 \
        E2E_ARGS="--servers unfused,ours --gpus 0,1 --workloads random:131072:512:1,8 \
        --prompts-per-conc 1 --tag s12_fused --deadline 450" \
        bash scripts/gpu/issue8_run.sh > "$OUT/e2e.txt" 2>&1
    ;;
2)  # two GPUs (nvidia-h100-x2)
    STAGES=tp WHEELS=.dev-s8/wheels OUT="$OUT/tp" CKPT=/tmp/m3-gpu TP_S=540 \
        TP_ARGS="--gpus 0,1 --configs inv:1,inv:2,ours:1 --workloads random:8192:128:8 \
        --deadline 420 --tag s12_inv" \
        bash scripts/gpu/issue8_run.sh > "$OUT/tp.txt" 2>&1
    cp "$OUT"/tp/tp_*.json "$OUT/" 2>/dev/null
    ;;
*) echo "unknown call $CALL"; exit 2 ;;
esac
wait
for f in "$OUT"/*.txt; do echo "===== $(basename "$f")"; tail -n 60 "$f"; done
(cd "$OUT" && tar czf "session12_$CALL.tgz" --remove-files */ 2>/dev/null)
echo "[total $(( $(date +%s) - t0 )) s]"
