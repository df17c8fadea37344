#!/usr/bin/env bash
# Reproduce the origin's experiment (pyimagesearch, 2020-03-16): its 50 images with its labels
# (25 covid, 25 "normal" of which 18 are really pneumonia: see ../shared/data/README.md), an
# 80/20 split, 25 epochs, batch 8, Adam 1e-3, rotation augmentation, no validation split (the
# origin had none). Differences that cannot or should not be undone: the split is by patient
# (the origin's image-level split put films of one patient on both sides), and without internet
# the base weights are random, so block 5 is trained (set BASE_WEIGHTS to imagenet or a local
# vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5 to get the origin's frozen ImageNet base).
#
# Usage: scripts/reproduce_pyimagesearch50.sh [OUT_DIR] [extra covid-cxr train flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
CXR="${COVID_CXR_SHARED_DATA:-../shared/data}/cxr"
OUT="${1:-covid-cxr-data/runs/pyimagesearch50-$(date -u +%Y%m%d-%H%M%S)}"
shift || true
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec .venv/bin/covid-cxr train \
  --csv "$CXR/metadata.csv" --where subset=pyimagesearch50 --label-column reference_label \
  --base-weights "${BASE_WEIGHTS:-none}" \
  --epochs 25 --batch-size 8 --learning-rate 1e-3 --test-fraction 0.2 --validation-fraction 0 \
  --name pyimagesearch50 --out "$OUT" "$@"
