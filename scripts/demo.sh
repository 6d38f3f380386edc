#!/usr/bin/env bash
# Runs denoising, anomaly detection and super-resolution with the bundled demo weights on a
# held-out phantom; writes NIfTI outputs and PNG previews to demo_output/.
# the demo prints classical baselines beside the model (non-local means: scikit-image)
source "$(dirname "${BASH_SOURCE[0]}")/env.sh" "benchmark"
exec meddiff-fm demo --output demo_output "$@"
