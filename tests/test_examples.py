import json
import os
import subprocess
import sys

from .conftest import EXAMPLES


def run_example(script, *args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout




def test_dcts_tokens_trains_the_policy_and_sweeps_thresholds(tmp_path, scene_dataset):
    out = run_example(
        "dcts_tokens.py", "--dataset_name", scene_dataset, "--image_size", 64, "--train_steps", 4,
        "--batch_size", 2, "--thresholds", 0.9, 0.5, 0.1, "--output_dir", tmp_path / "dcts", cwd=tmp_path,
    )
    results = json.loads((tmp_path / "dcts" / "results.json").read_text())
    assert results["grid_cells"] == 16 and results["train_steps"] == 4
    counts = [results["policy"][t]["tokens_mean"] for t in ("0.9", "0.5", "0.1")]
    assert counts == sorted(counts, reverse=True) and all(1 <= c <= 16 for c in counts)
    assert 1 <= results["oracle"]["tokens_mean"] <= 16
    assert "| oracle |" in out
