"""Write the model cards of the published STEP configurations: model_cards/step-vit-{tiny,small,base,large}/README.md.

    python model_cards/build.py [--results tiny=outputs/camvid-tiny ...] [--command small="bash ..."] [--notes ...]

A configuration gets measured results only from a training run's folder given with `--results PRESET=FOLDER`
(its `metrics.json` and the command in its README, or `--command PRESET=COMMAND` where the run was one stage of a
recipe script); the others say "not trained yet".
"""

import argparse
import json
import os
import re

from step_hf import StepConfig
from step_hf.model_card import model_card

HERE = os.path.dirname(os.path.abspath(__file__))
CAMVID = json.load(open(os.path.join(HERE, "camvid_id2label.json")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", nargs="*", default=[], help="PRESET=RUN_FOLDER of a finished training run")
    parser.add_argument("--command", nargs="*", default=[], help="PRESET=COMMAND that reproduces the run")
    parser.add_argument("--notes", nargs="*", default=[], help="PRESET=TEXT added to the card's limits")
    args = parser.parse_args()
    runs = dict(item.split("=", 1) for item in args.results)
    commands = dict(item.split("=", 1) for item in args.command)
    extra_notes = dict(item.split("=", 1) for item in args.notes)
    for preset in ("tiny", "small", "base", "large"):
        name = f"step-vit-{preset}"
        config = StepConfig.from_preset(preset, image_size=1024 if preset == "large" else 512,
                                        id2label={int(k): v for k, v in CAMVID.items()})
        command, results, dataset, input_size = None, None, "camvid", None
        if preset in runs:
            folder = runs[preset]
            metrics = json.load(open(os.path.join(folder, "metrics.json")))
            results = metrics["final_eval"]
            config = StepConfig.from_pretrained(folder)  # the settings its results were measured with
            size = json.load(open(os.path.join(folder, "preprocessor_config.json")))["size"]
            input_size = (f"shortest edge resized to {size['shortest_edge']}" if "shortest_edge" in size
                          else f"resized to {size['height']}x{size['width']}")
            card = open(os.path.join(folder, "README.md")).read()
            command = commands.get(preset) or re.search(r"```bash\n(.*?)\n```", card, re.S).group(1)
        notes = ("Measured results come from the training run of the command above, on the CamVid validation split "
                 "(101 frames; every frame is from a sequence that also supplies training frames, so scores read "
                 "optimistic).") if results else ""
        if preset in extra_notes:
            notes = f"{notes} {extra_notes[preset]}".strip()
        folder = os.path.join(HERE, name)
        os.makedirs(folder, exist_ok=True)
        model_card(f"step-hf/{name}", config, command, dataset, results, notes, input_size).save(os.path.join(folder, "README.md"))
        print(f"wrote {folder}/README.md ({'measured' if results else 'not trained yet'})")


if __name__ == "__main__":
    main()
