"""Model cards for STEP models in Hub format (YAML metadata with `model-index`, then prose)."""

import math

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .configuration_step import StepConfig


def model_card(
    model_name: str,
    config: StepConfig,
    training_command: str | None,
    dataset_name: str | None = None,
    results: dict | None = None,
    notes: str = "",
    input_size: str | None = None,
    provenance: str | None = None,
    model_id: str | None = None,
) -> ModelCard:
    """
    A model card for a STEP model. `results` holds measured numbers only (`mean_iou`, `overall_accuracy` in [0, 1],
    `tokens_per_image`, ...), measured with the settings saved in `config` (the card says so, naming them, and
    `input_size` when given); without them the card says "not trained yet". `provenance` says where the weights
    came from when the model did not start from scratch (converted from another checkpoint, started from a saved
    model), before the training command if any. `model_id` is what the usage snippet loads (a Hub id or the folder's
    path; default `model_name`).
    """
    data = card_data(model_name, dataset_name, results)
    encoder = (f"ViT with {config.num_hidden_layers} blocks of width {config.hidden_size}, "
               f"{config.num_attention_heads} heads, patch {config.patch_size}")
    rule = (f"keeping {config.exit_keep_tokens} tokens per image" if config.exit_keep_tokens
            else f"thresholds {config.exit_thresholds}")
    lines = [
        f"# {model_name}",
        "",
        "A [STEP](https://arxiv.org/abs/2509.14165) (SuperToken and Early-Pruning) semantic-segmentation model: a "
        f"plain {encoder}, a Segmenter mask-transformer decoder, a dCTS policy network that merges uniform "
        f"square groups of patches (sizes {config.superpatch_sizes}) into one token, and exit heads after blocks "
        f"{config.exit_layers} that halt confident tokens ({rule}, halting "
        f"{'on' if config.halting else 'off'}).",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        f'segmenter = pipeline("image-segmentation", model="{model_id or model_name}", trust_remote_code=True)',
        "```",
        "",
        "## Training",
        "",
    ]
    if provenance:
        lines += [provenance, ""]
    if training_command:
        lines += ["Trained with:", "", "```bash", training_command, "```", ""]
    elif not provenance:
        lines += ["Not trained yet.", ""]
    measured = results_lines(config, results, dataset_name, input_size)
    if provenance and not results:  # converted weights did train, elsewhere
        measured = ["No results measured with step-hf yet.", ""]
    lines += ["## Results", "", *measured]
    lines += [
        "## Intended use and limits",
        "",
        "Semantic segmentation of images like those of its training set. Token sharing and halting trade a little "
        "accuracy for speed; the partition and exit decisions are returned with every prediction "
        "(`superpatch_map`, `exit_map`). Models trained on small or synthetic data are for testing only.",
    ]
    if notes:
        lines += ["", notes]
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines) + "\n")


def card_data(model_name: str, dataset_name: str | None, results: dict | None) -> ModelCardData:
    """The card's YAML metadata: pipeline tag, tags, and the measured results as `model-index` entries."""
    eval_results = None
    if results and dataset_name:
        eval_results = [
            EvalResult(
                task_type="image-segmentation", dataset_type=dataset_name, dataset_name=dataset_name,
                metric_type=metric, metric_name=name, metric_value=round(float(results[metric]) * 100, 2),
                dataset_split=results.get("split", "validation"),
            )
            for metric, name in (("mean_iou", "mIoU"), ("overall_accuracy", "Pixel accuracy"))
            if measured(results.get(metric))  # nothing labelled measures NaN: no number to publish
        ] or None
    data = ModelCardData(
        library_name="transformers", pipeline_tag="image-segmentation", license="apache-2.0",
        tags=["step", "vision-transformer", "semantic-segmentation", "token-reduction"],
        datasets=[dataset_name] if dataset_name and "/" in dataset_name else None,
        model_name=model_name, eval_results=eval_results,
    )
    return data


def results_lines(config: StepConfig, results: dict | None, dataset_name: str | None,
                  input_size: str | None) -> list[str]:
    """The card's results: where and with which settings they were measured, then one table row."""
    if not results:
        return ["Not trained yet: no measured results.", ""]
    if not measured(results.get("mean_iou")):
        return ["No mIoU was measured (an evaluation split without a labelled pixel measures none).", ""]
    split = results.get("split", "validation")
    halted = ", ".join(f"{100 * s:.1f}%" for s in results.get("halted_share", [])) or "-"
    return [
        f"Measured on the {split} split of `{dataset_name}`{f' ({input_size})' if input_size else ''}, with the "
        f"settings this model loads with: {settings_text(config)}.", "",
        "| mIoU | pixel accuracy | tokens / image | share halted per exit |",
        "|---|---|---|---|",
        f"| {100 * results['mean_iou']:.2f} | {100 * results['overall_accuracy']:.2f} | "
        f"{results.get('tokens_per_image', float('nan')):.1f} | {halted} |",
        "",
    ]


def measured(value) -> bool:
    """Whether `value` is a number that was measured (not missing, NaN or infinite)."""
    return value is not None and math.isfinite(value)


def settings_text(config: StepConfig) -> str:
    """The run-time settings of `config` in words, as a card states them next to its numbers."""
    if config.partition_source == "dense" or not config.shared_sizes:
        partition = "no token sharing (`partition_source=\"dense\"`)"
    elif config.partition_source == "oracle":
        partition = "oracle partitions from the ground truth (`partition_source=\"oracle\"`)"
    elif config.token_budget is not None:
        partition = f"policy partitions with a budget of {config.token_budget} tokens per image"
    else:
        partition = f"policy partitions at thresholds {config.policy_thresholds}"
    if not config.halting:
        exits = "halting off"
    elif config.exit_keep_tokens:
        exits = f"halting on, exits after blocks {config.exit_layers} keeping {config.exit_keep_tokens} tokens"
    else:
        exits = f"halting on, exits after blocks {config.exit_layers} at thresholds {config.exit_thresholds}"
    if config.halting:
        rule = "DToP's rule" if config.exit_keep_rule == "predicted_class" else "the class-column rule"
        exits += (f" ({config.exit_head_type.upper()} heads, the {config.exit_keep_topk_per_class} most confident "
                  f"tokens per class kept by {rule}, predictions merged as {config.exit_merge})")
    return f"{partition}, {exits}"


__all__ = ["model_card", "settings_text"]
