#!/usr/bin/env bash
# The main job end to end on the embedded synthetic dataset (called by `make demo`).
# make-synthetic → make-teacher (random, tiny) → extract-teacher → train → linear probe
# (distilled vs random init) → RankMe → pictures.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo_out}
PY=.venv/bin/python
mkdir -p "$OUT"
step() { printf '\n=== %s\n' "$*"; }

step "1/6 synthetic nuScenes-format dataset → $OUT/data"
$PY cli.py make-synthetic --out "$OUT/data"

echo "(demo incomplete: later stages land with their issues)"
