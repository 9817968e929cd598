"""Publishing end to end: `examples/train.py --push_to_hub` against a local Hub stand-in (tests/hub_server.py), then
`from_pretrained` and `pipeline` from that Hub in a process where `step_hf` cannot be imported."""

import json
import os
import subprocess
import sys
import textwrap

from .conftest import EXAMPLES
from .hub_server import HubServer

REPO_ID = "org/step-vit-large"

LOAD_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["step_hf"] = None  # any `import step_hf` now fails: only the pushed code may be used
    import json
    import numpy as np
    from huggingface_hub import HfApi, hf_hub_download
    from PIL import Image
    from transformers import AutoModel, AutoModelForSemanticSegmentation, pipeline
    repo = sys.argv[1]
    encoder = AutoModel.from_pretrained(repo, trust_remote_code=True)
    model = AutoModelForSemanticSegmentation.from_pretrained(repo, trust_remote_code=True)
    segmenter = pipeline("image-segmentation", model=repo, trust_remote_code=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8))
    segments = segmenter(image)
    info = HfApi().model_info(repo)
    print(json.dumps({
        "classes": [type(x).__name__ for x in (encoder, model, segmenter.model, segmenter.image_processor)],
        "modules": sorted({type(x).__module__.split(".")[0] for x in (encoder, model, segmenter.model)}),
        "image_size": list(image.size),
        "segments": [{"keys": sorted(s), "label": s["label"], "mask_size": list(s["mask"].size)} for s in segments],
        "files": sorted(s.rfilename for s in info.siblings),
        "pipeline_tag": info.pipeline_tag,
        "readme": open(hf_hub_download(repo, "README.md")).read(),
    }))
    """
)


def run(what, args, env, cwd):
    result = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{what} failed:\n{result.stderr[-3000:]}"
    return result


def files_under(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_train_push_to_hub_then_load_without_step_hf(tmp_path):
    output_dir = tmp_path / "run"
    # A checkpoint left by an earlier run in the same folder: the push must leave it out.
    stale = output_dir / "checkpoints" / "2-prune-0000001"
    stale.mkdir(parents=True)
    (stale / "trainer_state.json").write_text("{}")

    with HubServer() as hub:
        # huggingface_hub reads these when imported, hence subprocesses (this process is offline).
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test_token",
               "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "0"}
        train = run("train.py --push_to_hub", [
            EXAMPLES / "train.py", "--output_dir", output_dir, "--image_size", 64, "--policy_steps", 2,
            "--segmenter_steps", 2, "--prune_steps", 1, "--checkpointing_steps", 0, "--max_train_samples", 16,
            "--max_eval_samples", 2, "--per_device_train_batch_size", 4, "--push_to_hub", "--hub_model_id", REPO_ID,
        ], env, cwd=EXAMPLES.parent)
        assert f"pushed {output_dir} to {REPO_ID}" in train.stdout, train.stdout[-2000:]

        local, pushed = files_under(output_dir), files_under(hub.repo_folder(REPO_ID))
        assert set(pushed) == {name for name in local if not name.startswith("checkpoints/")}, sorted(pushed)
        changed = [name for name in pushed if pushed[name] != local[name]]
        assert not changed, f"pushed bytes differ from {output_dir}: {changed}"

        load = run("loading from the Hub without step_hf", ["-c", LOAD_SCRIPT, REPO_ID], env, cwd=tmp_path)
        assert not hub.unhandled, f"requests the Hub stand-in could not answer: {hub.unhandled}"

    summary = json.loads(load.stdout.strip().splitlines()[-1])
    assert summary["classes"] == ["StepModel", "StepForSemanticSegmentation", "StepForSemanticSegmentation",
                                  "StepImageProcessor"]
    assert summary["modules"] == ["transformers_modules"], summary["modules"]
    assert summary["segments"], "the pipeline found no segment"
    for segment in summary["segments"]:
        assert segment["keys"] == ["label", "mask", "score"] and segment["mask_size"] == summary["image_size"], segment
    files = set(summary["files"])
    code = {"configuration_step.py", "modeling_step.py", "image_processing_step.py", "superpatch.py", "exits.py",
            "fast_ops.py", "token_layout.py"}
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md", *code} <= files, files
    assert not [name for name in files if name.startswith("checkpoints/")], files
    assert summary["pipeline_tag"] == "image-segmentation"
    assert "pipeline_tag: image-segmentation" in summary["readme"] and "model-index" in summary["readme"]


VIT_FROM_HUB = textwrap.dedent(
    """
    import sys, json, torch
    from huggingface_hub import HfApi
    from transformers import ViTConfig, ViTModel
    from step_hf import StepConfig, StepModel, load_vit_weights
    folder, repo = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=16), add_pooling_layer=False).eval()
    vit.save_pretrained(folder)
    HfApi().create_repo(repo, exist_ok=True)
    HfApi().upload_folder(repo_id=repo, folder_path=folder)
    step = StepModel(StepConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                image_size=32, layer_norm_eps=1e-12, num_labels=2)).eval()
    load_vit_weights(step, repo)  # a Hub id: model.safetensors and config.json come from the Hub
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        difference = (vit(x).last_hidden_state - step(x, partition_source="dense").last_hidden_state).abs()
    print(json.dumps({"max_difference": float(difference.max())}))
    """
)


def test_load_vit_weights_from_a_hub_id(tmp_path):
    with HubServer() as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test_token",
               "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "0"}
        result = run("load_vit_weights from a Hub id", ["-c", VIT_FROM_HUB, tmp_path / "vit", "google/vit-tiny-test"],
                     env, cwd=tmp_path)
        assert not hub.unhandled, hub.unhandled
    assert json.loads(result.stdout.strip().splitlines()[-1])["max_difference"] < 1e-5
