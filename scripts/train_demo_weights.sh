#!/usr/bin/env bash
# Re-trains the bundled demo weights (v2, voxel-size conditioned) on synthetic phantoms on the
# CPU, with the settings recorded in Resources/models/MODEL_CARD.md. Each run stops after its
# time budget (--max-minutes) and saves; resume is exact, so `--resume` with a larger budget
# continues a campaign where it stopped (the state lives in $OUT/<run>/training_state).
# Two single-threaded processes side by side beat one with two threads on a 2-core machine;
# on a GPU pass --device cuda (and more --steps).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" ""
set -x
OUT=${OUT:-runs}
RESUME=${RESUME:-}   # set RESUME=--resume to continue the runs in $OUT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# bf16 autocast where the CPU computes bf16 in hardware (2.3-3.4x faster than fp32 there); an
# AVX2-only CPU emulates it, 30x slower than fp32 (MedDiffFMLib.threads.cpu_has_native_bf16)
PRECISION=${PRECISION:-$(python -c "from MedDiffFMLib.threads import cpu_has_native_bf16; print('bf16' if cpu_has_native_bf16() else 'fp32')")}
# 1. foundation model: 96 adult-sized phantoms (seeds 0-95; sub-boxes of at most 1 M voxels on
#    random oblique clinical grids, 0.6-3 mm in-plane, 0.5-5 mm slices), 32^3 windows,
#    warm-started from the v1 weights (new voxel-size input channels start at zero), CPU bf16
#    autocast with channels_last_3d where native. (Steps 1-464 were trained on 60 miniature phantoms.)
meddiff-fm train --preset small --phantoms 96 --phantom-seed 0 --phantom-family adult --phantom-max-voxels 1000000 --steps 20000 --max-minutes ${BASE_MINUTES:-55} \
    --batch-size 2 --lr 2e-4 --ema-decay 0.995 --checkpoint-every 100 --seed 0 --device cpu --precision $PRECISION \
    --out "$OUT/base_v2" ${RESUME:---init-from ${V1_BASE:-Resources/models/meddifffm-demo-base}}
meddiff-fm export "$OUT/base_v2/model" --fp16 --to Resources/models/meddifffm-demo-base --register \
    --id meddifffm-demo-base --version "demo-2.1" --default --min-gpu-memory-gb 1 \
    --description "Demo foundation model v2, voxel-size conditioned (0.5-8 mm), trained on synthetic phantoms on a CPU. Not for clinical use."
# 2. task ControlNets on the exported (fp16) base, so that they record the shipped base's sha256:
#    super-resolution over factors 2-6 on thin-slice phantoms, its condition the parabolic slab
#    reconstruction (demo-2.3: from demo-2.2, trained on linear interpolation), and lesions (side by
#    side, one core each);
#    a new run starts from the shipped ControlNet of its task (V1_CN=none starts from the base's encoder)
CN_FAMILY="--phantom-family adult --phantom-max-voxels 1000000"
init_cn() { [ "${V1_CN:-}" = none ] || echo "--init-from Resources/models/meddifffm-demo-$1"; }
meddiff-fm finetune --base Resources/models/meddifffm-demo-base --task superres --phantoms 40 --phantom-seed 0 $CN_FAMILY \
    --steps 20000 --max-minutes ${SR_MINUTES:-62} --batch-size 2 --lr 2e-4 --ema-decay 0.99 --checkpoint-every 100 \
    --seed 3 --device cpu --precision $PRECISION --out "$OUT/superres_v2" ${RESUME:-$(init_cn superres)} &
meddiff-fm finetune --base Resources/models/meddifffm-demo-base --task lesion --lesions 3 --phantoms 40 $CN_FAMILY \
    --phantom-seed 2000 --steps 20000 --max-minutes ${CN_MINUTES:-42} --batch-size 2 --lr 4e-4 --ema-decay 0.99 \
    --checkpoint-every 100 --seed 2 --device cpu --precision $PRECISION --out "$OUT/lesion_v2" ${RESUME:-$(init_cn lesion)} &
wait
for task in superres lesion; do
    version=demo-2.1; [ "$task" = superres ] && version=demo-2.3
    meddiff-fm export "$OUT/${task}_v2/model" --fp16 --to "Resources/models/meddifffm-demo-$task" --register \
        --id "meddifffm-demo-$task" --base-id meddifffm-demo-base --version "$version" --min-gpu-memory-gb 1 \
        --description "Demo $task ControlNet v2 on the voxel-size conditioned base, trained on synthetic phantoms on a CPU. Not for clinical use."
done
