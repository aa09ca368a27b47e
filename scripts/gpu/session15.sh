#!/usr/bin/env bash
# Session 15's GPU runs (lanes.sh: wheels installed once; one card).
#
#   carry: [".dev-s8"]   timeout_s: 600   kind: nvidia-h200 (issue 5's earlier runs are on H200)
#
# Calls 1-7 measured experiments that were all reverted (none beat the separate Triton combine
# after the Triton main kernel; sparse_prefill.md, session 15). Their code and the probe scripts
# the calls run (fused_probe.py, overlap_probe.py, coresidency_probe.py, l2_probe.py) are in
# commits 27dc801 (combine in the main grid), 454af99 (combine beside it on a second stream),
# 68c4982 (L2 hints) and c3c9275 (local block in the combine, call 7): check one out to rerun.
#
#   call 1 (1 GPU):  issue 5: the combine fused into the CUDA main kernel's grid (CTAs that
#                    finished their item merge the KV heads already complete; a small kernel
#                    merges the rest). The sparse-prefill GPU tests, then bench_sparse_prefill.py's
#                    sweep (Triton ITEM_Q 64 / 128, CUDA unfused, CUDA fused) and main / full
#                    prefill at 32K / 128K vs SGLang's ops with the winner.
#   call 2 (1 GPU):  call 1's fused run took 47.7 ms (vs 2.43 unfused): fused_probe.py times
#                    the fused main kernel, the rest kernel and profiles one run (3 runs: the
#                    first form; batched loads + probes (-D: no unit work 4.3 ms, trailing CTAs
#                    only 4.1 ms, acq_rel fence 36.9); per-head fetch-and-add tickets; a
#                    per-CTA %globaltimer trace (-DM3_TRACE); one unit per CTA).
#   call 3 (1 GPU):  fused combine measured additive (H100: CTA slots, not bandwidth, are the
#                    limit); overlap_probe.py: main kernel + a combine on a second stream.
#   call 4 (1 GPU):  call 2 again: the CUDA combine modes ("grid", "stream": a small kernel on a
#                    second stream in the room two main CTAs leave per SM, "grid+stream").
#   call 5 (1 GPU):  "stream" ran after the main kernel, not beside it: coresidency_probe.py.
#   call 6 (1 GPU):  L2 hints in the CUDA main kernel: partial stores evict-first, query-row
#                    gathers evict-last (l2_probe.py), 128K and 32K.
#   call 7 (1 GPU):  each query's local block attended to by the combine instead of the main
#                    kernel (1/16 fewer tiles and partials): GPU tests, sweep (local in the
#                    combine or not, Triton and CUDA), main / full prefill at 32K / 128K.
set -uo pipefail
cd "$(dirname "$0")/../.."
CALL="${1:?usage: session15.sh 1..}"
WHEELS=.dev-s8/wheels
SITE=/tmp/m3serve-site15
source scripts/gpu/lanes.sh
K=tests/kernels
case "$CALL" in
1|7)  # GPU tests, then the sweep and main / full prefill at 32K / 128K (record run)
    timeout -k 10 220 $GT $K/test_sparse_prefill.py 2>&1 | tail -n 30 > "$OUT/kt.txt"
    mkdir -p "$OUT/pre"
    timeout -k 10 340 python3 benchmarks/bench_sparse_prefill.py --sweep --out "$OUT/pre" \
        --contexts 32768,131072 --full-contexts 32768,131072 2>&1 | grep -v Warning | tail -n 45 \
        > "$OUT/pre.txt"
    cp "$OUT"/pre/sparse_prefill.json "$OUT/pre_s15.json" 2>/dev/null
    ;;
2|4)  # where the fused run's time goes (fused_probe.py), after the CUDA-kernel GPU tests
    timeout -k 10 150 $GT $K/test_sparse_prefill.py -k cuda 2>&1 | tail -n 8 > "$OUT/kt.txt"
    timeout -k 10 300 python3 scripts/gpu/fused_probe.py 2>&1 | grep -v Warning | tail -n 40 > "$OUT/probe.txt"
    ;;
3)  # can a combine run beside the main kernel on a second stream (overlap_probe.py)?
    timeout -k 10 300 python3 scripts/gpu/overlap_probe.py 2>&1 | grep -v Warning | tail -n 40 > "$OUT/overlap.txt"
    ;;
5)  # do the main kernel and the side-stream combine share SMs? (coresidency_probe.py)
    timeout -k 10 200 python3 scripts/gpu/coresidency_probe.py 2>&1 | grep -v Warning | tail -n 8 > "$OUT/cores.txt"
    ;;
6)  # L2 residency hints in the CUDA main kernel (l2_probe.py)
    timeout -k 10 300 python3 scripts/gpu/l2_probe.py 2>&1 | grep -v Warning | tail -n 14 > "$OUT/l2.txt"
    ;;
esac
echo "[call $CALL done after $(( $(date +%s) - t0 )) s]"
