#!/usr/bin/env bash
# Session 10's GPU runs (lanes.sh: wheels installed once, lanes in parallel, one card each).
#
#   carry: [".dev-s8"]   timeout_s: 600
#   .dev-s8/wheels   python scripts/gpu/make_wheelhouse.py --out .dev-s8/wheels (slim sglang + its
#                    start-up deps + FlashInfer 0.6.18.post1), plus pytest and its deps
#
#   call 1 (1 H100):  kind nvidia-h100-x1, session 9's unrun call 6: after the host-work change (the
#                     dense page layout in numpy, no unread row-layout copies in the split-KV plan):
#                     scripts/gpu/host_sync_probe.py, the backend GPU tests, the sparse-decode GPU
#                     tests; and whether this torch has float32-output bf16 GEMMs (torch.mm /
#                     torch.bmm out_dtype), for a TP-invariant reduction mode.
#   call 2 (2 GPUs):  kind nvidia-h200-x2, issue 8's owed clean rerun of run E (session 9's run G put
#                     both lanes' servers on the same cards): the 1 dense + 3 MSA checkpoint, 128K
#                     input, c 1 / 8 / 32 / 64, ours on card 0 and SGLang's in-tree MSA ops on card 1
#                     side by side, one lane, nothing else on the host.
#   call 3 (1 H100):  kind nvidia-h100-x1: why ours decodes slower at c1 in call 2 (2.28 vs 2.04 ms
#                     per token): scripts/gpu/backend_decode_ab.py, the backend's decode step (1 dense
#                     + 3 MSA layers, as the server runs it, in a CUDA graph) ours vs SGLang's ops,
#                     B1 / B8 x 128K, with each side's GPU kernels of one eager step.
#   call 4 (2 GPUs):  kind nvidia-h200-x2: call 2 with the cards swapped (ours on card 1, SGLang's
#                     ops on card 0), c 1 / 8 only: does the c1 decode gap follow the card?
#   call 5 (1 H100):  kind nvidia-h100-x1: it does (call 4), so inside the servers:
#                     scripts/gpu/profile_decode.py, both servers on the card, one 128K request
#                     each, SGLang's profiler over 40 decode steps (GPU only, then with host stacks).
#                     As run: 270 s of device time were left; it ended before the 2nd server was up.
#   call 6 (1 H100):  NOT RUN (no device time left): the next session's first, kind nvidia-h100-x1,
#                     timeout_s 600: the c1 question again, with the time it needs: the extended
#                     backend_decode_ab.py (refill GPU work + back-to-back loop), then
#                     profile_decode.py (a server takes ~3.5 min to come up here).
set -uo pipefail
cd "$(dirname "$0")/../.."
CALL="${1:?usage: session10.sh 1..}"
WHEELS=.dev-s8/wheels
SITE=/tmp/m3serve-site10
source scripts/gpu/lanes.sh
K=tests/kernels
case "$CALL" in
1)  # one H100 (nvidia-h100-x1)
    export PYTHONPATH=$PWD/tests/sgl_kernel_standin:$PYTHONPATH
    python3 - <<'PY' 2>&1 | tee "$OUT/mm_dtype.txt"
import torch
a = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
b = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
for name, fn in [("mm", lambda: torch.mm(a, b, out_dtype=torch.float32)),
                 ("bmm", lambda: torch.bmm(a[None], b[None], out_dtype=torch.float32))]:
    try:
        r = fn()
        ref = a.float() @ b.float()
        print(name, "out_dtype float32:", r.dtype, "max|diff| vs fp32 matmul", (r - ref).abs().max().item())
    except Exception as e:  # noqa: BLE001
        print(name, "out_dtype float32 unsupported:", type(e).__name__, str(e)[:120])
PY
    timeout 150 python3 scripts/gpu/host_sync_probe.py 2>&1 | grep -v Warning | tee "$OUT/probe.txt"
    timeout 330 $GT tests/backend $K/test_sparse_decode.py 2>&1 | tail -n 15 | tee "$OUT/tests.txt"
    ;;
2)  # two GPUs (nvidia-h200-x2)
    STAGES=e2e WHEELS=.dev-s8/wheels OUT="$OUT/e2e" CKPT=/tmp/m3-gpu E2E_S=560 \
        E2E_ARGS="--gpus 0,1 --workloads random:131072:512:1,8,32,64 --prompts-per-conc 1 \
        --tag s10_128k --deadline 470" bash scripts/gpu/issue8_run.sh > "$OUT/e2e.txt" 2>&1
    ;;
3)  # one H100 (nvidia-h100-x1)
    export PYTHONPATH=$PWD/tests/sgl_kernel_standin:$PYTHONPATH
    timeout 400 python3 scripts/gpu/backend_decode_ab.py --batches 1,8 2>&1 | grep -v Warning \
        | tee "$OUT/ab.txt"
    ;;
4)  # two GPUs (nvidia-h200-x2)
    STAGES=e2e WHEELS=.dev-s8/wheels OUT="$OUT/e2e" CKPT=/tmp/m3-gpu E2E_S=540 \
        E2E_ARGS="--gpus 1,0 --workloads random:131072:512:1,8 --prompts-per-conc 1 \
        --tag s10_swap --deadline 470" bash scripts/gpu/issue8_run.sh > "$OUT/e2e.txt" 2>&1
    ;;
5)  # one H100 (nvidia-h100-x1)
    profile_c1 330
    ;;
6)  # one H100 (nvidia-h100-x1)
    export PYTHONPATH=$PWD/tests/sgl_kernel_standin:$PYTHONPATH
    timeout 150 python3 scripts/gpu/backend_decode_ab.py --batches 1,8 2>&1 | grep -v Warning \
        | tail -n 8 | tee "$OUT/ab.txt"
    profile_c1 400
    ;;
*) echo "unknown call $CALL"; exit 2 ;;
esac
wait
for f in "$OUT"/*.txt; do echo "===== $(basename "$f")"; tail -n 45 "$f"; done
(cd "$OUT" && tar czf "session10_$CALL.tgz" --remove-files */ 2>/dev/null)
echo "[total $(( $(date +%s) - t0 )) s]"
