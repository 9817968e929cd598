"""Train a STEP segmenter with Accelerate on any `datasets` semantic-segmentation set.

    accelerate launch --quiet examples/train.py --dataset_name ../shared/datasets/camvid --preset small --stage all
    python examples/train.py                      # a built-in procedural scene set, offline

STEP trains in three stages, each starting from the previous stage's weights: `policy` (the dCTS policy network
alone, on the processor's superpatch targets), `segmenter` (encoder + decoder with the policy frozen; the exit heads
learn by deep supervision, halting off) and `prune` (a short fine-tune with halting on). `--stage all` runs them in
order. Checkpoints are written atomically every `--checkpointing_steps` and on SIGTERM (then the run exits with
143); `--resume_from_checkpoint latest` continues the same run with the same data order, and refuses flags that
would change it. A non-finite loss, gradient or weight stops the run naming the last good checkpoint. The final
model, processor, code and model card go to `--output_dir`.

Results on the built-in scenes mean nothing about real data: they exist so that the whole path runs offline.
"""

import argparse
import dataclasses
import json
import math
import os
import shlex
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field, fields

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, DistributedType, set_seed
from checkpoints import (
    STAGES, disk_error, find_checkpoint, json_safe, newest_whole_checkpoint, remove_partial_checkpoints, save_checkpoint,
)
from data import load_data
from PIL import Image as PILImage
from PIL import ImageEnhance, ImageOps
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import HfArgumentParser

from step_hf import StepConfig, StepForSemanticSegmentation, StepImageProcessor, load_vit_weights
from step_hf.cli import UserError, run_command
from step_hf.configuration_step import (
    ATTENTION_MODES, EXIT_HEAD_TYPES, PARTITION_SOURCES, TRAINABLE_COMPONENTS, resolve_settings,
)
from step_hf.evaluation import EvalTransform, evaluate
from step_hf.hub import HubError, create_repository, push_folder
from step_hf.model_card import model_card

# Flags a resumed run may change: where and how often it writes, logs and evaluates, and where it publishes. Every
# other flag defines the run (what trains, on what data, with which schedule) and must match the checkpoint's.
RESUMABLE_FLAGS = ("output_dir", "resume_from_checkpoint", "checkpointing_steps", "save_total_limit", "eval_steps",
                   "logging_steps", "report_to", "push_to_hub", "hub_model_id", "num_workers",
                   "per_device_eval_batch_size", "gradient_checkpointing", "stage")
PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


class RunStopped(UserError):
    """The run stopped before its end (or its upload failed), saying why and what to do next; said like a refused
    input, without a traceback, with `exit_code` as the script's exit status."""

    exit_code = 1


class TrainingDiverged(RunStopped):
    """A non-finite loss, gradient norm or weight: nothing after it is saved."""


class Preempted(RunStopped):
    """SIGTERM: a checkpoint at the current step was saved."""

    exit_code = PREEMPTED_EXIT_CODE


def flag(help: str, **argparse_options) -> dict:
    """A field's `metadata` for `HfArgumentParser`: its help and any other `add_argument` options (choices)."""
    return {"help": help, **argparse_options}


@dataclass
class TrainArguments:
    """Everything that defines a run (and where and how often it writes), as `train.py`'s flags set it; a script
    can build one and call `run_training` instead. Impossible numbers are refused when it is made."""

    # data
    dataset_name: str | None = field(
        default=None, metadata=flag("a Hub id or a local folder laid out like one; default: built-in scenes"))
    dataset_config_name: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    image_column_name: str = "image"
    label_column_name: str = "label"
    id2label: str | None = field(
        default=None, metadata=flag("a JSON file or string {id: name}; default: the dataset's id2label.json"))
    reduce_labels: bool = field(default=False, metadata=flag("label 0 is void: map it to 255, shift the rest"))
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    image_size: int = field(default=256, metadata=flag("resize so that the shortest edge is this"))
    crop_size: int | None = field(default=None, metadata=flag("training crop side (default: --image_size)"))
    min_scale: float = 0.5
    max_scale: float = 2.0
    # model
    preset: str = field(default="tiny", metadata=flag("a new model's size", choices=["tiny", "small", "base", "large"]))
    model_name_or_path: str | None = field(default=None, metadata=flag("a saved STEP model to start from"))
    backbone_checkpoint: str | None = field(
        default=None, metadata=flag("public ViT weights (timm or HF names, safetensors)"))
    partition_source: str = field(default="policy", metadata=flag("partitions for the segmenter and prune stages",
                                                                  choices=PARTITION_SOURCES))
    exit_thresholds: list[float] | None = None
    token_budget: int | None = field(
        default=None, metadata=flag("a fixed number of tokens per image instead of thresholds"))
    exit_layers: list[int] | None = field(default=None, metadata=flag(
        "a new model's exit blocks (default: DToP's placement, e.g. 6 8 of ViT-B's 12 blocks; none: no exits)"))
    exit_head_type: str | None = field(
        default=None, metadata=flag("a new model's exit heads (default: mlp)", choices=EXIT_HEAD_TYPES))
    superpatch_sizes: list[int] | None = field(default=None, metadata=flag(
        "a new model's superpatch sides (default: 2 4 8 16; '2' alone is CTS's 2x2 sharing)"))
    attention_mode: str | None = field(default=None, metadata=flag(
        "how images of unequal token counts share a batch (default: the config's, packed)", choices=ATTENTION_MODES))
    gradient_checkpointing: bool = field(default=False, metadata=flag(
        "recompute each block's activations in the backward pass: less memory, same gradients"))
    # training
    stage: str = field(default="all", metadata=flag("the stage to train, or all three in order",
                                                    choices=[*STAGES, "all"]))
    policy_steps: int = 200
    segmenter_steps: int = 300
    prune_steps: int = 60
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    # The segmenter and pruning defaults fit a pretrained or converted ViT (DToP's and Segmenter's fine-tuning:
    # 2e-5, heads 10x, drop path 0.1); a ViT from scratch needs its own schedule (scripts/camvid_recipe.sh).
    learning_rate: float = field(default=2e-5, metadata=flag("the segmenter stage's backbone rate"))
    prune_learning_rate: float | None = field(default=None, metadata=flag(
        "the pruning stage, a short fine-tune of a trained segmenter (default: --learning_rate)"))
    policy_learning_rate: float = field(
        default=5e-4, metadata=flag("the policy stage (a small CNN, always trained from scratch)"))
    head_learning_rate_multiplier: float = 10.0
    drop_path_rate: float = field(
        default=0.1, metadata=flag("stochastic depth of the encoder blocks in training (0 for a ViT from scratch)"))
    weight_decay: float = 0.01
    warmup_steps: int = 20
    max_grad_norm: float = 1.0
    mixed_precision: str | None = field(default=None, metadata=flag("autocast precision", choices=["no", "fp16", "bf16"]))
    seed: int = 0
    num_workers: int = 0
    # run
    output_dir: str = "outputs/train"
    checkpointing_steps: int = 100
    save_total_limit: int | None = field(
        default=None, metadata=flag("keep only the newest N checkpoints, as Trainer's save_total_limit (default: all)"))
    resume_from_checkpoint: str | None = field(default=None, metadata=flag("a checkpoint folder or 'latest'"))
    eval_steps: int = field(default=0, metadata=flag("also evaluate every N steps (0: at stage ends)"))
    logging_steps: int = field(
        default=10, metadata=flag("read the losses back every N steps (each read waits for the device)"))
    report_to: str = field(default="none", metadata=flag("an Accelerate tracker ('tensorboard', 'all') or 'none'"))
    push_to_hub: bool = False
    hub_model_id: str | None = None

    def __post_init__(self):
        self.crop_size = self.crop_size or self.image_size
        if self.push_to_hub and not self.hub_model_id:
            raise UserError("--push_to_hub needs --hub_model_id org/name")
        minimums = [("logging_steps", 1), ("per_device_train_batch_size", 1), ("per_device_eval_batch_size", 1),
                    ("gradient_accumulation_steps", 1), ("image_size", 1), ("crop_size", 1), ("max_train_samples", 1),
                    ("max_eval_samples", 1), ("policy_steps", 0), ("segmenter_steps", 0), ("prune_steps", 0),
                    ("warmup_steps", 0), ("checkpointing_steps", 0), ("save_total_limit", 1), ("eval_steps", 0),
                    ("num_workers", 0)]
        for name, least in minimums:
            value = getattr(self, name)
            if value is not None and value < least:
                raise UserError(f"--{name} must be at least {least}, got {value}")
        for name in ("learning_rate", "prune_learning_rate", "policy_learning_rate", "head_learning_rate_multiplier",
                     "min_scale", "max_scale"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:  # NaN fails every comparison
                raise UserError(f"--{name} must be a positive finite number, got {value}")
        if not 0 <= self.drop_path_rate < 1:
            raise UserError(f"--drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if not 0 <= self.weight_decay < math.inf or not 0 <= self.max_grad_norm < math.inf:
            raise UserError(f"--weight_decay and --max_grad_norm must be finite and >= 0, got {self.weight_decay} "
                            f"and {self.max_grad_norm}")
        if self.min_scale > self.max_scale:
            raise UserError(f"--min_scale ({self.min_scale}) is above --max_scale ({self.max_scale})")


def argument_parser() -> HfArgumentParser:
    """`TrainArguments` as flags."""
    parser = HfArgumentParser(TrainArguments, description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    # `HfArgumentParser` makes every list flag take one value or more; `--exit_layers` alone means no exits.
    next(action for action in parser._actions if action.dest == "exit_layers").nargs = "*"
    return parser


def parse_args(argv: list[str] | None = None) -> TrainArguments:
    """The flags, checked: an unknown flag or an impossible number is refused (argparse's way: the usage and the
    reason, exit status 2) before anything loads."""
    parser = argument_parser()
    namespace = parser.parse_args(argv)
    try:
        return TrainArguments(**vars(namespace))
    except ValueError as error:
        parser.error(str(error))


def command_line(args: TrainArguments) -> str:
    """The command that runs `args`: the flags that differ from their defaults."""
    words = []
    for name, value in ((f.name, getattr(args, f.name)) for f in fields(args)):
        default = TrainArguments.__dataclass_fields__[name].default
        if value == default or value is None or (name == "crop_size" and value == args.image_size):
            continue
        if value is True:
            words.append(f"--{name}")
        else:
            words += [f"--{name}", *map(str, value if isinstance(value, list) else [value])]
    return "accelerate launch examples/train.py " + " ".join(shlex.quote(word) for word in words)


# ---------------------------------------------------------------------------------------------------- data


def data_arguments(args) -> dict:
    """`data.load_data`'s arguments from this script's flags."""
    return {"dataset_name": args.dataset_name, "dataset_config_name": args.dataset_config_name,
            "train_split": args.train_split, "eval_split": args.eval_split,
            "image_column_name": args.image_column_name, "label_column_name": args.label_column_name,
            "id2label_source": args.id2label, "reduce_labels": args.reduce_labels,
            "max_train_samples": args.max_train_samples, "max_eval_samples": args.max_eval_samples, "seed": args.seed}


class TrainTransform:
    """Random scale, crop, flip and photometric jitter on image and label together, then the processor (which
    derives the superpatch targets from the augmented labels). Randomness depends on (seed, epoch, index) only, so
    that any number of processes and a resumed run see exactly the same samples."""

    def __init__(self, dataset, processor: StepImageProcessor, args):
        self.dataset, self.processor, self.args, self.epoch = dataset, processor, args, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose augmentations `__getitem__` draws (as a sampler's `set_epoch` chooses its order)."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        args = self.args
        rng = np.random.default_rng([args.seed, self.epoch, index])
        example = self.dataset[index]
        image, label = example["image"].convert("RGB"), example["label"]
        scale = rng.uniform(args.min_scale, args.max_scale) * args.image_size / min(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image, label = image.resize(size, PILImage.BILINEAR), label.resize(size, PILImage.NEAREST)
        crop = args.crop_size
        padded_image = PILImage.new("RGB", (max(crop, size[0]), max(crop, size[1])), (124, 116, 104))
        padded_label = PILImage.new(label.mode, padded_image.size, 0 if args.reduce_labels else 255)
        padded_image.paste(image)
        padded_label.paste(label)
        left = rng.integers(0, padded_image.width - crop + 1)
        top = rng.integers(0, padded_image.height - crop + 1)
        box = (left, top, left + crop, top + crop)
        image, label = padded_image.crop(box), padded_label.crop(box)
        if rng.random() < 0.5:
            image, label = ImageOps.mirror(image), ImageOps.mirror(label)
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            image = enhance(image).enhance(rng.uniform(0.8, 1.2))
        inputs = self.processor(image, segmentation_maps=label, do_resize=False, return_tensors="pt")
        return {key: value[0] for key, value in inputs.items()}


# ---------------------------------------------------------------------------------------------------- model


def build_model(args, id2label: dict[int, str]) -> StepForSemanticSegmentation:
    """A saved model or a new one from a preset, with this run's settings in its configuration: every evaluation of
    the run, and the saved model, run with them."""
    label2id = {name: i for i, name in id2label.items()}
    if args.model_name_or_path:
        model = StepForSemanticSegmentation.from_pretrained(args.model_name_or_path)
        if model.config.id2label != id2label:
            raise UserError(f"{args.model_name_or_path} has classes {model.config.id2label}, the data {id2label}.")
        for name, value in architecture_args(args).items():
            if getattr(model.config, name) != value:
                raise UserError(f"--{name} {value} chooses a new model's architecture; {args.model_name_or_path} "
                                f"has {getattr(model.config, name)}.")
    else:
        config = StepConfig.from_preset(args.preset, image_size=args.crop_size, id2label=id2label, label2id=label2id,
                                        trained_components=[], **architecture_args(args))
        model = StepForSemanticSegmentation(config)
        if args.backbone_checkpoint:
            load_vit_weights(model, args.backbone_checkpoint)
            config.trained_components = ["encoder"]
    settings = {"partition_source": args.partition_source}
    if args.exit_thresholds:
        settings["exit_thresholds"] = args.exit_thresholds
    if args.token_budget:
        settings["token_budget"] = args.token_budget
    if args.attention_mode:
        settings["attention_mode"] = args.attention_mode
    model.config.update_settings(**settings)
    model.step.set_drop_path_rate(args.drop_path_rate)
    if args.crop_size % model.config.patch_size:
        raise UserError(f"--crop_size {args.crop_size} is not a multiple of the patch size {model.config.patch_size}.")
    if args.crop_size > args.image_size * args.max_scale:
        raise UserError(f"Images resized to a shortest edge of {args.image_size} (at most x{args.max_scale}) are too "
                        f"small for a {args.crop_size} crop; raise --image_size or lower --crop_size.")
    return model


def architecture_args(args) -> dict:
    """The flags that choose a new model's architecture, those given."""
    names = ("exit_layers", "exit_head_type", "superpatch_sizes")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def saved_normalisation(args) -> dict:
    """The image mean and std a saved model's weights learnt with (its processor's), so that fine-tuning a converted
    Segmenter (0.5 / 0.5 for AugReg ViTs) does not feed it ImageNet-normalised images; none for a new model."""
    if not args.model_name_or_path or not os.path.isfile(os.path.join(args.model_name_or_path,
                                                                       "preprocessor_config.json")):
        return {}
    saved = StepImageProcessor.from_pretrained(args.model_name_or_path)
    return {"image_mean": saved.image_mean, "image_std": saved.image_std}


def check_policy_is_trained(model: StepForSemanticSegmentation, args, stages: list[str]) -> None:
    """Refuse to train or evaluate a segmenter on the partitions of a policy that never trained (they are arbitrary,
    and the saved model would run them by default)."""
    if (args.partition_source == "policy" and model.step.policy is not None and "policy" not in stages
            and not policy_trained(model.config)):
        raise UserError("The policy network is untrained, so its partitions are arbitrary: run --stage policy first "
                        "(or --stage all), start from a --model_name_or_path whose policy trained, or choose "
                        "--partition_source oracle or dense.")


def optimizer_and_scheduler(model, args, learning_rate: float, num_steps: int, num_processes: int):
    """AdamW with a larger learning rate for the heads (decoder, exits, policy), linear warm-up, then poly decay.
    A scheduler prepared by Accelerate steps once per process per optimizer step: the schedule divides that out."""
    backbone, heads = [], []
    encoder = set(model.parameter_groups()["encoder"])
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (backbone if name in encoder else heads).append(parameter)
    groups = [{"params": backbone, "lr": learning_rate},
              {"params": heads, "lr": learning_rate * args.head_learning_rate_multiplier}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=args.weight_decay)

    def factor(process_steps: int) -> float:
        step = process_steps // num_processes
        if step < args.warmup_steps:
            return (step + 1) / (args.warmup_steps + 1)
        return (1 - (step - args.warmup_steps) / max(1, num_steps - args.warmup_steps)) ** 0.9

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def stage_settings(stage: str) -> dict:
    """The run-time settings a stage trains and is evaluated with, over the run's own (`build_model`): halting on
    for the pruning fine-tune only."""
    return {"halting": stage == "prune"}


def stage_inputs(stage: str, batch: dict, partition_source: str) -> dict:
    """Stage 1 sees only the policy's targets; later stages the labels (and the targets only for oracle
    partitions: the frozen policy gets no loss)."""
    if stage == "policy":
        return {"pixel_values": batch["pixel_values"], "superpatch_targets": batch["superpatch_targets"],
                "policy_only": True}
    inputs = {"pixel_values": batch["pixel_values"], "labels": batch["labels"], "settings": stage_settings(stage)}
    if partition_source == "oracle":
        inputs["superpatch_targets"] = batch["superpatch_targets"]
    return inputs


def configure_stage(model: StepForSemanticSegmentation, stage: str) -> None:
    """What trains in a stage, and the parts it trains recorded in the configuration (`trained_components`, unless a
    loaded model did not record them)."""
    model.set_training_stage(stage)
    mark_trained(model.config, stage)


def mark_trained(config: StepConfig, stage: str) -> None:
    """Add the parts a stage trains to `config.trained_components` (left `None` for a loaded model that did not
    record them)."""
    if config.trained_components is None:
        return
    parts = {"policy"} if stage == "policy" else {"encoder", "decoder", *(["exit_heads"] if config.exit_layers else [])}
    config.trained_components = [part for part in TRAINABLE_COMPONENTS if part in {*config.trained_components, *parts}]


def policy_trained(config: StepConfig) -> bool:
    """Whether the model has a policy that trained (a loaded model that did not record it counts as trained)."""
    trained = config.trained_components
    return bool(config.shared_sizes) and (trained is None or "policy" in trained)


def runnable_partition_source(config: StepConfig) -> str:
    """What a model trained on oracle partitions runs with once saved (oracle partitions need ground truth): its
    policy if that trained, else no sharing."""
    return "policy" if policy_trained(config) else "dense"


def check_mixed_precision(accelerator) -> None:
    """Refuse a mixed precision that would not run: Accelerate accepts fp16 on a CPU and then trains in fp32 without
    a word (bf16 does autocast there), and the run would record a precision it never used."""
    precision = accelerator.mixed_precision
    managed = accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
    if precision in ("fp16", "bf16") and not accelerator.native_amp and not managed:
        device = accelerator.device.type
        alternative = " or bf16, which autocasts on CPU" if device == "cpu" else ""
        raise UserError(f"--mixed_precision {precision} (the flag or Accelerate's config) does not run on {device}: "
                        f"Accelerate would train in fp32 instead. Choose --mixed_precision no{alternative}, or train "
                        "on a device that supports it.")


# ---------------------------------------------------------------------------------------------------- run records


def run_arguments(args, accelerator) -> dict:
    """What defines the run, as a checkpoint records it: every flag but `RESUMABLE_FLAGS` (a local dataset folder as
    an absolute path), the mixed precision that runs and the number of processes (which, with the per-device batch,
    make the global batch)."""
    values = {name: value for name, value in dataclasses.asdict(args).items() if name not in RESUMABLE_FLAGS}
    if args.dataset_name and os.path.isdir(args.dataset_name):
        values["dataset_name"] = os.path.abspath(args.dataset_name)
    values["mixed_precision"] = accelerator.mixed_precision
    values["num_processes"] = accelerator.num_processes
    return json.loads(json.dumps(values))  # as read back from a checkpoint: lists, not tuples


def check_same_run(state: dict, current: dict, checkpoint: str) -> None:
    """Refuse to resume `checkpoint` with flags that change the run (batch, data, steps, schedule, model, ...),
    naming each flag with the run's value and this command's, before any weights load."""
    saved = state.get("run_arguments")
    if saved is None:  # a checkpoint written before runs were recorded
        return
    changed = [name for name in sorted({*saved, *current}) if saved.get(name) != current.get(name)]
    if not changed:
        return

    def flag(name: str) -> str:
        return {"num_processes": "the number of processes (accelerate launch --num_processes)",
                "mixed_precision": "--mixed_precision (the flag or Accelerate's config)"}.get(name, f"--{name}")

    def shown(value) -> str:
        return "not given" if value is None else " ".join(map(str, value)) if isinstance(value, list) else str(value)

    lines = [f"{flag(name)}: the run used {shown(saved.get(name))}, this command gives {shown(current.get(name))}"
             for name in changed]
    raise UserError(f"Cannot resume from {checkpoint} with flags that change the run: " + "; ".join(lines)
                    + ". Resume with the run's values, or start a new run in another --output_dir. Only "
                    + ", ".join(f"--{name}" for name in RESUMABLE_FLAGS) + " may change on resume.")


def check_output_dir(args) -> None:
    """Refuse, before any training, an output location that cannot hold the run."""
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UserError(f"--output_dir {args.output_dir} is an existing file; choose a folder.")
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=args.output_dir):
            pass
    except OSError as error:
        raise UserError(f"--output_dir {args.output_dir} cannot be written ({error.strerror or error}); choose a "
                        "writable folder.") from None


def check_hub_repository(args) -> None:
    """Create (or find) the Hub repository before training, as `transformers`' examples do: an unreachable Hub or a
    missing permission then stops the run before any work is lost."""
    advice = ("Check the network and your token (`hf auth login`), or train without --push_to_hub and upload the "
              "folder later (python -m step_hf.hub).")
    try:
        create_repository(args.hub_model_id)
    except HubError as error:  # offline, unreachable, silent, no token, no permission: all stop the run here
        raise UserError(f"--push_to_hub: cannot create or reach the Hub repository {args.hub_model_id} at "
                        f"{error.host} ({error.cause}). {advice}") from None
    except Exception as error:  # an invalid repository id, say
        raise UserError(f"--push_to_hub: cannot create or reach the Hub repository {args.hub_model_id} "
                        f"({type(error).__name__}: {error}). {advice}") from None


# ---------------------------------------------------------------------------------------------------- main


def run_stage(stage, model, data, accelerator, args, history, resume, progress_label, run: dict | None = None,
              stop: "StopSignal | None" = None) -> StepForSemanticSegmentation:
    """Train one stage and return the (unwrapped) model; resumes mid-stage from `resume` if given. `run` goes into
    each checkpoint; after SIGTERM (`stop`) the stage saves one at the current step and raises `Preempted`. A
    non-finite loss or gradient norm, or non-finite weights about to be checkpointed, raise `TrainingDiverged`."""
    num_steps = {"policy": args.policy_steps, "segmenter": args.segmenter_steps, "prune": args.prune_steps}[stage]
    if stage == "policy" and model.step.policy is None:
        accelerator.print("no policy network (superpatch_sizes has no size above 1): skipping the policy stage")
        return model
    if stage == "prune" and not model.config.exit_layers:
        accelerator.print("no exit heads (exit_layers is empty): skipping the pruning stage")
        return model
    model, optimizer, scheduler, train_loader, start = prepare_stage(stage, model, data, accelerator, args, num_steps,
                                                                      resume)
    progress = tqdm(range(num_steps), initial=start, desc=progress_label, disable=not accelerator.is_main_process)
    losses, step = LossLog(stage, history, accelerator, progress), start

    def read_back() -> None:
        problem = losses.read_back()
        if problem:
            raise diverged(args, stage, *problem)

    def checkpoint(step: int) -> str:
        if not all_finite(model):  # an update made them so; the loss that shows it is the next step's
            raise diverged(args, stage, step, "the weights became non-finite", scheduler.get_last_lr()[0])
        return save_checkpoint(accelerator, args.output_dir, stage, step, {"history": history, **(run or {})},
                               args.save_total_limit)

    model.train()
    for step, loss, grad_norm in optimizer_steps(stage, model, optimizer, scheduler, train_loader, data, accelerator,
                                                 args, start, num_steps):
        progress.update(1)
        losses.add(step, accelerator.reduce(loss.detach(), reduction="mean"), grad_norm, scheduler.get_last_lr()[0])
        evaluate_now = args.eval_steps and step % args.eval_steps == 0 and stage != "policy"
        checkpoint_now = args.checkpointing_steps and step % args.checkpointing_steps == 0
        stop_now = stop is not None and stop.agreed(accelerator)
        if len(losses) >= args.logging_steps or evaluate_now or checkpoint_now or stop_now or step == num_steps:
            read_back()
        if evaluate_now:
            log_eval(model, data, accelerator, args, history, stage, step)
        if checkpoint_now or stop_now:
            path = checkpoint(step)
        if stop_now:
            progress.close()
            raise Preempted(f"Stopped by SIGTERM after {stage} step {step} of {num_steps}, and saved the checkpoint "
                            f"{path}. Resume with the same command and --resume_from_checkpoint {path} (or latest).")
    read_back()
    progress.close()
    if args.checkpointing_steps and step % args.checkpointing_steps:  # the stage's end, unless just saved
        checkpoint(step)
    if stage != "policy":  # the segmenter is untrained after stage 1: nothing to measure yet
        log_eval(model, data, accelerator, args, history, stage, step)
    model = accelerator.unwrap_model(model)
    accelerator.free_memory()
    return model


def stage_learning_rate(args, stage: str) -> float:
    return {"policy": args.policy_learning_rate, "segmenter": args.learning_rate,
            "prune": args.prune_learning_rate or args.learning_rate}[stage]


def prepare_stage(stage, model, data, accelerator, args, num_steps: int, resume: dict | None):
    """What trains in `stage`, its optimiser, schedule and shuffled loader, all prepared by Accelerate (and restored
    from `resume`); returns them with the step to start from."""
    configure_stage(model, stage)
    learning_rate = stage_learning_rate(args, stage)
    optimizer, scheduler = optimizer_and_scheduler(model, args, learning_rate, num_steps, accelerator.num_processes)
    train_loader = DataLoader(data["train"], batch_size=args.per_device_train_batch_size, shuffle=True,
                              generator=torch.Generator().manual_seed(args.seed), drop_last=True,
                              num_workers=args.num_workers)
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if len(train_loader) == 0:
        raise UserError(f"The training split has fewer samples than one batch of {args.per_device_train_batch_size} "
                        "per process.")
    start = 0
    if resume:
        accelerator.load_state(resume["path"])
        start = resume["step"]
    return model, optimizer, scheduler, train_loader, start


def optimizer_steps(stage, model, optimizer, scheduler, train_loader, data, accelerator, args, start: int,
                    num_steps: int):
    """Train from step `start` to `num_steps`, yielding `(step, loss, gradient norm)` after each optimiser step (the
    norm before clipping, or None without clipping or with fp16's loss scaling, whose skipped steps have infinite
    norms by design). Epochs follow from the micro-batches done, so that a resumed run skips exactly the batches it
    already saw."""
    step, micro = start, start * args.gradient_accumulation_steps
    batches_per_epoch = len(train_loader)
    while step < num_steps:
        epoch, skip = divmod(micro, batches_per_epoch)
        data["train"].set_epoch(epoch)
        train_loader.set_epoch(epoch)  # the shuffle order of this epoch, the same on every process and on resume
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        for batch in loader:
            grad_norm = None
            with accelerator.accumulate(model):
                loss = model(**stage_inputs(stage, batch, args.partition_source)).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    grad_norm = grad_norm if accelerator.scaler is None else None
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            micro += 1
            if accelerator.sync_gradients:
                step += 1
                yield step, loss, grad_norm
                if step == num_steps:
                    return


class LossLog:
    """Training losses (and gradient norms) kept on the device and read back together (each read waits for the
    device), then added to the run's history, its trackers and the progress bar."""

    def __init__(self, stage: str, history: list, accelerator, progress):
        self.stage, self.history, self.accelerator, self.progress = stage, history, accelerator, progress
        self.pending = []  # (step, mean loss on the device, gradient norm on the device or None, learning rate)

    def __len__(self) -> int:
        return len(self.pending)

    def add(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor | None, learning_rate: float) -> None:
        self.pending.append((step, loss, grad_norm, learning_rate))

    def read_back(self) -> tuple[int, str, float] | None:
        """Log what is pending; return `(step, what, learning rate)` for the first non-finite loss or gradient norm,
        or None."""
        pairs = [torch.stack([loss, loss.new_zeros(()) if norm is None else norm.to(loss)])
                 for _, loss, norm, _ in self.pending]
        values = torch.stack(pairs).tolist() if pairs else []
        problem = None
        for (step, _, _, lr), (value, norm) in zip(self.pending, values):
            self.history.append({"stage": self.stage, "step": step, "loss": value, "lr": lr})
            self.accelerator.log({f"{self.stage}/loss": value, f"{self.stage}/lr": lr}, step=len(self.history))
            if problem is None and not math.isfinite(value):
                problem = (step, f"the loss is {value}", lr)
            elif problem is None and not math.isfinite(norm):
                problem = (step, f"the gradient norm is {norm}", lr)
        if values:
            self.progress.set_postfix(loss=f"{values[-1][0]:.4f}")
        self.pending.clear()
        return problem


def all_finite(model) -> bool:
    """Whether every weight of `model` is finite (one read from the device)."""
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())


def diverged(args, stage: str, step: int, what: str, learning_rate: float) -> TrainingDiverged:
    """The error for a run that diverged at `stage` step `step`, naming the learning rate and the last good
    checkpoint."""
    flag = {"policy": "--policy_learning_rate", "segmenter": "--learning_rate",
            "prune": "--prune_learning_rate"}[stage]
    last = newest_whole_checkpoint(args.output_dir, log=lambda message: None)
    where = (f"The last good checkpoint is {last}, but resume is exact: resumed with the same flags the run diverges "
             "again." if last else "No checkpoint was written before it.")
    return TrainingDiverged(
        f"Training diverged: {what} at {stage} step {step} (learning rate {stage_learning_rate(args, stage):g} for the "
        f"{stage} stage, scheduled at {learning_rate:.3g} after this step). The run stopped; no checkpoint or model was saved after "
        f"it. {where} Start a new run (another --output_dir, or without --resume_from_checkpoint) with a lower "
        f"{flag}, more --warmup_steps or a lower --max_grad_norm.")


class StopSignal:
    """SIGTERM (a cluster preempting the job) asks the run to stop after the current optimiser step, saving a
    checkpoint there, instead of ending it where it stands. Processes save together, so with several they agree on
    the step (a one-number reduction per step)."""

    def __init__(self):
        self.received = False

    def __enter__(self) -> "StopSignal":
        self.previous = signal.signal(signal.SIGTERM, self.receive)
        return self

    def __exit__(self, *exc_info) -> None:
        signal.signal(signal.SIGTERM, self.previous)

    def receive(self, signum, frame) -> None:
        self.received = True

    def agreed(self, accelerator) -> bool:
        if accelerator.num_processes == 1:
            return self.received
        flag = torch.tensor(float(self.received), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum") > 0)


def log_eval(model, data, accelerator, args, history, stage, step) -> dict:
    loader = accelerator.prepare_data_loader(DataLoader(data["validation"], batch_size=args.per_device_eval_batch_size))
    config = accelerator.unwrap_model(model).config
    settings = resolve_settings(config, stage_settings(stage))  # the run's, as the stage runs them
    results = evaluate(model, loader, accelerator, settings)
    record = {"stage": stage, "step": step, "eval": results, "settings": settings.to_dict()}
    history.append(record)
    accelerator.log({f"{stage}/eval_mean_iou": results["mean_iou"],
                     f"{stage}/eval_tokens_per_image": results["tokens_per_image"]}, step=len(history))
    accelerator.print(f"[{stage} step {step}, {config.partition_source} partitions] validation mIoU "
                      f"{100 * results['mean_iou']:.2f}, pixel accuracy "
                      f"{100 * results['overall_accuracy']:.2f}, tokens/image {results['tokens_per_image']:.1f}, "
                      f"halted {[round(s, 3) for s in results['halted_share']]}, "
                      f"{results['gflops_per_image']:.2f} GFLOPs/image")
    return results


def main(argv: list[str] | None = None) -> None:
    """Run the script; with SIGTERM's handler in place for the whole run (see `StopSignal`)."""
    args = parse_args(argv)
    try:
        with StopSignal() as stop:
            run_training(args, stop)
    except HubError as error:  # it names the repository and host, and how to upload again
        raise RunStopped(str(error)) from None


def run_training(args: TrainArguments, stop: StopSignal | None = None) -> None:
    """Train, evaluate and save the run `args` defines (resuming it if asked); with `stop`, SIGTERM saves a
    checkpoint and stops the run (`Preempted`)."""
    started = time.time()
    check_output_dir(args)
    set_seed(args.seed)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=args.output_dir,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        # The shuffle order is seed + epoch on every process: resumable, and the same for any process count.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    check_mixed_precision(accelerator)
    if args.push_to_hub and accelerator.is_main_process:
        check_hub_repository(args)
    dataset, id2label = load_data(**data_arguments(args))
    model = build_model(args, id2label)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    processor = StepImageProcessor(
        size={"shortest_edge": args.image_size}, superpatch_sizes=model.config.superpatch_sizes,
        num_labels=model.config.num_labels, do_reduce_labels=args.reduce_labels, **saved_normalisation(args),
    )
    data = {"train": TrainTransform(dataset["train"], processor, args),
            "validation": EvalTransform(dataset["validation"], processor)}
    if args.report_to != "none":
        accelerator.init_trackers("step", config={k: v for k, v in dataclasses.asdict(args).items() if v is not None})

    stages = list(STAGES) if args.stage == "all" else [args.stage]
    check_policy_is_trained(model, args, stages)
    if accelerator.is_main_process:
        remove_partial_checkpoints(args.output_dir, accelerator.print)
    accelerator.wait_for_everyone()
    checkpoint, history = find_checkpoint(args.output_dir, args.resume_from_checkpoint, accelerator.print), []
    resume, run = None, {"run_arguments": run_arguments(args, accelerator), "commands": [command_line(args)]}
    if checkpoint:
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            state = json.load(f)
        check_same_run(state, run["run_arguments"], checkpoint)
        if state["stage"] not in stages:
            raise UserError(f"{checkpoint} is from stage {state['stage']!r}, which this run ({stages}) does not run.")
        for done in stages[:stages.index(state["stage"])]:
            mark_trained(model.config, done)
        stages = stages[stages.index(state["stage"]):]
        resume, history = {"path": checkpoint, "step": state["step"]}, state["history"]
        run["commands"] = [*state.get("commands", []),
                           f"# resumed from {state['stage']} step {state['step']}:\n{command_line(args)}"]
        accelerator.print(f"resuming from {checkpoint} (stage {state['stage']}, step {state['step']})")
    for index, stage in enumerate(stages):
        model = run_stage(stage, model, data, accelerator, args, history, resume if index == 0 else None,
                          f"{stage} ({index + 1}/{len(stages)})", run, stop)

    notes = []
    if model.config.partition_source == "oracle":
        notes.append(save_runnable_settings(model, data, accelerator, args, history))
    accelerator.wait_for_everyone()
    final = next((record for record in reversed(history) if "eval" in record), None)
    if final is not None:  # the saved model runs, by default, as its final evaluation measured it
        model.config.update_settings(**final["settings"])
    final_eval = final["eval"] if final is not None else None
    if accelerator.is_main_process:
        save_final(model, processor, args, history, final_eval, time.time() - started, notes, run)
    accelerator.end_training()


def save_runnable_settings(model, data, accelerator, args, history) -> str:
    """Oracle partitions need ground truth at inference: switch to the closest runnable source, measure the model
    again with it (so that the saved model reproduces its reported numbers) and return a note saying so."""
    source = runnable_partition_source(model.config)
    model.config.update_settings(partition_source=source)
    last = next((r for r in reversed(history) if "eval" in r), None)
    note = (f"Trained with oracle partitions (from the ground truth), which need labels at inference: saved with "
            f"`partition_source={source!r}`.")
    if last is not None:
        note += (f" With oracle partitions it measured {100 * last['eval']['mean_iou']:.2f} mIoU; the reported "
                 f"results are measured with `{source}`.")
        log_eval(model, data, accelerator, args, history, last["stage"], last["step"])
    accelerator.print(note)
    return note


def save_final(model, processor, args, history, final_eval, seconds, notes: list[str], run: dict | None = None) -> None:
    """Model, processor, code, `metrics.json` and the model card in `--output_dir`; optionally pushed. `final_eval`
    was measured with the settings saved in the configuration; `run` holds the run's arguments and its commands (the
    first, then each resume), which the card shows. Everything is written to a temporary folder first and then moved
    in, `config.json` last, so that a failed write (a full disk) never leaves a folder that looks like a model without
    its weights."""
    dataset_name = args.dataset_name or "built-in procedural scenes"
    if args.dataset_name and os.path.isdir(args.dataset_name):
        dataset_name = os.path.basename(os.path.normpath(args.dataset_name))
    run = run or {"commands": [command_line(args)]}
    command = "\n".join(run["commands"])
    name = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
    precision = run.get("run_arguments", {}).get("mixed_precision", "no")
    if precision != "no":
        notes = [*notes, f"Trained in {precision} mixed precision (autocast)."]
    if not args.dataset_name:
        notes = [*notes, "Trained on the built-in procedural scenes: its results say nothing about real images."]
    temporary = tempfile.mkdtemp(prefix=".final-", dir=args.output_dir)
    try:
        model.save_pretrained(temporary)
        processor.save_pretrained(temporary)
        with open(os.path.join(temporary, "metrics.json"), "w") as f:
            json.dump(json_safe({"history": history, "final_eval": final_eval,
                                 "settings": model.config.settings.to_dict(),
                                 "trained_components": model.config.trained_components, "train_seconds": seconds,
                                 **run}), f, indent=1, allow_nan=False)
        started = f"Started from `{args.model_name_or_path}`." if args.model_name_or_path else None
        card = model_card(name, model.config, command, dataset_name, final_eval, " ".join(notes),
                          input_size=f"shortest edge resized to {args.image_size}", provenance=started,
                          model_id=args.hub_model_id or args.output_dir)
        card.save(os.path.join(temporary, "README.md"))
    except OSError as error:
        shutil.rmtree(temporary, ignore_errors=True)
        raise disk_error(error, f"saving the final model to {args.output_dir} (nothing of it was written there; the "
                                "checkpoints are intact)") from error
    for file in sorted(os.listdir(temporary), key=lambda file: file == "config.json"):  # renames need no space
        os.replace(os.path.join(temporary, file), os.path.join(args.output_dir, file))
    os.rmdir(temporary)
    print(f"saved the model, processor, code and model card to {args.output_dir}")
    if args.push_to_hub:  # the repository was created by check_hub_repository
        push_folder(args.output_dir, args.hub_model_id, ["checkpoints/*", "runs/*", "*.tmp"], create=False)
        print(f"pushed {args.output_dir} to {args.hub_model_id}")


if __name__ == "__main__":
    run_command(main)
