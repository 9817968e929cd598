"""Drive the app in headless Chromium (Debian's `chromium` and `chromedriver`, through Selenium): what the browser
test does, and the README's screenshot.

    python spaces/step-demo/browser.py --model outputs/demo --output docs/figures/demo_app.png

serves the app on 127.0.0.1 (built-in scenes only), uploads a scene, waits for its results and saves a screenshot of
the whole page.
"""

import argparse
import re
import tempfile
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Chromium's own network traffic (updates, sync, safe browsing) off: the page is all it loads.
QUIET_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync")


def start_chromium(user_data_dir: str, width: int = 1400, height: int = 1500) -> webdriver.Chrome:
    """Headless Chromium with a fresh profile in `user_data_dir`."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*QUIET_FLAGS, f"--user-data-dir={user_data_dir}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def numbers(driver: webdriver.Chrome) -> dict:
    """The numbers the page shows (its numbers list), parsed; {} before the first result."""
    text = driver.find_element(By.ID, "numbers").text
    tokens = re.search(r"tokens per image: (\d+) of (\d+)", text)
    if tokens is None:
        return {}
    ran = re.search(r"ran with: (.*)", text)
    return {
        "tokens": int(tokens[1]), "dense_tokens": int(tokens[2]),
        "gflops": float(re.search(r"GFLOPs: ([\d.]+)", text)[1]),
        "halted_share": {int(layer): float(share) / 100
                         for layer, share in re.findall(r"block (\d+): ([\d.]+)%", text)},
        "ran_with": ran[1].strip() if ran else "",
    }


def wait_for_numbers(driver: webdriver.Chrome, ran_with: str | None = None, timeout: float = 120) -> dict:
    """The page's numbers once a result is shown, and (with `ran_with`) once its settings line contains that text."""
    WebDriverWait(driver, timeout).until(
        lambda d: numbers(d) and (ran_with is None or ran_with in numbers(d)["ran_with"]))
    return numbers(driver)


def upload(driver: webdriver.Chrome, path: str) -> None:
    driver.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(Path(path).resolve()))


def move_slider(driver: webdriver.Chrome, elem_id: str, to: str) -> None:
    """Click a slider's track at its left (`to="min"`) or right (`"max"`) end, as a user drags it there."""
    track = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} input[type=range]")
    offset = track.size["width"] // 2 - 2
    ActionChains(driver).move_to_element_with_offset(track, -offset if to == "min" else offset, 0).click().perform()


def images_rendered(driver: webdriver.Chrome, elem_ids: list[str]) -> dict[str, int]:
    """The drawn width of the picture in each output (0 when it is missing or did not decode)."""
    return {elem_id: driver.execute_script(
        "const i = document.querySelector(arguments[0]); return i && i.complete ? i.naturalWidth : 0;",
        f"#{elem_id} img") or 0 for elem_id in elem_ids}


def screenshot(driver: webdriver.Chrome, path: str) -> None:
    """The whole page, not only the window; in 256 colours (a third of the bytes, for the repository)."""
    from PIL import Image

    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(driver.get_window_size()["width"], height + 40)
    driver.save_screenshot(path)
    Image.open(path).convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import app

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=app.default_model())
    parser.add_argument("--image", help="the image to upload; default: a built-in scene")
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--output", default="docs/figures/demo_app.png")
    args = parser.parse_args()
    demo = app.build_app(args.model, camvid=False)
    demo.queue().launch(server_name="127.0.0.1", server_port=args.port, prevent_thread_lock=True, quiet=True)
    scratch = tempfile.mkdtemp(prefix="step-demo-browser-")
    image = args.image or app.built_in_examples(Path(scratch), camvid=False)[0]
    driver = start_chromium(str(Path(scratch) / "profile"))
    try:
        driver.get(f"http://127.0.0.1:{args.port}/")
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
        upload(driver, image)
        wait_for_numbers(driver)
        WebDriverWait(driver, 60).until(lambda d: all(images_rendered(d, ["overlay", "superpatches", "exits"])
                                                      .values()))
        screenshot(driver, args.output)
    finally:
        driver.quit()
        demo.close()
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
