import numpy as np
import pytest
import torch
from PIL import Image

from step_hf import StepImageProcessor
from step_hf.image_processing_step import window_starts
from step_hf.modeling_step import StepSemanticSegmenterOutput


def rgb(height, width, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def label_map(height, width, num_labels=4, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, num_labels, (height, width), dtype=np.uint8))


def test_pixels_and_labels():
    processor = StepImageProcessor(size={"height": 32, "width": 48})
    labels = np.zeros((20, 30), dtype=np.uint8)
    labels[:, 15:] = 3
    labels[0, 0] = 255
    out = processor([rgb(20, 30), rgb(40, 10)], segmentation_maps=[Image.fromarray(labels), label_map(40, 10)],
                    return_tensors="pt")
    assert out["pixel_values"].shape == (2, 3, 32, 48) and out["pixel_values"].dtype == torch.float32
    assert out["labels"].shape == (2, 32, 48) and out["labels"].dtype == torch.int64
    assert set(out["labels"][0].unique().tolist()) == {0, 3, 255}  # nearest: no blended values
    assert -1.0 <= out["pixel_values"].min() and out["pixel_values"].max() <= 1.0


def test_reduce_labels():
    processor = StepImageProcessor(size={"height": 16, "width": 16}, do_reduce_labels=True)
    labels = np.array([[0, 1], [2, 255]], dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    out = processor(rgb(16, 16), segmentation_maps=Image.fromarray(labels), return_tensors="pt")
    assert out["labels"][0, ::8, ::8].tolist() == [[255, 0], [1, 255]]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA"])
def test_other_image_modes_are_converted(mode):
    image = rgb(16, 16).convert(mode)
    out = StepImageProcessor(size={"height": 16, "width": 16})(image, return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 16, 16)


def test_shortest_edge_keeps_aspect_on_multiples_of_16():
    processor = StepImageProcessor(size={"shortest_edge": 360})
    out = processor(rgb(360, 480), return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 352, 480)


def test_label_errors_name_value_and_image():
    processor = StepImageProcessor(size={"height": 16, "width": 16}, num_labels=4)
    bad = np.zeros((16, 16), dtype=np.uint8)
    bad[3, 3] = 9
    with pytest.raises(ValueError, match="map 1 holds the label value 9"):
        processor([rgb(16, 16), rgb(16, 16)], segmentation_maps=[label_map(16, 16), Image.fromarray(bad)])
    with pytest.raises(ValueError, match="single-channel"):
        processor(rgb(16, 16), segmentation_maps=rgb(16, 16))
    with pytest.raises(ValueError, match="same size"):
        processor(rgb(16, 16), segmentation_maps=label_map(8, 16))
    with pytest.raises(ValueError, match="not a multiple of 16"):
        StepImageProcessor(size={"height": 20, "width": 16})(rgb(16, 16))


def test_window_starts_cover_and_align():
    starts = window_starts(1024, 512, 341, 16)
    assert starts[0] == 0 and starts[-1] == 512 and all(s % 16 == 0 for s in starts)
    assert window_starts(2048, 1024, 682, 16) == [0, 672, 1024]
    assert window_starts(300, 512, 341, 16) == [0]


def test_windows_cut_and_pad():
    processor = StepImageProcessor(size={"height": 64, "width": 160}, window_size=64, window_stride=48)
    out = processor([rgb(64, 160), rgb(10, 10)], segmentation_maps=[label_map(64, 160), label_map(10, 10)],
                    size={"height": 32, "width": 160}, return_tensors="pt")
    offsets = out["window_offsets"].tolist()
    # 32x160 -> rows: one window padded to 64, columns 0/48/96; same for the second image.
    assert offsets == [[i, 0, left, 32, 160] for i in (0, 1) for left in (0, 48, 96)]
    assert out["pixel_values"].shape == (6, 3, 64, 64)
    assert (out["labels"][:, 32:] == 255).all() and (out["labels"][:, :32] != 255).all()


def test_stitching_reproduces_a_global_map():
    """Windows cut from one logit grid, stitched, give that grid back exactly."""
    processor = StepImageProcessor(size={"height": 96, "width": 160}, window_size=64, window_stride=32)
    out = processor([rgb(96, 160), rgb(96, 160, seed=1)], return_tensors="pt")
    global_logits = torch.randn(2, 5, 6, 10)
    windows = torch.stack([
        global_logits[image, :, top // 16:top // 16 + 4, left // 16:left // 16 + 4]
        for image, top, left, _, _ in out["window_offsets"].tolist()
    ])
    outputs = StepSemanticSegmenterOutput(logits=windows, window_offsets=out["window_offsets"])
    stitched = processor.stitch_windows(outputs.logits, outputs.window_offsets)
    for image in range(2):
        torch.testing.assert_close(stitched[image], global_logits[image])
    maps = processor.post_process_semantic_segmentation(outputs, target_sizes=[(96, 160), (48, 80)])
    assert maps[0].shape == (96, 160) and maps[1].shape == (48, 80)


def test_windows_equal_single_pass_when_the_image_fits(model):
    image = rgb(50, 70)
    plain = StepImageProcessor(size={"height": 64, "width": 64})
    windowed = StepImageProcessor(size={"height": 64, "width": 64}, window_size=64)
    with torch.no_grad():
        a = plain.post_process_semantic_segmentation(model(**plain(image, return_tensors="pt")), [(50, 70)])
        inputs = windowed(image, return_tensors="pt")
        assert inputs["window_offsets"].tolist() == [[0, 0, 0, 64, 64]]
        b = windowed.post_process_semantic_segmentation(model(**inputs), [(50, 70)])
    assert torch.equal(a[0], b[0])


def test_post_process_without_target_sizes(model):
    processor = StepImageProcessor(size={"height": 32, "width": 48})
    with torch.no_grad():
        outputs = model(**processor([rgb(20, 20), rgb(30, 30)], return_tensors="pt"))
    maps = processor.post_process_semantic_segmentation(outputs)
    assert [m.shape for m in maps] == [(2, 3), (2, 3)] and maps[0].dtype == torch.int64
    with pytest.raises(ValueError, match="target sizes"):
        processor.post_process_semantic_segmentation(outputs, target_sizes=[(1, 1)])


def test_segmentation_scores_beside_the_maps():
    """`return_segmentation_scores=True`: per image the class map and the scores it is the argmax of, stitched from
    the windows and resized like the map."""
    processor = StepImageProcessor(size={"height": 96, "width": 160}, window_size=64, window_stride=32)
    out = processor([rgb(96, 160), rgb(96, 160, seed=1)], return_tensors="pt")
    windows = torch.randn(len(out["window_offsets"]), 5, 4, 4, generator=torch.Generator().manual_seed(0))
    outputs = StepSemanticSegmenterOutput(logits=windows, window_offsets=out["window_offsets"])
    maps = processor.post_process_semantic_segmentation(outputs, target_sizes=[(96, 160), (48, 80)])
    scored = processor.post_process_semantic_segmentation(outputs, target_sizes=[(96, 160), (48, 80)],
                                                          return_segmentation_scores=True)
    assert len(scored) == 2
    for image, size in enumerate([(96, 160), (48, 80)]):
        assert torch.equal(scored[image].segmentation, maps[image])
        assert scored[image].segmentation_scores.shape == (5, *size)
        assert torch.equal(scored[image].segmentation_scores.argmax(0), maps[image])
    stitched = processor.stitch_windows(windows, out["window_offsets"])  # on the patch grid without target sizes
    unsized = processor.post_process_semantic_segmentation(outputs, return_segmentation_scores=True)
    torch.testing.assert_close(unsized[1].segmentation_scores, stitched[1])


def test_images_with_other_channel_counts_need_as_many_means():
    """A model may take other than 3 channels (`num_channels`): such images pass with one mean and std per channel,
    and are refused, naming both counts, with the RGB defaults."""
    images = [np.random.default_rng(seed).integers(0, 256, (32, 48, 4), dtype=np.uint8) for seed in range(2)]
    processor = StepImageProcessor(size={"height": 32, "width": 48}, do_convert_rgb=False,
                                   input_data_format="channels_last")  # older transformers guess 1 or 3 only
    out = processor(images, image_mean=[0.5] * 4, image_std=[0.5] * 4, return_tensors="pt")
    assert out["pixel_values"].shape == (2, 4, 32, 48)
    with pytest.raises(ValueError, match="Image 0 has 4 channels but `image_mean` has 3 values"):
        processor(images, return_tensors="pt")
    assert processor(images, do_normalize=False, return_tensors="pt")["pixel_values"].shape == (2, 4, 32, 48)


def test_save_and_reload(tmp_path):
    processor = StepImageProcessor(size={"height": 32, "width": 32}, window_size=32, num_labels=4)
    processor.save_pretrained(tmp_path)
    loaded = StepImageProcessor.from_pretrained(tmp_path)
    assert loaded.window_size == 32 and loaded.num_labels == 4 and loaded.size == processor.size


def test_input_sizing_is_the_processors_size_with_windows_only_for_a_larger_input():
    from step_hf import input_sizing

    processor = StepImageProcessor(size={"shortest_edge": 64})
    own = input_sizing(processor, 360, 480)
    assert (own.resized, own.window, own.overrides, own.input_size) == ((64, 80), None, {}, (64, 80))
    assert input_sizing(processor, 360, 480, 64) == own  # the processor's own side is its own sizing
    larger = input_sizing(processor, 360, 480, 128)
    assert larger.resized == (128, 176) and larger.input_size == (64, 64)
    pixels = processor(rgb(360, 480), **larger.overrides, return_tensors="pt")["pixel_values"]
    assert pixels.shape[-2:] == (64, 64) and len(pixels) == 6  # 2 rows x 3 columns of windows
    assert input_sizing(processor, 360, 480, 32).input_size == (32, 48)  # smaller: resized, whole
    with pytest.raises(ValueError, match="multiple of 16"):
        input_sizing(processor, 360, 480, 100)


def test_every_tool_sizes_a_frame_by_the_same_rule(tmp_path):
    """The pipeline, examples/segment.py, the demo app and evaluation feed the model the same input for one frame:
    the processor's own size (a shorter side of 64: 64x80 for 360x480), one input, no windows."""
    import subprocess
    import sys

    from transformers import pipeline

    from step_hf.evaluation import EvalTransform

    from .conftest import EXAMPLES, tiny_model

    model = tiny_model(partition_source="policy", halting=True)
    processor = StepImageProcessor(size={"shortest_edge": 64})
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    frame = rgb(360, 480)
    frame.save(tmp_path / "frame.png")
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(tuple(kwargs["pixel_values"].shape)),
                                    with_kwargs=True)

    pipeline("image-segmentation", model=model, image_processor=processor)(frame)
    sample = EvalTransform([{"image": frame, "label": Image.new("L", frame.size)}], processor)[0]
    assert seen == [(1, 3, 64, 80)] and sample["pixel_values"].shape == (3, 64, 80)

    result = subprocess.run([sys.executable, str(EXAMPLES / "segment.py"), "--model_name_or_path", str(tmp_path / "m"),
                             "--image", str(tmp_path / "frame.png"), "--output", str(tmp_path / "seg.png")],
                            capture_output=True, text=True, timeout=600)
    assert "resized to 64x80, 1 model input(s) of 64x80" in result.stdout, result.stderr[-3000:]

    pytest.importorskip("gradio")
    sys.path.insert(0, str(EXAMPLES.parent / "spaces" / "step-demo"))
    import app

    numbers = app.segment(app.LoadedModel("m", model, processor), frame, app.Controls()).numbers
    assert numbers["windows"] == 1 and numbers["window_size"] == [64, 80]
