"""Results out: metrics as text and JSON, training curves, the attention rollout figure and the model card."""

import json
from dataclasses import dataclass
from pathlib import Path

import accelerate
import datasets
import torch
import transformers
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from matplotlib.figure import Figure

from configuration_vit_custom import ViTCustomConfig

# The files the writers below put into the output folder.
RESULTS_FILE = "all_results.json"
CURVES_FILE = "training_curves.png"
ROLLOUT_FILE = "attention_rollout.png"
CARD_FILE = "README.md"
# Masked inputs and their reconstructions after every epoch of a pre-training run.
RECONSTRUCTIONS_FILE = "reconstructions-epoch-{epoch}.png"
OUTPUT_FILES = (RESULTS_FILE, CURVES_FILE, ROLLOUT_FILE, CARD_FILE, RECONSTRUCTIONS_FILE.format(epoch="*"))


def write_results(output_dir: Path, results: dict):
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n")


def format_metrics(metrics: dict, exclude: tuple[str, ...] = ()) -> str:
    return ", ".join(f"{name} {value:.4g}" for name, value in metrics.items() if name not in exclude)


def tracker_config(values: dict) -> dict:
    """`values` as the scalars that every tracker (TensorBoard's hparams included) accepts."""
    return {name: value if isinstance(value, (int, float, str, bool)) else str(value) for name, value in values.items()}


def plot_training_curves(
    history: list[dict], output_dir: Path, loss: str = "loss", train: str = "train (with label smoothing)"
):
    """Loss, accuracy (of a classifier) and learning rate per epoch, as a PNG; `loss` and `train` name the loss and
    its training curve."""
    epochs = [record["epoch"] for record in history]
    classifier = "eval_accuracy" in history[0]
    figure = Figure(figsize=(13 if classifier else 9, 3.6), layout="tight")  # no pyplot: no global state, no display
    loss_axis, *accuracy_axis, lr_axis = figure.subplots(1, 3 if classifier else 2)
    loss_axis.plot(epochs, [r["train_loss"] for r in history], label=train)
    loss_axis.plot(epochs, [r["eval_loss"] for r in history], label="validation")
    loss_axis.set(title=loss, xlabel="epoch")
    loss_axis.legend()
    for axis in accuracy_axis:
        axis.plot(epochs, [r["eval_accuracy"] for r in history], label="top-1")
        if "eval_top5_accuracy" in history[0]:
            axis.plot(epochs, [r["eval_top5_accuracy"] for r in history], label="top-5")
        axis.set(title="validation accuracy", xlabel="epoch")
        axis.legend()
    lr_axis.plot(epochs, [r["learning_rate"] for r in history])
    lr_axis.set(title="learning rate (end of epoch)", xlabel="epoch")
    figure.savefig(output_dir / CURVES_FILE, dpi=100)


def plot_attention_rollout(output_dir: Path, batch: dict, image_processor):
    """The attention rollout of a batch of validation images, as `attention_rollout.png`.

    Drawn by the saved model, reloaded on the CPU, so that neither a training wrapper (compile, FSDP, mixed precision)
    nor the devices change what the figure shows.
    """
    from explain_figures import DPI, rollout_figure
    from modeling_vit_custom import ViTCustomForImageClassification

    model = ViTCustomForImageClassification.from_pretrained(output_dir).eval()
    mean, std = image_processor.image_mean, image_processor.image_std
    figure = rollout_figure(model, batch["pixel_values"], mean, std, labels=batch["labels"].tolist())
    figure.savefig(output_dir / ROLLOUT_FILE, dpi=DPI)


MODEL_CARD = """---
{card_data}
---

# {model_name}

A Vision Transformer ([vit-custom](https://huggingface.co/docs/transformers/custom_models)) for image classification,
{origin} on {dataset_description} with `run_finetune.py`.

| | |
|---|---|
{architecture}

## Results

{results_table}

![Training curves](training_curves.png)

## What the model looks at

Attention rollout ([Abnar & Zuidema, 2020](https://arxiv.org/abs/2005.00928)) of a few validation images: how much
the pooled image vector draws from each patch through all the layers. vit-custom's `explain.py` draws more (every
head's attention, the ViT paper's Figure 7).

![Attention rollout](attention_rollout.png)

## How to use

The model code lives in this repository, so loading it runs that code on your machine: pin the `revision` to a commit
you have reviewed.

```python
from transformers import pipeline

classifier = pipeline(
    "image-classification", model="{repo_id}", trust_remote_code=True, revision="{revision}"
)
classifier("image.png")
```

or, without the pipeline:

```python
from transformers import AutoImageProcessor, AutoModelForImageClassification

model = AutoModelForImageClassification.from_pretrained("{repo_id}", trust_remote_code=True, revision="{revision}")
processor = AutoImageProcessor.from_pretrained("{repo_id}", revision="{revision}")
```

## Training

{hyperparameters}

Framework versions: transformers {transformers_version}, PyTorch {torch_version}, Accelerate {accelerate_version},
Datasets {datasets_version}.
"""


@dataclass(frozen=True)
class CardFacts:
    """What a model card says about a run besides the model and its results."""

    dataset: tuple[str, str]  # an identifier and a description of the training data
    hyperparameters: dict  # name -> value, listed under "Training"
    license: str = "apache-2.0"
    base_model: str | None = None  # the checkpoint fine-tuned, None for a model trained from scratch
    base_revision: str | None = None


def write_model_card(
    output_dir: Path, config: ViTCustomConfig, results: dict, facts: CardFacts, repo_id: str | None,
    revision: str = "main",
):
    """A README.md with Hub metadata (library, task, dataset, metrics as model-index) and a loading snippet."""
    model_name = (repo_id or output_dir.name).split("/")[-1]
    dataset_id, dataset_description = facts.dataset
    from_hub_model = facts.base_model is not None and not Path(facts.base_model).exists()
    split = "test" if "test_accuracy" in results else "validation"
    prefix = "test" if split == "test" else "eval"
    metrics = {"accuracy": results[f"{prefix}_accuracy"]}
    if f"{prefix}_top5_accuracy" in results:
        metrics["top5_accuracy"] = results[f"{prefix}_top5_accuracy"]
    card_data = ModelCardData(
        license=facts.license,
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["vit-custom", "vision", "image-classification", "custom_code"],
        datasets=[dataset_id],
        metrics=list(metrics),
        base_model=facts.base_model if from_hub_model else None,
        model_name=model_name,
        eval_results=[
            EvalResult(
                task_type="image-classification",
                task_name="Image Classification",
                dataset_type=dataset_id,
                dataset_name=dataset_description,
                dataset_split=split,
                metric_type=name,
                metric_name=name.replace("_", " ").replace("top5", "top-5").capitalize(),
                metric_value=round(value, 4),
            )
            for name, value in metrics.items()
        ],
    )
    height, width = config.image_height_width
    num_patches = config.grid_size[0] * config.grid_size[1]
    architecture = {
        "resolution": f"{height}x{width} px, {config.num_channels} channel(s)",
        "patches": f"{config.patch_size}x{config.patch_size} px, {num_patches} tokens",
        "encoder": f"{config.num_hidden_layers} blocks, width {config.hidden_size}, "
        f"{config.num_attention_heads} heads, MLP {config.intermediate_size}",
        "pooling": f"{config.pooling} ({'with' if config.use_cls_token else 'without'} CLS token)",
        "classes": f"{config.num_labels}: {', '.join(config.id2label[i] for i in range(min(config.num_labels, 10)))}"
        + (", ..." if config.num_labels > 10 else ""),
    }
    results_table = "| split | metric | value |\n|---|---|---|\n" + "\n".join(
        f"| {split} | {name.replace('_', ' ')} | {value:.4f} |" for name, value in metrics.items()
    )
    card = ModelCard(
        MODEL_CARD.format(
            card_data=card_data.to_yaml(),
            model_name=model_name,
            origin=checkpoint_origin(facts.base_model, facts.base_revision),
            dataset_description=dataset_description,
            architecture="\n".join(f"| {key} | {value} |" for key, value in architecture.items()),
            results_table=results_table,
            repo_id=repo_id or f"<user>/{model_name}",
            revision=revision,
            hyperparameters="\n".join(f"- {key}: {value}" for key, value in facts.hyperparameters.items()),
            transformers_version=transformers.__version__,
            torch_version=torch.__version__,
            accelerate_version=accelerate.__version__,
            datasets_version=datasets.__version__,
        )
    )
    card.save(output_dir / CARD_FILE)


def checkpoint_origin(base_model: str | None, revision: str | None) -> str:
    if base_model is None:
        return "trained from scratch"
    at_revision = f" at revision `{revision}`" if revision is not None else ""
    return f"fine-tuned from `{base_model}`{at_revision}"

