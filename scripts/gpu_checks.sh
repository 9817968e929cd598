#!/usr/bin/env bash
# All GPU checks of a session in one run (correctness first, then timings), for a lent H100/H200:
#   bash scripts/gpu_checks.sh OUT_DIR
# Needs CamVid's validation parquet copied into .bench_data/camvid/data/ (ignored by git; carried to the machine),
# because ../shared does not travel. Prints Markdown tables and writes JSON to OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HOME=/tmp/hf_home
python3 -c "import transformers, datasets" 2>/dev/null || pip install -q "transformers>=5" datasets accelerate safetensors
pip install -q --no-deps -e . >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$out/gpu.txt"
data=.bench_data/camvid
# 1. correctness on the GPU (each benchmark run checks packed = padded = per-image first), small and fast
python3 -m step_hf.benchmark --preset small --image_size 512 --batch_size 4 --num_batches 1 --repeats 1 \
    --dtype fp32 --dataset_name $data --skip_vit --output "$out/check_fp32.json" || exit 1
# 2. the ladder: ViT-L at 1024, bf16, batch 8, then batch 1 with the compiled static-budget variant
python3 -m step_hf.benchmark --preset large --image_size 1024 --batch_size 8 --num_batches 2 --dtype bf16 \
    --dataset_name $data --output "$out/vitl_1024_b8.json"
python3 -m step_hf.benchmark --preset large --image_size 1024 --batch_size 1 --num_batches 4 --dtype bf16 \
    --dataset_name $data --compile --skip_vit --output "$out/vitl_1024_b1.json"
python3 -m step_hf.benchmark --preset large --image_size 1024 --batch_size 8 --num_batches 2 --dtype bf16 \
    --dataset_name $data --attention_mode padded --skip_vit --output "$out/vitl_1024_b8_padded.json"
