#!/usr/bin/env bash
# Create or reuse the one project virtualenv and install everything m3serve needs.
#
# The venv lives OUTSIDE the clone (~/.cache/m3serve/venv by default) because torch 2.14.1's CUDA
# wheel and sglang are several GB: CI clones into a fresh folder each time and must reuse them.
# The Rust build directory is cached there too. A second run only rebuilds what changed.
# Usage: source-free; prints the venv's python path on its last line. Env: M3SERVE_VENV,
# M3SERVE_CACHE, CARGO_TARGET_DIR.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${M3SERVE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/m3serve}"
VENV="${M3SERVE_VENV:-$CACHE/venv}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/cargo-target}"
mkdir -p "$CACHE"
log() { echo "[bootstrap] $*" >&2; }

# -- Debian packages the build needs (C toolchain pieces for -sys crates) --
APT_PACKAGES="pkg-config cmake nasm"
missing=""
for p in $APT_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
    log "installing Debian packages:$missing"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

# -- Rust toolchain --
command -v cargo >/dev/null || { log "cargo not found: install Rust (rustup) first"; exit 1; }

# -- Python >= 3.11 --
PY=""
for cand in python3.11 python3.12 python3.13 python3; do
    if command -v "$cand" >/dev/null && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        PY="$(command -v "$cand")"; break
    fi
done
[ -n "$PY" ] || { log "need Python >= 3.11"; exit 1; }

# -- one bootstrap at a time per venv: two runs side by side (a demo beside a test run, two
# clones) would otherwise pip-uninstall m3serve under each other's feet --
if command -v flock >/dev/null; then
    exec 9>"$CACHE/bootstrap.lock"
    flock -n 9 || { log "waiting for another bootstrap of $VENV to finish"; flock 9; }
fi

if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv at $VENV with $PY"
    "$PY" -m venv "$VENV"
fi

# -- Python dependencies: reinstalled only when requirements change --
REQ="$ROOT/requirements.txt"
stamp="$VENV/.m3serve-deps-$(sha256sum "$REQ" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
    log "installing Python dependencies (first run: several GB, cached by pip afterwards)"
    t0=$(date +%s)
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -r "$REQ"
    rm -f "$VENV"/.m3serve-deps-*
    touch "$stamp"
    log "dependencies installed in $(( $(date +%s) - t0 )) s"
fi

# -- m3serve itself (editable; builds the Rust extension m3serve._smg with maturin) --
# Reinstalled only when the Rust sources or pyproject change, or the venv points at another clone.
src_hash=$( (cd "$ROOT" && cat pyproject.toml Cargo.toml Cargo.lock 2>/dev/null; \
    find rust -type f \( -name '*.rs' -o -name 'Cargo.toml' \) | sort | xargs cat) | sha256sum | cut -c1-16)
inst_stamp="$VENV/.m3serve-install"
want="$ROOT $src_hash"
if [ "$(cat "$inst_stamp" 2>/dev/null)" != "$want" ] \
    || ! "$VENV/bin/python" -c 'import m3serve._smg' 2>/dev/null; then
    log "building m3serve (maturin develop --release) from $ROOT"
    t0=$(date +%s)
    build_log="$CACHE/maturin-develop.log"
    if ! (cd "$ROOT" && VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH" \
        "$VENV/bin/maturin" develop --release -q >"$build_log" 2>&1); then
        tail -n 60 "$build_log" >&2
        log "maturin develop failed; full log: $build_log"
        exit 1
    fi
    echo "$want" > "$inst_stamp"
    log "m3serve built in $(( $(date +%s) - t0 )) s"
fi
echo "$VENV/bin/python"
