#!/usr/bin/env bash
# Issue 8 smoke on the GPU machine. Carry .dev-e2e/wheels (python scripts/gpu/make_wheelhouse.py).
set -uo pipefail
OUT="${OUT:-$PWD/gpu-out}"; mkdir -p "$OUT"
SITE=/tmp/m3serve-site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    .dev-e2e/wheels/*.whl > "$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; exit 1; }
# SGLang finds plugins through package metadata: declare m3serve's entry point (no Rust build here).
mkdir -p "$SITE/m3serve-0.1.0.dist-info"
printf 'Metadata-Version: 2.1\nName: m3serve\nVersion: 0.1.0\n' > "$SITE/m3serve-0.1.0.dist-info/METADATA"
printf '[sglang.srt.plugins]\nm3serve = m3serve.plugin:register\n' > "$SITE/m3serve-0.1.0.dist-info/entry_points.txt"
export PYTHONPATH="$SITE:$PWD/python" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
CKPT=/tmp/m3-gpu
python3 scripts/gpu/make_m3_gpu_checkpoint.py "$CKPT" ${CKPT_ARGS:-} || exit 1
timeout "${E2E_S:-400}" python3 scripts/gpu/e2e_smoke.py "$CKPT" ${E2E_ARGS:-}
rc=$?
echo "e2e exit $rc"; [ $rc -ne 0 ] && tail -n 60 "$OUT"/server_*.log
exit $rc
