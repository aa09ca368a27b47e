# Sourced by the GPU check scripts (topk_check.sh, moe_check.sh) from the repo root: pytest from
# .dev-index/index_topk_wheels where the machine has none, this tree's python/ first on PYTHONPATH,
# then the card and the torch / triton versions. Needs OUT set.
mkdir -p "$OUT"
if ! python3 -c "import pytest" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/m3serve-pytest .dev-index/index_topk_wheels/*.whl >/dev/null 2>&1 \
        || echo "no pytest and no .dev-index/index_topk_wheels: GPU tests will fail"
    export PYTHONPATH="/tmp/m3serve-pytest:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/python:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
