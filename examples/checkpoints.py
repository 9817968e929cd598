"""A training run's checkpoints: written atomically, checked before a resume, and found again.

A run writes its checkpoints to `OUTPUT_DIR/checkpoints/`, one folder per save named `{stage index}-{stage}-{step}`
(so that names sort in the order the run wrote them), each holding Accelerate's state and `trainer_state.json`
(the stage, the step, the history so far and what defines the run). A folder ending in `.tmp` is a write that did
not finish.
"""

import errno
import json
import math
import os
import shutil
import zipfile

import torch
from safetensors import safe_open

from step_hf.cli import UserError

STAGES = ("policy", "segmenter", "prune")  # the training stages, in the order a run takes them


def checkpoints_folder(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def save_checkpoint(accelerator, output_dir: str, stage: str, step: int, state: dict, keep: int | None = None) -> str:
    """Write to a temporary folder, then rename: a crash never leaves a half-written checkpoint, and a failed write
    (a full disk, say) removes its partial folder. `trainer_state.json` holds the stage, the step and `state`; with
    `keep`, only the newest `keep` checkpoints stay, removed once the new one is whole. Returns the checkpoint's
    folder."""
    final = os.path.join(checkpoints_folder(output_dir), f"{STAGES.index(stage)}-{stage}-{step:07d}")
    temporary = final + ".tmp"
    try:
        accelerator.save_state(temporary)
        if accelerator.is_main_process:
            with open(os.path.join(temporary, "trainer_state.json"), "w") as f:
                json.dump(json_safe({"stage": stage, "step": step, **state}), f, allow_nan=False)
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        raise disk_error(error, f"writing the checkpoint {final}") from error
    if accelerator.is_main_process:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(temporary, final)
        for name in checkpoint_names(checkpoints_folder(output_dir))[keep:] if keep else []:
            shutil.rmtree(os.path.join(checkpoints_folder(output_dir), name))
    accelerator.wait_for_everyone()
    return final


def json_safe(value):
    """`value` with every NaN or infinity replaced by None, so that the JSON written is valid (no bare `NaN`)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def disk_error(error: OSError, doing: str) -> OSError:
    """The same error, its message saying what was being written and, for a full disk, that space ran out."""
    cause = "No space left on device" if error.errno == errno.ENOSPC else (error.strerror or str(error))
    return type(error)(error.errno, f"{cause} while {doing}; free space (or choose another --output_dir) and run "
                                    "again with --resume_from_checkpoint latest")


def checkpoint_problem(path: str) -> str | None:
    """Why a checkpoint folder cannot be resumed from (missing or truncated files), or `None` if it looks whole."""
    try:
        with open(os.path.join(path, "trainer_state.json")) as f:
            state = json.load(f)
        if state["stage"] not in STAGES or not isinstance(state["step"], int):
            return "trainer_state.json names no stage and step"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"trainer_state.json cannot be read ({error})"
    for name in sorted(os.listdir(path)):
        file = os.path.join(path, name)
        try:
            if name.endswith(".safetensors"):
                with safe_open(file, "pt") as tensors:
                    bad = [key for key in tensors.keys() if not finite(tensors.get_tensor(key))]
                if bad:
                    return (f"{name} holds non-finite weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}"
                            "): the run had diverged")
            elif name.endswith((".bin", ".pkl", ".pt")) and (not zipfile.is_zipfile(file)
                                                             or zipfile.ZipFile(file).testzip() is not None):
                return f"{name} is truncated or corrupt"
        except Exception as error:  # safetensors' own error type for a short file
            return f"{name} is truncated or corrupt ({error})"
    return None


def finite(tensor: torch.Tensor) -> bool:
    return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())


def find_checkpoint(output_dir: str, resume_from_checkpoint: str | None, log=print) -> str | None:
    """The checkpoint to resume from: `resume_from_checkpoint` itself, or with `latest` the newest one of
    `output_dir` that is whole (skipped ones are named, with the reason). Nothing to resume from is an error, as in
    `transformers.Trainer`: a first run leaves the flag out."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint != "latest":
        problem = checkpoint_problem(resume_from_checkpoint) if os.path.isdir(resume_from_checkpoint) \
            else "not a folder"
        if problem:
            raise UserError(f"Cannot resume from {resume_from_checkpoint}: {problem}.")
        return resume_from_checkpoint
    root = checkpoints_folder(output_dir)
    if not checkpoint_names(root):
        raise UserError(f"--resume_from_checkpoint latest: no checkpoint in {root}. Leave the flag out to start a new "
                        "run, or point --output_dir at the run to continue.")
    newest = newest_whole_checkpoint(output_dir, log)
    if newest is None:
        raise UserError(f"None of the checkpoints in {root} can be resumed from (see above); leave out "
                        "--resume_from_checkpoint to start again.")
    return newest


def checkpoint_names(root: str) -> list[str]:
    """The finished checkpoints in `root`, newest first."""
    return sorted((n for n in os.listdir(root) if not n.endswith(".tmp")), reverse=True) if os.path.isdir(root) else []


def newest_whole_checkpoint(output_dir: str, log=print) -> str | None:
    """The newest checkpoint of a run that can be resumed from (whole files, finite weights), naming those skipped."""
    root = checkpoints_folder(output_dir)
    for name in checkpoint_names(root):
        problem = checkpoint_problem(os.path.join(root, name))
        if problem is None:
            return os.path.join(root, name)
        log(f"skipping checkpoint {name}: {problem}")
    return None


def remove_partial_checkpoints(output_dir: str, log=print) -> None:
    """Remove the `*.tmp` folders a killed or failed checkpoint write left behind."""
    root = checkpoints_folder(output_dir)
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        if name.endswith(".tmp"):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            log(f"removed the partial checkpoint {name} (a checkpoint write that did not finish)")
