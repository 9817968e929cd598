#!/usr/bin/env bash
# Sets up (scripts/setup.sh: .venv only), trains a small STEP model on the built-in procedural scenes (offline:
# policy -> segmenter -> pruning fine-tune, 650 steps whose time the CPU sets), then segments an image and saves a
# picture of it. Extra arguments go to examples/train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
# A ViT from scratch: its own learning rates and no drop path (train.py's defaults fine-tune pretrained ones).
.venv/bin/python examples/train.py --output_dir outputs/demo --preset tiny --image_size 128 \
    --policy_steps 150 --segmenter_steps 400 --prune_steps 100 --checkpointing_steps 100 --save_total_limit 1 \
    --learning_rate 5e-4 --prune_learning_rate 1e-4 --drop_path_rate 0 "$@"
.venv/bin/python examples/segment.py --model_name_or_path outputs/demo --output outputs/demo/segmentation.png
