"""Masked autoencoder pre-training (He et al., 2022) of a vit-custom encoder.

Most patches (75% in the paper) are hidden; the encoder sees only the visible ones, plus the CLS token. A light
decoder puts a mask token wherever a patch was hidden, mixes all tokens with a few blocks and predicts every patch's
pixels, normalised per patch. The loss is the mean squared error on the hidden patches only.

The encoder is a plain `ViTCustomModel`: `MaskedAutoencoder.encoder.save_pretrained(folder)` writes a folder that
`AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)` loads with a new classifier.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn
from transformers.utils import ModelOutput

from configuration_vit_custom import ViTCustomConfig
from explain_figures import PANEL_INCHES, display_images, show_image
from modeling_vit_custom import ViTCustomLayer, ViTCustomModel, check_pixel_values, resample_position_embeddings


MASKED_GRAY = 0.5  # the shade that stands for a hidden patch in the figure


@dataclass
class MaskedAutoencoderOutput(ModelOutput):
    """What `MaskedAutoencoder.forward` returns.

    Args:
        loss: mean squared error of the predicted normalised pixels on the hidden patches (0 when none is hidden).
        reconstruction: `(batch, num_patches, patch_size**2 * num_channels)` predicted pixels of every patch,
            normalised per patch, in `patchify`'s order.
        mask: `(batch, num_patches)`, true where a patch was hidden from the encoder.
        last_hidden_state: `(batch, num_prefix_tokens + num_visible, hidden_size)` encoder output.
    """

    loss: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None


def masking_generator(seed: int, step: int, rank: int = 0) -> torch.Generator:
    """A CPU generator for the masks of one training step, the same for the same seed, step and process."""
    state = np.random.SeedSequence([seed, step, rank]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def visible_patch_count(num_patches: int, mask_ratio: float) -> int:
    """`round((1 - mask_ratio) * num_patches)`, refusing ratios that leave nothing for the encoder to see."""
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0.0 <= mask_ratio < 1.0:
        raise ValueError(
            f"mask_ratio={mask_ratio!r} must be a number in [0, 1): the fraction of patches hidden from the encoder "
            "(the MAE paper uses 0.75)."
        )
    count = round((1 - mask_ratio) * num_patches)
    if count == 0:
        raise ValueError(
            f"mask_ratio={mask_ratio} hides all {num_patches} patches, leaving the encoder nothing to see; use a "
            f"mask_ratio of at most {1 - 1 / num_patches:.4g}, or more patches (larger images or smaller patches)."
        )
    return count


def random_masking(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose the visible patches of every image by sorting per-image uniform noise, as in the MAE paper.

    The noise is drawn on the CPU from `generator`, so a seeded generator gives the same masks on every device.

    Returns:
        `ids_keep`, `(batch, num_visible)` indices of the visible patches in ascending (image) order, and `mask`,
        `(batch, num_patches)`, true where a patch is hidden.
    """
    num_visible = visible_patch_count(num_patches, mask_ratio)
    noise = torch.rand(batch_size, num_patches, generator=generator).to(device)
    # Kept in image order, not noise order: with nothing hidden the encoder then sees exactly the unmasked sequence.
    ids_keep = noise.argsort(dim=1)[:, :num_visible].sort(dim=1).values
    mask = torch.ones(batch_size, num_patches, dtype=torch.bool, device=device).scatter(1, ids_keep, False)
    return ids_keep, mask


def patch_grid(pixel_values: torch.Tensor, patch_size: int) -> tuple[int, int]:
    """The `(rows, columns)` of patches of `(batch, channels, height, width)` images."""
    return pixel_values.shape[-2] // patch_size, pixel_values.shape[-1] // patch_size


def patchify(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`(batch, channels, height, width)` images as `(batch, num_patches, patch_size**2 * channels)`, row by row."""
    batch_size, channels, height, width = pixel_values.shape
    patches = pixel_values.reshape(batch_size, channels, height // patch_size, patch_size, width // patch_size, -1)
    return patches.permute(0, 2, 4, 3, 5, 1).reshape(batch_size, -1, patch_size * patch_size * channels)


def unpatchify(patches: torch.Tensor, patch_size: int, grid: Sequence[int], channels: int) -> torch.Tensor:
    """The inverse of `patchify` for a `(rows, columns)` patch grid."""
    batch_size = patches.shape[0]
    images = patches.reshape(batch_size, grid[0], grid[1], patch_size, patch_size, channels)
    return images.permute(0, 5, 1, 3, 2, 4).reshape(batch_size, channels, grid[0] * patch_size, -1)


def normalised_patches(pixel_values: torch.Tensor, patch_size: int, eps: float = 1e-6) -> torch.Tensor:
    """The targets: every patch of `patchify` minus its mean, divided by its standard deviation."""
    patches = patchify(pixel_values.float(), patch_size)
    mean, variance = patches.mean(dim=-1, keepdim=True), patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (variance + eps).sqrt()


class MaskedAutoencoderDecoder(nn.Module):
    """MAE's light decoder: encoder tokens projected to `hidden_size`, a mask token in every hidden patch's place,
    learned position embeddings, `num_layers` vit-custom blocks, and a linear layer predicting each patch's pixels.

    An encoder that pools the mean has no final LayerNorm on its tokens; the decoder then normalises them itself.
    """

    def __init__(self, encoder_config: ViTCustomConfig, hidden_size: int, num_layers: int, num_heads: int):
        super().__init__()
        config = ViTCustomConfig(
            image_size=encoder_config.image_size,
            patch_size=encoder_config.patch_size,
            num_channels=encoder_config.num_channels,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=4 * hidden_size,
            hidden_act=encoder_config.hidden_act,
            layer_norm_eps=encoder_config.layer_norm_eps,
            qkv_bias=encoder_config.qkv_bias,
            use_cls_token=encoder_config.use_cls_token,
            pooling=encoder_config.pooling,
            attn_implementation=encoder_config._attn_implementation,
        )
        self.grid_size = config.grid_size
        self.num_prefix_tokens = config.num_prefix_tokens
        eps = config.layer_norm_eps
        mean_pooled = config.pooling == "mean"
        self.input_norm = nn.LayerNorm(encoder_config.hidden_size, eps=eps) if mean_pooled else nn.Identity()
        self.embed = nn.Linear(encoder_config.hidden_size, hidden_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        num_positions = self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_positions, hidden_size))
        self.layers = nn.ModuleList([ViTCustomLayer(config) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.prediction = nn.Linear(hidden_size, config.patch_size**2 * config.num_channels)
        nn.init.trunc_normal_(self.mask_token, std=encoder_config.initializer_range)
        nn.init.trunc_normal_(self.position_embeddings, std=encoder_config.initializer_range)

    def forward(self, encoded: torch.Tensor, ids_keep: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
        """Predict the normalised pixels of all `grid` patches from the encoder's prefix and visible tokens."""
        tokens = self.embed(self.input_norm(encoded))
        prefix, visible = tokens[:, : self.num_prefix_tokens], tokens[:, self.num_prefix_tokens :]
        batch_size, _, width = visible.shape
        all_patches = self.mask_token.to(visible.dtype).expand(batch_size, grid[0] * grid[1], width)
        all_patches = all_patches.scatter(1, ids_keep.unsqueeze(-1).expand(-1, -1, width), visible)
        positions = resample_position_embeddings(self.position_embeddings, grid, self.grid_size, self.num_prefix_tokens)
        hidden_states = torch.cat([prefix, all_patches], dim=1) + positions
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return self.prediction(self.norm(hidden_states[:, self.num_prefix_tokens :]))


class MaskedAutoencoder(nn.Module):
    """A vit-custom encoder with MAE's masking, light decoder and normalised-pixel loss.

    Args:
        encoder: the `ViTCustomModel` to pre-train; its embeddings, blocks and final norm are used as they are.
        mask_ratio: fraction of the patches hidden from the encoder, in [0, 1).
        decoder_hidden_size, decoder_num_layers, decoder_num_heads: the decoder's width, depth and heads (the
            paper's default decoder: 512 wide, 8 blocks, 16 heads).
    """

    def __init__(
        self,
        encoder: ViTCustomModel,
        mask_ratio: float = 0.75,
        decoder_hidden_size: int = 512,
        decoder_num_layers: int = 8,
        decoder_num_heads: int = 16,
    ):
        super().__init__()
        config = encoder.config
        visible_patch_count(config.grid_size[0] * config.grid_size[1], mask_ratio)
        self.mask_ratio = mask_ratio
        self.patch_size = config.patch_size
        self.encoder = encoder
        self.decoder = MaskedAutoencoderDecoder(config, decoder_hidden_size, decoder_num_layers, decoder_num_heads)
        self.decoder.apply(encoder._init_weights)

    def forward(
        self,
        pixel_values: torch.Tensor,
        generator: torch.Generator | None = None,
        interpolate_pos_encoding: bool | None = None,
    ) -> MaskedAutoencoderOutput:
        """Hide patches at random (drawn from `generator`), encode the rest, predict every patch; loss on the hidden."""
        encoded, ids_keep, mask = self.encode(pixel_values, generator, interpolate_pos_encoding)
        grid = patch_grid(pixel_values, self.patch_size)
        reconstruction = self.decoder(encoded, ids_keep, grid)
        errors = (reconstruction.float() - normalised_patches(pixel_values, self.patch_size)).square().mean(dim=-1)
        loss = (errors * mask).sum() / mask.sum().clamp(min=1)
        return MaskedAutoencoderOutput(loss=loss, reconstruction=reconstruction, mask=mask, last_hidden_state=encoded)

    def encode(
        self,
        pixel_values: torch.Tensor,
        generator: torch.Generator | None = None,
        interpolate_pos_encoding: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The encoder's output on the prefix and the visible patches, with `random_masking`'s `ids_keep` and `mask`.

        With `mask_ratio=0` this is `ViTCustomModel`'s `last_hidden_state`.
        """
        check_pixel_values(pixel_values, self.encoder.config.num_channels)
        embeddings = self.encoder.embeddings
        pixel_values = pixel_values.to(embeddings.patch_embeddings.projection.weight.dtype)
        patch_tokens, position_embeddings = embeddings.patch_tokens(pixel_values, interpolate_pos_encoding)
        batch_size, num_patches, width = patch_tokens.shape
        ids_keep, mask = random_masking(batch_size, num_patches, self.mask_ratio, generator, patch_tokens.device)
        visible = patch_tokens.gather(1, ids_keep.unsqueeze(-1).expand(-1, -1, width))
        hidden_states = embeddings.dropout(embeddings.add_prefix(visible, position_embeddings))
        for layer in self.encoder.layers:
            hidden_states = layer(hidden_states)
        return self.encoder.layernorm(hidden_states), ids_keep, mask


def reconstructed_images(pixel_values: torch.Tensor, output: MaskedAutoencoderOutput, patch_size: int) -> torch.Tensor:
    """The predicted patches as images, in `pixel_values`' (normalised) space.

    The model predicts each patch up to its mean and standard deviation; for viewing, both are taken from the input.
    """
    patches = patchify(pixel_values.detach().float(), patch_size)
    mean, std = patches.mean(dim=-1, keepdim=True), (patches.var(dim=-1, keepdim=True) + 1e-6).sqrt()
    predicted = output.reconstruction.detach().float() * std + mean
    grid = patch_grid(pixel_values, patch_size)
    return unpatchify(predicted, patch_size, grid, pixel_values.shape[1])


def reconstruction_figure(
    pixel_values: torch.Tensor,
    output: MaskedAutoencoderOutput,
    patch_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    title: str = "",
) -> Figure:
    """One column per image: the input, what the encoder saw, the reconstruction, and the reconstruction with the
    visible patches pasted back. Each panel is `explain_figures.PANEL_INCHES` square; save with `figure.savefig`.
    """
    grid = patch_grid(pixel_values, patch_size)
    hidden = unpatchify(output.mask.detach().cpu().float()[..., None], 1, grid, 1)
    hidden = nn.functional.interpolate(hidden, scale_factor=patch_size)  # (batch, 1, height, width)
    inputs = display_images(pixel_values, image_mean, image_std)
    predicted = display_images(reconstructed_images(pixel_values, output, patch_size), image_mean, image_std)
    hidden = hidden.permute(0, 2, 3, 1).reshape(inputs.shape[:3] + (1,) * (inputs.ndim - 3)).numpy()
    rows = {
        "input": inputs,
        "encoder input": inputs * (1 - hidden) + MASKED_GRAY * hidden,
        "reconstruction": predicted,
        "reconstruction\n+ visible": inputs * (1 - hidden) + predicted * hidden,
    }
    figure = Figure(figsize=(PANEL_INCHES * len(inputs) + 0.8, PANEL_INCHES * len(rows) + 0.4), layout="constrained")
    axes = figure.subplots(len(rows), len(inputs), squeeze=False)
    for row, (name, images) in enumerate(rows.items()):
        for column, image in enumerate(images):
            show_image(axes[row, column], image)
        axes[row, 0].set_axis_on()
        axes[row, 0].set(xticks=[], yticks=[])
        axes[row, 0].set_ylabel(name, fontsize=8)
    figure.suptitle(title, fontsize=10)
    return figure
