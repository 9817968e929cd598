"""Peak memory of one training step (forward and backward) with and without gradient checkpointing.

    python examples/training_memory.py --preset base --image_size 512 --batch_size 2

Each variant runs in a fresh process. On a GPU it reports `torch.cuda.max_memory_allocated` during the step; on
CPU, the growth of the process's peak resident memory (`ru_maxrss`) from before the step to after it (the model is
already built and its weights resident, so the growth is what the step itself needed: activations and gradients).
"""

import argparse
import json
import resource
import subprocess
import sys

import torch

from step_hf import StepConfig, StepForSemanticSegmentation
from step_hf.cli import run_command


def one_step(preset: str, image_size: int, batch_size: int, checkpointing: bool) -> dict:
    """Build the model, then run one forward and backward step; the memory that step needed, in MiB."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = StepConfig.from_preset(preset, image_size=image_size, num_labels=19, partition_source="dense")
    model = StepForSemanticSegmentation(config).to(device).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device)
    labels = torch.randint(0, 19, (batch_size, image_size, image_size), generator=generator).to(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model(pixel_values=pixels, labels=labels).loss.backward()
    after = torch.cuda.max_memory_allocated() if device == "cuda" else (
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"device": device, "checkpointing": checkpointing, "step_mib": (after - before) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--image_size", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--one", choices=["plain", "checkpointing"], help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_step(args.preset, args.image_size, args.batch_size, args.one == "checkpointing")))
        return
    rows = []
    for variant in ("plain", "checkpointing"):
        command = [sys.executable, __file__, "--preset", args.preset, "--image_size", str(args.image_size),
                   "--batch_size", str(args.batch_size), "--one", variant]
        rows.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout))
    print(f"ViT-{args.preset} at {args.image_size}x{args.image_size}, batch {args.batch_size}, on {rows[0]['device']}:")
    for row in rows:
        print(f"  {'with' if row['checkpointing'] else 'without'} gradient checkpointing: {row['step_mib']:.0f} MiB")
    print(f"  saved: {rows[0]['step_mib'] - rows[1]['step_mib']:.0f} MiB "
          f"({100 * (1 - rows[1]['step_mib'] / rows[0]['step_mib']):.0f}%)")


if __name__ == "__main__":
    run_command(main)
