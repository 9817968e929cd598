import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from step_hf import StepForSemanticSegmentation, StepImageProcessor

from .conftest import EXAMPLES, tiny_config, tiny_model


def run_example(script, *args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout




def test_dcts_tokens_trains_the_policy_and_sweeps_thresholds(tmp_path, scene_dataset):
    out = run_example(
        "dcts_tokens.py", "--dataset_name", scene_dataset, "--image_size", 64, "--policy_steps", 4,
        "--per_device_train_batch_size", 2, "--thresholds", 0.9, 0.5, 0.1, "--output_dir", tmp_path / "dcts",
        cwd=tmp_path,
    )
    results = json.loads((tmp_path / "dcts" / "results.json").read_text())
    assert results["grid_cells"] == 16 and results["train_steps"] == 4
    counts = [results["policy"][t]["tokens_mean"] for t in ("0.9", "0.5", "0.1")]
    assert counts == sorted(counts, reverse=True) and all(1 <= c <= 16 for c in counts)
    assert 1 <= results["oracle"]["tokens_mean"] <= 16
    assert "| oracle |" in out


def test_segment_saves_a_picture(tmp_path):
    StepForSemanticSegmentation(tiny_config(partition_source="policy", halting=True)).save_pretrained(tmp_path / "m")
    StepImageProcessor(size={"height": 64, "width": 96}).save_pretrained(tmp_path / "m")
    out = run_example("segment.py", "--model_name_or_path", tmp_path / "m", "--output", tmp_path / "seg.png",
                      cwd=tmp_path)
    picture = Image.open(tmp_path / "seg.png")
    assert picture.width == 4 * 480 and picture.height > 360  # image | ground truth | prediction | tokens; legend
    below = np.asarray(picture)[-40:].reshape(-1, 3)
    assert (below == (255, 255, 0)).all(-1).any()  # the legend's superpatch-outline swatch
    assert "tokens:" in out and "classes found:" in out
    with pytest.raises(AssertionError, match="Cannot read"):
        (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
        run_example("segment.py", "--model_name_or_path", tmp_path / "m", "--image", tmp_path / "bad.jpg",
                    cwd=tmp_path)


def test_segment_turns_a_phone_photo_upright_by_its_exif_orientation(tmp_path):
    """A photo stored 96 wide and 64 high with EXIF orientation 6 (rotate 90 degrees clockwise to view) is drawn
    upright, 64 wide and 96 high, as the pipeline (`transformers.image_utils.load_image`) sees it."""
    StepForSemanticSegmentation(tiny_config()).save_pretrained(tmp_path / "m")
    StepImageProcessor(size={"height": 64, "width": 64}).save_pretrained(tmp_path / "m")
    stored = Image.fromarray(torch.randint(0, 256, (64, 96, 3), generator=torch.Generator().manual_seed(0),
                                           dtype=torch.uint8).numpy())
    exif = Image.Exif()
    exif[0x0112] = 6  # the Orientation tag
    stored.save(tmp_path / "photo.png", exif=exif)
    run_example("segment.py", "--model_name_or_path", tmp_path / "m", "--image", tmp_path / "photo.png",
                "--output", tmp_path / "seg.png", cwd=tmp_path)
    picture = Image.open(tmp_path / "seg.png").convert("RGB")
    assert picture.width >= 3 * 64 and picture.height > 96  # image | prediction | tokens, titled, a legend below
    upright = stored.transpose(Image.Transpose.ROTATE_270)  # orientation 6 is viewed rotated 90 degrees clockwise
    # The first panel, below its title, is the photo upright.
    assert any(picture.crop((0, top, 64, top + 96)).tobytes() == upright.tobytes()
               for top in range(picture.height - 96 + 1))


def grey_pair(folder) -> tuple:
    """A 16-bit greyscale PNG (PIL mode 'I;16') of a random picture and the 8-bit RGB PNG it stands for (/ 257)."""
    grey = np.random.default_rng(0).integers(0, 256, (70, 110), dtype=np.uint8)
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "grey16.png")
    Image.fromarray(grey).convert("RGB").save(folder / "grey8.png")
    return folder / "grey16.png", folder / "grey8.png"


def test_segment_reads_a_16_bit_image_as_its_8_bit_image(tmp_path):
    StepForSemanticSegmentation(tiny_config()).save_pretrained(tmp_path / "m")
    StepImageProcessor(size={"height": 64, "width": 96}).save_pretrained(tmp_path / "m")
    pictures = []
    for image in grey_pair(tmp_path):
        run_example("segment.py", "--model_name_or_path", tmp_path / "m", "--image", image, "--output",
                    tmp_path / "seg.png", cwd=tmp_path)
        pictures.append(Image.open(tmp_path / "seg.png").tobytes())
    assert pictures[0] == pictures[1]  # the picture, the prediction and the tokens: not those of a white image


def test_onnx_segment_reads_a_16_bit_image_as_the_pipeline_given_it_opened(tmp_path):
    """`examples/onnx_segment.py` (where torch cannot be imported) and the pipeline given the opened 16-bit image
    (which the processor divides by 257) give the same class map."""
    from transformers import pipeline

    from step_hf.export import main as export

    tiny_model().save_pretrained(tmp_path / "model")
    StepImageProcessor(size={"shortest_edge": 64}, num_labels=4).save_pretrained(tmp_path / "model")
    export(["--model_name_or_path", str(tmp_path / "model"), "--format", "onnx", "--output_dir",
            str(tmp_path / "onnx"), "--image_size", "64", "96"])
    grey16, _ = grey_pair(tmp_path)
    script = (f"import runpy, sys; sys.modules['torch'] = None; sys.argv = {['onnx_segment.py', '--model', str(tmp_path / 'onnx'), '--image', str(grey16), '--output', str(tmp_path / 'classes.png')]!r}; "
              f"runpy.run_path({str(EXAMPLES / 'onnx_segment.py')!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    classes = np.array(Image.open(tmp_path / "classes.png"))
    expected = np.full(classes.shape, -1)
    for found in pipeline("image-segmentation", model=str(tmp_path / "model"))(Image.open(grey16)):
        expected[np.array(found["mask"]) > 0] = tiny_model().config.label2id[found["label"]]
    assert classes.shape == (70, 110) and len(np.unique(classes)) > 1
    assert (classes == expected).mean() >= 0.999


def test_plot_sweep_draws_the_curve_and_writes_its_data(tmp_path):
    rows = [{"partition_source": "policy", "policy_threshold": t, "exit_threshold": None, "mean_iou": m,
             "gflops_per_image": g, "tokens_per_image": n, "halted_share": []}
            for t, m, g, n in ((0.7, 0.52, 3.0, 300.0), (0.5, 0.50, 2.0, 200.0))]
    (tmp_path / "sweep.json").write_text(json.dumps(rows))
    run_example("plot_sweep.py", tmp_path / "sweep.json", "--output", tmp_path / "curve.png", cwd=tmp_path)
    assert Image.open(tmp_path / "curve.png").size == (1240, 600)  # the axes, then the legend beside them
    lines = (tmp_path / "curve.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[1].startswith("sweep,policy,0.5,,2.0000,50.00,200.0")


def test_camvid_recipe_runs_each_variant(tmp_path, scene_dataset):
    """The per-variant commands of the CamVid comparison, scaled down to seconds on the scene dataset: dense, then
    dCTS -> STEP reusing nothing but what the recipe itself saved."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHON": sys.executable, "DATA": str(scene_dataset), "PRESET": "tiny",
           "SIZE": "64", "PRECISION": "no", "WORKERS": "0", "POLICY_STEPS": "2", "SEGMENTER_STEPS": "3",
           "PRUNE_STEPS": "2", "CTS_BUDGET": "11"}
    recipe = EXAMPLES.parent / "scripts" / "camvid_recipe.sh"
    for variant in ("dense", "step", "cts", "dtop"):
        result = subprocess.run(["bash", str(recipe), variant, str(tmp_path / "runs")], env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    configs, evals = {}, {}
    for name in ("dense", "dcts-policy", "dcts", "step"):
        configs[name] = json.loads((tmp_path / "runs" / name / "config.json").read_text())
        evals[name] = json.loads((tmp_path / "runs" / name / "metrics.json").read_text())["final_eval"]
    assert evals["dense"]["tokens_per_image"] == 20 and configs["dense"]["hidden_size"] == 192  # ViT-Tiny, 4x5 grid
    assert evals["dcts-policy"] is None and evals["dcts"]["tokens_per_image"] <= 20  # the policy stage has no eval
    assert not configs["dcts"]["halting"] and configs["step"]["halting"]
    # CTS alone: 2x2 superpatches only, at its token budget (20 cells - 3 per merge: 11); DToP alone: dense + halting
    cts = json.loads((tmp_path / "runs" / "cts" / "config.json").read_text())
    assert cts["superpatch_sizes"] == [2] and cts["token_budget"] == 11
    assert json.loads((tmp_path / "runs" / "cts" / "metrics.json").read_text())["final_eval"]["tokens_per_image"] == 11
    dtop = json.loads((tmp_path / "runs" / "dtop" / "config.json").read_text())
    assert dtop["partition_source"] == "dense" and dtop["halting"]

    def learning_rates(name: str, stage: str) -> list:
        history = json.loads((tmp_path / "runs" / name / "metrics.json").read_text())["history"]
        return [entry["lr"] for entry in history if entry.get("stage") == stage and "lr" in entry]

    # dense and dCTS train their segmenters on one schedule: the recipe's from-scratch one, still warming up here
    assert learning_rates("dense", "segmenter") == learning_rates("dcts", "segmenter")
    assert learning_rates("dense", "segmenter") == pytest.approx([4e-4 * step / 101 for step in (2, 3, 4)])
    # the pruning stage fine-tunes at --prune_learning_rate (1e-4), warming up over train.py's 20 steps
    assert learning_rates("step", "prune") == pytest.approx([1e-4 * step / 21 for step in (2, 3)])


def test_windows_against_full_frame(tmp_path, scene_dataset):
    """One window as large as the frame is the full frame; smaller windows give their own, stitched, result."""
    torch.manual_seed(0)
    classes = {i: str(i) for i in range(6)}
    model = StepForSemanticSegmentation(tiny_config(id2label=classes, label2id={v: k for k, v in classes.items()}))
    model.save_pretrained(tmp_path / "m")
    StepImageProcessor(size={"height": 64, "width": 64}).save_pretrained(tmp_path / "m")
    whole = run_example("windows_vs_full_frame.py", "--model_name_or_path", tmp_path / "m", "--dataset_name",
                        scene_dataset, "--window_size", 64, cwd=tmp_path)
    assert "windows - full frame: +0.00 mIoU" in whole
    split = run_example("windows_vs_full_frame.py", "--model_name_or_path", tmp_path / "m", "--dataset_name",
                        scene_dataset, "--window_size", 32, "--window_stride", 16, cwd=tmp_path)
    assert "full frame: mIoU" in split and "windows: mIoU" in split


def write_run(folder, final: dict, exit_layers=(6, 8), halting=False, sweep=None):
    """A trained run's files as train.py and sweep.py write them, with only the fields the tables read."""
    folder.mkdir(parents=True)
    metrics = {"final_eval": final, "settings": {"partition_source": "dense", "halting": halting,
                                                 "exit_thresholds": [0.9, 0.9]}}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "config.json").write_text(json.dumps({"exit_layers": list(exit_layers), "exit_head_type": "mlp"}))
    if sweep is not None:
        (folder / "sweep.json").write_text(json.dumps(sweep))


def sweep_row(miou, gflops, halted):
    return {"mean_iou": miou, "gflops_per_image": gflops, "halted_share": halted, "tokens_per_image": 10.0,
            "partition_source": "dense", "policy_threshold": None, "exit_threshold": 0.9}


def test_lineage_table_compares_at_equal_halted_share_and_flops(tmp_path):
    import lineage_table

    for seed, shift in (("seed-0", 0.0), ("seed-1", 0.02)):
        write_run(tmp_path / seed / "dense", sweep_row(0.30 + shift, 3.0, [0.0, 0.0]))
        # halted 0.2 -> mIoU 0.40, halted 0.6 -> 0.30: at 0.4 halted, 0.35 (+ shift); FLOPs 2.0 -> 1.0
        sweep = [sweep_row(0.40 + shift, 2.0, [0.1, 0.1]), sweep_row(0.30 + shift, 1.0, [0.5, 0.1])]
        write_run(tmp_path / seed / "dtop", sweep[0], halting=True, sweep=sweep)
    lineage_table.main([str(tmp_path), "--output", str(tmp_path / "out" / "lineage"), "--halted_shares", "0.4"])
    written = json.loads((tmp_path / "out" / "lineage.json").read_text())
    assert set(written) == {"dense ViT + Segmenter", "DToP alone (dense + halting)"}
    assert (tmp_path / "out" / "lineage.png").is_file() and (tmp_path / "out" / "lineage.csv").is_file()
    rows = {seed: lineage_table.interpolate(run["sweep"], "halted", 0.4, "mean_iou")
            for seed, run in zip(("0", "1"), written["DToP alone (dense + halting)"])}
    assert rows["0"] == pytest.approx(0.35) and rows["1"] == pytest.approx(0.37)
    assert lineage_table.interpolate(written["DToP alone (dense + halting)"][0]["sweep"], "gflops_per_image", 1.5,
                                     "mean_iou") == pytest.approx(0.35)
    assert lineage_table.interpolate(written["DToP alone (dense + halting)"][0]["sweep"], "halted", 0.9,
                                     "mean_iou") is None  # outside the sweep: not extrapolated


def test_exit_head_cost_reports_both_heads():
    import exit_head_cost

    rows = [exit_head_cost.measure(exit_head_cost.parse_args(["--preset", "tiny", "--image_size", "64", "--device",
                                                              "cpu", "--dtype", "float32", "--repeats", "1"]),
                                   5, head) for head in ("mlp", "atm")]
    assert [row["head"] for row in rows] == ["mlp", "atm"]
    assert 0 < rows[0]["gflops_per_head"] < rows[1]["gflops_per_head"]
    assert all(row["forward_ms"] > 0 and row["exit_share_of_time"] > 0 for row in rows)  # times: no bounds
