#!/usr/bin/env bash
# The CamVid comparison of dense, dCTS and STEP: one command per variant, the same backbone, recipe and segmenter steps.
#   bash scripts/camvid_recipe.sh dense OUTPUT_ROOT   # plain ViT + Segmenter, no token sharing
#   bash scripts/camvid_recipe.sh dcts  OUTPUT_ROOT   # policy stage, then the segmenter on its partitions
#   bash scripts/camvid_recipe.sh step  OUTPUT_ROOT   # dcts (reused if present), then the pruning fine-tune
#   bash scripts/camvid_recipe.sh cts   OUTPUT_ROOT   # CTS alone: 2x2 superpatches only, CTS_BUDGET tokens per image
#   bash scripts/camvid_recipe.sh dtop  OUTPUT_ROOT   # DToP alone: dense (reused if present), then the pruning fine-tune
# Defaults: one H100/H200 GPU, ViT-S from scratch, CamVid resized to a shortest edge of 720 (frames 720x960, a 45x60
# patch grid), 720x720 crops, batch 8, bf16; 200 policy, 1600 segmenter and 150 pruning steps (on an H200, dense and
# dCTS -> STEP side by side: 4 and 5 minutes). The CPU scale-down of the recipe (under an hour on 2 cores):
#   PRESET=tiny SIZE=384 PRECISION=no WORKERS=0 SEGMENTER_STEPS=400 POLICY_STEPS=200 PRUNE_STEPS=100 bash ...
# SEGMENTER_LR, SEGMENTER_HEAD_LR_MULTIPLIER and SEGMENTER_WARMUP set the segmenter stage's schedule (below).
# Extra arguments go to every examples/train.py call; PYTHON chooses the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
variant=${1:?dense, dcts, step, cts or dtop} root=${2:?an output folder}
shift 2
common=(--dataset_name "${DATA:-../shared/datasets/camvid}" --preset "${PRESET:-small}" --image_size "${SIZE:-720}"
        --per_device_train_batch_size 8 --per_device_eval_batch_size 8 --mixed_precision "${PRECISION:-bf16}"
        --num_workers "${WORKERS:-7}" --policy_steps "${POLICY_STEPS:-200}" --segmenter_steps "${SEGMENTER_STEPS:-1600}"
        --prune_steps "${PRUNE_STEPS:-150}" --checkpointing_steps "${CHECKPOINT_STEPS:-0}"
        ${ATTENTION_MODE:+--attention_mode "$ATTENTION_MODE"})
# The recipe trains a ViT from scratch, so it sets its own schedule. train.py's defaults (2e-5, heads 10x, drop path
# 0.1) fine-tune a pretrained backbone. From scratch, 5e-4 with heads 10x left the dense ViT-S at 11 mIoU on the
# GPU, and at 17 against 24 for this schedule in a CPU comparison (docs/RESULTS.md): the segmenter stage uses one
# learning rate for backbone and decoder and a longer warm-up, no drop path; the pruning fine-tune 1e-4 (5e-4 undid
# most of what a ViT-S had learnt). The policy stage keeps train.py's --policy_learning_rate.
common+=(--drop_path_rate 0)
segmenter=(--stage segmenter --learning_rate "${SEGMENTER_LR:-4e-4}"
           --head_learning_rate_multiplier "${SEGMENTER_HEAD_LR_MULTIPLIER:-1}" --warmup_steps "${SEGMENTER_WARMUP:-100}")
prune=(--stage prune --prune_learning_rate "${PRUNE_LR:-1e-4}")
train() { "${PYTHON:-python3}" examples/train.py "${common[@]}" "$@"; }
case $variant in
    dense) train --output_dir "$root/dense" "${segmenter[@]}" --partition_source dense "$@" ;;
    dcts) train --output_dir "$root/dcts-policy" --stage policy "$@"
          train --output_dir "$root/dcts" "${segmenter[@]}" --model_name_or_path "$root/dcts-policy" "$@" ;;
    step) [ -f "$root/dcts/config.json" ] || bash "$0" dcts "$root" "$@"
          train --output_dir "$root/step" "${prune[@]}" --model_name_or_path "$root/dcts" "$@" ;;
    cts) train --output_dir "$root/cts-policy" --stage policy --superpatch_sizes 2 "$@"
         train --output_dir "$root/cts" "${segmenter[@]}" --model_name_or_path "$root/cts-policy" \
               --token_budget "${CTS_BUDGET:?the tokens per image, e.g. 112}" "$@" ;;
    dtop) [ -f "$root/dense/config.json" ] || bash "$0" dense "$root" "$@"
          train --output_dir "$root/dtop" "${prune[@]}" --model_name_or_path "$root/dense" --partition_source dense \
                "$@" ;;
    *) echo "unknown variant $variant: dense, dcts, step, cts or dtop" >&2; exit 2 ;;
esac
