#!/usr/bin/env bash
# The demo: set everything up (scripts/bootstrap.sh), then `m3serve demo` — a tiny checkpoint served
# on CPU by the real SGLang, one chat request, the answer and timings printed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$(bash "$ROOT/scripts/bootstrap.sh" | tail -n 1)"
exec "$PY" -m m3serve demo "$@"
