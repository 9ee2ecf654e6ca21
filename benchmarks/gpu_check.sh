#!/usr/bin/env bash
# The GPU extraction check of issue 9, as one script for a lent GPU machine (device tool):
#   bash benchmarks/gpu_check.sh            # results under $OUT (or ./gpu-check)
# It renders the synthetic set at nuScenes resolution, makes random ViT-S/14- and ViT-B/14-shaped
# teachers, and prints `bench extraction` tables (extract-teacher images/s ÷ bare forward
# images/s, both on the GPU) on --replicate copies of the set (steady-state runs of ~1,500
# images): JPEGs decoded on the GPU and, as the same machine's baseline, on the CPU; and it runs
# the CUDA-only tests (tests/test_images.py). Python packages missing on the machine are installed from ./.whl when
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
[ -d "$WORK/teacher-b" ] || "$PY" cli.py make-teacher --out "$WORK/teacher-b" --size vitb14
stamp() { echo "--- $(date +%T) $*"; }
stamp "disk: 2 GiB written, fdatasync (the cache's fsync'd writes need this bandwidth)"
dd if=/dev/zero of="$WORK/dd.bin" bs=16M count=128 conv=fdatasync 2>&1 | tail -1
rm -f "$WORK/dd.bin"

bench() {
    stamp "bench $*"
    timeout "${BENCH_TIMEOUT:-150}" "$PY" cli.py bench "$@" --data "$WORK/data" --split all \
        --image-size "$SIZE" --device "$DEVICE" --dtype "$DTYPE" --scans 4 \
        --replicate "$COPIES" 2>&1 | grep -v " - INFO - " || true
}
# Most telling first (a lease can end mid-script; the log keeps what finished).
# 1. ViT-S/14, 8 processes x 2 threads (the best CPU-decode setting of 2026-11-26: 0.36 on an
#    H200), JPEG decode + resize on the GPU (nvJPEG)
bench extraction --teacher "$WORK/teacher" --processes --workers 8 --threads-per-worker 2 --image-decode device
# 2. the CUDA-only tests: nvJPEG decode gives the CPU's targets; a broken JPEG is named
stamp "pytest (CUDA)"
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/test_images.py \
    tests/test_teacher.py -k "device or cuda" 2>&1 | tail -25 || true
# 3. ViT-B/14, as 1.
bench extraction --teacher "$WORK/teacher-b" --processes --workers 8 --threads-per-worker 2 --image-decode device
# 4. the same machine's baseline: ViT-S/14 with CPU decode
bench extraction --teacher "$WORK/teacher" --processes --workers 8 --threads-per-worker 2 --image-decode cpu
echo "done: $log"
