#!/usr/bin/env bash
# The main job end to end on the embedded synthetic dataset (called by `make demo`):
# make-synthetic → make-teacher (a small DINOv2 fitted to the synthetic train labels: a stand-in,
# no real weights can be downloaded here)
# → extract-teacher → train (+ export of the backbone) → linear probe (distilled vs random init) → RankMe → pictures.
# Every step is resumable: re-running skips the dataset, teacher and cache that already exist.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-demo_out}
PY=.venv/bin/python
SCENES=${DEMO_SCENES:-4}
SAMPLES=${DEMO_SAMPLES:-6}
EPOCHS=${DEMO_EPOCHS:-12}
TEACHER_EPOCHS=${DEMO_TEACHER_EPOCHS:-20}
IMAGE_SIZE=${DEMO_IMAGE_SIZE:-224x392}
mkdir -p "$OUT"
step() { printf '\n=== [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
start=$(date +%s)

step "1/7 synthetic nuScenes-format dataset ($SCENES scenes x $SAMPLES samples) → $OUT/data"
if [ -f "$OUT/data/synthetic_meta.json" ]; then echo "exists: kept"; else
    $PY cli.py make-synthetic --out "$OUT/data" --scenes "$SCENES" --samples-per-scene "$SAMPLES"
fi

step "2/7 teacher: a small DINOv2 fitted to the train split's labels (stands in for facebook/dinov2-small) → $OUT/teacher"
if [ -f "$OUT/teacher/config.json" ]; then echo "exists: kept"; else
    $PY cli.py make-teacher --out "$OUT/teacher" --size small --fit-on "$OUT/data" \
        --image-size "$IMAGE_SIZE" --fit-epochs "$TEACHER_EPOCHS"
fi

step "3/7 extract-teacher (stage one) → $OUT/cache"
$PY cli.py extract-teacher --data "$OUT/data" --cache "$OUT/cache" --teacher "$OUT/teacher" \
    --split train --image-size "$IMAGE_SIZE" --scans-per-unit 2 | tee "$OUT/extract.log"
CACHE=$($PY -c "import sys; from cache.store import list_caches; print(list_caches(sys.argv[1])[0])" "$OUT/cache")
$PY cli.py cache verify "$CACHE"

step "4/7 train (stage two, from the cache only) → $OUT/run; its backbone → $OUT/backbone.pt"
RESUME=""
[ -f "$OUT/run/checkpoint.pt" ] && RESUME="--resume"
$PY cli.py train --cache "$CACHE" --data "$OUT/data" --out "$OUT/run" --backbone tiny \
    --head mlp --occupancy-weight 0.5 --epochs "$EPOCHS" --batch-size 2 --workers 2 $RESUME
rm -f "$OUT/backbone.pt"  # export refuses to replace a file; the run may have trained further
$PY cli.py export --checkpoint "$OUT/run" --out "$OUT/backbone.pt"

step "5/7 linear probe: distilled student vs the same architecture at random init"
$PY cli.py evaluate linear-probe --checkpoint "$OUT/run" --data "$OUT/data"
$PY cli.py evaluate linear-probe --checkpoint none --like "$OUT/run" --data "$OUT/data" --out "$OUT/random_init"

step "6/7 RankMe: student and teacher targets on the cache; student and random init on val"
$PY cli.py evaluate rankme --checkpoint "$OUT/run" --data "$OUT/data" --cache "$CACHE"
$PY cli.py evaluate rankme --checkpoint "$OUT/run" --data "$OUT/data" --out "$OUT/run/eval/val"
$PY cli.py evaluate rankme --checkpoint none --like "$OUT/run" --data "$OUT/data" --out "$OUT/random_init"

step "7/7 pictures: PCA of teacher targets vs student features → $OUT/pictures"
$PY cli.py visualize --checkpoint "$OUT/run" --data "$OUT/data" --cache "$CACHE" --out "$OUT/pictures"

$PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
d = json.loads((out / "run/eval/linear_probe.json").read_text())
r = json.loads((out / "random_init/linear_probe.json").read_text())
print(f"\nlinear-probe mIoU: distilled {100 * d['miou']:.1f}  vs  random init {100 * r['miou']:.1f}")
rd = json.loads((out / "run/eval/val/rankme.json").read_text())
rr = json.loads((out / "random_init/rankme.json").read_text())
print(f"RankMe on val (of {rd['student_dim']} dims): distilled {rd['student']:.1f}  vs  random init {rr['student']:.1f}")
PYEOF
printf '\nDemo finished in %s s.\n  results: %s/run (metrics.jsonl, eval/), %s/random_init\n  pictures: %s/pictures\n  pretrained backbone: %s/backbone.pt\n' \
    "$(( $(date +%s) - start ))" "$OUT" "$OUT" "$OUT" "$OUT"
