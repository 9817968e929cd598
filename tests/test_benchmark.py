import json

from step_hf import benchmark


def test_benchmark_ladder_runs_on_real_images_and_reports_everything(tmp_path, scene_dataset, capsys):
    output = tmp_path / "bench.json"
    benchmark.main(["--preset", "tiny", "--image_size", "64", "--batch_size", "2", "--num_batches", "2",
                    "--repeats", "1", "--warmup", "1", "--dataset_name", str(scene_dataset),
                    "--output", str(output)])
    table = capsys.readouterr().out
    rows = json.loads(output.read_text())["rows"]
    variants = [row["variant"] for row in rows]
    assert variants[:3] == ["dense", "transformers ViTModel + decoder", "dCTS"]
    assert variants[3].startswith("dCTS + exits") and variants[4].startswith("dCTS budget")
    assert rows[0]["speedup"] == 1.0 and rows[0]["tokens_mean"] == 16
    assert rows[2]["tokens_mean"] < 16 and rows[2]["policy_gflops_per_image"] > 0  # scenes have uniform areas
    assert rows[4]["tokens_min"] == rows[4]["tokens_max"]  # a budget: the same count for every image
    assert all(row["ms_per_image"] > 0 and row["gflops_per_image"] > 0 for row in rows)
    assert "| dense |" in table and "speed-up vs dense" in table
