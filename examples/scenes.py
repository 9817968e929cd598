"""A tiny procedural road-scene generator: images with exact label maps, needing no download.

Results on these scenes mean nothing about real data; they exist so that examples and smoke runs work offline.
"""

import numpy as np
from PIL import Image, ImageDraw

SCENE_CLASSES = {0: "sky", 1: "building", 2: "road", 3: "tree", 4: "car"}
PALETTE = np.array([[70, 130, 180], [120, 70, 60], [128, 64, 128], [60, 140, 50], [20, 20, 160]], dtype=np.uint8)


def make_scene(height: int, width: int, seed: int) -> tuple[Image.Image, Image.Image]:
    """One RGB image and its class-id map (mode "L"): sky, buildings, trees, a road and a few cars."""
    rng = np.random.default_rng(seed)
    labels = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(labels)
    horizon = int(height * rng.uniform(0.35, 0.55))
    for _ in range(rng.integers(2, 6)):  # buildings and trees rising above the horizon
        left = int(rng.uniform(-0.1, 0.9) * width)
        right = left + int(rng.uniform(0.1, 0.35) * width)
        top = int(horizon * rng.uniform(0.1, 0.7))
        if rng.random() < 0.6:
            draw.rectangle([left, top, right, horizon], fill=1)
        else:
            draw.ellipse([left, top, right, horizon + (right - left) // 4], fill=3)
    draw.rectangle([0, horizon, width, height], fill=2)
    for _ in range(rng.integers(1, 4)):  # cars on the road
        left = int(rng.uniform(0, 0.8) * width)
        top = int(rng.uniform(horizon, height * 0.85))
        size = int((top - horizon + 10) * rng.uniform(0.5, 0.9))
        draw.rounded_rectangle([left, top, left + 2 * size, top + size], radius=max(1, size // 4), fill=4)
    label_array = np.array(labels)
    shade = rng.uniform(0.8, 1.2, size=(len(PALETTE), 1))
    colours = np.clip(PALETTE * shade, 0, 255)[label_array]
    noise = rng.normal(0, 12, size=colours.shape)
    image = Image.fromarray(np.clip(colours + noise, 0, 255).astype(np.uint8))
    return image, labels
