#!/usr/bin/env bash
# All GPU checks in one run (correctness first, then timings), on a GPU machine (H100/H200):
#   bash scripts/fetch_gpu_wheels.sh                 # first, with PyPI access: wheels into .whl/, CamVid into .bench_data/
#   bash scripts/gpu_checks.sh OUT                   # on the GPU machine, with .whl/ and .bench_data/ beside the checkout
# Prints Markdown tables and writes JSON to OUT_DIR. PRESET / SIZE / SMALL_SIZE override the models for a dry run on
# CPU (e.g. TINY=1 PRESET=tiny SIZE=128 SMALL_SIZE=64: TINY keeps the installed packages).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench_out}
mkdir -p "$out"
source scripts/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    | tee -a "$out/gpu.txt"
data=${DATA:-.bench_data/camvid}
preset=${PRESET:-large} size=${SIZE:-1024} small_size=${SMALL_SIZE:-512}
# 1. correctness on the GPU (each benchmark run checks packed = padded = per-image first), small and fast
timeout 90 python3 -m step_hf.benchmark --preset small --image_size $small_size --batch_size 4 --num_batches 1 --repeats 1 \
    --dtype fp32 --dataset_name $data --skip_vit --output "$out/check_fp32.json" || exit 1
# 2. the ladder: ViT-L at 1024, bf16, batch 8 (eager, profiled); batch 1 and batch 8 with the static variants
# (token budget, then also fixed exit counts) compiled with CUDA graphs (each compilation takes a minute or two);
# the padded attention mode last (a fallback: the least needed number)
timeout 180 python3 -m step_hf.benchmark --preset $preset --image_size $size --batch_size 8 --num_batches 2 \
    --dtype bf16 --dataset_name $data --profile --peers segformer-b5 eomt-large --output "$out/vitl_1024_b8.json"
for batch in 1 8; do
    timeout 300 python3 -m step_hf.benchmark --preset $preset --image_size $size --batch_size $batch \
        --num_batches $(( 8 / batch > 2 ? 4 : 2 )) --dtype bf16 --dataset_name $data --compile \
        --compile_mode "${COMPILE_MODE:-reduce-overhead}" --skip_vit --output "$out/vitl_1024_b${batch}_compiled.json"
done
timeout 90 python3 -m step_hf.benchmark --preset $preset --image_size $size --batch_size 8 --num_batches 2 \
    --dtype bf16 --dataset_name $data --attention_mode padded --skip_vit --output "$out/vitl_1024_b8_padded.json"
# 3. the exit heads' cost at ViT-L 1024: MLP against DToP's ATM heads, 19 and 150 classes
timeout 120 python3 examples/exit_head_cost.py --preset $preset --image_size $size --num_labels 19 150 \
    --dtype bfloat16 | tee "$out/exit_heads.md"
