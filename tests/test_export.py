"""Export: the exportable replacements of the stable sorts give today's partitions and halted tokens, ExecuTorch runs
the fixed-count configurations as eager does, the export command traces at the processor's size and writes one
consistent folder, and what cannot export is refused in one line naming the setting to change (every configuration
of the models users have, in the other formats: tests/test_export_matrix.py)."""

import contextlib
import io
import json
import subprocess
import sys

import pytest
import torch
from torch.export import Dim

from step_hf import StepForSemanticSegmentation
from step_hf.export import export_model, load_exported
from step_hf.superpatch import block_reduce, budget_token_count, decisions_for_budget
from step_hf.token_layout import PackedBatch, first_true_positions, top_count_first_on_ties
from step_hf.exits import keep_topk_per_class

from .conftest import tiny_config, tiny_model

exporters = pytest.importorskip("transformers.exporters")


def stable_sort_selection(values: torch.Tensor, count: int) -> torch.Tensor:
    """The selection as it was computed before: the first `count` of a stable descending sort of each row."""
    order = values.sort(dim=1, descending=True, stable=True).indices[:, :count]
    return torch.zeros_like(values, dtype=torch.bool).scatter_(1, order, True)


def test_top_count_with_position_ties_is_the_stable_sort_selection():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        values = torch.randint(0, 4, (3, 17), generator=generator).float()  # many ties
        values[0, :5] = float("-inf")
        for count in (0, 1, 5, 12):
            assert torch.equal(top_count_first_on_ties(values, count, dim=1), stable_sort_selection(values, count))


def test_first_true_positions_are_the_survivors_of_the_stable_argsort():
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        keep = torch.rand(40, generator=generator) < 0.4
        count = int(keep.sum())
        before = torch.argsort((~keep).to(torch.int8), stable=True)[:count]
        assert torch.equal(first_true_positions(keep, count), before)
        assert torch.equal(first_true_positions(keep, None), before)  # the data-dependent form


def test_budget_partitions_are_unchanged_with_tied_priorities():
    generator = torch.Generator().manual_seed(2)
    grid = (8, 12)
    for budget in (20, 50, 90):
        block_logits = {size: torch.randint(-2, 3, (2, 8 // size, 12 // size), generator=generator).float()
                        for size in (2, 4)}
        # The selection before: the same priorities, a stable sort.
        priorities, child = [], None
        for size in (2, 4):
            priority = block_logits[size] if child is None else torch.minimum(block_logits[size],
                                                                              block_reduce(child, 2, "min"))
            priorities.append(priority)
            child = priority
        merges = (96 - budget_token_count(96, budget)) // 3
        before = stable_sort_selection(torch.cat([p.flatten(1) for p in priorities], 1), merges)
        decisions = decisions_for_budget(block_logits, grid, budget)
        assert torch.equal(torch.cat([decisions[2].flatten(1), decisions[4].flatten(1)], 1), before)


def test_a_superpatch_size_with_no_whole_block_changes_no_budget_decision():
    generator = torch.Generator().manual_seed(3)
    block_logits = {size: torch.randn(2, 8 // size, 12 // size, generator=generator) for size in (2, 4)}
    with_empty = decisions_for_budget({**block_logits, 16: torch.zeros(2, 0, 0)}, (8, 12), 50)
    assert with_empty[16].shape == (2, 0, 0) and with_empty[16].dtype == torch.bool
    for size, decision in decisions_for_budget(block_logits, (8, 12), 50).items():
        assert torch.equal(with_empty[size], decision)


def test_kept_tokens_break_ties_toward_the_earlier_token():
    batch = PackedBatch.of([4, 3], "cpu")
    scores = torch.tensor([[1.0], [2.0], [2.0], [2.0], [5.0], [5.0], [float("-inf")]])
    keep = keep_topk_per_class(scores, batch, 2)
    assert keep.tolist() == [False, True, True, False, True, True, False]


# Every configuration: its fields, and whether height and width are dynamic too (the policy's partitions are exported
# for one input size, any batch).
CONFIGURATIONS = {
    "dense": (dict(), True),
    "dense + halting by thresholds": (dict(exit_layers=[1], halting=True, exit_thresholds=[0.3]), False),
    # Side 8 has no whole block on the traced 4x6 grid: its empty block grid must not reach the program.
    "token budget + exit keep counts": (dict(partition_source="policy", superpatch_sizes=[1, 2, 4, 8],
                                             token_budget=12, exit_layers=[1], halting=True, exit_keep_tokens=[6]),
                                        False),
    "policy and exit thresholds": (dict(partition_source="policy", superpatch_sizes=[1, 2, 4],
                                        policy_thresholds=[0.5, 0.5], exit_layers=[1], halting=True,
                                        exit_thresholds=[0.3]), False),
}


def export_and_check(name: str, exporter, config_class, tmp_path, dynamic: bool = True) -> None:
    """Export configuration `name`, reload it and compare with eager on inputs it was not traced with: other batch
    sizes (and input sizes where the configuration allows), or with `dynamic=False` other images of the traced
    shape."""
    fields, dynamic_size = CONFIGURATIONS[name]
    torch.manual_seed(0)
    model = StepForSemanticSegmentation(tiny_config(**fields)).eval()
    traced = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    axes = {0: Dim("batch", min=1, max=32)}
    if dynamic_size:
        axes.update({2: Dim.AUTO, 3: Dim.AUTO})
    config = config_class(dynamic_shapes={"pixel_values": axes}) if dynamic else config_class()
    exported = exporter.export(model, {"pixel_values": traced}, config)
    exported.save_pretrained(tmp_path / "exported")
    reloaded = load_exported(tmp_path / "exported")
    if not dynamic:
        unseen = [(2, 64, 96), (2, 64, 96)]
    else:
        unseen = [(3, 64, 96), (1, 64, 96)] + ([(2, 80, 112), (1, 64, 64)] if dynamic_size else [])
    counts = []
    for seed, shape in enumerate(unseen):
        pixels = torch.randn(shape[0], 3, *shape[1:], generator=torch.Generator().manual_seed(10 + seed))
        program, eager = reloaded(pixel_values=pixels), model(pixels)
        torch.testing.assert_close(program.logits, eager.logits, rtol=0, atol=1e-4)
        assert torch.equal(program.token_counts, eager.token_counts)
        counts += program.token_counts.tolist()
        assert torch.equal(program.superpatch_map, eager.superpatch_map)
        if eager.halted_share is not None:
            assert torch.equal(program.exit_map, eager.exit_map)
            torch.testing.assert_close(program.halted_share, eager.halted_share, rtol=0, atol=0)
    if fields.get("policy_thresholds"):  # the graph computed each image's own count
        assert len(set(counts)) > 1


# Every configuration of the models users have, in torch.export, ONNX and OpenVINO: tests/test_export_matrix.py.


# ExecuTorch plans every tensor's memory ahead of the run: one batch and input size, token counts fixed.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["dense", "token budget + exit keep counts"])
def test_the_fixed_count_configurations_export_to_executorch_and_match_eager(name, tmp_path):
    pytest.importorskip("executorch")
    export_and_check(name, exporters.ExecutorchExporter(), exporters.ExecutorchConfig, tmp_path, dynamic=False)


@pytest.mark.parametrize("name", ["dense + halting by thresholds", "policy and exit thresholds"])
def test_executorch_refuses_image_dependent_token_counts_naming_the_settings_that_fix_them(name):
    model = StepForSemanticSegmentation(tiny_config(**CONFIGURATIONS[name][0])).eval()
    with pytest.raises(ValueError, match="ExecuTorch cannot run token counts that depend on the image") as raised:
        export_model(model, "executorch", (64, 96), {})
    assert "exit_keep_tokens" in str(raised.value)
    assert ("token_budget" in str(raised.value)) == ("policy_thresholds" in CONFIGURATIONS[name][0])


def test_a_budget_above_the_stored_grid_exports_for_a_larger_input(tmp_path):
    from step_hf import StepConfig

    torch.manual_seed(0)
    model = StepForSemanticSegmentation(tiny_config(partition_source="policy", superpatch_sizes=[1, 2, 4])).eval()
    exported, settings = export_model(model, "dynamo", (64, 128), {"token_budget": 26})  # stored: 4x4 = 16 cells
    exported.save_pretrained(tmp_path / "out")
    assert StepConfig.from_pretrained(tmp_path / "out").token_budget == 26 == settings["token_budget"]
    pixels = torch.randn(3, 3, 64, 128, generator=torch.Generator().manual_seed(4))
    program, eager = load_exported(tmp_path / "out")(pixel_values=pixels), model(pixels)
    assert program.token_counts.tolist() == eager.token_counts.tolist() == [26, 26, 26]
    torch.testing.assert_close(program.logits, eager.logits, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="exceeds the 4x4 grid of this input"):
        model(torch.randn(1, 3, 64, 64))


def test_the_oracle_partition_refuses_to_export_naming_the_settings_to_change():
    model = StepForSemanticSegmentation(tiny_config(partition_source="oracle", superpatch_sizes=[1, 2])).eval()
    with pytest.raises(Exception, match="oracle") as raised:
        torch.export.export(model, (torch.randn(1, 3, 64, 96),))
    assert "partition_source" in str(raised.value) and "token_budget" in str(raised.value)


@pytest.mark.slow
@pytest.mark.parametrize("export_format", ["dynamo", "executorch"])
def test_the_export_command_writes_the_program_processor_and_readme_running_the_given_settings(export_format,
                                                                                              tmp_path):
    from step_hf import StepImageProcessor
    from step_hf.export import PROGRAM_FILES, main

    if export_format == "executorch":
        pytest.importorskip("executorch")

    torch.manual_seed(0)
    model = StepForSemanticSegmentation(tiny_config(partition_source="policy", superpatch_sizes=[1, 2, 4],
                                                    exit_layers=[1])).eval()
    model.save_pretrained(tmp_path / "model")
    StepImageProcessor(size={"height": 64, "width": 64}).save_pretrained(tmp_path / "model")
    main(["--model_name_or_path", str(tmp_path / "model"), "--format", export_format, "--output_dir",
          str(tmp_path / "out"), "--token_budget", "12", "--exit_keep_tokens", "6", "--halting", "--batch_size", "3"])
    assert (tmp_path / "out" / PROGRAM_FILES[export_format]).is_file()
    assert StepImageProcessor.from_pretrained(tmp_path / "out").size == {"height": 64, "width": 64}
    readme = (tmp_path / "out" / "README.md").read_text()
    assert '"token_budget": 12' in readme
    assert ("a batch of 3, 64x64" if export_format == "executorch" else "any batch, 64x64") in readme
    reloaded = load_exported(tmp_path / "out")
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    program = reloaded(pixel_values=pixels)
    eager = model(pixels, token_budget=12, exit_keep_tokens=[6], halting=True)
    torch.testing.assert_close(program.logits, eager.logits, rtol=0, atol=1e-4)
    assert torch.equal(program.token_counts, eager.token_counts) and torch.equal(program.exit_map, eager.exit_map)


def run_export_command(*args: str) -> subprocess.CompletedProcess:
    """`python -m step_hf.export ARGS` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "step_hf.export", *args], capture_output=True, text=True,
                          timeout=600)


def test_the_export_command_traces_at_the_processors_size_and_keeps_one_export_per_folder(tmp_path):
    """With no --image_size a policy's program is traced at the size the model's processor feeds (its fixed height
    and width, not the stored image_size) and says so; a second export into the same folder is refused unless
    --overwrite, which replaces the folder whole (no stale program beside the new one)."""
    from step_hf import StepImageProcessor
    from step_hf.export import main

    model = tiny_model(partition_source="policy", superpatch_sizes=[1, 2, 4], exit_layers=[1])  # stored 64x64
    model.save_pretrained(tmp_path / "model")
    StepImageProcessor(size={"height": 64, "width": 96}).save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["--model_name_or_path", str(tmp_path / "model"), "--format", "dynamo", "--output_dir", str(out)])
    assert "Tracing dynamo at 64x96 (the processor's fixed size)" in printed.getvalue()
    assert StepImageProcessor.from_pretrained(out).size == {"height": 64, "width": 96}
    pixels = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(load_exported(out)(pixel_values=pixels).logits, model(pixels).logits, rtol=0,
                               atol=1e-4)

    again = run_export_command("--model_name_or_path", str(tmp_path / "model"), "--format", "onnx", "--output_dir",
                               str(out), "--partition_source", "dense")
    assert again.returncode != 0 and "already holds an export: add --overwrite" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1, again.stderr
    main(["--model_name_or_path", str(tmp_path / "model"), "--format", "dynamo", "--output_dir", str(out),
          "--partition_source", "dense", "--overwrite"])
    assert sorted(path.name for path in out.iterdir() if path.name.startswith("model.")) == ["model.pt2"]
    assert json.loads((out / "config.json").read_text())["partition_source"] == "dense"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model", "out"]  # no staging folder left


@pytest.mark.parametrize("flags, words", [
    (["--token_budget", "100"], ["--token_budget 100 does not fit the 4x6 grid of a 64x96 input (24 cells)",
                                 "at most 24"]),
    (["--token_budget", "12", "--exit_keep_tokens", "20", "--halting"], ["--exit_keep_tokens 20",
                                                                          "counts of at most 12"]),
    (["--image_size", "100", "150"], ["--image_size 100 150", "multiples of the patch size 16", "96x144"]),
    (["--policy_thresholds", "0.5"], ["`policy_thresholds` has 1 values"]),
])
def test_the_export_command_refuses_what_cannot_fit_in_one_line_before_tracing(flags, words, tmp_path):
    from step_hf import StepImageProcessor

    tiny_model(partition_source="policy", superpatch_sizes=[1, 2, 4], exit_layers=[1]).save_pretrained(tmp_path / "m")
    StepImageProcessor(size={"height": 64, "width": 96}).save_pretrained(tmp_path / "m")
    result = run_export_command("--model_name_or_path", str(tmp_path / "m"), "--output_dir", str(tmp_path / "out"),
                                *flags)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert all(word in result.stderr for word in words), result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("export_format", ["onnx", "openvino"])
def test_the_demo_models_saved_settings_export_with_no_flags(export_format, tmp_path):
    """The model `scripts/demo.sh` trains, as `examples/train.py` saves it (ViT-Tiny at 128, the scenes' 5 classes,
    the policy's thresholds, halting by exit thresholds, a shortest-edge processor), exported with no flags: traced
    at its image_size, and the program gives eager's outputs."""
    from scenes import SCENE_CLASSES

    from step_hf import StepConfig, StepImageProcessor
    from step_hf.export import main

    id2label = {int(i): name for i, name in SCENE_CLASSES.items()}
    config = StepConfig.from_preset("tiny", image_size=128, id2label=id2label,
                                    label2id={name: i for i, name in id2label.items()})
    config.update_settings(partition_source="policy", halting=True, exit_thresholds=[0.3, 0.3])
    torch.manual_seed(0)
    model = StepForSemanticSegmentation(config).eval()
    model.save_pretrained(tmp_path / "demo")
    StepImageProcessor(size={"shortest_edge": 128}, superpatch_sizes=config.superpatch_sizes,
                       num_labels=5).save_pretrained(tmp_path / "demo")
    main(["--model_name_or_path", str(tmp_path / "demo"), "--format", export_format, "--output_dir",
          str(tmp_path / "out")])
    pixels = torch.randn(3, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    program, eager = load_exported(tmp_path / "out")(pixel_values=pixels), model(pixels)
    torch.testing.assert_close(program.logits, eager.logits, rtol=1e-4, atol=2e-4)
    for name in ("token_counts", "superpatch_map", "exit_map"):
        assert torch.equal(getattr(program, name), getattr(eager, name)), name


@pytest.mark.slow
def test_the_torch_free_example_segments_as_the_pipeline_does(tmp_path):
    """`examples/onnx_segment.py` on the ONNX export of a saved model, run where `import torch` fails, writes the
    pipeline's class map of the image (pixel agreement >= 99.9%)."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image
    from transformers import pipeline

    from step_hf import StepImageProcessor
    from step_hf.export import main as export

    from .conftest import EXAMPLES, tiny_model

    tiny_model().save_pretrained(tmp_path / "model")
    StepImageProcessor(size={"shortest_edge": 64}, num_labels=4).save_pretrained(tmp_path / "model")
    export(["--model_name_or_path", str(tmp_path / "model"), "--format", "onnx", "--output_dir",
            str(tmp_path / "onnx"), "--image_size", "64", "96"])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 110, 3), dtype=np.uint8))
    image.save(tmp_path / "image.png")
    script = (f"import runpy, sys; sys.modules['torch'] = None; sys.argv = {['onnx_segment.py', '--model', str(tmp_path / 'onnx'), '--image', str(tmp_path / 'image.png'), '--output', str(tmp_path / 'classes.png')]!r}; "
              f"runpy.run_path({str(EXAMPLES / 'onnx_segment.py')!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    classes = np.array(Image.open(tmp_path / "classes.png"))
    segments = pipeline("image-segmentation", model=str(tmp_path / "model"))(image)
    expected = np.full(classes.shape, -1)
    for segment in segments:
        expected[np.array(segment["mask"]) > 0] = tiny_model().config.label2id[segment["label"]]
    assert classes.shape == (70, 110) and len(np.unique(classes)) > 1  # a map with borders to get right
    assert (classes == expected).mean() >= 0.999


@pytest.mark.slow
def test_the_int8_onnx_program_runs_with_the_same_tokens_and_close_predictions(tmp_path):
    """`--quantize int8` writes a smaller ONNX program (int8 weights) that ONNX Runtime runs: the static STEP
    configuration's token counts and halted shares are the fp32 program's, and nearly every cell's class too."""
    import onnxruntime

    from step_hf import StepImageProcessor
    from step_hf.export import main as export

    from .conftest import tiny_model

    tiny_model(partition_source="policy", superpatch_sizes=[1, 2, 4], exit_layers=[1], hidden_size=64,
               intermediate_size=128, decoder_hidden_size=64).save_pretrained(tmp_path / "model")
    StepImageProcessor(size={"height": 64, "width": 96}).save_pretrained(tmp_path / "model")
    static = ["--token_budget", "12", "--exit_keep_tokens", "8", "--halting", "--image_size", "64", "96"]
    results, sizes = {}, {}
    pixels = torch.randn(3, 3, 64, 96, generator=torch.Generator().manual_seed(1)).numpy()
    for name, extra in (("fp32", []), ("int8", ["--quantize", "int8"])):
        export(["--model_name_or_path", str(tmp_path / "model"), "--format", "onnx", "--output_dir",
                str(tmp_path / name), *static, *extra])
        folder = tmp_path / name
        sizes[name] = sum(path.stat().st_size for path in folder.glob("model.onnx*"))
        session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
        names = [output.name for output in session.get_outputs()]
        results[name] = dict(zip(names, session.run(None, {session.get_inputs()[0].name: pixels})))
    assert sizes["int8"] < 0.6 * sizes["fp32"]
    for output in ("token_counts", "superpatch_map"):
        assert (results["int8"][output] == results["fp32"][output]).all()
    agreement = (results["int8"]["logits"].argmax(1) == results["fp32"]["logits"].argmax(1)).mean()
    assert agreement >= 0.9
    assert "int8" in (tmp_path / "int8" / "README.md").read_text()


@pytest.mark.slow
def test_an_exported_program_is_measured_on_a_dataset_as_the_eager_model_is(tmp_path, scene_dataset):
    """`python -m step_hf.evaluation` on an ONNX export gives the eager model's mIoU, tokens, halted shares and
    FLOPs under the traced settings: dense with the saved processor, and the static STEP configuration at the traced
    size (to which the exported folder's processor resizes every image)."""
    import json

    from datasets import load_dataset
    from scenes import SCENE_CLASSES
    from torch.utils.data import DataLoader

    from step_hf import StepImageProcessor
    from step_hf.evaluation import EvalTransform, evaluate
    from step_hf.evaluation import main as evaluate_folder
    from step_hf.export import main as export

    from .conftest import tiny_model

    id2label = {int(i): name for i, name in SCENE_CLASSES.items()}
    model = tiny_model(id2label=id2label, label2id={name: i for i, name in id2label.items()},
                       partition_source="policy", superpatch_sizes=[1, 2, 4], exit_layers=[1])
    model.save_pretrained(tmp_path / "model")
    StepImageProcessor(size={"shortest_edge": 64}, superpatch_sizes=[1, 2, 4]).save_pretrained(tmp_path / "model")
    validation = load_dataset(str(scene_dataset), split="validation")
    evaluate_folder(["--model", str(tmp_path / "model"), "--dataset_name", str(scene_dataset), "--output",
                     str(tmp_path / "saved.json")])  # a saved model: its saved settings and processor, in torch
    saved = evaluate(model, DataLoader(EvalTransform(validation, StepImageProcessor.from_pretrained(tmp_path / "model"))))
    assert json.loads((tmp_path / "saved.json").read_text()) == json.loads(json.dumps(saved))
    variants = {"dense": (["--partition_source", "dense"], {"partition_source": "dense"}),
                "static STEP": (["--token_budget", "12", "--exit_keep_tokens", "8", "--halting", "--image_size", "64",
                                 "80"], {"token_budget": 12, "exit_keep_tokens": [8], "halting": True})}
    for name, (flags, settings) in variants.items():
        folder = tmp_path / name
        export(["--model_name_or_path", str(tmp_path / "model"), "--format", "onnx", "--output_dir", str(folder),
                *flags])
        evaluate_folder(["--model", str(folder), "--dataset_name", str(scene_dataset), "--output",
                         str(tmp_path / f"{name}.json")])
        measured = json.loads((tmp_path / f"{name}.json").read_text())
        processor = StepImageProcessor.from_pretrained(folder)
        expected = evaluate(model, DataLoader(EvalTransform(validation, processor)), settings=settings)
        assert measured["tokens_per_image"] == expected["tokens_per_image"]
        assert measured["halted_share"] == pytest.approx(expected["halted_share"], abs=1e-6)
        assert measured["gflops_per_image"] == pytest.approx(expected["gflops_per_image"], rel=1e-9)
        assert measured["mean_iou"] == pytest.approx(expected["mean_iou"], abs=1e-3)
    assert processor.size.height == 64 and processor.size.width == 80  # the static program's one input size
