#!/usr/bin/env bash
# STEP against the methods it is built from, on the CamVid recipe (scripts/camvid_recipe.sh), one seed per call:
#   bash scripts/lineage_ablation.sh OUTPUT_ROOT SEED
# trains, for that seed, under OUTPUT_ROOT/seed-SEED: dense; DToP alone (dense + halting); CTS alone (2x2
# superpatches, CTS_BUDGET tokens); dCTS; STEP with MLP exit heads; STEP with ATM exit heads; STEP with exits after
# blocks EXITS_ABLATION (default 4 8) instead of the default placement. Then it sweeps the exit thresholds of the
# four halting models (EXIT_SWEEP; ATM_EXIT_SWEEP for ATM heads, whose scores, presence x mask sigmoid, run lower),
# for comparisons at equal halted share. examples/lineage_table.py reads the
# folders of every seed and writes the table and the plot. The recipe's environment (PRESET, SIZE, steps, ...) is
# passed through; extra arguments go to every examples/train.py call.
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:?an output folder} seed=${2:?a seed}
shift 2
out="$root/seed-$seed"
recipe() { bash scripts/camvid_recipe.sh "$1" "$2" --seed "$seed" "${@:3}"; }
export CTS_BUDGET=${CTS_BUDGET:-112}
[ -f "$out/dtop/config.json" ] || recipe dtop "$out" "$@"
[ -f "$out/cts/config.json" ] || recipe cts "$out" "$@"
[ -f "$out/step/config.json" ] || recipe step "$out" "$@"
[ -f "$out/atm/step/config.json" ] || recipe step "$out/atm" --exit_head_type atm "$@"
# shellcheck disable=SC2086
[ -f "$out/exits/step/config.json" ] || recipe step "$out/exits" --exit_layers ${EXITS_ABLATION:-4 8} "$@"
for model in dtop step atm/step exits/step; do
  partition=policy; [ "$model" = dtop ] && partition=dense
  thresholds=${EXIT_SWEEP:-0.99 0.9 0.8 0.6}; [ "$model" = atm/step ] && thresholds=${ATM_EXIT_SWEEP:-0.9 0.7 0.5 0.4 0.3 0.2}
  # shellcheck disable=SC2086
  [ -f "$out/$model/sweep.json" ] || "${PYTHON:-python3}" examples/sweep.py --model_name_or_path "$out/$model" \
      --dataset_name "${DATA:-../shared/datasets/camvid}" --partition_source "$partition" \
      --exit_thresholds $thresholds --output "$out/$model/sweep.json" > "$out/$model/sweep.md"
done
