#!/usr/bin/env bash
# Add STEP to a trained (dense) segmenter, e.g. one converted by `python -m step_hf.convert_segmenter`:
#   bash scripts/add_step.sh MODEL_DIR DATASET OUTPUT_ROOT [extra examples/train.py arguments]
# 1. policy: the dCTS policy trains alone (the segmenter is untouched): OUTPUT_ROOT/policy
# 2. segmenter: a short fine-tune of the trained encoder and decoder on the policy's partitions, the fresh exit heads
#    learning by deep supervision: OUTPUT_ROOT/segmenter
# 3. prune: the pruning fine-tune with halting on: OUTPUT_ROOT/step
# Each stage is evaluated and saved (metrics.json: mIoU, tokens, FLOPs, share halted). The model's own normalisation
# (preprocessor_config.json) is kept. Learning rates fit weights that already segment well: the policy is new
# (train.py's 5e-4); the segmenter stage moves the trained backbone at 2e-5 and the heads (decoder, exits) at 10x,
# so that the new exit heads learn while the trained model stays where it was; the pruning stage at 2e-5.
# Sizes and steps: SIZE (shortest edge, default 512), POLICY_STEPS (1000), SEGMENTER_STEPS (2000), PRUNE_STEPS (500),
# BATCH (8), PRECISION (bf16), WORKERS (7), SEGMENTER_LR, PRUNE_LR; PYTHON chooses the interpreter (python3).
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:?a trained STEP model folder} data=${2:?a dataset} root=${3:?an output folder}
shift 3
common=(--dataset_name "$data" --image_size "${SIZE:-512}" --per_device_train_batch_size "${BATCH:-8}"
        --per_device_eval_batch_size "${BATCH:-8}" --mixed_precision "${PRECISION:-bf16}" --num_workers "${WORKERS:-7}"
        --policy_steps "${POLICY_STEPS:-1000}" --segmenter_steps "${SEGMENTER_STEPS:-2000}"
        --prune_steps "${PRUNE_STEPS:-500}" --checkpointing_steps "${CHECKPOINT_STEPS:-0}")
train() { "${PYTHON:-python3}" examples/train.py "${common[@]}" "$@"; }
train --output_dir "$root/policy" --stage policy --model_name_or_path "$model" "$@"
train --output_dir "$root/segmenter" --stage segmenter --model_name_or_path "$root/policy" \
      --learning_rate "${SEGMENTER_LR:-2e-5}" "$@"
train --output_dir "$root/step" --stage prune --model_name_or_path "$root/segmenter" \
      --prune_learning_rate "${PRUNE_LR:-2e-5}" "$@"
