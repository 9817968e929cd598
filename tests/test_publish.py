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


FAULTY_HUB_SCRIPT = textwrap.dedent(
    """
    import shlex, sys
    from step_hf import StepConfig, StepForSemanticSegmentation
    from step_hf.hub import HubError, hub_timeout, main, push_folder
    folder, repo = sys.argv[1], sys.argv[2]
    model = StepForSemanticSegmentation(StepConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                   intermediate_size=64, image_size=32, num_labels=2))
    def failure(push):
        try:
            push()
        except HubError as error:
            return str(error)
    def push_model():
        with hub_timeout(repo_id=repo, doing="push to"):
            model.push_to_hub(repo)
    print("silent:", failure(lambda: push_folder(folder, repo, ["checkpoints/*"])))
    print("silent push_to_hub:", failure(push_model))
    dropped = failure(lambda: push_folder(folder, repo, ["checkpoints/*"]))
    print("dropped:", dropped)
    retry = shlex.split(dropped.split("uploading again is safe: ")[1])
    print("retry:", retry)
    main(retry[3:])  # the command the error gives, run as `python -m step_hf.hub` runs it
    """
)


def test_hub_waits_are_bounded_and_failures_name_the_repo_and_host(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "step"}')
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# model\n")  # validated by the Hub on upload
    before = files_under(folder)
    # The Hub accepts the connection and never answers (twice), then drops the connection in the middle of an
    # upload (the metadata check of the commit, a request huggingface_hub does not retry), then is back.
    faults = [("create_repo", "stall"), ("create_repo", "stall"), ("validate_yaml", "drop")]
    with HubServer(faults=faults) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test_token", "HF_HOME": str(tmp_path / "hf_home"),
               "HF_HUB_OFFLINE": "0", "STEP_HF_HUB_TIMEOUT": "1"}
        result = run("pushes to a faulty Hub", ["-c", FAULTY_HUB_SCRIPT, folder, REPO_ID], env, cwd=tmp_path)
        pushed = files_under(hub.repo_folder(REPO_ID))
        assert not hub.faults and not hub.unhandled, (hub.faults, hub.unhandled)
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    silent = f"Could not upload to the Hub repository {REPO_ID} at {hub.url}: no answer within 1 s"
    assert lines["silent"].startswith(silent), lines
    assert lines["silent push_to_hub"].startswith(f"Could not push to the Hub repository {REPO_ID} at {hub.url}: no "
                                                  "answer within 1 s"), lines
    assert lines["dropped"].startswith(f"Could not upload to the Hub repository {REPO_ID} at {hub.url}: the "
                                       "connection failed or dropped (RemoteProtocolError: Server disconnected"), lines
    assert f"The local folder {folder} is complete and unchanged" in lines["dropped"]
    assert lines["retry"] == str(["python", "-m", "step_hf.hub", str(folder), REPO_ID, "--exclude", "checkpoints/*"])
    assert f"pushed {folder} to {REPO_ID}" in result.stdout
    assert files_under(folder) == before and pushed == before


def test_train_push_to_hub_with_a_silent_hub_stops_before_training(tmp_path):
    output_dir = tmp_path / "run"
    with HubServer(faults=[("create_repo", "stall")]) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_test_token", "HF_HOME": str(tmp_path / "hf_home"),
               "HF_HUB_OFFLINE": "0", "STEP_HF_HUB_TIMEOUT": "1"}
        result = subprocess.run([sys.executable, str(EXAMPLES / "train.py"), "--output_dir", str(output_dir),
                                 "--push_to_hub", "--hub_model_id", REPO_ID], env=env, capture_output=True, text=True,
                                timeout=300, cwd=tmp_path)
    assert result.returncode != 0
    assert f"cannot create or reach the Hub repository {REPO_ID} at {hub.url} (no answer within 1 s" in result.stderr, \
        result.stderr[-2000:]
    assert not (output_dir / "checkpoints").exists()
