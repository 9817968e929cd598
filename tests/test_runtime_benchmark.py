"""The runtime benchmark: one row per variant, the runtime's tokens the eager model's, speed-ups and FLOP ratios
computed from the measured times and from `step_hf.accounting`, the table and the targets printed; in ONNX Runtime,
OpenVINO and the torch.export program too (slow: every variant is exported)."""

import json

import pytest
import torch

from step_hf import runtime_benchmark
from step_hf.accounting import flops_per_image
from step_hf.benchmark import make_model
from step_hf.superpatch import budget_token_count

from .conftest import tiny_model

FAST = ["--image_sizes", "64x96", "--num_batches", "2", "--repeats", "1", "--warmup", "0"]


def run(tmp_path, dataset, *arguments: str) -> tuple[list[dict], dict]:
    output = tmp_path / "rows.json"
    runtime_benchmark.main([*arguments, *FAST, "--dataset_name", str(dataset), "--output", str(output)])
    written = json.loads(output.read_text())
    return written["rows"], written


def check_rows(rows: list[dict], variants: list[str], exact_classes: bool = True) -> None:
    """What every runtime's rows must hold: the variants in order, the runtime's tokens and halted shares the eager
    model's, and the ratios computed from the rows' own times and FLOPs."""
    assert [row["variant"] for row in rows] == variants
    dense = rows[0]
    assert dense["runtime_tokens_mean"] == 4 * 6 and dense["speedup"] == 1.0 and dense["runtime_halted_share"] == []
    for row in rows:
        assert row["ms_per_image"] > 0 and row["tokens_as_eager"]
        assert row["runtime_tokens_mean"] == row["tokens_mean"]
        assert row["speedup"] == pytest.approx(dense["ms_per_image"] / row["ms_per_image"])
        assert row["flop_ratio"] == pytest.approx(dense["gflops_per_image"] / row["gflops_per_image"])
        assert row["speedup_per_flop_ratio"] == pytest.approx(row["speedup"] / row["flop_ratio"])
        if row["variant"] != "dense":  # a static budget: every image keeps the count the budget reaches
            assert row["runtime_tokens_mean"] == budget_token_count(4 * 6, row["token_budget"])
            assert row["flop_ratio"] > 1
        if row["quantize"] is None and exact_classes:
            assert row["classes_as_eager"] == 1.0
    step = rows[2]
    kept = step["exit_keep_tokens"]
    assert step["runtime_halted_share"] and sum(step["runtime_halted_share"]) == pytest.approx(
        1 - kept[-1] / step["runtime_tokens_mean"], abs=1e-6)


def test_torch_rows_their_flops_and_the_table(tmp_path, scene_dataset, capsys):
    rows, written = run(tmp_path, scene_dataset, "--runtime", "torch", "--presets", "tiny", "--token_budget", "20")
    check_rows(rows, ["dense", "static dCTS", "static STEP"])
    assert all(row["token_budget"] == 20 for row in rows[1:])
    # The FLOPs are what accounting gives for an eager forward with the row's settings (static shapes: any frame)
    model = make_model("tiny", (64, 96))
    pixels = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    for row in rows:
        settings = dict(partition_source="policy", token_budget=row["token_budget"], halting=False)
        if row["variant"] == "dense":
            settings = dict(partition_source="dense", halting=False)
        if row["exit_keep_tokens"]:
            settings.update(exit_keep_tokens=row["exit_keep_tokens"], halting=True)
        with torch.no_grad():
            outputs = model(pixels, settings=settings)
        assert row["gflops_per_image"] == pytest.approx(flops_per_image(model.config, (64, 96), outputs)[0] / 1e9)
    table = capsys.readouterr().out
    assert "torch" in written["runtime"] and f"transformers {written['transformers']}" in table
    assert "| tiny | 64x96 | dense |" in table and "speed-up / FLOP ratio" in table
    assert "speed-up >= 75% of the FLOP ratio" in table and len(written["targets"]) == 2  # dCTS and STEP


def test_the_budget_is_the_mean_oracle_count_of_the_frames(tmp_path, scene_dataset):
    """Without --token_budget the static budget is the frames' mean ground-truth token count, which for scenes of
    uniform areas is below the full grid."""
    from step_hf.benchmark import add_oracle_partitions, load_batches

    rows, written = run(tmp_path, scene_dataset, "--runtime", "torch", "--presets", "tiny")
    args = runtime_benchmark.parse_args(["--runtime", "torch", "--dataset_name", str(scene_dataset), *FAST])
    args.image_size, args.dtype = (64, 96), "fp32"
    model = make_model("tiny", (64, 96))
    batches = load_batches(args, model.config)
    add_oracle_partitions(model, batches)
    counts = torch.cat([batch["oracle_counts"] for batch in batches]).float()
    assert rows[1]["token_budget"] == int(counts.mean()) < 24


def test_a_missing_dataset_stops_with_what_to_give(tmp_path):
    with pytest.raises(SystemExit, match="--dataset_name"):
        runtime_benchmark.main(["--runtime", "torch", "--presets", "tiny", *FAST, "--dataset_name",
                                str(tmp_path / "absent")])


def test_options_of_another_runtime_are_refused(capsys):
    for arguments in (["--runtime", "torch", "--profile"], ["--runtime", "onnxruntime", "--torch_export"],
                      ["--runtime", "openvino", "--device", "cuda"]):
        with pytest.raises(SystemExit):
            runtime_benchmark.parse_args(arguments)
    assert "--profile" in capsys.readouterr().err


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A small saved STEP model stored at 64x96 (a budget is checked against the stored grid), its superpatches
    fitting that grid (sides 2 and 4), one exit, 64 wide (int8 quantization leaves layers too narrow alone)."""
    folder = tmp_path_factory.mktemp("model")
    tiny_model(image_size=[64, 96], partition_source="policy", superpatch_sizes=[1, 2, 4], exit_layers=[1],
               hidden_size=64, intermediate_size=128, decoder_hidden_size=64).save_pretrained(folder)
    return folder


@pytest.mark.slow
def test_onnxruntime_rows_with_int8_and_the_profile(tmp_path, scene_dataset, saved_model, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    rows, written = run(tmp_path, scene_dataset, "--runtime", "onnxruntime", "--presets", str(saved_model),
                        "--profile")
    check_rows(rows, ["dense", "static dCTS", "static STEP", "int8 static STEP"])
    assert "ONNX Runtime" in written["runtime"] and "CPUExecutionProvider" in written["runtime"]
    int8, step = rows[3], rows[2]
    assert int8["quantize"] == "int8" and int8["gflops_per_image"] == step["gflops_per_image"]
    assert int8["classes_as_eager"] >= 0.9
    for row in rows:  # the profiler saw the operators: integer ones (ConvInteger, DynamicQuantizeMatMul) in int8 only
        integer = [op for op in row["profile"]["top"] if "Integer" in op["op_type"] or "Quantize" in op["op_type"]]
        assert 0 < row["profile"]["operators_ms_per_run"] <= row["profile"]["ms_per_run"]
        assert sum(op["share"] for op in row["profile"]["top"]) <= 1 + 1e-9
        assert bool(integer) == (row["quantize"] == "int8")
    targets = {(t["variant"], t["target"]) for t in written["targets"]}
    assert ("static STEP", runtime_benchmark.TARGETS[0].description) in targets
    assert ("int8 static STEP", runtime_benchmark.TARGETS[2].description) in targets
    assert "profile," in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("runtime", ["openvino", "torch.export"])
def test_openvino_and_torch_export_rows(runtime, tmp_path, scene_dataset, saved_model):
    if runtime == "openvino":
        pytest.importorskip("openvino")
    arguments = ["--runtime", "torch", "--torch_export"] if runtime == "torch.export" else ["--runtime", runtime,
                                                                                            "--profile"]
    rows, written = run(tmp_path, scene_dataset, *arguments, "--presets", str(saved_model))
    check_rows(rows, ["dense", "static dCTS", "static STEP"])
    assert ("OpenVINO" if runtime == "openvino" else "torch.export program") in written["runtime"]
    if runtime == "openvino":  # OpenVINO's counters: its node types, timed
        for row in rows:
            assert 0 < row["profile"]["operators_ms_per_run"] and row["profile"]["top"][0]["ms_per_run"] > 0
