#!/usr/bin/env bash
# Run every test of the project: Rust (clippy -D warnings, cargo test) and Python (ruff, pytest).
# Sets everything up first through scripts/bootstrap.sh (creates or reuses the project venv).
# Extra arguments go to pytest, e.g. `scripts/test.sh -k sglang`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
t0=$(date +%s)
PY="$(bash scripts/bootstrap.sh | tail -n 1)"
VENV_BIN="$(dirname "$PY")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${M3SERVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/m3serve}/cargo-target}"
echo "[test] set-up took $(( $(date +%s) - t0 )) s"

stage() { echo; echo "== $* =="; }
t=$(date +%s); stage "cargo clippy (-D warnings)"
cargo clippy --workspace --all-targets --quiet -- -D warnings
stage "cargo test"
cargo test --workspace --quiet 2>&1
echo "[test] rust took $(( $(date +%s) - t )) s"

stage "ruff"
"$VENV_BIN/ruff" check python tests benchmarks scripts

stage "pytest"
t=$(date +%s)
set +e
"$PY" -m pytest "$@"
rc=$?
set -e
echo "[test] pytest took $(( $(date +%s) - t )) s; total $(( $(date +%s) - t0 )) s"
if [ "$rc" -eq 5 ]; then
    echo "[test] pytest collected no tests: that is a failure" >&2
    exit 1
fi
exit "$rc"
