# Sourced by the session scripts (session6.sh .. session9.sh) from the repo root: installs the
# carried wheels ($WHEELS, default .dev-s6/wheels: FlashInfer 0.6.18, tvm-ffi, pytest; session 8:
# .dev-s8/wheels, slim sglang too) once into $SITE (default /tmp/m3serve-site6), puts this
# tree's python/, $SITE and SGLang's MSA ops (.dev-s6/sglang_site) on PYTHONPATH, prints the card,
# versions and set-up time, sets SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python, and defines
# lane NAME GPU COMMAND: COMMAND in the background on one card, its
# output in $OUT/NAME.txt, its own Triton cache; and profile_c1 LIMIT_S (issue 8's concurrency-1
# profile: install + checkpoint, then profile_decode.py). Sets OUT, t0, SITE, BASE, DEC and GT.
OUT="${OUT:-$PWD/gpu-out}"; mkdir -p "$OUT"
t0=$(date +%s)
SITE="${SITE:-/tmp/m3serve-site6}"
if [ ! -f "$SITE/.done" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
        "${WHEELS:-.dev-s6/wheels}"/*.whl > "$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; exit 1; }
    touch "$SITE/.done"
fi
BASE="$PWD/python:$SITE:$PWD/.dev-s6/sglang_site"
export PYTHONPATH="$BASE" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/card.txt"
python3 -c "import torch, triton, flashinfer; print('torch', torch.__version__, 'triton', triton.__version__, 'flashinfer', flashinfer.__version__)"
lane() {  # lane NAME GPU COMMAND: run in the background on one card, output in $OUT/NAME.txt
    local name=$1 gpu=$2; shift 2
    mkdir -p "$OUT/$name"
    ( CUDA_VISIBLE_DEVICES=$gpu OUT="$OUT/$name" TRITON_CACHE_DIR="/tmp/triton-$name" \
        bash -c "$*" > "$OUT/$name.txt" 2>&1
      echo "[lane $name exit $? after $(( $(date +%s) - t0 )) s]" >> "$OUT/$name.txt" ) &
}
export SGLANG_UNIFIED_RADIX_TREE_CORE_BACKEND=python  # tests importing sglang need it (GPU.md)
echo "[setup $(( $(date +%s) - t0 )) s]"
DEC="python3 benchmarks/bench_sparse_decode.py --sglang-site .dev-s6/sglang_site"
GT="python3 -m pytest -q -m gpu -p no:cacheprovider --durations=5"
profile_c1() {  # profile_c1 LIMIT_S: install + checkpoint (issue8_run.sh setup), profile_decode.py
    STAGES=setup WHEELS=.dev-s8/wheels OUT="$OUT/setup" CKPT=/tmp/m3-gpu \
        bash scripts/gpu/issue8_run.sh > "$OUT/setup.txt" 2>&1 || { tail -20 "$OUT/setup.txt"; exit 1; }
    PYTHONPATH=/tmp/m3serve-site:$PWD/python OUT="$OUT/prof" timeout "$1" \
        python3 scripts/gpu/profile_decode.py /tmp/m3-gpu --input 131072 --new 1200 --steps 30 \
        > "$OUT/prof.txt" 2>&1
    cp "$OUT/prof/profile_decode.json" "$OUT/" 2>/dev/null
}
