"""The data side the examples share: the built-in scenes, loading a `datasets` segmentation set with its class
names, and the check of every label map before anything runs. The evaluation side of a dataset (`EvalTransform`)
lives in `step_hf.evaluation`, next to the loop that reads it.

    python examples/data.py --output_dir outputs/scenes [--seed 0]

writes the built-in scenes that `examples/train.py` trains on without `--dataset_name` (the same `--seed`) as a
dataset folder (`data/{train,validation}-*.parquet` and `id2label.json`), which `--dataset_name` and
`python -m step_hf.evaluation` take.
"""

import argparse
import json
import os

import numpy as np
from datasets import Dataset, DatasetDict, Image, load_dataset
from scenes import SCENE_CLASSES, make_scene

from step_hf.cli import UserError, refusing, run_command
from step_hf.image_processing_step import reduce_labels as reduce_label_values


def builtin_scenes(seed: int) -> tuple[DatasetDict, dict[int, str]]:
    """A small procedural road-scene set: 160 training and 32 validation images of 192x256."""
    splits = {}
    for split, seeds in (("train", range(160)), ("validation", range(10_000, 10_032))):
        rows = [make_scene(192, 256, seed=seed * 100_000 + s) for s in seeds]
        splits[split] = Dataset.from_dict({"image": [r[0] for r in rows], "label": [r[1] for r in rows]})
    return DatasetDict(splits).cast_column("image", Image()).cast_column("label", Image()), dict(SCENE_CLASSES)


def load_data(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_split: str = "train",
    eval_split: str = "validation",
    image_column_name: str = "image",
    label_column_name: str = "label",
    id2label_source: str | None = None,
    reduce_labels: bool = False,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    seed: int = 0,
) -> tuple[DatasetDict, dict[int, str]]:
    """The `train` and `validation` splits (from `train_split` and `eval_split`) with `image` and `label` columns,
    and `id2label`; bad input is refused here. `dataset_name=None` builds the built-in scenes from `seed`;
    `id2label_source` is as in `read_id2label`."""
    if dataset_name is None:
        dataset, id2label = builtin_scenes(seed)
    else:
        with refusing(dataset_name, "a Hub id or a local folder laid out like one"):  # e.g. an empty split
            dataset = load_dataset(dataset_name, dataset_config_name)
        id2label = read_id2label(dataset_name, id2label_source)
    for split in (train_split, eval_split):
        check_split(dataset, split, (image_column_name, label_column_name))
    dataset = DatasetDict({"train": dataset[train_split], "validation": dataset[eval_split]})
    dataset = dataset.select_columns([image_column_name, label_column_name])
    if image_column_name != "image":
        dataset = dataset.rename_column(image_column_name, "image")
    if label_column_name != "label":
        dataset = dataset.rename_column(label_column_name, "label")
    for split, limit in (("train", max_train_samples), ("validation", max_eval_samples)):
        if limit:
            dataset[split] = dataset[split].select(range(min(limit, len(dataset[split]))))
    check_dataset_labels(dataset, id2label, reduce_labels,
                         flags={"train": f"--train_split {train_split}", "validation": f"--eval_split {eval_split}"})
    return dataset, id2label


def check_split(dataset: DatasetDict, split: str, columns: tuple[str, str]) -> None:
    """Refuse a missing or empty split, or one without the image and label columns, naming the flags to set."""
    if split not in dataset:
        raise UserError(f"The dataset has no split {split!r} (it has {sorted(dataset)}); set "
                        "--train_split/--eval_split.")
    names = dataset[split].column_names
    for column in columns:
        if column not in names:
            raise UserError(f"Split {split!r} has no column {column!r} (columns: {names}); set "
                            "--image_column_name/--label_column_name.")
    if len(dataset[split]) == 0:
        raise UserError(f"Split {split!r} is empty.")


def read_id2label(dataset_name: str, source: str | None = None) -> dict[int, str]:
    """`source` (a JSON file or string, from `--id2label`), else the dataset's `id2label.json` (in its folder or its
    Hub repository)."""
    if source is None:
        source = os.path.join(dataset_name, "id2label.json")
        if os.path.isdir(dataset_name) and not os.path.isfile(source):
            raise UserError(f"The dataset folder {dataset_name} has no id2label.json, so the class names are "
                            """missing: add that file ({"0": "road", "1": "sky", ...}) or pass --id2label with a """
                            "JSON file or string.")
        if not os.path.isdir(dataset_name):
            from huggingface_hub import hf_hub_download

            try:
                source = hf_hub_download(dataset_name, "id2label.json", repo_type="dataset")
            except Exception as error:  # offline, missing file, no access: say what was looked for
                raise UserError(f"Cannot get the class names: {dataset_name} is not a local folder, and its "
                                f"id2label.json could not be fetched from the Hub ({type(error).__name__}: "
                                f"{error}). Pass --id2label with a JSON file or string.") from None
    if os.path.isfile(source):
        with open(source) as f:
            source = f.read()
    try:
        return {int(k): v for k, v in json.loads(source).items()}
    except (json.JSONDecodeError, ValueError, AttributeError) as error:
        raise UserError(f"--id2label must be a JSON file or string mapping ids to names: {error}") from None


def check_dataset_labels(dataset: DatasetDict, id2label: dict[int, str], reduce: bool, ignore: int = 255,
                         flags: dict[str, str] | None = None) -> None:
    """Scan every row of every split: refuse label values that are neither a class nor void (after `reduce_labels`
    when `reduce`), label maps that are not single-channel or not the image's size, corrupt or unreadable images,
    naming the split, row and value, and a split in which every pixel is void: there would be nothing to learn (a
    NaN loss) or to measure (a NaN mIoU). `flags` names, per split, the flag that chose it (for the message). (The
    model's own `check_labels` checks a batch of label tensors.)"""
    valid = set(id2label) | {ignore}
    for split in dataset:
        labelled = False
        for row in range(len(dataset[split])):
            try:
                example = dataset[split][row]
                label = np.asarray(example["label"])
                image = example["image"]
            except Exception as error:  # a corrupt file surfaces on decoding
                raise UserError(f"Split {split!r}, row {row}: the image or label cannot be read ({error}).") from None
            if label.ndim != 2:
                raise UserError(f"Split {split!r}, row {row}: the label map has shape {label.shape}; it must be a "
                                "single-channel class-id map.")
            if image.size[::-1] != label.shape:
                raise UserError(f"Split {split!r}, row {row}: image {image.size[::-1]} and label {label.shape} differ "
                                "in size.")
            values = np.unique(label)
            values = set((reduce_label_values(values, ignore) if reduce else values).tolist())
            unknown = values - valid
            if unknown:
                raise UserError(f"Split {split!r}, row {row}: label value(s) {sorted(unknown)} are not in id2label "
                                f"({len(id2label)} classes) nor the ignore index {ignore}.")
            labelled = labelled or bool(values - {ignore})
        if not labelled:
            flag = (flags or {}).get(split, f"split {split!r}")
            void = f"{ignore}, or 0 with --reduce_labels" if reduce else str(ignore)
            purpose = "train on (the loss would be NaN)" if split == "train" else "measure (the mIoU would be NaN)"
            raise UserError(f"Every pixel of the {split} split ({flag}, {len(dataset[split])} images) is void (label "
                            f"{void}): there is nothing to {purpose}. Check --label_column_name and "
                            f"--reduce_labels, or choose another {flag.split()[0]}.")


def write_builtin_scenes(output_dir: str, seed: int = 0) -> None:
    """The built-in scenes of `seed` as a dataset folder laid out like a Hub dataset repository."""
    dataset, id2label = builtin_scenes(seed)
    os.makedirs(os.path.join(output_dir, "data"), exist_ok=True)
    for split in dataset:
        dataset[split].to_parquet(os.path.join(output_dir, "data", f"{split}-00000-of-00001.parquet"))
    with open(os.path.join(output_dir, "id2label.json"), "w") as f:
        json.dump(id2label, f)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True, help="the dataset folder to write")
    parser.add_argument("--seed", type=int, default=0, help="the scenes of examples/train.py's --seed")
    args = parser.parse_args(argv)
    write_builtin_scenes(args.output_dir, args.seed)
    print(f"wrote the built-in scenes (seed {args.seed}) to {args.output_dir}")


__all__ = ["builtin_scenes", "check_dataset_labels", "check_split", "load_data", "read_id2label", "write_builtin_scenes"]


if __name__ == "__main__":
    run_command(main)
