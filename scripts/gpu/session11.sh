#!/usr/bin/env bash
# Session 11's GPU runs (lanes.sh: wheels installed once, lanes in parallel, one card each).
#
#   carry: [".dev-s8"]   timeout_s: 600
#   .dev-s8/wheels   python scripts/gpu/make_wheelhouse.py --out .dev-s8/wheels (slim sglang + its
#                    start-up deps + FlashInfer 0.6.18.post1), plus pytest and its deps
#
#   call 1 (1 H100):  kind nvidia-h100-x1: session 10's unrun call 6, with the time it needs: issue
#                     8's concurrency-1 decode gap inside the servers, scripts/gpu/profile_decode.py
#                     (both servers on the card, one 128K request each, SGLang's profiler over 30
#                     decode steps: GPU only, then with host stacks). Both servers take ~7 min to
#                     come up one after the other, so nothing else runs in this call.
set -uo pipefail
cd "$(dirname "$0")/../.."
CALL="${1:?usage: session11.sh 1..}"
WHEELS=.dev-s8/wheels
SITE=/tmp/m3serve-site11
source scripts/gpu/lanes.sh
case "$CALL" in
1)  # one H100 (nvidia-h100-x1)
    profile_c1 520
    ;;
*) echo "unknown call $CALL"; exit 2 ;;
esac
wait
for f in "$OUT"/*.txt; do echo "===== $(basename "$f")"; tail -n 60 "$f"; done
(cd "$OUT" && tar czf "session11_$CALL.tgz" --remove-files */ 2>/dev/null)
echo "[total $(( $(date +%s) - t0 )) s]"
