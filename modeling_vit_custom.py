"""vit-custom: a Vision Transformer (Dosovitskiy et al., 2021) as Hugging Face transformers v5 model code.

An image is cut into P x P patches, each patch is linearly embedded, learned position embeddings are added, an
optional CLS token is prepended, and a stack of pre-norm encoder blocks mixes the tokens. The image is then pooled
into one vector, from the CLS token or from the mean of the patch tokens, for a linear classifier.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput, MaskedImageModelingOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs


try:
    from .configuration_vit_custom import ViTCustomConfig
except ImportError:
    from configuration_vit_custom import ViTCustomConfig


def resample_position_embeddings(
    position_embeddings: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int],
    num_prefix_tokens: int,
) -> torch.Tensor:
    """Resample learned position embeddings from one patch grid to another.

    The prefix (CLS) positions are kept as they are; the patch positions are treated as an image of
    `old_grid` and resized to `new_grid` with antialiased bicubic interpolation, in float32, as timm does.
    Used at run time for inputs of another size and once when a checkpoint is loaded at a new resolution.

    Args:
        position_embeddings: `(1, num_prefix_tokens + old_h * old_w, dim)`.
        new_grid: `(new_h, new_w)` patches.
        old_grid: `(old_h, old_w)` patches of `position_embeddings`.
        num_prefix_tokens: leading positions that belong to no patch.

    Returns:
        `(1, num_prefix_tokens + new_h * new_w, dim)`, in the input's dtype.
    """
    if tuple(new_grid) == tuple(old_grid):
        return position_embeddings
    prefix, patches = position_embeddings[:, :num_prefix_tokens], position_embeddings[:, num_prefix_tokens:]
    dim = patches.shape[-1]
    patches = patches.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    patches = nn.functional.interpolate(patches, size=tuple(new_grid), mode="bicubic", antialias=True)
    patches = patches.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(position_embeddings.dtype)
    return torch.cat([prefix, patches], dim=1)


def check_pixel_values(pixel_values: torch.Tensor, num_channels: int):
    """Refuse inputs the model would misread, saying what to pass instead. The image size is the embeddings' check."""
    prepare = "prepare the images with the image processor: processor(images, return_tensors='pt')"
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values is a {type(pixel_values).__name__}, not a torch.Tensor; {prepare}.")
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values holds {pixel_values.dtype} values, not normalised floats; {prepare}, or convert them the "
            "same way (scale to [0, 1], subtract the mean, divide by the std)."
        )
    if pixel_values.ndim != 4 or pixel_values.shape[1] != num_channels:
        if pixel_values.ndim == 3:
            fix = "For a single image, add the batch axis: pixel_values.unsqueeze(0)."
        elif pixel_values.ndim == 4 and pixel_values.shape[-1] == num_channels:
            fix = "The channels come last: pass pixel_values.permute(0, 3, 1, 2)."
        else:
            fix = (
                f"Convert the images to {num_channels} channels (the image processor does this with do_convert_rgb), "
                "or build the model with a matching num_channels."
            )
        raise ValueError(
            f"Expected pixel_values of shape (batch, {num_channels}, height, width), got {tuple(pixel_values.shape)}. "
            + fix
        )


def check_labels(labels: torch.Tensor, logits: torch.Tensor, num_labels: int, problem_type: str):
    """Refuse labels the loss would misread or fail on, saying what to pass instead."""
    batch_size = logits.shape[0]
    if num_labels == 0:
        raise ValueError(
            "The model has no classifier (num_labels=0): it returns the pooled features. Build it with num_labels > 0 "
            "to train it with labels."
        )
    if problem_type == "single_label_classification":
        if labels.is_floating_point() or labels.numel() != batch_size:
            raise ValueError(
                f"Single-label classification takes one class index per image, integers of shape ({batch_size},); "
                f"got {labels.dtype} labels of shape {tuple(labels.shape)}."
            )
        # A data-dependent check: skipped while compiling, where it would break the graph.
        if not torch.compiler.is_compiling():
            wrong = labels[(labels != -100) & ((labels < 0) | (labels >= num_labels))]
            if wrong.numel():
                raise ValueError(
                    f"labels holds class {wrong[0].item()}, but the model has {num_labels} classes: pass indices from "
                    f"0 to {num_labels - 1} (or -100 for an image to ignore), or build the model with more labels."
                )
    elif problem_type == "multi_label_classification" and labels.shape != logits.shape:
        raise ValueError(
            f"Multi-label classification takes 0/1 labels of shape {tuple(logits.shape)}, got {tuple(labels.shape)}. "
            "For single-label classification pass class indices as integers (torch.long), or set "
            "config.problem_type."
        )
    elif problem_type == "regression" and labels.numel() != logits.numel():
        raise ValueError(
            f"Regression takes {logits.numel()} targets ({num_labels} per image), got labels of shape "
            f"{tuple(labels.shape)}."
        )


def dropout(probability: float) -> nn.Module:
    """`nn.Dropout`, or `nn.Identity` when there is nothing to drop (a cheaper call, which small models feel)."""
    return nn.Dropout(probability) if probability > 0 else nn.Identity()


class ViTCustomPatchEmbeddings(nn.Module):
    """Cuts the image into non-overlapping patches and projects each one to `hidden_size`.

    The projection is stored as a strided convolution, the layout of ViT checkpoints, and run as one matrix product
    over the flattened patches: the same sums, with less overhead than a convolution call. So `projection` is
    never called: hooks or adapters belong on this module, not on `projection`.
    """

    def __init__(self, config: ViTCustomConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch_size, channels, height, width = pixel_values.shape
        size = self.patch_size
        patches = pixel_values.reshape(batch_size, channels, height // size, size, width // size, size)
        patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(batch_size, -1, channels * size * size)
        return nn.functional.linear(patches, self.projection.weight.flatten(1), self.projection.bias)


class ViTCustomEmbeddings(nn.Module):
    """Patch embeddings, an optional CLS token in front, plus learned position embeddings.

    With `use_mask_token`, the embeddings of masked patches are replaced by a learned mask token (SimMIM).
    """

    def __init__(self, config: ViTCustomConfig, use_mask_token: bool = False):
        super().__init__()
        self.patch_size = config.patch_size
        self.grid_size = config.grid_size
        self.num_prefix_tokens = config.num_prefix_tokens
        self.interpolate_by_default = config.interpolate_pos_encoding
        self.patch_embeddings = ViTCustomPatchEmbeddings(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if config.use_cls_token else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if use_mask_token else None
        num_positions = self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_positions, config.hidden_size))
        self.dropout = dropout(config.hidden_dropout_prob)

    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool | None = None,
        bool_masked_pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        patch_tokens, position_embeddings = self.patch_tokens(pixel_values, interpolate_pos_encoding, bool_masked_pos)
        return self.dropout(self.add_prefix(patch_tokens, position_embeddings))

    def patch_tokens(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool | None = None,
        bool_masked_pos: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The patch embeddings plus their positions, and the position embeddings for the input's size.

        Args:
            pixel_values: `(batch, num_channels, height, width)`.
            interpolate_pos_encoding: resample the position embeddings to the input's size; defaults to the config's.
            bool_masked_pos: `(batch, num_patches)`, true (or 1) where a patch is replaced by the mask token.

        Returns:
            `(batch, num_patches, hidden_size)` patch tokens and the `(1, num_positions, hidden_size)` position
            embeddings they were given (prefix positions first), for `add_prefix`.
        """
        height, width = pixel_values.shape[-2:]
        grid = (height // self.patch_size, width // self.patch_size)
        if interpolate_pos_encoding is None:
            interpolate_pos_encoding = self.interpolate_by_default
        self._check_size(height, width, grid, interpolate_pos_encoding)

        embeddings = self.patch_embeddings(pixel_values)
        if bool_masked_pos is not None:
            self._check_mask(bool_masked_pos, embeddings.shape[:2], grid)
            mask = bool_masked_pos.unsqueeze(-1).to(embeddings.dtype)
            embeddings = embeddings * (1.0 - mask) + self.mask_token.to(embeddings.dtype) * mask
        position_embeddings = self.position_embeddings
        if interpolate_pos_encoding:
            position_embeddings = resample_position_embeddings(
                position_embeddings, grid, self.grid_size, self.num_prefix_tokens
            )
        return embeddings + position_embeddings[:, self.num_prefix_tokens :], position_embeddings

    def add_prefix(self, patch_tokens: torch.Tensor, position_embeddings: torch.Tensor) -> torch.Tensor:
        """Put the CLS token, plus its position embedding, in front of `patch_tokens` (any subset of the patches)."""
        if self.cls_token is None:
            return patch_tokens
        cls_tokens = (self.cls_token + position_embeddings[:, :1]).expand(patch_tokens.shape[0], -1, -1)
        return torch.cat([cls_tokens, patch_tokens], dim=1)

    def _check_size(self, height: int, width: int, grid: tuple[int, int], interpolate: bool):
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"Input image size ({height}x{width}) is not divisible by the patch size {self.patch_size}; "
                "resize or crop the images to a multiple of it."
            )
        if not interpolate and grid != tuple(self.grid_size):
            trained = (self.grid_size[0] * self.patch_size, self.grid_size[1] * self.patch_size)
            raise ValueError(
                f"Input image size ({height}x{width}) doesn't match the model's image size "
                f"({trained[0]}x{trained[1]}). Resize the images, pass interpolate_pos_encoding=True, or set "
                "config.interpolate_pos_encoding=True to resample the position embeddings for every input."
            )

    def _check_mask(self, bool_masked_pos: torch.Tensor, batch_and_patches: torch.Size, grid: tuple[int, int]):
        if self.mask_token is None:
            raise ValueError(
                "bool_masked_pos was passed to a model without a mask token; use ViTCustomForMaskedImageModeling (or "
                "ViTCustomModel(config, use_mask_token=True)) for masked-image modelling."
            )
        if tuple(bool_masked_pos.shape) != tuple(batch_and_patches):
            raise ValueError(
                f"bool_masked_pos has shape {tuple(bool_masked_pos.shape)}, but the images have {grid[0]}x{grid[1]} "
                f"patches of {self.patch_size} px: pass one value per patch, of shape {tuple(batch_and_patches)}, "
                "and mask in units of the model's patch size."
            )


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T * scaling) V on `(batch, heads, tokens, head_dim)` inputs.

    Returns the output as `(batch, tokens, heads, head_dim)` and the attention weights.
    """
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2)
    return attn_output, attn_weights


class ViTCustomAttention(nn.Module):
    """Multi-head self-attention with one fused query/key/value projection."""

    def __init__(self, config: ViTCustomConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_probs_dropout_prob
        self.is_causal = False
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.proj_dropout = dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, num_tokens, _ = hidden_states.shape
        qkv = self.qkv(hidden_states).view(batch_size, num_tokens, 3, self.num_heads, self.head_dim)
        # Split on the "3" axis itself, so that backward stacks the three gradients straight into qkv's layout.
        query, key, value = (states.transpose(1, 2) for states in qkv.unbind(2))

        # Only the eager computation materialises the attention weights: a call that asks for them runs it, every
        # other call keeps the configured backend (SDPA, flash, flex).
        implementation = "eager" if kwargs.get("output_attentions") else self.config._attn_implementation
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            None,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch_size, num_tokens, -1)
        return self.proj_dropout(self.proj(attn_output)), attn_weights


class ViTCustomMLP(nn.Module):
    """Two linear layers with an activation between them, applied to every token."""

    def __init__(self, config: ViTCustomConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.dropout = dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.activation(self.fc1(hidden_states))))


class DropPath(nn.Module):
    """Stochastic depth: during training, drops a residual branch for whole samples with probability `drop_prob`."""

    def __init__(self, drop_prob: float):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return hidden_states
        keep_prob = 1.0 - self.drop_prob
        mask_shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
        keep = hidden_states.new_empty(mask_shape).bernoulli_(keep_prob)
        return hidden_states * keep / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class ViTCustomLayer(GradientCheckpointingLayer):
    """A pre-norm encoder block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ViTCustomConfig, drop_path: float = 0.0):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = ViTCustomAttention(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = ViTCustomMLP(config)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        attn_output, _ = self.attention(self.layernorm_before(hidden_states), **kwargs)
        hidden_states = hidden_states + self.drop_path(attn_output)
        return hidden_states + self.drop_path(self.mlp(self.layernorm_after(hidden_states)))


class ViTCustomClsPooler(nn.Module):
    """Reads the CLS token, which the model has already passed through the final LayerNorm."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states[:, 0]


class ViTCustomMeanPooler(nn.Module):
    """Averages the patch tokens, then normalises the average (timm's `fc_norm`).

    The CLS token, when there is one, is left out of the average: it is a summary the model is free to write
    anything into, not a part of the image.
    """

    def __init__(self, config: ViTCustomConfig):
        super().__init__()
        self.num_prefix_tokens = config.num_prefix_tokens
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.layernorm(hidden_states[:, self.num_prefix_tokens :].mean(dim=1))


class ViTCustomPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the capabilities transformers reads from the class (attention backends, ...)."""

    config_class = ViTCustomConfig
    config: ViTCustomConfig
    base_model_prefix = "vit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["ViTCustomEmbeddings", "ViTCustomLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": ViTCustomLayer, "attentions": ViTCustomAttention}

    def _init_weights(self, module: nn.Module):
        """ViT / timm initialisation: truncated normal(0.02) weights, zero biases, LayerNorm at identity."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, ViTCustomEmbeddings):
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
            if module.cls_token is not None:
                init.trunc_normal_(module.cls_token, mean=0.0, std=std)
            if module.mask_token is not None:
                init.zeros_(module.mask_token)


class ViTCustomModel(ViTCustomPreTrainedModel):
    """The ViT encoder: embeddings, encoder blocks and pooling. `pooler_output` is the pooled image vector.

    With `pooling="cls"`, `last_hidden_state` is normalised by the final LayerNorm and `pooler_output` is its CLS
    token. With `pooling="mean"`, `last_hidden_state` is the output of the last block and `pooler_output` is the
    normalised mean of its patch tokens. `use_mask_token` adds the mask token that `bool_masked_pos` reads.
    """

    def __init__(self, config: ViTCustomConfig, use_mask_token: bool = False):
        super().__init__(config)
        self.embeddings = ViTCustomEmbeddings(config, use_mask_token=use_mask_token)
        depth = config.num_hidden_layers
        drop_path_rates = [config.drop_path_rate * index / max(depth - 1, 1) for index in range(depth)]
        self.layers = nn.ModuleList([ViTCustomLayer(config, rate) for rate in drop_path_rates])
        if config.pooling == "cls":
            self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.pooler = ViTCustomClsPooler()
        else:
            self.layernorm = nn.Identity()
            self.pooler = ViTCustomMeanPooler(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embeddings

    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self,
        pixel_values: torch.Tensor,
        interpolate_pos_encoding: bool | None = None,
        bool_masked_pos: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, num_channels, height, width)`): the images, as the
                image processor prepares them.
            interpolate_pos_encoding (`bool`, *optional*): resample the position embeddings to the input's size;
                defaults to `config.interpolate_pos_encoding`.
            bool_masked_pos (`torch.BoolTensor` of shape `(batch, num_patches)`, *optional*): patches to replace by
                the mask token (true or 1); needs `use_mask_token=True`.
        """
        check_pixel_values(pixel_values, self.config.num_channels)
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        hidden_states = self.embeddings(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, bool_masked_pos=bool_masked_pos
        )
        for layer in self.layers:
            hidden_states = layer(hidden_states, **kwargs)
        sequence_output = self.layernorm(hidden_states)
        return BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=self.pooler(sequence_output))


class ViTCustomForImageClassification(ViTCustomPreTrainedModel):
    """ViT with a linear classifier on the pooled image vector.

    The loss follows `config.problem_type` (single-label, multi-label or regression). Given `num_items_in_batch`, as
    `transformers.Trainer` passes it under gradient accumulation, every loss is summed and divided by it, so that
    accumulated micro-batches give the same loss and gradients as one large batch.
    """

    def __init__(self, config: ViTCustomConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = ViTCustomModel(config)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, num_channels, height, width)`): the images.
            labels (`torch.Tensor`, *optional*): class indices `(batch,)` for single-label classification, 0/1
                floats `(batch, num_labels)` for multi-label, float targets for regression.
            interpolate_pos_encoding (`bool`, *optional*): see `ViTCustomModel.forward`.
        """
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        outputs = self.vit(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        logits = self.classifier(outputs.pooler_output)
        loss = None
        if labels is not None:
            loss = self.classification_loss(logits, labels, num_items_in_batch)
        return ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )

    def classification_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """Loss of `logits` against `labels` for `config.problem_type`, inferred from the labels when unset.

        The per-item losses are summed and divided by `num_items_in_batch` when given (the number of label entries
        across all accumulated micro-batches, as `Trainer` counts them), else averaged.
        """
        config = self.config
        if config.problem_type is None:
            if self.num_labels == 1:
                config.problem_type = "regression"
            elif labels.dtype in (torch.long, torch.int):
                config.problem_type = "single_label_classification"
            else:
                config.problem_type = "multi_label_classification"
        labels = labels.to(logits.device)
        check_labels(labels, logits, self.num_labels, config.problem_type)
        if config.problem_type == "single_label_classification":
            losses = nn.functional.cross_entropy(
                logits.view(-1, self.num_labels).float(), labels.view(-1).long(), ignore_index=-100, reduction="none"
            )
            num_items = (labels != -100).sum()
        elif config.problem_type == "multi_label_classification":
            losses = nn.functional.binary_cross_entropy_with_logits(
                logits.float(), labels.to(torch.float32), reduction="none"
            )
            num_items = labels.numel()
        elif config.problem_type == "regression":
            predictions = logits.squeeze(-1) if self.num_labels == 1 else logits
            losses = nn.functional.mse_loss(
                predictions.float(), labels.to(torch.float32).view(predictions.shape), reduction="none"
            )
            num_items = labels.numel()
        else:
            raise ValueError(
                f"problem_type={config.problem_type!r} is unknown; use 'single_label_classification', "
                "'multi_label_classification' or 'regression'."
            )
        if num_items_in_batch is None:
            num_items_in_batch = num_items
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(losses.device)
        return losses.sum() / num_items_in_batch


class ViTCustomForMaskedImageModeling(ViTCustomPreTrainedModel):
    """ViT with the SimMIM decoder (Xie et al., 2022): masked patches are replaced by a mask token, and a linear layer
    turns every patch token back into the patch's pixels (a 1x1 convolution, then a pixel shuffle at
    `config.encoder_stride`). The loss is the L1 distance to the input on the masked pixels only.

    Loads with `AutoModelForMaskedImageModeling`, so transformers' `run_mim.py` pre-trains it with
    `--trust_remote_code`; the `vit.*` weights then load into `ViTCustomForImageClassification`.
    """

    def __init__(self, config: ViTCustomConfig):
        super().__init__(config)
        # run_mim.py changes image_size, patch_size and encoder_stride with config.update, which skips the checks.
        config._check_values()
        stride = config.encoder_stride or config.patch_size
        self.vit = ViTCustomModel(config, use_mask_token=True)
        self.decoder = nn.Sequential(
            nn.Conv2d(config.hidden_size, stride**2 * config.num_channels, kernel_size=1), nn.PixelShuffle(stride)
        )
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs,
    ) -> MaskedImageModelingOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch, num_channels, height, width)`): the images.
            bool_masked_pos (`torch.BoolTensor` of shape `(batch, num_patches)`, *optional*): the patches to mask
                (true or 1), in row-major order; without it nothing is masked and no loss is returned.
            interpolate_pos_encoding (`bool`, *optional*): see `ViTCustomModel.forward`.
        """
        kwargs.pop("num_items_in_batch", None)  # Trainer's count of labels: this loss has no labels
        outputs = self.vit(
            pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, bool_masked_pos=bool_masked_pos, **kwargs
        )
        patch_tokens = outputs.last_hidden_state[:, self.config.num_prefix_tokens :]
        grid = (pixel_values.shape[-2] // self.config.patch_size, pixel_values.shape[-1] // self.config.patch_size)
        feature_map = patch_tokens.transpose(1, 2).reshape(patch_tokens.shape[0], -1, *grid)
        reconstruction = self.decoder(feature_map)

        loss = None
        if bool_masked_pos is not None:
            size = self.config.patch_size
            mask = bool_masked_pos.reshape(-1, 1, *grid).to(reconstruction.dtype)
            mask = mask.repeat_interleave(size, 2).repeat_interleave(size, 3)
            errors = nn.functional.l1_loss(pixel_values.to(reconstruction.dtype), reconstruction, reduction="none")
            loss = (errors * mask).sum() / (mask.sum() + 1e-5) / self.config.num_channels
        return MaskedImageModelingOutput(
            loss=loss, reconstruction=reconstruction, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


__all__ = [
    "ViTCustomForImageClassification",
    "ViTCustomForMaskedImageModeling",
    "ViTCustomModel",
    "ViTCustomPreTrainedModel",
    "resample_position_embeddings",
]

# `save_pretrained` and `push_to_hub` copy both files beside the weights and write an `auto_map`, so the Auto classes
# load the model with `trust_remote_code=True`.
ViTCustomConfig.register_for_auto_class()
ViTCustomModel.register_for_auto_class("AutoModel")
ViTCustomForImageClassification.register_for_auto_class("AutoModelForImageClassification")
ViTCustomForMaskedImageModeling.register_for_auto_class("AutoModelForMaskedImageModeling")
