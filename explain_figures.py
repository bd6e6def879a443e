"""Figures of what a vit-custom model looks at, drawn from `explain_vit_custom`'s tensors.

Every function returns a `matplotlib.figure.Figure` (no pyplot: no global state, no display needed); save it with
`figure.savefig(path)`. Maps are drawn over the image the model saw, one cell per patch, on the image's pixel grid.
"""

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.colors import Normalize, PowerNorm
from matplotlib.figure import Figure

import explain_vit_custom as explain


HEAT_MAP = "inferno"
OVERLAY_ALPHA = 0.6
PANEL_INCHES = 1.5
DPI = 100
ROLLOUT_SCALE = "rollout, from each image's\nlowest to highest patch"


def rollout_figure(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    labels: Sequence[int] | None = None,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
) -> Figure:
    """The attention rollout of a few images, each titled with its predicted (and true) class.

    Args:
        model: a vit-custom `ViTCustomForImageClassification`, in eval mode.
        pixel_values: `(batch, channels, height, width)`, normalised with `image_mean` and `image_std`.
        image_mean, image_std: the image processor's normalisation, undone to show the images.
        labels: the true class of every image, if known.
        head_fusion, discard_ratio: as in `explain_vit_custom.attention_rollout`.
    """
    config = model.config
    rollout = explain.attention_rollout(explain.attention_maps(model, pixel_values), head_fusion, discard_ratio)
    with torch.no_grad():
        predicted = model(pixel_values.to(model.device)).logits.argmax(dim=-1).tolist()
    titles = [f"predicted {class_name(config, index)}" for index in predicted]
    if labels is not None:
        titles = [f"{title}\ntrue {class_name(config, label)}" for title, label in zip(titles, labels, strict=True)]
    return overlay_figure(
        display_images(pixel_values, image_mean, image_std),
        explain.patch_map(rollout, input_grid(config, pixel_values), config.num_prefix_tokens, config.pooling),
        titles,
        heading=f"Attention rollout to the {pooled_reader(config)} ({head_fusion} over heads, discard ratio "
        f"{discard_ratio})",
        colorbar_label=ROLLOUT_SCALE,
    )


def gradient_rollout_figure(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    class_index: int | None = None,
    discard_ratio: float = 0.0,
) -> Figure:
    """The gradient-weighted rollout of a few images for `class_index` (default: each one's predicted class)."""
    config = model.config
    rollout, classes = explain.gradient_rollout(model, pixel_values, class_index, discard_ratio)
    which = "predicted class" if class_index is None else "class"
    return overlay_figure(
        display_images(pixel_values, image_mean, image_std),
        explain.patch_map(rollout, input_grid(config, pixel_values), config.num_prefix_tokens, config.pooling),
        [f"{which}\n{class_name(config, index)}" for index in classes.tolist()],
        heading=f"Gradient-weighted attention rollout to the {pooled_reader(config)} (discard ratio {discard_ratio})",
        colorbar_label=ROLLOUT_SCALE,
    )


def overlay_figure(
    images: np.ndarray, maps: torch.Tensor, titles: Sequence[str], heading: str, colorbar_label: str
) -> Figure:
    """Each image above the same image overlaid with its map, one column per image.

    Each map is scaled from its lowest to its highest patch: rollouts are dominated by the identity of the residual
    connections, so on a common scale from 0 their differences between patches would not show.
    """
    low = maps.flatten(1).min(dim=1).values.view(-1, 1, 1)
    high = maps.flatten(1).max(dim=1).values.view(-1, 1, 1)
    scaled = (maps - low) / (high - low).clamp(min=1e-12)
    figure = Figure(figsize=(PANEL_INCHES * len(images) + 1.0, 2 * PANEL_INCHES + 0.9), layout="constrained")
    axes = figure.subplots(2, len(images), squeeze=False)
    for column, (image, heat, title) in enumerate(zip(images, scaled, titles, strict=True)):
        show_image(axes[0, column], image)
        axes[0, column].set_title(title, fontsize=8)
        artist = overlay(axes[1, column], image, heat, Normalize(vmin=0.0, vmax=1.0))
    figure.colorbar(artist, ax=axes.ravel().tolist(), label=colorbar_label, shrink=0.8, pad=0.01)
    figure.suptitle(heading, fontsize=10)
    return figure


def attention_maps_figure(
    image: np.ndarray, maps: torch.Tensor, layers: Sequence[int], heads: Sequence[int], heading: str
) -> Figure:
    """One image's attention maps `(layers, heads, grid_height, grid_width)`: a row per layer, a column per head.

    One colour scale for all panels, a square-root one, so that a head's small weights stay visible beside another
    head's peak.
    """
    figure = Figure(
        figsize=(PANEL_INCHES * (len(heads) + 1) + 1.2, PANEL_INCHES * len(layers) + 0.8), layout="constrained"
    )
    axes = figure.subplots(len(layers), len(heads) + 1, squeeze=False)
    norm = PowerNorm(gamma=0.5, vmin=0.0, vmax=float(maps.max()))
    for row, layer in enumerate(layers):
        axes[row, 0].set_axis_off()
        for column, head in enumerate(heads, start=1):
            artist = overlay(axes[row, column], image, maps[row, column - 1], norm)
            axes[row, column].set_title(f"layer {layer}, head {head}", fontsize=9)
    show_image(axes[0, 0], image)
    axes[0, 0].set_title("input", fontsize=9)
    figure.colorbar(artist, ax=axes[:, 1:].ravel().tolist(), label="attention weight", shrink=0.9)
    figure.suptitle(heading, fontsize=10)
    return figure


def position_similarity_figure(similarity: torch.Tensor) -> Figure:
    """`(grid_h, grid_w, grid_h, grid_w)` cosine similarities: a panel per patch, placed where the patch is.

    Rows and columns are numbered from 1, as in the ViT paper's figure.
    """
    rows, columns = similarity.shape[:2]
    side = min(PANEL_INCHES, 9.0 / max(rows, columns))
    figure = Figure(figsize=(side * columns + 1.4, side * rows + 0.9), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for row in range(rows):
        for column in range(columns):
            artist = axes[row, column].imshow(similarity[row, column], cmap="viridis", vmin=-1, vmax=1)
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
        axes[row, 0].set_ylabel(str(row + 1), rotation=0, ha="right", va="center", fontsize=8)
    for column in range(columns):
        axes[-1, column].set_xlabel(str(column + 1), fontsize=8)
    figure.supylabel("input patch row")
    figure.supxlabel("input patch column")
    figure.colorbar(artist, ax=axes.ravel().tolist(), label="cosine similarity", shrink=0.8)
    figure.suptitle("Position embedding similarity: each patch's embedding against every other's", fontsize=10)
    return figure


def attention_distance_figure(distances: torch.Tensor, grid_size: Sequence[int], patch_size: int) -> Figure:
    """Mean attention distance `(layers, heads)`: one dot per head, by depth, as in the ViT paper's Figure 7."""
    num_layers, num_heads = distances.shape
    height, width = grid_size[0] * patch_size, grid_size[1] * patch_size
    num_tokens = grid_size[0] * grid_size[1]
    uniform = explain.mean_attention_distance(torch.ones(1, 1, 1, num_tokens, num_tokens), grid_size, patch_size, 0)
    figure = Figure(figsize=(6, 4), layout="constrained")
    axis = figure.subplots()
    for head in range(num_heads):
        axis.scatter(range(num_layers), distances[:, head], s=18, label=f"head {head}")
    axis.axhline(float(uniform), color="gray", linestyle="--", label="uniform attention")
    axis.set(
        xlabel="network depth (layer)",
        ylabel="mean attention distance (pixels)\n(axis up to the image diagonal)",
        ylim=(0, float(np.hypot(height, width))),
        xticks=range(num_layers),
        title=f"Mean attention distance, {height}x{width} px input",
    )
    axis.title.set_fontsize(10)
    axis.legend(fontsize=8, ncol=2 if num_heads > 6 else 1, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return figure


def filter_components_figure(components: torch.Tensor, explained: torch.Tensor) -> Figure:
    """Principal components `(k, channels, P, P)` of the patch-embedding filters, each scaled to the full range."""
    count = len(components)
    columns = min(count, 7)
    rows = -(-count // columns)
    figure = Figure(figsize=(1.3 * columns, 1.4 * rows + 0.6), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis in axes.ravel():
        axis.set_axis_off()
    for index, (component, fraction) in enumerate(zip(components, explained)):
        low, high = component.min(), component.max()
        image = ((component - low) / (high - low).clamp(min=1e-12)).permute(1, 2, 0).squeeze(-1).numpy()
        axis = axes[index // columns, index % columns]
        axis.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axis.set_title(f"PC{index + 1} ({fraction:.0%})", fontsize=8)
    figure.suptitle("Principal components of the patch embedding filters (share of variance)", fontsize=10)
    return figure


def display_images(pixel_values: torch.Tensor, image_mean: Sequence[float], image_std: Sequence[float]) -> np.ndarray:
    """The images as the model sees them, the normalisation undone: `(batch, height, width[, 3])` in [0, 1]."""
    mean = torch.as_tensor(image_mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(image_std, dtype=torch.float32).view(1, -1, 1, 1)
    images = (pixel_values.detach().float().cpu() * std + mean).clamp(0, 1)
    return images.permute(0, 2, 3, 1).squeeze(-1).numpy()


def show_image(axis, image: np.ndarray):
    axis.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axis.set_axis_off()


def overlay(axis, image: np.ndarray, heat: torch.Tensor, norm: Normalize):
    """Draw `image` with `heat` over it, stretched so that each map cell covers its patch's pixels."""
    height, width = image.shape[:2]
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)  # the image's own pixel-centre coordinates
    show_image(axis, image)
    return axis.imshow(heat, cmap=HEAT_MAP, norm=norm, alpha=OVERLAY_ALPHA, interpolation="nearest", extent=extent)


def input_grid(config, pixel_values: torch.Tensor) -> tuple[int, int]:
    """The patch grid of `pixel_values` (the config's, unless the input is of another size)."""
    return pixel_values.shape[-2] // config.patch_size, pixel_values.shape[-1] // config.patch_size


def class_name(config, index: int) -> str:
    """The class's name, shortened to fit a panel title."""
    name = str(config.id2label.get(int(index), index))
    return name if len(name) <= 12 else name[:11] + "…"


def pooled_reader(config) -> str:
    return "CLS token" if config.pooling == "cls" else "mean of the patch tokens"
