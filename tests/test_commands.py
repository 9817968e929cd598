"""What every command shares: a refused input is one line on stderr and exit status 2 (`step_hf.cli`), the main
job installs nothing outside .venv, and the built-in scenes written as a dataset evaluate as training measured them."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from step_hf import StepImageProcessor
from step_hf.cli import UserError, run_command

from .conftest import EXAMPLES, tiny_model

REPO = Path(__file__).resolve().parent.parent


def run(*command, cwd):
    return subprocess.run([sys.executable, *map(str, command)], cwd=cwd, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=600)


def scripts_run_by(script: str) -> set[str]:
    """`script` and every script it runs with `bash scripts/...`, followed through."""
    found, todo = set(), [script]
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo += re.findall(r"bash (scripts/\S+\.sh)", (REPO / name).read_text())
    return found


def test_the_main_job_installs_nothing_outside_the_venv():
    for script in scripts_run_by("scripts/demo.sh"):
        text = (REPO / script).read_text()
        assert "apt-get" not in text and "install_browser" not in text, script
    assert "scripts/install_browser.sh" in scripts_run_by("scripts/test.sh")  # the test command brings the browser


def test_run_command_says_a_user_error_in_one_line_with_status_2(capsys):
    def refuses(argv):
        raise UserError(f"--flag {argv[0]} is refused:\n  use another value")

    with pytest.raises(SystemExit) as exited:
        run_command(refuses, ["x"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: --flag x is refused:; use another value\n"
    with pytest.raises(KeyError):  # a bug keeps its traceback
        run_command(lambda: {}["missing"])


def test_evaluation_names_a_class_mismatch_in_one_line(tmp_path, scene_dataset):
    tiny_model().save_pretrained(tmp_path / "m")  # 4 classes; the scenes have 5
    StepImageProcessor(size={"shortest_edge": 64}, num_labels=4).save_pretrained(tmp_path / "m")
    result = run("-m", "step_hf.evaluation", "--model", tmp_path / "m", "--dataset_name", scene_dataset, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {tmp_path / 'm'} predicts 4 classes (road, sky, car, tree) but")
    assert "labels 5 (sky, building, road, tree, car)" in line and "examples/data.py --output_dir" in line


def test_the_built_in_scenes_written_as_a_dataset_evaluate(tmp_path):
    from scenes import SCENE_CLASSES

    run(EXAMPLES / "data.py", "--output_dir", tmp_path / "scenes", cwd=tmp_path).check_returncode()
    assert json.loads((tmp_path / "scenes" / "id2label.json").read_text()) == {str(k): v for k, v in
                                                                                SCENE_CLASSES.items()}
    tiny_model(id2label=SCENE_CLASSES, label2id={v: k for k, v in SCENE_CLASSES.items()}).save_pretrained(
        tmp_path / "m")
    StepImageProcessor(size={"shortest_edge": 64}, num_labels=5).save_pretrained(tmp_path / "m")
    result = run("-m", "step_hf.evaluation", "--model", tmp_path / "m", "--dataset_name", tmp_path / "scenes",
                 "--max_samples", 2, "--output", tmp_path / "results.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 images: mIoU" in result.stdout
    assert set(json.loads((tmp_path / "results.json").read_text())["per_category_iou"]) == set(SCENE_CLASSES.values())


def test_every_declared_dependency_is_imported():
    import tomllib

    modules = {"pillow": "PIL", "huggingface-hub": "huggingface_hub"}
    code = "\n".join(path.read_text() for folder in ("step_hf", "examples") for path in (REPO / folder).glob("*.py"))
    for requirement in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement)[0]
        module = modules.get(name, name)
        assert re.search(rf"^\s*(import|from) {module}\b", code, re.MULTILINE), f"{name} is declared but not imported"
