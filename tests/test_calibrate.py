"""`python -m step_hf.calibrate`: its rows are what `step_hf.evaluation` measures under their settings, the chosen row
is the cheapest within the drop, the saved copy (and its exported program) reproduce the row, and bad input is
refused in one line with nothing written."""

import json

import pytest
import torch
from torch.utils.data import DataLoader

from step_hf import StepImageProcessor
from step_hf.calibrate import (accuracy_latency_front, budget_ladder, cheapest_within, keep_counts, main,
                               relative_halt_shares)
from step_hf.cli import run_command
from step_hf.evaluation import EvalTransform, evaluate
from step_hf.evaluation import main as evaluate_folder

from .conftest import tiny_model

# Timing is not under test here: one pass, no warm-up, batches of 2 over the 4 validation scenes.
FAST = ["--batch_size", "2", "--timing_images", "4", "--repeats", "1", "--warmup", "0", "--threads", "1"]


def save_scene_model(folder, **overrides):
    """A random-weight tiny model with the scenes' classes, a policy over sizes 2 and 4 and one exit whose threshold
    halts some tokens of these weights, saved with a processor feeding 64x80."""
    from scenes import SCENE_CLASSES

    id2label = {int(i): name for i, name in SCENE_CLASSES.items()}
    fields = dict(id2label=id2label, label2id={name: i for i, name in id2label.items()}, partition_source="policy",
                  superpatch_sizes=[1, 2, 4], exit_layers=[1], exit_thresholds=[0.205], exit_keep_topk_per_class=1,
                  halting=True)
    model = tiny_model(**{**fields, **overrides})
    model.save_pretrained(folder)
    StepImageProcessor(size={"height": 64, "width": 80}, superpatch_sizes=model.config.superpatch_sizes
                       ).save_pretrained(folder)
    return model


def rows_of(folder) -> list[dict]:
    return json.loads((folder / "calibration.json").read_text())["rows"]


def test_the_chosen_row_is_the_cheapest_within_the_drop_and_the_front_is_what_no_row_beats():
    rows = [{"mean_iou": 0.50, "ms": 10.0}, {"mean_iou": 0.495, "ms": 6.0}, {"mean_iou": 0.48, "ms": 4.0},
            {"mean_iou": 0.47, "ms": 5.0}, {"mean_iou": 0.40, "ms": 1.0}]
    assert cheapest_within(rows, 0.50, 1.0, "ms") == 1  # 0.48 is 2 points down: too far
    assert cheapest_within(rows, 0.50, 2.0, "ms") == 2
    assert cheapest_within(rows, 0.50, 100, "ms") == 4
    assert cheapest_within(rows, 0.50, 0.0, "ms") == 0
    assert accuracy_latency_front(rows, "ms") == [0, 1, 2, 4]  # row 3 is slower and less accurate than row 2
    with pytest.raises(ValueError, match="No row is within"):
        cheapest_within(rows, 0.60, 1.0, "ms")


def test_budgets_come_from_the_token_counts_and_keep_counts_from_the_halting_rates():
    counts = torch.tensor([10, 20, 30, 40, 50])
    assert budget_ladder(["mean", "p100", "p0"], counts, 64) == [49, 28, 10]  # down to counts 64 reaches (64 - 3k)
    assert budget_ladder(["mean", "p50"], counts, 64) == [28]  # one budget once
    assert budget_ladder(["25"], counts, 64) == [25]
    with pytest.raises(ValueError, match="does not fit the input's grid of 64 cells"):
        budget_ladder(["65"], counts, 64)
    with pytest.raises(ValueError, match="percentiles"):
        budget_ladder(["median"], counts, 64)
    assert relative_halt_shares([0.2, 0.2]) == pytest.approx([0.2, 0.25])  # a quarter of the 80% left halts next
    assert keep_counts(100, [0.2, 0.25]) == [80, 60]


def test_the_rows_are_what_evaluation_measures_and_the_saved_copy_reproduces_the_chosen_one(tmp_path, scene_dataset,
                                                                                           capsys):
    model = save_scene_model(tmp_path / "model")
    main(["--model", str(tmp_path / "model"), "--dataset_name", str(scene_dataset), "--runtime", "torch",
          "--budgets", "p95", "p25", "--max_miou_drop", "0.5", "--output_dir", str(tmp_path / "out"), *FAST])
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "calibration.json").read_text())
    rows, chosen = result["rows"], result["rows"][result["chosen"]]
    names = [row["name"] for row in rows]
    assert names[:2] == ["dense", "adaptive"] and any(name.startswith("static STEP") for name in names)
    assert len(names) == 2 + 2 * len(result["budgets"]) and result["budgets"]
    assert any(sum(row["halted_share"]) > 0 for row in rows if row["settings"]["halting"])  # exits halt tokens
    assert "| row | mIoU | vs adaptive |" in printed and "| sky |" in printed  # the table and per-class IoU

    from datasets import load_dataset

    validation = load_dataset(str(scene_dataset), split="validation")
    loader = DataLoader(EvalTransform(validation, StepImageProcessor.from_pretrained(tmp_path / "out")))
    for row in rows:
        expected = evaluate(model, loader, settings=row["settings"])
        for metric in ("mean_iou", "tokens_per_image", "gflops_per_image", "overall_accuracy"):
            assert row[metric] == pytest.approx(expected[metric], rel=1e-9), (row["name"], metric)
        assert row["per_category_iou"] == pytest.approx(expected["per_category_iou"], rel=1e-9)
        assert row["halted_share"] == pytest.approx(expected["halted_share"], rel=1e-9)
        assert row["ms_per_image_batch_1"] > 0 and row["ms_per_image_batch"] > 0

    adaptive = rows[1]["mean_iou"]
    assert chosen["mean_iou"] >= adaptive - 0.005 - 1e-12
    cheaper = [row for row in rows if row["ms_per_image_batch_1"] < chosen["ms_per_image_batch_1"]]
    assert all(row["mean_iou"] < adaptive - 0.005 for row in cheaper)  # nothing faster was allowed
    evaluate_folder(["--model", str(tmp_path / "out"), "--dataset_name", str(scene_dataset), "--output",
                     str(tmp_path / "copy.json")])
    copy = json.loads((tmp_path / "copy.json").read_text())
    assert copy["mean_iou"] == pytest.approx(chosen["mean_iou"], rel=1e-9)
    assert copy["tokens_per_image"] == pytest.approx(chosen["tokens_per_image"], rel=1e-9)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["token_budget"] == \
        chosen["settings"]["token_budget"]
    assert (tmp_path / "out" / "calibration.png").stat().st_size > 0
    assert "| <- |" in (tmp_path / "out" / "calibration.md").read_text()


def test_a_model_is_calibrated_in_the_parts_it_has(tmp_path, scene_dataset):
    save_scene_model(tmp_path / "no-exits", exit_layers=[], exit_thresholds=[], halting=False)
    main(["--model", str(tmp_path / "no-exits"), "--dataset_name", str(scene_dataset), "--runtime", "torch",
          "--budgets", "mean", "--output_dir", str(tmp_path / "a"), *FAST])
    assert [row["name"].split(",")[0] for row in rows_of(tmp_path / "a")] == ["dense", "adaptive", "static dCTS"]

    save_scene_model(tmp_path / "no-policy", superpatch_sizes=[1], partition_source="dense")
    main(["--model", str(tmp_path / "no-policy"), "--dataset_name", str(scene_dataset), "--runtime", "torch",
          "--output_dir", str(tmp_path / "b"), *FAST])
    rows = rows_of(tmp_path / "b")
    assert [row["name"].split(",")[0] for row in rows] == ["dense", "adaptive", "dense"]  # dense, exits keeping [k]
    assert rows[2]["settings"]["exit_keep_tokens"] and rows[2]["settings"]["token_budget"] is None


def refused(argv: list[str], capsys) -> str:
    """The one line a refused command prints; it exits with status 2."""
    with pytest.raises(SystemExit) as exited:
        run_command(main, argv)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_bad_input_is_refused_in_one_line_and_nothing_is_written(tmp_path, scene_dataset, capsys, monkeypatch):
    from datasets import Dataset, Image
    from scenes import make_scene

    save_scene_model(tmp_path / "model")
    unlabelled = tmp_path / "unlabelled"
    (unlabelled / "data").mkdir(parents=True)
    Dataset.from_dict({"image": [make_scene(96, 128, seed=1)[0]]}).cast_column("image", Image()).to_parquet(
        str(unlabelled / "data" / "validation-00000-of-00001.parquet"))
    save_scene_model(tmp_path / "plain", superpatch_sizes=[1], partition_source="dense", exit_layers=[],
                     exit_thresholds=[], halting=False)
    capsys.readouterr()  # what making the inputs printed
    common = ["--runtime", "torch", "--output_dir", str(tmp_path / "out"), *FAST]
    model, scenes = ["--model", str(tmp_path / "model")], ["--dataset_name", str(scene_dataset)]

    assert "accuracy is measured against labels" in refused([*model, "--dataset_name", str(unlabelled), *common],
                                                           capsys)
    assert "does not fit the input's grid of 20 cells" in refused([*model, *scenes, "--budgets", "21", *common], capsys)
    assert "leaves no token" in refused([*model, *scenes, "--budgets", "1", *common], capsys)
    assert "cannot be reached" in refused([*model, *scenes, "--budgets", "2", *common], capsys)  # below its least
    assert "nothing to calibrate" in refused(["--model", str(tmp_path / "plain"), *scenes, *common], capsys)
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "openvino" else
                        find_spec(name, *rest))
    assert "the openvino package is not installed" in refused(
        [*model, *scenes, *common, "--runtime", "openvino"], capsys)
    assert not (tmp_path / "out").exists()
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".out")]  # no staging folder left


def test_a_deployed_program_that_does_not_reproduce_its_row_writes_nothing(tmp_path, scene_dataset, monkeypatch):
    import step_hf.calibrate

    save_scene_model(tmp_path / "model")
    real = step_hf.calibrate.deployed_measure

    def off_by_a_point(*args, **kwargs):
        results = real(*args, **kwargs)
        return {**results, "mean_iou": results["mean_iou"] + 0.01}

    monkeypatch.setattr(step_hf.calibrate, "deployed_measure", off_by_a_point)
    with pytest.raises(RuntimeError, match="must agree within 0.05 points"):
        main(["--model", str(tmp_path / "model"), "--dataset_name", str(scene_dataset), "--runtime", "torch",
              "--budgets", "mean", "--output_dir", str(tmp_path / "out"), *FAST])
    assert not (tmp_path / "out").exists() and [path.name for path in tmp_path.iterdir()] == ["model"]


@pytest.mark.slow
def test_an_onnx_calibration_exports_the_chosen_row_and_the_program_reproduces_it(tmp_path, scene_dataset):
    save_scene_model(tmp_path / "model")
    main(["--model", str(tmp_path / "model"), "--dataset_name", str(scene_dataset), "--runtime", "onnxruntime",
          "--budgets", "mean", "--max_miou_drop", "1", "--export", "--output_dir", str(tmp_path / "out"), *FAST])
    result = json.loads((tmp_path / "out" / "calibration.json").read_text())
    chosen = result["rows"][result["chosen"]]
    assert len(result["rows"]) == 4 and result["deployed"]["measured"] == "model.onnx in onnxruntime"
    for folder in ("out", "out/onnx"):  # the saved copy in torch, the exported program in ONNX Runtime
        evaluate_folder(["--model", str(tmp_path / folder), "--dataset_name", str(scene_dataset), "--output",
                         str(tmp_path / "measured.json")])
        measured = json.loads((tmp_path / "measured.json").read_text())
        assert abs(measured["mean_iou"] - chosen["mean_iou"]) <= 0.0005, folder
        assert measured["tokens_per_image"] == chosen["tokens_per_image"], folder
        assert measured["halted_share"] == pytest.approx(chosen["halted_share"], abs=1e-6), folder
    exported = json.loads((tmp_path / "out" / "onnx" / "config.json").read_text())
    assert {name: exported[name] for name in chosen["settings"]} == chosen["settings"]
    assert "python -m step_hf.calibrate" in (tmp_path / "out" / "onnx" / "README.md").read_text()
