#!/usr/bin/env bash
# Every GPU measurement, in order of priority, in one run of under 10 minutes on a GPU machine (H100/H200):
#   first, with PyPI access: bash scripts/fetch_gpu_wheels.sh   (wheels into .whl/, CamVid into .bench_data/)
#   on the GPU machine, with .whl/ and .bench_data/ copied beside the checkout: bash scripts/gpu_session.sh OUT
# 1. the speed ladder: correctness of the batching modes on the GPU, then the ViT-L ladder (scripts/gpu_checks.sh);
# 2. the CamVid recipe (scripts/camvid_recipe.sh), dense and dCTS -> STEP trained side by side;
# 3. sweeps of policy / exit thresholds, throughput of the trained models at batch 8, the token analysis.
# Results (JSON, logs, tables, pictures; no weights) are re-packed into OUT/results.tar.gz after every part, so a
# part cut short by a time limit loses only itself. CPU dry run: TINY=1 bash scripts/gpu_session.sh /tmp/dry
# The recipe's step counts (SEGMENTER_STEPS, ...) pass through to scripts/camvid_recipe.sh; SKIP_BENCHMARK=1 leaves
# part 1 out and gives its minutes to training; BENCHMARK_SECONDS (default 225) bounds part 1.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?an output folder}
mkdir -p "$out"
res=${RESULTS:-/tmp/step_gpu_results} && rm -rf "$res" && mkdir -p "$res"
exec > >(tee -a "$out/log.txt") 2>&1
deadline=${DEADLINE:-585}  # seconds: under a 600-second run limit
left() { echo $(( deadline - SECONDS )); }
pack() { tar -czf "$out/results.tar.gz" -C "$res" --exclude='*.safetensors' --exclude='checkpoints' . ; }
source scripts/gpu_env.sh
data=.bench_data/camvid
[ -d "$data" ] || data=../shared/datasets/camvid
python3 -c "import torch, transformers, datasets, accelerate; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'datasets', datasets.__version__, 'accelerate', accelerate.__version__)"
echo "== part 1: batching correctness and the ViT-L ladder ($(left) s left)"
if [ -n "${SKIP_BENCHMARK:-}" ]; then  # e.g. a run that spends its minutes on longer training
    echo "skipped (SKIP_BENCHMARK)"
elif [ -n "${TINY:-}" ]; then
    PRESET=tiny SIZE=128 SMALL_SIZE=64 DATA=$data timeout "$(left)" bash scripts/gpu_checks.sh "$res/bench"
else
    DATA=$data timeout "${BENCHMARK_SECONDS:-225}" bash scripts/gpu_checks.sh "$res/bench"
fi
pack

echo "== part 2: CamVid recipe, dense and dCTS -> STEP side by side ($(left) s left)"
recipe=(env DATA="$data")
[ -n "${TINY:-}" ] && recipe+=(PRESET=tiny SIZE=64 PRECISION=no WORKERS=0 POLICY_STEPS=4 SEGMENTER_STEPS=6
                               PRUNE_STEPS=4 OMP_NUM_THREADS=1)
# Training backpropagates through the varlen kernel: check its gradients against padded attention first, and
# train in padded mode if they disagree or the build has no backward for it.
python3 -m pytest -q -p no:cacheprovider tests/test_batching.py -k gradients || recipe+=(ATTENTION_MODE=padded)
budget=$(( $(left) - 100 ))
if [ "$budget" -lt 60 ]; then
    echo "no time left for training ($(left) s)"
    echo "== done in $SECONDS s"
    exit 0
fi
# (`wait` names its jobs: a bare one would also wait for the `tee` above)
( time timeout "$budget" "${recipe[@]}" bash scripts/camvid_recipe.sh dense "$res/camvid" ) > "$res/dense.log" 2>&1 &
dense_job=$!
( time timeout "$budget" "${recipe[@]}" bash scripts/camvid_recipe.sh step "$res/camvid" ) > "$res/step.log" 2>&1 &
wait $dense_job $!
tail -n 4 "$res/dense.log" "$res/step.log"
for variant in dense dcts step; do
    cp "$res/camvid/$variant/metrics.json" "$res/metrics_$variant.json" 2>/dev/null
done
pack

echo "== part 3: sweeps, where the tokens go, throughput of the trained models ($(left) s left)"
sweep() { timeout "$(left)" python3 examples/sweep.py --dataset_name "$data" "$@"; }
jobs_started=()
if [ -f "$res/camvid/step/config.json" ]; then  # on the CPU, beside the sweeps on the GPU
    OMP_NUM_THREADS=8 timeout "$(left)" python3 -m step_hf.analysis --model_name_or_path "$res/camvid/step" \
        --dataset_name "$data" --images 0 40 80 --without_dataset_pixels --output_dir "$res/analysis" \
        > "$res/analysis.log" 2>&1 &
    jobs_started+=($!)
fi
if [ -f "$res/camvid/dense/config.json" ]; then
    sweep --model_name_or_path "$res/camvid/dense" --partition_source dense --output "$res/sweep_dense.json" \
        > "$res/sweep_dense.log" 2>&1 &
    jobs_started+=($!)
fi
if [ -f "$res/camvid/dcts/config.json" ]; then
    sweep --model_name_or_path "$res/camvid/dcts" --policy_thresholds 0.8 0.65 0.5 0.35 0.2 \
        --output "$res/sweep_dcts.json" > "$res/sweep_dcts.log" 2>&1 &
    jobs_started+=($!)
fi
if [ -f "$res/camvid/step/config.json" ]; then
    sweep --model_name_or_path "$res/camvid/step" --exit_thresholds 1.01 0.95 0.9 0.8 0.7 0.6 0.5 \
        --output "$res/sweep_step.json" > "$res/sweep_step.log" 2>&1
    sweep --model_name_or_path "$res/camvid/step" --partition_source oracle --exit_thresholds 1.01 0.7 \
        --output "$res/sweep_step_oracle.json" > "$res/sweep_step_oracle.log" 2>&1
fi
[ ${#jobs_started[@]} -gt 0 ] && wait "${jobs_started[@]}"
tail -n 14 "$res"/sweep_*.log "$res/analysis.log"
pack
if [ -f "$res/camvid/step/config.json" ]; then
    size=(720 960) && [ -n "${TINY:-}" ] && size=(64 96)
    for threshold in 0.9 0.7; do
        timeout "$(left)" python3 -m step_hf.benchmark --model_name_or_path "$res/camvid/step" \
            --image_size "${size[@]}" --batch_size 8 --num_batches 2 \
            --dtype "$([ -n "${TINY:-}" ] && echo fp32 || echo bf16)" \
            --partition_source policy --exit_thresholds $threshold $threshold --skip_vit --dataset_name "$data" \
            --output "$res/throughput_step_exit$threshold.json"
    done
    pack
fi
echo "== done in $SECONDS s"
