"""Write a copy of a saved STEP model that runs, by default, with the settings of one row of `examples/sweep.py`.

    python examples/save_settings.py --model_name_or_path outputs/camvid-tiny --sweep sweep.json \
        --output_dir outputs/tuned
    python examples/save_settings.py --model_name_or_path outputs/camvid-tiny --sweep sweep.json --row 3 \
        --output_dir ...

`--row best` (the default) takes the row the sweep marked best. The copy has the same weights; its configuration
holds the row's partition source, thresholds and halting, its processor the row's input size, and its model card and
`metrics.json` the row's measured numbers, so that `from_pretrained` or `pipeline` reproduces the row
(`step_hf.calibrate.save_copy`, which also saves the row `python -m step_hf.calibrate` chooses among static token
budgets and exit keep counts timed in a deployment runtime).
"""

import argparse
import json
import os
from pathlib import Path

from step_hf import StepForSemanticSegmentation, StepImageProcessor
from step_hf.calibrate import save_copy
from step_hf.configuration_step import StepSettings


def choose_row(rows: list[dict], row: str) -> dict:
    if row == "best":
        marked = [candidate for candidate in rows if candidate.get("best")]
        if not marked:
            raise SystemExit("The sweep marks no row as best; choose one with --row N.")
        return marked[0]
    if not row.isdigit() or int(row) >= len(rows):
        raise SystemExit(f"--row must be 'best' or a row number below {len(rows)}, got {row!r}.")
    return rows[int(row)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", required=True, help="the saved model the sweep measured")
    parser.add_argument("--sweep", required=True, help="the JSON rows written by examples/sweep.py")
    parser.add_argument("--row", default="best", help="'best' or a row number (from 0)")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)

    with open(args.sweep) as f:
        row = choose_row(json.load(f), args.row)
    if row["settings"]["partition_source"] == "oracle":
        raise SystemExit("This row used oracle partitions, which need ground truth at inference: a saved model cannot "
                         "run with them. Choose a 'policy' or 'dense' row.")
    model = StepForSemanticSegmentation.from_pretrained(args.model_name_or_path)
    processor = StepImageProcessor.from_pretrained(args.model_name_or_path)
    processor.size = row["processor_size"]
    notes = (f"The weights of `{args.model_name_or_path}`, with run-time settings chosen by `examples/sweep.py` "
             f"(`{os.path.basename(args.sweep)}`: policy threshold {row['policy_threshold'] or '-'}, exit threshold "
             f"{row['exit_threshold'] or 'off'}).")
    save_copy(model, processor, Path(args.output_dir), StepSettings(**row["settings"]), row, args.model_name_or_path,
              notes)
    print(f"saved {args.output_dir}: {model.config.settings.to_dict()}, processor size {row['processor_size']}")


if __name__ == "__main__":
    main()
