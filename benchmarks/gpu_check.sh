#!/usr/bin/env bash
# The GPU extraction check of issue 9, as one script for a lent GPU machine (device tool):
#   bash benchmarks/gpu_check.sh            # results under $OUT (or ./gpu-check)
# It renders the synthetic set at nuScenes resolution, makes a random ViT-S/14-shaped teacher,
# and prints `bench extraction` tables (extract-teacher images/s ÷ bare forward images/s, both
# on the GPU) for thread workers and for processes x threads, on --replicate copies of the set
# (steady-state runs of ~1,500 images), then `bench feed` (the CPU side against a stand-in GPU
# of the bare rate). Python packages missing on the machine are installed from ./.whl when
# present (wheels of zarr, dask, ... for its Python; docs/benchmarks.md, "GPU").
# Environment: DEVICE (cuda), DTYPE (float16), SIZE (448x896), COPIES (8), SCENES (4),
# SAMPLES (8), WIDTH/HEIGHT (1600/900), PY (python3). CPU dry run:
#   DEVICE=cpu DTYPE=float32 SIZE=56x98 COPIES=2 SCENES=2 SAMPLES=2 WIDTH=320 HEIGHT=180 \
#     PY=.venv/bin/python bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-float16}
SIZE=${SIZE:-448x896}
COPIES=${COPIES:-8}
SCENES=${SCENES:-4}
SAMPLES=${SAMPLES:-8}
WIDTH=${WIDTH:-1600}
HEIGHT=${HEIGHT:-900}
PY=${PY:-python3}
OUT=${OUT:-gpu-check}
WORK=${WORK:-/tmp/gpu-check}
mkdir -p "$OUT" "$WORK"
log="$OUT/gpu_check.log"
exec > >(tee -a "$log") 2>&1

# what extraction imports (matplotlib and MinkowskiEngine are not needed here)
missing() {
    "$PY" - <<'PY'
import importlib.util
mods = "torch numpy zarr numcodecs google_crc32c dask distributed transformers typer tqdm pyquaternion PIL yaml scipy"
print(" ".join(m for m in mods.split() if importlib.util.find_spec(m) is None))
PY
}
if [ -n "$(missing)" ]; then
    echo "missing: $(missing)"
    [ -d .whl ] && "$PY" -m pip install -q --no-index --no-deps .whl/*.whl
    [ -z "$(missing)" ] || { echo "still missing: $(missing) (put their wheels in ./.whl)"; exit 1; }
fi
nproc
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no cuda')"
cores=$(nproc)

if [ ! -f "$WORK/data/synthetic_meta.json" ]; then
    rm -rf "$WORK/data"
    time "$PY" cli.py make-synthetic --out "$WORK/data" --scenes "$SCENES" \
        --samples-per-scene "$SAMPLES" --width "$WIDTH" --height "$HEIGHT" \
        --workers "$cores"
fi
[ -d "$WORK/teacher" ] || "$PY" cli.py make-teacher --out "$WORK/teacher" --size vits14

bench() {
    echo "### bench $*"
    timeout "${BENCH_TIMEOUT:-150}" "$PY" cli.py bench "$@" --data "$WORK/data" \
        --teacher "$WORK/teacher" --split all --image-size "$SIZE" --device "$DEVICE" \
        --dtype "$DTYPE" --scans 4 --replicate "$COPIES" 2>&1 | grep -v " - INFO - " || true
}
# Most telling first (a lease can end mid-script; the log keeps what finished).
# 1. processes x threads: each process has its own GIL and its own Zarr I/O loop
bench extraction --processes --workers 4 --threads-per-worker 2
# 2. thread workers (the default kind), several per GPU
bench extraction --workers 8
bench extraction --processes --workers 8
bench extraction --processes --workers 8 --threads-per-worker 2
# 3. the CPU side alone against a stand-in GPU at the measured bare rate
bench feed --processes --workers 4 --threads-per-worker 2 --gpu-rate 200
echo "done: $log"
