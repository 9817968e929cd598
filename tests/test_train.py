"""examples/train.py: bad input is refused before training, resume is exact, and two processes train exactly like
one process with the same global batch."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.torch import load_file

from step_hf.evaluation import confusion_matrices, segmentation_metrics

from .conftest import EXAMPLES

import checkpoints  # examples/ (conftest puts it on the path)
import train
from data import check_dataset_labels, load_data

TINY = ["--image_size", "64", "--policy_steps", "2", "--segmenter_steps", "4", "--prune_steps", "2",
        "--max_train_samples", "16", "--max_eval_samples", "3"]


def run_train(args, cwd, launcher=None, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    command = (launcher or [sys.executable]) + [str(EXAMPLES / "train.py"), *map(str, args)]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def losses(output_dir):
    history = json.loads((output_dir / "metrics.json").read_text())["history"]
    return [(r["stage"], r["step"], r.get("loss")) for r in history]


def weight_differences(a, b):
    """(largest absolute difference, relative L2 difference) between two saved models' weights."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    largest = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    squared = sum(float((wa[k] - wb[k]).pow(2).sum()) for k in wa)
    return largest, (squared / sum(float(wa[k].pow(2).sum()) for k in wa)) ** 0.5


def test_train_saves_a_loadable_model_and_resumes_exactly(tmp_path, scene_dataset):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    args = [*TINY, "--dataset_name", scene_dataset, "--checkpointing_steps", "2", "--per_device_train_batch_size", "4"]
    run_train([*args, "--output_dir", full], cwd=tmp_path)
    written = sorted(os.listdir(full / "checkpoints"))
    assert written == ["0-policy-0000002", "1-segmenter-0000002", "1-segmenter-0000004", "2-prune-0000002"]
    for name in ("model.safetensors", "config.json", "preprocessor_config.json", "modeling_step.py", "README.md",
                 "metrics.json"):
        assert (full / name).is_file(), name
    card = (full / "README.md").read_text()
    assert "pipeline_tag: image-segmentation" in card and "model-index" in card and "mIoU" in card
    metrics = json.loads((full / "metrics.json").read_text())
    assert 0 <= metrics["final_eval"]["mean_iou"] <= 1 and len(metrics["final_eval"]["halted_share"]) == 2

    # A run killed after segmenter step 2 (its newest checkpoint), then resumed: same steps, same losses, weights.
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "1-segmenter-0000002", resumed / "checkpoints" / "1-segmenter-0000002")
    (resumed / "checkpoints" / "2-prune-0000009.tmp").mkdir()  # a half-written checkpoint is never picked
    run_train([*args, "--output_dir", resumed, "--resume_from_checkpoint", "latest"], cwd=tmp_path)
    assert losses(resumed) == losses(full)
    assert weight_differences(full, resumed) == (0, 0)


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, scene_dataset):
    # Without drop path: each process draws its own images' drops, so with it the two runs differ by design.
    args = [*TINY, "--dataset_name", scene_dataset, "--checkpointing_steps", "0", "--drop_path_rate", "0"]
    single, double = tmp_path / "single", tmp_path / "double"
    run_train([*args, "--output_dir", single, "--per_device_train_batch_size", "4"], cwd=tmp_path)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    run_train([*args, "--output_dir", double, "--per_device_train_batch_size", "2"], cwd=tmp_path,
              launcher=launcher, env_extra={"ACCELERATE_USE_CPU": "true", "HF_HOME": str(tmp_path / "hf_home")})
    # Float rounding differs between one sum and an all-reduce of two; Adam turns it into small weight changes
    # (far below one step at the heads' learning rate, 5e-3), nothing more.
    largest, relative = weight_differences(single, double)
    assert largest < 1e-3 and relative < 1e-5, (largest, relative)
    a, b = losses(single), losses(double)
    assert [x[:2] for x in a] == [x[:2] for x in b]
    np.testing.assert_allclose([x[2] for x in a if x[2] is not None], [x[2] for x in b if x[2] is not None],
                               rtol=1e-4)
    eval_a = json.loads((single / "metrics.json").read_text())["final_eval"]
    eval_b = json.loads((double / "metrics.json").read_text())["final_eval"]
    assert eval_a["mean_iou"] == pytest.approx(eval_b["mean_iou"], abs=1e-6)  # every image counted once


def write_dataset(folder, rows, splits=("train", "validation")):
    from datasets import Dataset, Image

    (folder / "data").mkdir(parents=True)
    for split in splits:
        dataset = Dataset.from_dict(rows).cast_column("image", Image()).cast_column("label", Image())
        dataset.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    (folder / "id2label.json").write_text(json.dumps({"0": "a", "1": "b"}))
    return folder


def scene_rows(label_value=1, count=2):
    from PIL import Image

    images = [Image.new("RGB", (64, 48), (i * 40, 90, 30)) for i in range(count)]
    labels = [Image.fromarray(np.full((48, 64), label_value, dtype=np.uint8)) for _ in range(count)]
    return {"image": images, "label": labels}


@pytest.mark.parametrize(
    "make, extra, message",
    [
        (lambda d: write_dataset(d, scene_rows()), ["--label_column_name", "mask"], "no column 'mask'"),
        (lambda d: write_dataset(d, scene_rows(label_value=7)), [], r"label value\(s\) \[7\]"),
        (lambda d: write_dataset(d, scene_rows()), ["--eval_split", "test"], "no split 'test'"),
        (lambda d: write_dataset(d, scene_rows()), ["--crop_size", "512"], "too small for a 512 crop"),
        (lambda d: write_dataset(d, scene_rows()), ["--id2label", "{not json"], "--id2label must be"),
    ],
)
def test_bad_input_is_refused_before_training(tmp_path, make, extra, message):
    folder = make(tmp_path / "data")
    args = train.parse_args(["--dataset_name", str(folder), "--image_size", "64", *extra])
    with pytest.raises(ValueError, match=message):
        dataset, id2label = load_data(**train.data_arguments(args))
        train.build_model(args, id2label)


def test_empty_split_is_refused(tmp_path):
    from datasets import Dataset, Image

    folder = write_dataset(tmp_path / "data", scene_rows(), splits=("train",))
    empty = Dataset.from_dict({"image": [], "label": []}).cast_column("image", Image()).cast_column("label", Image())
    empty.to_parquet(str(folder / "data" / "validation-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match='Cannot load .*"validation" corresponds to no data'):
        load_data(dataset_name=str(folder))


def test_corrupt_image_is_refused(tmp_path):
    from datasets import Dataset, Image

    folder = write_dataset(tmp_path / "data", scene_rows(), splits=("validation",))
    rows = scene_rows()
    broken = Dataset.from_dict(rows).cast_column("image", Image()).cast_column("label", Image())
    broken = broken.cast_column("image", Image(decode=False))
    broken = broken.map(lambda row: {"image": {"bytes": b"not an image", "path": None}})
    broken.cast_column("image", Image()).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match="cannot be read"):
        load_data(dataset_name=str(folder))


def test_metrics_match_a_brute_force_mean_iou():
    """The Hub's mean_iou definition: areas summed over the dataset, IoU per class, nan-mean over classes."""
    import torch

    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 4, (3, 20, 30)))
    labels[0, :5] = 255
    labels[labels == 3] = 2  # class 3 never appears in the labels...
    prediction = torch.from_numpy(rng.integers(0, 4, (3, 20, 30)))
    prediction[prediction == 1] = 0  # ...and class 1 is never predicted
    confusion = confusion_matrices(labels, prediction, 5, 255).sum(0)  # class 4 appears nowhere
    metrics = segmentation_metrics(confusion, {i: str(i) for i in range(5)})

    valid = labels.numpy() != 255
    y, p = labels.numpy()[valid], prediction.numpy()[valid]
    ious = []
    for c in range(5):
        union = np.sum((y == c) | (p == c))
        ious.append(np.sum((y == c) & (p == c)) / union if union else np.nan)
    assert metrics["mean_iou"] == pytest.approx(np.nanmean(ious))
    assert metrics["per_category_iou"]["4"] is None and metrics["per_category_iou"]["3"] == 0  # NaN: JSON-invalid
    assert metrics["overall_accuracy"] == pytest.approx(np.mean(y == p))


def test_label_check_reduces_labels_as_the_processor_does():
    """With --reduce_labels, 0 and 255 are void and the rest move down by one, as in `StepImageProcessor`: a map of
    {0, 1, 2, 255} fits two classes; a 3 does not."""
    from datasets import Dataset, DatasetDict
    from PIL import Image

    def dataset(values):
        label = Image.fromarray(np.array([values], dtype=np.uint8))
        image = Image.new("RGB", label.size)
        return DatasetDict({"train": Dataset.from_dict({"image": [image], "label": [label]})})

    check_dataset_labels(dataset([0, 1, 2, 255]), {0: "a", 1: "b"}, reduce=True)
    with pytest.raises(ValueError, match=r"label value\(s\) \[2\]"):
        check_dataset_labels(dataset([0, 1, 3]), {0: "a", 1: "b"}, reduce=True)


def test_gradient_checkpointing_trains_exactly_like_the_plain_run(tmp_path, scene_dataset):
    args = ["--dataset_name", str(scene_dataset), "--image_size", "64", "--stage", "segmenter",
            "--partition_source", "dense", "--segmenter_steps", "3", "--logging_steps", "1", "--checkpointing_steps",
            "0", "--per_device_train_batch_size", "4", "--max_eval_samples", "1"]
    train.main([*args, "--output_dir", str(tmp_path / "plain")])
    train.main([*args, "--output_dir", str(tmp_path / "checkpointed"), "--gradient_checkpointing"])
    plain, checkpointed = losses(tmp_path / "plain"), losses(tmp_path / "checkpointed")
    assert [x[:2] for x in plain] == [x[:2] for x in checkpointed] and len(plain) > 3
    np.testing.assert_allclose([x[2] for x in plain if x[2] is not None],
                               [x[2] for x in checkpointed if x[2] is not None], rtol=1e-5)


def test_learning_rates_per_stage_and_new_models_exits(tmp_path, scene_dataset):
    """The policy trains at --policy_learning_rate; segmenter and pruning at --learning_rate (pretrained-backbone
    defaults) unless --prune_learning_rate is given; --exit_head_type and --exit_layers build a new model's exits,
    and a saved model with other exits is refused rather than silently kept."""
    out = tmp_path / "atm"
    run_train([*TINY, "--dataset_name", scene_dataset, "--output_dir", out, "--checkpointing_steps", "0",
               "--exit_head_type", "atm", "--exit_layers", "1", "--warmup_steps", "0"], cwd=tmp_path)
    config = json.loads((out / "config.json").read_text())
    assert config["exit_head_type"] == "atm" and config["exit_layers"] == [1] and config["drop_path_rate"] == 0.1
    history = json.loads((out / "metrics.json").read_text())["history"]
    steps = {"policy": 2, "segmenter": 4, "prune": 2}
    # The logged rate is the first parameter group's after the step: the backbone's, or in the policy stage the
    # policy's, which trains as a head (x10).
    for stage, rate in (("policy", 5e-4 * 10), ("segmenter", 2e-5), ("prune", 2e-5)):
        logged = [entry for entry in history if entry.get("stage") == stage and "lr" in entry]
        assert logged, stage
        for entry in logged:  # no warm-up: the poly decay from the stage's rate
            assert entry["lr"] == pytest.approx(rate * (1 - entry["step"] / steps[stage]) ** 0.9), stage
    result = subprocess.run([sys.executable, str(EXAMPLES / "train.py"), *TINY, "--dataset_name", scene_dataset,
                             "--model_name_or_path", str(out), "--stage", "prune", "--exit_head_type", "mlp",
                             "--output_dir", str(tmp_path / "refused")], cwd=tmp_path, capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600)
    assert result.returncode != 0 and "--exit_head_type mlp chooses a new model's architecture" in result.stderr


# ---- long runs: divergence, preemption, resuming another run, precision, nothing labelled --------------------------


SEGMENTER_ONLY = ["--image_size", "64", "--stage", "segmenter", "--partition_source", "dense",
                  "--per_device_train_batch_size", "4", "--max_train_samples", "8", "--max_eval_samples", "2"]


def strict_json(path):
    """The file parsed as JSON proper: a bare NaN or Infinity (which Python writes and reads by default) fails."""
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_diverging_run_stops_naming_the_last_good_checkpoint(tmp_path, scene_dataset):
    out = tmp_path / "run"
    with pytest.raises(train.TrainingDiverged) as raised:
        train.main([*SEGMENTER_ONLY, "--dataset_name", str(scene_dataset), "--output_dir", str(out),
                    "--segmenter_steps", "8", "--learning_rate", "1e6", "--warmup_steps", "0",
                    "--checkpointing_steps", "1", "--logging_steps", "4"])
    message = str(raised.value)
    assert "segmenter step" in message and "learning rate 1e+06" in message and "--learning_rate" in message
    # Nothing that looks like a model, and every checkpoint written holds finite weights.
    assert not {"model.safetensors", "config.json", "README.md", "metrics.json"} & set(os.listdir(out))
    written = sorted((out / "checkpoints").iterdir())
    assert written, "the run diverged before any checkpoint: raise the test's learning rate margin"
    assert all(checkpoints.checkpoint_problem(str(c)) is None for c in written)
    last_good = written[-1]
    assert f"The last good checkpoint is {last_good}" in message
    stopped_at = int(message.split("segmenter step ")[1].split()[0])
    assert stopped_at > int(last_good.name.split("-")[-1])

    # A checkpoint with non-finite weights (as written before this check existed) is skipped by `latest`.
    diverged = last_good.with_name(f"1-segmenter-{stopped_at:07d}")
    shutil.copytree(last_good, diverged)
    weights = load_file(diverged / "model.safetensors")
    first = sorted(weights)[0]
    weights[first] = weights[first] * float("nan")
    from safetensors.torch import save_file
    save_file(weights, diverged / "model.safetensors", metadata={"format": "pt"})
    messages = []
    found = checkpoints.find_checkpoint(str(out), "latest", log=messages.append)
    assert found == str(last_good)
    assert len(messages) == 1 and diverged.name in messages[0] and "non-finite weights" in messages[0] \
        and first in messages[0]


def test_sigterm_saves_a_checkpoint_and_the_run_resumes_exactly(tmp_path, scene_dataset):
    args = [*TINY, "--dataset_name", scene_dataset, "--checkpointing_steps", "2", "--per_device_train_batch_size", "4"]
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    train.main([*map(str, args), "--output_dir", str(full)])

    command = [sys.executable, str(EXAMPLES / "train.py"), *map(str, args), "--output_dir", str(stopped)]
    process = subprocess.Popen(command, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_checkpoint = stopped / "checkpoints" / "0-policy-0000002"  # the policy stage's end
    while not first_checkpoint.exists() and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # a preemption somewhere in the segmenter stage
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == train.PREEMPTED_EXIT_CODE, stderr[-3000:]
    assert "Stopped by SIGTERM after segmenter step" in stderr, stderr[-3000:]
    resume_argument = stderr.split("--resume_from_checkpoint ")[1].split()[0]
    step = int(stderr.split("Stopped by SIGTERM after segmenter step ")[1].split()[0])
    assert resume_argument == str(stopped / "checkpoints" / f"1-segmenter-{step:07d}")
    assert checkpoints.checkpoint_problem(resume_argument) is None
    assert not (stopped / "model.safetensors").exists()

    train.main([*map(str, args), "--output_dir", str(stopped), "--resume_from_checkpoint", resume_argument])
    assert losses(stopped) == losses(full)
    assert weight_differences(full, stopped) == (0, 0)
    metrics = strict_json(stopped / "metrics.json")  # per-class IoUs of absent classes are null, not NaN
    assert metrics["commands"][1].startswith(f"# resumed from segmenter step {step}:")


def test_resuming_with_flags_that_change_the_run_is_refused(tmp_path, scene_dataset):
    out = tmp_path / "run"
    base = [*SEGMENTER_ONLY, "--dataset_name", str(scene_dataset), "--output_dir", str(out), "--segmenter_steps", "2",
            "--checkpointing_steps", "1"]
    train.main(base)
    shutil.rmtree(out / "checkpoints" / "1-segmenter-0000002")  # as if stopped after step 1
    other_data = shutil.copytree(scene_dataset, tmp_path / "other-data")
    resume = [*base, "--resume_from_checkpoint", "latest"]
    for change, expected in [
        (["--per_device_train_batch_size", "2"], "--per_device_train_batch_size: the run used 4, this command gives 2"),
        (["--segmenter_steps", "1"], "--segmenter_steps: the run used 2, this command gives 1"),
        (["--dataset_name", str(other_data)], f"this command gives {other_data}"),
        (["--preset", "small"], "--preset: the run used tiny, this command gives small"),
    ]:
        with pytest.raises(ValueError, match="flags that change the run") as raised:
            train.main([*resume, *change])
        assert expected in str(raised.value) and "size mismatch" not in str(raised.value)
        assert "--checkpointing_steps" in str(raised.value)  # says what may change

    # From the command line, through `accelerate launch --quiet` as the README runs it: one line, no traceback.
    launcher = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--quiet"]
    result = subprocess.run([*launcher, str(EXAMPLES / "train.py"), *resume, "--seed", "1"], cwd=tmp_path,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: Cannot resume from {out}")

    # Flags that only change where and how often the run writes and logs are accepted, and the card shows both
    # commands, the resume with where it started.
    train.main([*resume, "--logging_steps", "5", "--checkpointing_steps", "0"])
    card = (out / "README.md").read_text()
    first = card.index(train.command_line(train.parse_args(base)))
    assert card.index("# resumed from segmenter step 1:") > first
    assert train.command_line(train.parse_args([*resume, "--logging_steps", "5", "--checkpointing_steps", "0"])) in card


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="fp16 runs on a GPU")
def test_fp16_on_a_cpu_is_refused_rather_than_run_in_fp32(tmp_path, scene_dataset):
    result = subprocess.run([sys.executable, str(EXAMPLES / "train.py"), *SEGMENTER_ONLY, "--dataset_name",
                             str(scene_dataset), "--output_dir", str(tmp_path / "run"), "--mixed_precision", "fp16"],
                            cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: --mixed_precision fp16 (the flag or Accelerate's "
                                                             "config) does not run on cpu")
    assert "bf16, which autocasts on CPU" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_validation_split_with_nothing_labelled_is_refused(tmp_path):
    folder = write_dataset(tmp_path / "data", scene_rows(), splits=("train",))
    from datasets import Dataset, Image

    void = Dataset.from_dict(scene_rows(label_value=255)).cast_column("image", Image()).cast_column("label", Image())
    void.to_parquet(str(folder / "data" / "validation-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match=r"Every pixel of the validation split \(--eval_split validation, 2 images\) "
                                         r"is void \(label 255\): there is nothing to measure"):
        train.main(["--dataset_name", str(folder), "--image_size", "64", "--output_dir", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_card_never_publishes_an_unmeasured_number():
    """Results measured on nothing labelled are NaN: the card's model-index leaves them out instead of `.nan`."""
    from step_hf.model_card import model_card

    from .conftest import tiny_config

    nan = float("nan")
    card = str(model_card("m", tiny_config(), "train.py", "data", {"mean_iou": nan, "overall_accuracy": nan}))
    assert "nan" not in card.lower() and "model-index" not in card and "No mIoU was measured" in card
    card = str(model_card("m", tiny_config(), "train.py", "data", {"mean_iou": 0.5, "overall_accuracy": 0.75}))
    assert "model-index" in card and "value: 50.0" in card and "value: 75.0" in card


def test_save_total_limit_keeps_the_newest_checkpoints(tmp_path, scene_dataset):
    out = tmp_path / "run"
    train.main([*SEGMENTER_ONLY, "--dataset_name", str(scene_dataset), "--output_dir", str(out), "--segmenter_steps",
                "3", "--checkpointing_steps", "1", "--save_total_limit", "2"])
    assert sorted(os.listdir(out / "checkpoints")) == ["1-segmenter-0000002", "1-segmenter-0000003"]
    # The card's usage snippet loads the folder where it was written, not a name no one can load.
    assert f'pipeline("image-segmentation", model="{out}", trust_remote_code=True)' in (out / "README.md").read_text()
