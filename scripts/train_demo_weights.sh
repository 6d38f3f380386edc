#!/usr/bin/env bash
# Re-trains the bundled demo weights from scratch on synthetic phantoms, on the CPU, with the
# exact settings recorded in Resources/models/MODEL_CARD.md (the step counts are the ones the
# shipped weights reached within their time budgets; resume is exact, so one uninterrupted run
# of that many steps reproduces them). About 1.5 hours on 2 CPU cores with OMP_NUM_THREADS=1
# per process; on a GPU pass --device cuda (and more --steps).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" ""
set -x
OUT=${OUT:-runs}
# 1. foundation model: 60 phantoms (seeds 0-59, 20 per region), 4 mm voxels, 32^3 windows
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
meddiff-fm train --preset small --phantoms 60 --phantom-seed 0 --steps 3423 --batch-size 2 --lr 4e-4 \
    --ema-decay 0.995 --checkpoint-every 100 --seed 0 --device cpu --out "$OUT/base"
meddiff-fm export "$OUT/base/model" --fp16 --to Resources/models/meddifffm-demo-base --register \
    --id meddifffm-demo-base --version "demo-1" --default --min-gpu-memory-gb 1 \
    --description "Demo foundation model trained on synthetic phantoms (4 mm, CPU). Not for clinical use."
# 2. task ControlNets on the exported (fp16) base, so that they record the shipped base's sha256
#    (the two runs are independent: run them side by side, one core each)
meddiff-fm finetune --base Resources/models/meddifffm-demo-base --task superres --factor 3 1 1 \
    --phantoms 60 --phantom-seed 0 --steps 1830 --batch-size 2 --lr 4e-4 --ema-decay 0.99 \
    --checkpoint-every 100 --seed 1 --device cpu --out "$OUT/superres" &
meddiff-fm finetune --base Resources/models/meddifffm-demo-base --task lesion --lesions 3 \
    --phantoms 60 --phantom-seed 2000 --steps 1842 --batch-size 2 --lr 4e-4 --ema-decay 0.99 \
    --checkpoint-every 100 --seed 2 --device cpu --out "$OUT/lesion" &
wait
for task in superres lesion; do
    meddiff-fm export "$OUT/$task/model" --fp16 --to "Resources/models/meddifffm-demo-$task" --register \
        --id "meddifffm-demo-$task" --base-id meddifffm-demo-base --version "demo-1" --min-gpu-memory-gb 1 \
        --description "Demo $task ControlNet trained on synthetic phantoms (4 mm, CPU). Not for clinical use."
done
# 3. the model card's table
meddiff-fm benchmark --cases 6 --markdown Resources/models/benchmark.md --output Resources/models/benchmark.json
