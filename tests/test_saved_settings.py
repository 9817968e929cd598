"""A saved model runs as its training run evaluated it: for every stage and partition source, train at toy size, save,
reload through the Auto classes and through `pipeline`, evaluate with the same evaluation code, and get the metrics
the run reported. Also for a row of `examples/sweep.py` written into a model by `examples/save_settings.py`."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation, pipeline

from step_hf.evaluation import EvalTransform, evaluate

from .conftest import EXAMPLES

import save_settings  # examples/ (conftest puts it on the path)
import train
import windows_vs_full_frame
from data import load_data

# From scratch: a toy model needs the from-scratch rate (train.py's default fine-tunes pretrained ViTs).
TOY = ["--image_size", "64", "--policy_steps", "3", "--segmenter_steps", "4", "--prune_steps", "3",
       "--learning_rate", "5e-4", "--per_device_train_batch_size", "4", "--checkpointing_steps", "0"]
# name: (train.py arguments, the partition source the saved model must run with). The exit thresholds are low so
# that a toy model halts some tokens and the halted shares are worth comparing.
RUNS = {
    "all-policy": (["--stage", "all", "--exit_thresholds", "0.3", "0.3"], "policy"),
    "all-oracle": (["--stage", "all", "--partition_source", "oracle"], "policy"),
    "segmenter-dense": (["--stage", "segmenter", "--partition_source", "dense"], "dense"),
    "segmenter-oracle": (["--stage", "segmenter", "--partition_source", "oracle"], "dense"),  # its policy never trained
    "prune-dense": (["--stage", "prune", "--partition_source", "dense", "--exit_thresholds", "0.3", "0.3"], "dense"),
    "policy": (["--stage", "policy"], "policy"),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, scene_dataset):
    root = tmp_path_factory.mktemp("runs")
    for name, (extra, _) in RUNS.items():
        start = ["--model_name_or_path", str(root / "segmenter-dense")] if name == "prune-dense" else []
        train.main([*TOY, "--dataset_name", str(scene_dataset), *start, *extra, "--output_dir", str(root / name)])
    return root


def eval_loader(scene_dataset, processor) -> DataLoader:
    dataset, _ = load_data(dataset_name=str(scene_dataset))
    return DataLoader(EvalTransform(dataset["validation"], processor))


def pipeline_mean_iou(folder, loader) -> float:
    """mIoU of the maps `pipeline("image-segmentation")` returns for the loader's frames."""
    return windows_vs_full_frame.mean_iou(pipeline("image-segmentation", model=str(folder)), loader.dataset.dataset,
                                          reduce=False)


@pytest.mark.parametrize("name", [name for name in RUNS if name != "policy"])
def test_a_reloaded_model_reproduces_its_run(runs, scene_dataset, name):
    folder = runs / name
    reported = json.loads((folder / "metrics.json").read_text())["final_eval"]
    model = AutoModelForSemanticSegmentation.from_pretrained(folder)
    assert model.config.partition_source == RUNS[name][1]
    loader = eval_loader(scene_dataset, AutoImageProcessor.from_pretrained(folder))
    measured = evaluate(model, loader)
    for metric in ("mean_iou", "overall_accuracy", "tokens_per_image", "gflops_per_image"):
        assert measured[metric] == pytest.approx(reported[metric], rel=1e-9), metric
    assert measured["halted_share"] == pytest.approx(reported["halted_share"], rel=1e-9)
    assert pipeline_mean_iou(folder, loader) == pytest.approx(reported["mean_iou"], rel=1e-9)


def test_the_runs_save_what_they_trained_and_say_how_they_measured(runs):
    saved = {name: json.loads((runs / name / "config.json").read_text()) for name in RUNS}
    assert saved["all-policy"]["trained_components"] == ["policy", "encoder", "decoder", "exit_heads"]
    assert saved["segmenter-dense"]["trained_components"] == ["encoder", "decoder", "exit_heads"]
    assert saved["policy"]["trained_components"] == ["policy"]
    assert [saved[name]["halting"] for name in ("all-policy", "segmenter-dense", "prune-dense")] == [True, False, True]
    halted = json.loads((runs / "prune-dense" / "metrics.json").read_text())["final_eval"]["halted_share"]
    assert len(halted) == 2 and sum(halted) > 0  # the comparison of halted shares above is not between zeros
    card = (runs / "all-oracle" / "README.md").read_text()
    assert "Trained with oracle partitions" in card and "saved with `partition_source='policy'`" in card
    assert "with the settings this model loads with: policy partitions at thresholds [0.5" in card
    assert "no token sharing" in (runs / "segmenter-dense" / "README.md").read_text()


def test_a_model_with_untrained_parts_says_so_when_it_runs(runs, caplog):
    model = AutoModelForSemanticSegmentation.from_pretrained(runs / "policy").eval()
    with caplog.at_level(logging.WARNING):
        model(torch.zeros(1, 3, 64, 64))
    assert caplog.text.count("never trained") == 1 and "encoder, decoder, exit_heads never trained" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the policy alone (stage 1's own forward) is trained: no warning
        model(torch.zeros(1, 3, 64, 64), policy_only=True)
    assert "never trained" not in caplog.text


def test_a_segmenter_is_not_trained_on_an_untrained_policy(tmp_path, scene_dataset):
    with pytest.raises(ValueError, match="policy network is untrained"):
        train.main([*TOY, "--dataset_name", str(scene_dataset), "--stage", "segmenter", "--output_dir",
                    str(tmp_path / "out")])


def test_the_best_sweep_row_saved_into_a_model_reproduces_the_row(runs, scene_dataset, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "sweep.py"), "--model_name_or_path", str(runs / "all-policy"),
         "--dataset_name", str(scene_dataset), "--policy_thresholds", "0.9", "0.5", "--exit_thresholds", "1.01", "0.3",
         "--max_miou_drop", "100", "--output", str(tmp_path / "sweep.json")],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "examples/save_settings.py --model_name_or_path" in result.stdout
    rows = json.loads((tmp_path / "sweep.json").read_text())
    best = next(row for row in rows if row.get("best"))
    assert best["gflops_per_image"] == min(row["gflops_per_image"] for row in rows)  # any drop allowed: cheapest

    save_settings.main(["--model_name_or_path", str(runs / "all-policy"), "--sweep", str(tmp_path / "sweep.json"),
                        "--output_dir", str(tmp_path / "tuned")])
    model = AutoModelForSemanticSegmentation.from_pretrained(tmp_path / "tuned")
    assert model.config.settings.to_dict() == best["settings"]
    measured = evaluate(model, eval_loader(scene_dataset, AutoImageProcessor.from_pretrained(tmp_path / "tuned")))
    for metric in ("mean_iou", "tokens_per_image", "gflops_per_image"):
        assert measured[metric] == pytest.approx(best[metric], rel=1e-9), metric
    assert measured["halted_share"] == pytest.approx(best["halted_share"], rel=1e-9)
    assert "policy partitions at thresholds" in (tmp_path / "tuned" / "README.md").read_text()
