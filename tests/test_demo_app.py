"""spaces/step-demo/app.py: started by its one command on 127.0.0.1, driven through its API (gradio_client) and in
headless Chromium (Debian's chromium and chromedriver, through Selenium), on a STEP model trained for a few steps
on the built-in scenes. Skipped where gradio (`pip install -e ".[demo]"`), or Selenium and the browser
(`pip install selenium`; `apt-get install chromium chromium-driver`), are absent."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from step_hf.superpatch import budget_token_count

from .conftest import EXAMPLES

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

SPACE = EXAMPLES.parent / "spaces" / "step-demo"


@pytest.fixture(scope="module")
def trained_model(tmp_path_factory, scene_dataset) -> Path:
    """ViT-Tiny STEP trained through its three stages for a few steps at 128 pixels (a shorter side of 128): what the
    README's demo command makes, in seconds."""
    folder = tmp_path_factory.mktemp("demo-model") / "model"
    command = [sys.executable, str(EXAMPLES / "train.py"), "--dataset_name", str(scene_dataset), "--image_size", "128",
               "--policy_steps", "2", "--segmenter_steps", "4", "--prune_steps", "2", "--max_eval_samples", "1",
               "--per_device_train_batch_size", "4", "--learning_rate", "5e-4", "--prune_learning_rate", "1e-4",
               "--drop_path_rate", "0", "--checkpointing_steps", "0", "--output_dir", str(folder)]
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


# One torch thread unless told otherwise: on a busy 2-core machine more threads spin against each other (tens of times
# slower); the app serves several requests at once anyway.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained_model, tmp_path_factory) -> str:
    """The app as its one command starts it; the local URL it prints."""
    port = free_port()
    env = {**ENV, "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio"))}
    process = subprocess.Popen([sys.executable, str(SPACE / "app.py"), "--model", str(trained_model), "--port",
                                str(port), "--no_camvid"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True).start()
    deadline = time.monotonic() + 240
    while not any("Running on local URL" in line for line in lines):
        assert process.poll() is None and time.monotonic() < deadline, "".join(lines)[-3000:]
        time.sleep(0.5)
    url = re.search(r"Running on local URL:\s+(\S+)", "".join(lines))[1]
    assert url.rstrip("/") == f"http://127.0.0.1:{port}"
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server, verbose=False, httpx_kwargs={"timeout": 300})


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    from scenes import make_scene

    path = tmp_path_factory.mktemp("scene") / "scene.png"
    make_scene(192, 256, seed=3)[0].save(path)  # at the processor's shorter side of 128: one 128x176 input
    return path


def submit(client, image: Path, **controls):
    """One request through the API, sent; `.result()` waits for it."""
    controls = {"partition": "policy thresholds", "policy_threshold": 0.5, "token_budget_percent": 50,
                "halting": True, "shortest_side": 128, **{f"exit_threshold_{i + 1}": 0.9 for i in range(4)},
                **controls}
    return client.submit(gradio_client.handle_file(str(image)), api_name="/segment", **controls)


def segment(client, image: Path, **controls) -> dict:
    """One request through the API; its numbers, with its three pictures opened."""
    *pictures, markdown, numbers = submit(client, image, **controls).result()
    numbers["pictures"] = [Image.open(path).convert("RGB") for path in pictures]
    numbers["markdown"] = markdown
    return numbers


def exit_layers(model_folder: Path) -> list[int]:
    return json.loads((model_folder / "config.json").read_text())["exit_layers"]


def test_the_api_controls_move_tokens_flops_and_halting(client, scene, trained_model):
    # Policy thresholds, halting off: higher keeps more tokens and costs more; dense keeps every cell.
    runs = [segment(client, scene, policy_threshold=t, halting=False) for t in (0.05, 0.5, 0.95)]
    dense = segment(client, scene, partition="dense", halting=False)
    tokens = [run["tokens"] for run in runs]
    assert tokens == sorted(tokens) and tokens[0] < tokens[-1] <= dense["tokens"] == dense["dense_tokens"]
    gflops = [run["gflops"] for run in runs]
    assert gflops == sorted(gflops) and gflops[0] < gflops[-1]
    assert runs[-1]["settings"]["policy_thresholds"] == [0.95] * 4 and not runs[-1]["settings"]["halting"]
    # The processor's own sizing (a shorter side of 128): one 128x176 input; windows only for a larger input.
    assert dense["windows"] == 1 and dense["window_size"] == [128, 176] and dense["halted_share"] == {}
    larger = segment(client, scene, partition="dense", halting=False, shortest_side=192)
    assert larger["windows"] == 4 and larger["window_size"] == [128, 128]

    # A token budget fixes the count: a share of each window's cells, as the superpatch quadtree can reach it.
    cells = 128 // 16 * 176 // 16
    for percent in (25, 75):
        run = segment(client, scene, partition="token budget", token_budget_percent=percent, halting=False)
        assert run["tokens"] == run["windows"] * budget_token_count(cells, round(percent / 100 * cells))

    # Exit thresholds: nothing is more confident than 1.0; at 0.05 the first exit halts tokens and FLOPs fall.
    never = segment(client, scene, partition="dense", exit_threshold_1=1.0, exit_threshold_2=1.0)
    eager = segment(client, scene, partition="dense", exit_threshold_1=0.05, exit_threshold_2=0.05)
    first, second = exit_layers(trained_model)
    assert list(never["halted_share"]) == [f"block {first}", f"block {second}"]
    assert set(never["halted_share"].values()) == {0.0}
    assert eager["halted_share"][f"block {first}"] > 0 and eager["gflops"] < never["gflops"]
    assert "exit thresholds 0.05 / 0.05" in eager["markdown"]

    # The pictures: drawn at the image's aspect, each with its title strip and legend below.
    for picture in eager["pictures"]:
        assert picture.width == 256 and picture.height > 192
    assert (np.asarray(eager["pictures"][2]) == (230, 25, 75)).all(-1).any()  # the first exit's legend swatch


def test_requests_at_once_each_run_with_their_own_settings(client, server, scene):
    alone = {t: segment(client, scene, policy_threshold=t, halting=False)["tokens"] for t in (0.05, 0.95)}
    assert alone[0.05] != alone[0.95]
    # Numbers only: requests with the same settings draw the same pictures, which Gradio caches under one name, and
    # downloading one while another request writes it again can break off.
    numbers_only = gradio_client.Client(server, verbose=False, download_files=False, httpx_kwargs={"timeout": 300})
    thresholds = [0.05, 0.95] * 3
    jobs = [submit(numbers_only, scene, policy_threshold=t, halting=False) for t in thresholds]  # queued at once
    for threshold, job in zip(thresholds, jobs):
        numbers = job.result()[-1]
        assert numbers["tokens"] == alone[threshold] and numbers["settings"]["policy_thresholds"] == [threshold] * 4


def test_bad_uploads_get_a_message(client, scene, tmp_path):
    with pytest.raises(gradio_client.exceptions.AppError, match=r"Cannot load the model .*missing-model"):
        segment(client, scene, model=str(tmp_path / "missing-model"))
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"this is text, not a picture")
    with pytest.raises(gradio_client.exceptions.AppError, match=r"notes\.png cannot be read as an image"):
        segment(client, not_an_image)
    huge = tmp_path / "huge.png"
    Image.new("RGB", (6000, 4500)).save(huge)  # 27 MP, a small file
    with pytest.raises(gradio_client.exceptions.AppError, match=r"^The image is 6000x4500 pixels .*up to 25 MP"):
        segment(client, huge)
    truncated = tmp_path / "truncated.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])  # the header, then nothing
    with pytest.raises(gradio_client.exceptions.AppError, match=r"truncated\.png cannot be read as an image"):
        segment(client, truncated)


browser_missing = not (shutil.which("chromium") and shutil.which("chromedriver"))


@pytest.mark.skipif(browser_missing, reason="Debian's chromium and chromium-driver are not installed")
def test_in_a_real_browser(server, scene, trained_model, tmp_path):
    pytest.importorskip("selenium")
    sys.path.insert(0, str(SPACE))
    import browser

    driver = browser.start_chromium(str(tmp_path / "profile"))
    try:
        driver.get(server)
        browser.WebDriverWait(driver, 60).until(
            lambda d: d.find_elements(browser.By.CSS_SELECTOR, "#image input[type=file]"))
        # One exit-threshold slider per exit of the model, no more.
        shown = [i for i in range(4) if any(element.is_displayed() for element in
                                            driver.find_elements(browser.By.ID, f"exit_threshold_{i}"))]
        assert shown == list(range(len(exit_layers(trained_model))))
        browser.upload(driver, scene)
        first = browser.wait_for_numbers(driver)
        assert 0 < first["tokens"] <= first["dense_tokens"]
        outputs = ["overlay", "superpatches", "exits"]
        browser.WebDriverWait(driver, 30).until(lambda d: all(browser.images_rendered(d, outputs).values()))
        assert set(browser.images_rendered(driver, outputs).values()) == {256}

        # Halting off, then the policy threshold dragged from its lowest to its highest: more tokens, more FLOPs.
        driver.find_element(browser.By.CSS_SELECTOR, "#halting input[type=checkbox]").click()
        browser.wait_for_numbers(driver, ran_with="halting off")
        browser.move_slider(driver, "policy_threshold", "min")
        low = browser.wait_for_numbers(driver, ran_with="policy thresholds 0.05")
        browser.move_slider(driver, "policy_threshold", "max")
        high = browser.wait_for_numbers(driver, ran_with="policy thresholds 0.95")
        assert high["tokens"] > low["tokens"] and high["gflops"] > low["gflops"]

        # Halting on, then the first exit's threshold dragged down: more tokens halt there, fewer FLOPs.
        driver.find_element(browser.By.CSS_SELECTOR, "#halting input[type=checkbox]").click()
        before = browser.wait_for_numbers(driver, ran_with="exit thresholds")
        browser.move_slider(driver, "exit_threshold_0", "min")
        after = browser.wait_for_numbers(driver, ran_with="exit thresholds 0.05")
        first = exit_layers(trained_model)[0]
        assert after["halted_share"][first] > before["halted_share"][first] and after["gflops"] < before["gflops"]
        assert all(browser.images_rendered(driver, outputs).values())

        # A file that is not an image: a message in the page, and the page still works.
        (tmp_path / "notes.png").write_bytes(b"this is text, not a picture")
        browser.upload(driver, tmp_path / "notes.png")
        browser.WebDriverWait(driver, 60).until(
            lambda d: "cannot be read as an image" in d.find_element(browser.By.TAG_NAME, "body").text)
        assert "Traceback" not in driver.find_element(browser.By.TAG_NAME, "body").text
    finally:
        driver.quit()


def raw_request(server: str, image: Path, model: Path, **controls) -> str:
    """One request by plain HTTP, its JSON written by Python (which writes NaN, as gradio_client will not); the
    answer's event stream."""
    import httpx

    controls = {"partition": "policy thresholds", "policy_threshold": 0.5, "token_budget_percent": 50,
                "halting": True, "shortest_side": 128, **{f"exit_threshold_{i + 1}": 0.9 for i in range(4)},
                **controls}
    with open(image, "rb") as f:
        uploaded = httpx.post(f"{server}/gradio_api/upload", files={"files": f}, timeout=60).json()[0]
    order = ["partition", "policy_threshold", "token_budget_percent", "halting", "shortest_side",
             *(f"exit_threshold_{i + 1}" for i in range(4))]
    data = [{"path": uploaded, "meta": {"_type": "gradio.FileData"}}, str(model), *(controls[k] for k in order)]
    event = httpx.post(f"{server}/gradio_api/call/segment", content=json.dumps({"data": data}),
                       headers={"content-type": "application/json"}, timeout=60).json()["event_id"]
    return httpx.get(f"{server}/gradio_api/call/segment/{event}", timeout=300).text


def test_a_checkbox_sent_as_a_string_is_read_as_meant(client, scene):
    """An API client may send the halting checkbox as "false": halting is then off (not `bool("false")`)."""
    off = segment(client, scene, halting="false")
    assert off["settings"]["halting"] is False and off["halted_share"] == {}
    with pytest.raises(gradio_client.exceptions.AppError, match="halting checkbox must be true or false, got 'maybe'"):
        segment(client, scene, halting="maybe")


def test_a_slider_sent_as_nan_is_refused_by_its_control(server, scene, trained_model):
    """NaN for a slider is refused naming the control, not as "cannot convert float NaN to integer"."""
    for control, name in [("token_budget_percent", "token budget"), ("shortest_side", "shorter side"),
                          ("policy_threshold", "policy threshold"), ("exit_threshold_1", "exit threshold 1")]:
        answer = raw_request(server, scene, trained_model, partition="token budget", **{control: float("nan")})
        assert re.search(f"The {name}.* must be a finite number, got nan", answer), answer[-1000:]


def test_a_16_bit_upload_is_read_as_the_processor_reads_it(client, scene, tmp_path):
    """A 16-bit greyscale PNG gives the numbers and pictures of its 8-bit image (not one clipped to white)."""
    grey = np.asarray(Image.open(scene).convert("L"))
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "grey16.png")  # PIL mode 'I;16'
    Image.fromarray(grey).convert("RGB").save(tmp_path / "grey8.png")
    sixteen = segment(client, tmp_path / "grey16.png", halting=False)
    eight = segment(client, tmp_path / "grey8.png", halting=False)
    assert sixteen["tokens"] == eight["tokens"]
    assert [p.tobytes() for p in sixteen["pictures"]] == [p.tobytes() for p in eight["pictures"]]


def test_a_large_upload_of_any_mode_is_refused_from_its_header(client, tmp_path):
    """Above 25 MP, whatever the mode: refused before anything decodes it. The files are cut short after the header,
    so any decoding would fail instead of giving the size message."""
    for mode in ("RGB", "L", "P", "I;16", "RGBA", "1"):
        path = tmp_path / f"huge_{mode.replace(';', '')}.png"
        Image.new(mode, (6000, 4500)).save(path)  # 27 MP
        data = path.read_bytes()
        path.write_bytes(data[:data.index(b"IDAT") + 64])  # the header, then the start of the pixels
        with pytest.raises(gradio_client.exceptions.AppError, match=r"^The image is 6000x4500 pixels .*up to 25 MP"):
            segment(client, path)
