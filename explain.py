#!/usr/bin/env python
"""Draw what a vit-custom model looks at as PNG figures: attention maps, attention rollout and the ViT paper's Figure 7.

    python explain.py outputs/vit-custom-digits          # a digits model from run_finetune.py, on 8 of the test digits
    python explain.py outputs/vit-base --images cat.jpg dog.png --class_index 281

The model is anything vit_loading.load_model reads: a vit-custom folder, a transformers ViT or timm checkpoint, or a
Hub repo. Any image files work: each is converted to the model's channels and resized by the model's image processor.
Written into --output_dir:

  attention_maps_<N>_<image>.png   every layer's and head's attention from the pooled token(s) to the patches
  attention_rollout.png            attention rollout (Abnar & Zuidema, 2020) of every image
  gradient_rollout.png             rollout weighted by the gradient of one class's logit (Chefer et al., 2021)
  position_embedding_similarity.png, mean_attention_distance.png, patch_embedding_filters.png
                                   the ViT paper's Figure 7: centre, right and left
"""

import argparse
import sys
from pathlib import Path

from huggingface_hub import ModelCard
from PIL import Image, UnidentifiedImageError

import explain_figures as figures
import explain_vit_custom as explain
from explain_vit_custom import HEAD_FUSIONS
from vit_training.data import DIGITS_DATASET_ID, load_digits_dataset
from vit_loading import load_model


def main(argv: list[str] | None = None) -> list[Path]:
    """Write the figures that `argv` (default: the command line) asks for; returns their paths."""
    args = parse_args(argv)
    model, image_processor = load_model(args.model)
    config = model.config
    if args.images:
        names, images, labels = [path.stem for path in args.images], read_images(args.images), None
    else:
        names, images, labels = default_images(args.model, args.num_images)
    mode = image_mode(config.num_channels)
    pixel_values = image_processor([image.convert(mode) for image in images], return_tensors="pt")["pixel_values"]
    shown = figures.display_images(pixel_values, image_processor.image_mean, image_processor.image_std)
    output_dir = args.output_dir or Path("explanations") / Path(args.model).name
    output_dir.mkdir(parents=True, exist_ok=True)
    written = {}

    # Every layer's and head's attention, from what the pooled vector reads (CLS token or mean of patches).
    layers = explain.check_indices(args.layers, config.num_hidden_layers, "layer")
    heads = explain.check_indices(args.heads, config.num_attention_heads, "head")
    attentions = explain.attention_maps(model, pixel_values, layers, heads)
    maps = explain.patch_map(attentions, config.grid_size, config.num_prefix_tokens, config.pooling)
    for index, name in enumerate(names):
        heading = f"Attention from the {figures.pooled_reader(config)} to the patches: {name}"
        written[f"attention_maps_{index}_{name}.png"] = figures.attention_maps_figure(
            shown[index], maps[:, index], layers, heads, heading
        )

    # Rollout through all layers, plain and weighted by one class's gradient.
    mean, std = image_processor.image_mean, image_processor.image_std
    written["attention_rollout.png"] = figures.rollout_figure(
        model, pixel_values, mean, std, labels, args.head_fusion, args.discard_ratio
    )
    written["gradient_rollout.png"] = figures.gradient_rollout_figure(
        model, pixel_values, mean, std, args.class_index, args.discard_ratio
    )

    # The ViT paper's Figure 7: position embedding similarity, mean attention distance, embedding filters.
    written["position_embedding_similarity.png"] = figures.position_similarity_figure(
        explain.position_embedding_similarity(model)
    )
    distances = explain.mean_attention_distance(
        explain.attention_maps(model, pixel_values), config.grid_size, config.patch_size, config.num_prefix_tokens
    )
    written["mean_attention_distance.png"] = figures.attention_distance_figure(
        distances, config.grid_size, config.patch_size
    )
    num_components = min(args.num_components, config.hidden_size, config.num_channels * config.patch_size**2)
    written["patch_embedding_filters.png"] = figures.filter_components_figure(
        *explain.patch_embedding_components(model, num_components)
    )

    paths = []
    for file_name, figure in written.items():
        figure.savefig(output_dir / file_name, dpi=figures.DPI)
        paths.append(output_dir / file_name)
    print(f"Wrote {len(paths)} figures to {output_dir}")
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "model",
        help="A vit-custom model folder (e.g. run_finetune.py's output), a transformers ViT or timm "
        "checkpoint, or a Hub repo id.",
    )
    parser.add_argument(
        "--images", nargs="+", type=Path, metavar="FILE",
        help="Image files to explain, in any format and size Pillow reads. Default: for a model that run_finetune.py "
        "trained on the digits, the first --num_images images of the digits' test split, which training never sees.",
    )  # fmt: skip
    parser.add_argument(
        "--num_images", type=positive_int, default=8, help="How many default images to explain (default: 8)."
    )
    parser.add_argument(
        "--output_dir", type=Path, help="Where to write the figures (default: explanations/<model folder name>)."
    )
    parser.add_argument(
        "--layers", nargs="+", type=int, metavar="L",
        help="Layers of the attention-map figures, counted from 0; negative counts from the end (default: all).",
    )  # fmt: skip
    parser.add_argument(
        "--heads", nargs="+", type=int, metavar="H", help="Heads of the attention-map figures (default: all)."
    )
    parser.add_argument(
        "--class_index", type=int,
        help="The class whose gradient weights the gradient rollout (default: each image's predicted class).",
    )  # fmt: skip
    parser.add_argument(
        "--head_fusion",
        choices=HEAD_FUSIONS,
        default="mean",
        help="How the rollout fuses each layer's heads (default: mean).",
    )
    parser.add_argument(
        "--discard_ratio", type=float, default=0.0,
        help="Fraction of each layer's lowest fused attention weights the rollouts set to zero, in [0, 1) "
        "(default: 0).",
    )  # fmt: skip
    parser.add_argument(
        "--num_components", type=positive_int, default=28,
        help="Principal components of the patch embedding filters to show, at most what the filters have "
        "(default: 28).",
    )  # fmt: skip
    return parser.parse_args(argv)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return value


def read_images(paths: list[Path]) -> list[Image.Image]:
    images = []
    for path in paths:
        try:
            with Image.open(path) as image:
                images.append(image.copy())
        except (FileNotFoundError, UnidentifiedImageError) as error:
            raise ValueError(f"--images {path}: not an image file Pillow can read ({error}).") from error
    return images


def default_images(model: str, num_images: int) -> tuple[list[str], list[Image.Image], list[int]]:
    """The first `num_images` test digits, for a model whose card says run_finetune.py trained it on them."""
    card = Path(model) / "README.md"
    trained_on = ModelCard.load(card).data.datasets if card.is_file() else None
    if trained_on != [DIGITS_DATASET_ID]:
        raise ValueError(
            f"{model} has no model card saying it was trained on the digits, whose test images are the default: pass "
            "image files with --images."
        )
    test = load_digits_dataset()["test"]
    test = test.select(range(min(num_images, len(test))))
    return [f"digit{index}" for index in range(len(test))], test["image"], test["label"]


def image_mode(num_channels: int) -> str:
    """The Pillow mode that gives the model's channels."""
    if num_channels not in (1, 3):
        raise ValueError(
            f"The model takes {num_channels}-channel images; image files are converted to 1 (grayscale) or 3 (RGB) "
            "channels only. Pass pixel_values to explain_vit_custom's functions instead."
        )
    return "RGB" if num_channels == 3 else "L"


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:
        sys.exit(f"error: {error}")
