#!/usr/bin/env bash
# Measures the bundled weights on every task and rewrites the numbers of the model card
# (Resources/models/MODEL_CARD.md) and the README from that one run: the held-out family at
# clinical grids ($CASES cases per task, for synthesis per region; the targets are judged there)
# and the training family ($TRAINING_CASES cases, labelled as such). Two single-threaded benchmark
# processes share the sections (on 2 CPU cores with the defaults this takes about an hour and a
# half; DEVICE=cuda on a GPU).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" "benchmark"
set -euo pipefail
OUT=${OUT:-runs/model_card}
CASES=${CASES:-5}
TRAINING_CASES=${TRAINING_CASES:-1}
STEPS=${STEPS:-superres=4}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
rm -f "$OUT"/*.json
# the tables go to $OUT/*.log, the progress lines to $OUT/*.progress
run() { meddiff-fm benchmark --device "${DEVICE:-cpu}" --steps $STEPS "$@"; }
run --sections denoise,superres,synthesis --cases "$CASES" --families heldout -o "$OUT/heldout_a.json" \
    > "$OUT/a.log" 2> "$OUT/a.progress" &
a=$!
run --sections anomaly,inpaint,lesion --cases "$CASES" --families heldout -o "$OUT/heldout_b.json" \
    > "$OUT/b.log" 2> "$OUT/b.progress" &
b=$!
wait $a
wait $b
if [ "$TRAINING_CASES" -gt 0 ]; then
    run --cases "$TRAINING_CASES" --families training -o "$OUT/training.json" > "$OUT/c.log" 2> "$OUT/c.progress"
fi
python -m MedDiffFMLib.benchmark.card "$OUT"/*.json
