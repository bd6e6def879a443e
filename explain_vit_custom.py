"""What a vit-custom model looks at: attention maps, attention rollout and the ViT paper's Figure 7, as tensors.

Each function takes a vit-custom model and a batch of `pixel_values` (as the model's image processor prepares them),
or only the weights it needs, and returns float32 tensors on the CPU. `explain_figures.py` draws them. Attention
matrices are `(..., tokens, tokens)` with the prefix (CLS) token first and the patches in row-major order; row q
holds what query token q takes from every key token.
"""

from collections.abc import Sequence

import torch


HEAD_FUSIONS = ("mean", "max", "min")


def attention_maps(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> torch.Tensor:
    """The attention weights softmax(Q K^T / sqrt(d)) of every layer and head, for one forward pass.

    The pass runs the eager attention whatever backend the model is set to (see `ViTCustomAttention`).

    Args:
        model: a vit-custom `ViTCustomForImageClassification` or `ViTCustomModel`, in eval mode.
        pixel_values: `(batch, channels, height, width)`.
        layers: the layers to return, in `[-num_hidden_layers, num_hidden_layers)` (default: all).
        heads: the heads to return, in `[-num_attention_heads, num_attention_heads)` (default: all).

    Returns:
        `(layers, batch, heads, tokens, tokens)`.
    """
    encoder = vit_encoder(model)
    layers = check_indices(layers, encoder.config.num_hidden_layers, "layer")
    heads = check_indices(heads, encoder.config.num_attention_heads, "head")
    with torch.no_grad():
        attentions = encoder(pixel_values.to(encoder.device), output_attentions=True).attentions
    return stack_attentions(attentions)[layers][:, :, heads].float().cpu()


def patch_map(matrix: torch.Tensor, grid_size: Sequence[int], num_prefix_tokens: int, pooling: str) -> torch.Tensor:
    """The row of an attention or rollout matrix that the pooled image vector reads, on the patch grid.

    With `pooling="cls"` that is the CLS token's row; with `pooling="mean"` the mean of the patch tokens' rows, as
    the pooled vector is their mean. Only the patch columns are kept.

    Args:
        matrix: `(..., tokens, tokens)`.
        grid_size: `(grid_height, grid_width)` patches of the input.
        num_prefix_tokens: tokens before the patches (1 with a CLS token, else 0).
        pooling: `"cls"` or `"mean"`, as `config.pooling`.

    Returns:
        `(..., grid_height, grid_width)`.
    """
    check_token_count(matrix.shape[-1], grid_size, num_prefix_tokens)
    if pooling == "cls":
        row = matrix[..., 0, :]
    elif pooling == "mean":
        row = matrix[..., num_prefix_tokens:, :].mean(dim=-2)
    else:
        raise ValueError(f"pooling={pooling!r} is unknown; use 'cls' or 'mean'.")
    return row[..., num_prefix_tokens:].unflatten(-1, tuple(grid_size))


def attention_rollout(
    attentions: torch.Tensor | Sequence[torch.Tensor], head_fusion: str = "mean", discard_ratio: float = 0.0
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): how much every output token draws from every input token.

    The heads of each layer are fused into one matrix by their mean, max or min; the `discard_ratio` lowest entries of
    that matrix are set to zero, for each image; the identity is added for the residual connection and every row is
    renormalised to sum to 1. The rollout is the product of these matrices, last layer on the left.

    Args:
        attentions: `(layers, batch, heads, tokens, tokens)`, or the model's `outputs.attentions`.
        head_fusion: `"mean"`, `"max"` or `"min"` over the heads.
        discard_ratio: fraction of the lowest fused weights dropped in every layer, in `[0, 1)`.

    Returns:
        `(batch, tokens, tokens)`, rows summing to 1.
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion={head_fusion!r} is unknown; use one of {HEAD_FUSIONS}.")
    attentions = stack_attentions(attentions).float()
    fused = {"mean": attentions.mean, "max": attentions.amax, "min": attentions.amin}[head_fusion](dim=2)
    return roll_out(fused, discard_ratio)


def gradient_rollout(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    class_index: int | Sequence[int] | None = None,
    discard_ratio: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention rollout weighted by the gradient of one class's logit (Chefer et al., 2021).

    Each layer's heads are fused into mean_h((dy_c/dA ⊙ A)^+), the positive part of the attention weights times the
    gradient of the class logit y_c with respect to them, which keeps what speaks for the class. These matrices are
    rolled out as in `attention_rollout`.

    Args:
        model: a vit-custom `ViTCustomForImageClassification`, in eval mode.
        pixel_values: `(batch, channels, height, width)`.
        class_index: the class to explain, one for all images or one per image, in `[0, num_labels)`
            (default: each image's predicted class).
        discard_ratio: as in `attention_rollout`.

    Returns:
        The rollout `(batch, tokens, tokens)` and the explained class of every image `(batch,)`.
    """
    vit_encoder(model)
    num_labels = model.config.num_labels
    if not hasattr(model, "classifier") or num_labels == 0:
        raise ValueError("gradient_rollout needs a classifier: a ViTCustomForImageClassification with num_labels > 0.")
    if class_index is not None:
        wanted = torch.as_tensor(class_index).flatten().tolist()
        check_indices(wanted, num_labels, "class", allow_negative=False)
        if len(wanted) not in (1, len(pixel_values)):
            raise ValueError(
                f"class_index names {len(wanted)} classes for {len(pixel_values)} images: give one for all, or one "
                "per image."
            )
    with torch.enable_grad():
        outputs = model(pixel_values.to(model.device), output_attentions=True)
        if class_index is None:
            classes = outputs.logits.argmax(dim=-1)
        else:
            classes = torch.as_tensor(class_index, device=outputs.logits.device).expand(len(pixel_values))
        # Images do not interact, so the gradient of the summed logits gives every image its own gradient.
        score = outputs.logits.gather(1, classes[:, None]).sum()
        gradients = torch.autograd.grad(score, outputs.attentions)
    attentions = stack_attentions(outputs.attentions).detach().float()
    weighted = (stack_attentions(gradients).float() * attentions).clamp(min=0).mean(dim=2)
    return roll_out(weighted, discard_ratio).cpu(), classes.cpu()


def position_embedding_similarity(model: torch.nn.Module) -> torch.Tensor:
    """Cosine similarity of every patch's position embedding with every other's (the ViT paper, Figure 7 centre).

    Returns:
        `(grid_height, grid_width, grid_height, grid_width)`: `[i, j]` is patch (i, j)'s similarity to every patch.
    """
    encoder = vit_encoder(model)
    config = encoder.config
    embeddings = encoder.embeddings.position_embeddings.detach()[0, config.num_prefix_tokens :].float().cpu()
    unit = torch.nn.functional.normalize(embeddings, dim=-1)
    return (unit @ unit.T).reshape(*config.grid_size, *config.grid_size)


def mean_attention_distance(
    attentions: torch.Tensor | Sequence[torch.Tensor],
    grid_size: Sequence[int],
    patch_size: int,
    num_prefix_tokens: int,
) -> torch.Tensor:
    """Mean attention distance in pixels per layer and head (the ViT paper, Figure 7 right).

    For every query patch, the distance between its centre and each key patch's centre, weighted by the attention
    between them; averaged over the query patches and the images. Prefix tokens have no place in the image: they are
    left out, and each query's weights over the patches are renormalised to sum to 1, so that a head that mostly reads
    the CLS token is measured by where in the image it looks.

    Args:
        attentions: `(layers, batch, heads, tokens, tokens)`, or the model's `outputs.attentions`.
        grid_size: `(grid_height, grid_width)` patches of the input.
        patch_size: side of a patch in pixels.
        num_prefix_tokens: tokens before the patches.

    Returns:
        `(layers, heads)`, each at most the distance between two opposite corner patches.
    """
    attentions = stack_attentions(attentions).float()
    check_token_count(attentions.shape[-1], grid_size, num_prefix_tokens)
    patches = attentions[..., num_prefix_tokens:, num_prefix_tokens:]
    patches = patches / patches.sum(dim=-1, keepdim=True)
    rows, columns = torch.meshgrid(torch.arange(grid_size[0]), torch.arange(grid_size[1]), indexing="ij")
    centres = torch.stack([rows.flatten(), columns.flatten()], dim=-1).float() * patch_size
    distances = torch.cdist(centres, centres)
    return (patches * distances).sum(dim=-1).mean(dim=(1, 3))


def patch_embedding_components(model: torch.nn.Module, num_components: int = 28) -> tuple[torch.Tensor, torch.Tensor]:
    """Principal components of the patch-embedding filters (the ViT paper, Figure 7 left).

    Each of the `hidden_size` filters of the patch projection is a `channels x P x P` image. After the mean filter is
    subtracted, the components are the directions of largest variance among the filters: the right singular vectors
    of the centred filter matrix. Each is of unit norm, its sign chosen so that its largest entry is positive.

    Args:
        model: a vit-custom model.
        num_components: how many, at most `min(hidden_size, channels * P * P)`.

    Returns:
        The components `(num_components, channels, P, P)`, by decreasing variance, and the fraction of the filters'
        variance each explains `(num_components,)`.
    """
    encoder = vit_encoder(model)
    weight = encoder.embeddings.patch_embeddings.projection.weight.detach().float().cpu()
    filters = weight.flatten(1)
    limit = min(filters.shape)
    if not 1 <= num_components <= limit:
        raise ValueError(
            f"num_components={num_components} is out of range: the {filters.shape[0]} filters of "
            f"{filters.shape[1]} values have 1 to {limit} principal components."
        )
    _, singular_values, directions = torch.linalg.svd(filters - filters.mean(dim=0), full_matrices=False)
    components = directions[:num_components]
    largest = components.gather(1, components.abs().argmax(dim=1, keepdim=True))
    components = components * largest.sign()
    variance = singular_values**2
    return components.reshape(num_components, *weight.shape[1:]), (variance / variance.sum())[:num_components]


def reshape_transform(tokens: torch.Tensor, grid_size: Sequence[int], num_prefix_tokens: int) -> torch.Tensor:
    """Lay out a block's tokens as CNN activations, the `reshape_transform` pytorch-grad-cam's CAM methods take.

    Bind the model's values with `functools.partial(reshape_transform, grid_size=config.grid_size,
    num_prefix_tokens=config.num_prefix_tokens)`, and target `model.vit.layers[-1].layernorm_before`: with CLS
    pooling the last block's output reaches the classifier only through the CLS token, so its patch tokens have no
    gradient; the input of the last attention works for both poolings.

    Args:
        tokens: `(batch, num_prefix_tokens + grid_height * grid_width, dim)`.
        grid_size: `(grid_height, grid_width)` patches of the input.
        num_prefix_tokens: tokens before the patches (CLS, registers), dropped.

    Returns:
        `(batch, dim, grid_height, grid_width)`.
    """
    check_token_count(tokens.shape[1], grid_size, num_prefix_tokens)
    return tokens[:, num_prefix_tokens:].unflatten(1, tuple(grid_size)).permute(0, 3, 1, 2)


def roll_out(fused: torch.Tensor, discard_ratio: float) -> torch.Tensor:
    """Roll out one fused attention matrix per layer, `(layers, batch, tokens, tokens)`, as in `attention_rollout`."""
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"discard_ratio={discard_ratio} is out of range: use a fraction in [0, 1).")
    num_tokens = fused.shape[-1]
    identity = torch.eye(num_tokens, device=fused.device)
    rollout = identity.expand_as(fused[0])
    for layer in fused:
        num_discarded = int(discard_ratio * num_tokens**2)
        if num_discarded:
            flat = layer.flatten(1)
            lowest = flat.topk(num_discarded, dim=1, largest=False).indices
            layer = flat.scatter(1, lowest, 0.0).view_as(layer)
        layer = layer + identity
        rollout = (layer / layer.sum(dim=-1, keepdim=True)) @ rollout
    return rollout


def vit_encoder(model: torch.nn.Module) -> torch.nn.Module:
    """The `ViTCustomModel` of a vit-custom model; an error naming the fix for any other model."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type != "vit_custom":
        raise ValueError(
            f"Expected a vit-custom model, got {type(model).__name__} (model_type {model_type!r}). Import transformers "
            "ViT and timm checkpoints with vit_loading.load_model(...)."
        )
    return model.base_model


def stack_attentions(attentions: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """`(layers, batch, heads, tokens, tokens)` from a stacked tensor or a model's `outputs.attentions`."""
    if not isinstance(attentions, torch.Tensor):
        if attentions is None or len(attentions) == 0 or any(weights is None for weights in attentions):
            raise ValueError(
                "The model returned no attention weights. Its code may predate output_attentions under SDPA (a "
                "model loaded with trust_remote_code from an older revision): load it with "
                "attn_implementation='eager', or with this repository's model code."
            )
        attentions = torch.stack(tuple(attentions))
    if attentions.ndim != 5 or attentions.shape[-1] != attentions.shape[-2]:
        raise ValueError(
            "Expected attention weights of shape (layers, batch, heads, tokens, tokens), got "
            f"{tuple(attentions.shape)}."
        )
    return attentions


def check_indices(indices: Sequence[int] | None, count: int, name: str, allow_negative: bool = True) -> list[int]:
    """`indices` counted from 0 (default: all `count`), after checking each is in range."""
    if indices is None:
        return list(range(count))
    low = -count if allow_negative else 0
    for index in indices:
        if not low <= index < count:
            plural = name + ("es" if name.endswith("s") else "s")
            from_end = f", or -{count} to -1 from the end" if allow_negative else ""
            raise ValueError(
                f"{name} {index} is out of range: the model has {count} {plural}, numbered 0 to {count - 1}{from_end}."
            )
    return [index % count for index in indices]


def check_token_count(num_tokens: int, grid_size: Sequence[int], num_prefix_tokens: int):
    expected = num_prefix_tokens + grid_size[0] * grid_size[1]
    if num_tokens != expected:
        raise ValueError(
            f"{num_tokens} tokens don't match a {grid_size[0]}x{grid_size[1]} patch grid with {num_prefix_tokens} "
            f"prefix token(s), which makes {expected}; pass the grid of the input (its size over the patch size)."
        )
