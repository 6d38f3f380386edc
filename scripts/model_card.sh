#!/usr/bin/env bash
# Measures the bundled weights on every task and rewrites the numbers of the model card
# (Resources/models/MODEL_CARD.md) and the README from that one run: the held-out family at
# clinical grids ($CASES cases per task, the targets are judged there) and the training family
# ($TRAINING_CASES cases, labelled as such). Two single-threaded benchmark processes share the
# sections (on 2 CPU cores with the defaults this takes about an hour and a half; DEVICE=cuda on a GPU).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" "benchmark"
set -euo pipefail
OUT=${OUT:-runs/model_card}
CASES=${CASES:-5}
TRAINING_CASES=${TRAINING_CASES:-1}
STEPS=${STEPS:-superres=4}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
rm -f "$OUT"/*.json
run() { meddiff-fm benchmark --device "${DEVICE:-cpu}" --quiet --steps $STEPS "$@"; }
run --sections denoise,superres --cases "$CASES" --families heldout -o "$OUT/heldout_restoration.json" > "$OUT/a.log" &
a=$!
run --sections anomaly,synthesis,inpaint,lesion --cases "$CASES" --families heldout -o "$OUT/heldout_other.json" \
    > "$OUT/b.log" &
b=$!
wait $a
wait $b
if [ "$TRAINING_CASES" -gt 0 ]; then
    run --cases "$TRAINING_CASES" --families training -o "$OUT/training.json" > "$OUT/c.log"
fi
python -m MedDiffFMLib.benchmark.card "$OUT"/*.json
