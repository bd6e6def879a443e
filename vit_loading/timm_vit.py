"""timm `VisionTransformer` -> vit-custom: the configuration, inferred from the tensors and what timm records, the
tensors renamed, and the preprocessing of timm's `pretrained_cfg`."""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from vit_loading.folders import shorten
from vit_loading.labels import label_fields
from vit_loading.renaming import rename_tensors, square

if TYPE_CHECKING:
    import torch

    from configuration_vit_custom import ViTCustomConfig

logger = logging.getLogger(__name__)

TIMM_NAMES = {
    "cls_token": "vit.embeddings.cls_token",
    "pos_embed": "vit.embeddings.position_embeddings",
    "patch_embed.proj": "vit.embeddings.patch_embeddings.projection",
    "norm": "vit.layernorm",
    "fc_norm": "vit.pooler.layernorm",
    "head": "classifier",
}
TIMM_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
TIMM_BLOCK_NAMES = {
    "norm1": "layernorm_before",
    "attn.qkv": "attention.qkv",
    "attn.proj": "attention.proj",
    "norm2": "layernorm_after",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
# Options of timm's VisionTransformer that vit-custom does not have, by the tensors that reveal them.
TIMM_UNSUPPORTED_TENSORS = {
    r"reg_token": "register tokens (reg_tokens)",
    r"dist_token|head_dist\..*": "a distillation token (DeiT distilled)",
    r"blocks\.\d+\.ls[12]\..*": "layer scale (init_values)",
    r"blocks\.\d+\.attn\.[qk]_norm\..*": "qk_norm",
    r"norm_pre\..*": "pre_norm",
    r"attn_pool\..*": "attention pooling (global_pool='map' or 'prr')",
    r"patch_embed\.norm\..*": "a norm in the patch embedding",
}
# timm activation modules -> `hidden_act` of the same function in transformers' ACT2FN.
TIMM_ACTIVATIONS = {"GELU": "gelu", "GELUTanh": "gelu_pytorch_tanh", "QuickGELU": "quick_gelu"}
# What a timm checkpoint may leave unsaid and the user may then state: they set no size of any tensor.
TIMM_HINTS = ("num_attention_heads", "layer_norm_eps", "hidden_act")
TIMM_DEFAULT_EPS = 1e-6


def vit_custom_config_from_timm(
    state_dict: dict[str, torch.Tensor], timm_config: dict | None = None, **hints
) -> ViTCustomConfig:
    """The vit-custom configuration of a timm VisionTransformer checkpoint.

    The tensors give the sizes and reveal the options vit-custom lacks. What they do not record comes from timm's
    definition of `timm_config["architecture"]` when timm is installed, else from the `model_args` timm saves, else
    from `hints` (see `TIMM_HINTS`), else from timm's ViT defaults (logged).

    Args:
        state_dict: timm's tensors (`patch_embed.proj.weight`, `blocks.N.attn.qkv.weight`, ...).
        timm_config: the `config.json` of a timm Hub folder (`architecture`, `model_args`, `pretrained_cfg`), if any.
    """
    from configuration_vit_custom import ViTCustomConfig

    timm_config = timm_config or {}
    _reject_unsupported_tensors(state_dict)
    _require_sizes(state_dict)
    hidden_size, num_channels, patch_height, patch_width = state_dict["patch_embed.proj.weight"].shape
    patch_size = square([patch_height, patch_width], "patch_size")
    intermediate_size = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    use_cls_token = "cls_token" in state_dict
    image_size = _image_size(state_dict, timm_config, patch_size, use_cls_token)

    # What timm recorded wins over the hints, so that a contradicting override is reported as a changed architecture.
    known = {**hints, **_recorded_args(timm_config), **_architecture_args(timm_config)}
    fallbacks = {
        "num_attention_heads": _default_num_heads(hidden_size, intermediate_size),
        "layer_norm_eps": TIMM_DEFAULT_EPS,
        "hidden_act": "gelu",
    }
    assumed = {name: value for name, value in fallbacks.items() if name not in known}
    if assumed.get("num_attention_heads", 1) is None:
        raise ValueError(
            f"The timm checkpoint does not record its attention heads, and its width {hidden_size} is no standard "
            "ViT's: pass num_attention_heads (--num_attention_heads)."
        )
    if assumed:
        logger.warning(
            f"The timm checkpoint does not record {', '.join(f'{k}={v!r}' for k, v in assumed.items())}: assumed "
            "from timm's ViT defaults. Pass them as overrides if the model was built otherwise."
        )
    settings = {**assumed, **known}
    head = state_dict.get("head.weight")
    return ViTCustomConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=num_channels,
        hidden_size=hidden_size,
        num_hidden_layers=1 + max(int(m[1]) for key in state_dict if (m := TIMM_BLOCK.fullmatch(key))),
        num_attention_heads=settings["num_attention_heads"],
        intermediate_size=intermediate_size,
        hidden_act=settings["hidden_act"],
        layer_norm_eps=settings["layer_norm_eps"],
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        use_cls_token=use_cls_token,
        pooling=_pooling(settings.get("global_pool"), state_dict),
        interpolate_pos_encoding=settings.get("dynamic_img_size", False),
        **_labels(timm_config, 0 if head is None else head.shape[0]),
    )


def vit_custom_state_dict_from_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename timm VisionTransformer tensors; tensors with no vit-custom name keep their own."""
    return rename_tensors(state_dict, TIMM_NAMES, TIMM_BLOCK, TIMM_BLOCK_NAMES)


def timm_preprocessing(timm_config: dict, source: Path) -> dict:
    """The mean, std and resampling of timm's `pretrained_cfg`; ImageNet's mean and std (timm's default) if none."""
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling

    pretrained_cfg = timm_config.get("pretrained_cfg", timm_config)
    if "mean" not in pretrained_cfg:
        logger.warning(
            f"{source} does not record its preprocessing: using ImageNet's mean and std (timm's default). Edit "
            "preprocessor_config.json if the weights were trained otherwise (Google's ViTs use 0.5)."
        )
    interpolation = pretrained_cfg.get("interpolation", "bicubic").upper()
    return {
        "image_mean": list(pretrained_cfg.get("mean", IMAGENET_DEFAULT_MEAN)),
        "image_std": list(pretrained_cfg.get("std", IMAGENET_DEFAULT_STD)),
        "resample": PILImageResampling.__members__.get(interpolation, PILImageResampling.BICUBIC),
    }


def _reject_unsupported_tensors(state_dict: dict[str, torch.Tensor]):
    found = {}
    for pattern, feature in TIMM_UNSUPPORTED_TENSORS.items():
        keys = [key for key in state_dict if re.fullmatch(pattern, key)]
        if keys:
            found[feature] = keys
    if found:
        listed = "; ".join(f"{feature} ({shorten(keys, 3)})" for feature, keys in found.items())
        raise ValueError(f"The timm checkpoint uses options vit-custom does not have: {listed}.")


def _require_sizes(state_dict: dict[str, torch.Tensor]):
    needed = ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight")
    missing = [key for key in needed if key not in state_dict]
    if missing:
        hint = (
            " They look like transformers ViT weights: pass the folder with their config.json."
            if any("patch_embeddings" in key for key in state_dict)
            else ""
        )
        raise ValueError(
            f"Not a timm VisionTransformer state dict: {', '.join(missing)} missing among "
            f"{shorten(sorted(state_dict))}.{hint}"
        )


def _image_size(
    state_dict: dict[str, torch.Tensor], timm_config: dict, patch_size: int, use_cls_token: bool
) -> int | list[int]:
    """The resolution the position embeddings were learned for: timm's recorded input size, else a square grid."""
    num_positions = state_dict["pos_embed"].shape[1]
    input_size = timm_config.get("pretrained_cfg", timm_config).get("input_size")
    if input_size:
        height, width = input_size[-2:]
    else:
        # A square grid; when the class token has no position (no_embed_class) the patches alone fill pos_embed.
        squares = [n for n in (num_positions - use_cls_token, num_positions) if math.isqrt(n) ** 2 == n]
        height = width = math.isqrt(squares[0]) * patch_size if squares else 0
    num_patches = (height // patch_size) * (width // patch_size)
    if use_cls_token and num_positions == num_patches:
        raise ValueError(
            "The timm checkpoint uses options vit-custom does not have: position embeddings without the class token "
            "(no_embed_class=True); vit-custom's include the class-token position."
        )
    if num_positions != use_cls_token + num_patches:
        raise ValueError(
            f"pos_embed has {num_positions} positions, which fits no {height}x{width} image with patch size "
            f"{patch_size}{' and a class token' if use_cls_token else ''}; the checkpoint is incomplete or not a "
            "plain ViT."
        )
    return height if height == width else [height, width]


def _recorded_args(timm_config: dict) -> dict:
    """What newer timm exports record beside the weights: `model_args` and the global pooling."""
    model_args = timm_config.get("model_args", {})
    recorded = {
        "num_attention_heads": model_args.get("num_heads"),
        "global_pool": model_args.get("global_pool", timm_config.get("global_pool")),
        "dynamic_img_size": model_args.get("dynamic_img_size"),
    }
    return {name: value for name, value in recorded.items() if value is not None}


def _architecture_args(timm_config: dict) -> dict:
    """Heads, LayerNorm eps, activation and pooling of timm's own definition of the architecture, if timm is installed.

    The model is built on the meta device, so nothing is allocated or downloaded.
    """
    import torch

    if "architecture" not in timm_config:
        return {}
    try:
        import timm
        from timm.layers import Attention, Mlp
        from timm.models.vision_transformer import Block, VisionTransformer
    except ImportError:
        logger.warning("timm is not installed: the architecture's heads, eps and activation cannot be looked up.")
        return {}
    architecture = timm_config["architecture"]
    try:
        with torch.device("meta"):
            model = timm.create_model(architecture, pretrained=False, **timm_config.get("model_args", {}))
    except RuntimeError as error:  # timm's "Unknown model"
        raise ValueError(f"timm cannot build architecture {architecture!r}: {error}") from error
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"timm architecture {architecture!r} is a {type(model).__name__}, not a VisionTransformer; only timm "
            "ViTs can be imported."
        )
    block = model.blocks[0]
    unsupported = {
        f"block_fn={type(block).__name__}": type(block) is not Block,
        f"attn_layer={type(block.attn).__name__}": type(block.attn) is not Attention,
        f"mlp_layer={type(block.mlp).__name__}": type(block.mlp) is not Mlp,
        f"norm_layer={type(block.norm1).__name__}": not isinstance(block.norm1, torch.nn.LayerNorm),
        f"activation {type(getattr(block.mlp, 'act', None)).__name__}": _activation(block.mlp) is None,
        "no_embed_class=True": model.no_embed_class,
        "pool_include_prefix=True": model.pool_include_prefix,
        "dynamic_img_pad=True": getattr(model.patch_embed, "dynamic_img_pad", False),
    }
    found = [name for name, present in unsupported.items() if present]
    if found:
        raise ValueError(
            f"timm architecture {architecture!r} uses options vit-custom does not have: {', '.join(found)}."
        )
    return {
        "num_attention_heads": block.attn.num_heads,
        "layer_norm_eps": block.norm1.eps,
        "hidden_act": _activation(block.mlp),
        "global_pool": model.global_pool,
        "dynamic_img_size": model.dynamic_img_size,
    }


def _activation(mlp: torch.nn.Module) -> str | None:
    act = getattr(mlp, "act", None)
    name = type(act).__name__
    if name == "GELU" and getattr(act, "approximate", "none") == "tanh":
        name = "GELUTanh"
    return TIMM_ACTIVATIONS.get(name)


def _pooling(global_pool: str | None, state_dict: dict[str, torch.Tensor]) -> str:
    """vit-custom's `pooling` for timm's: 'token' after the final norm, or 'avg' of the patch tokens then fc_norm."""
    has_norm, has_fc_norm = "norm.weight" in state_dict, "fc_norm.weight" in state_dict
    if global_pool is None:
        global_pool = "avg" if has_fc_norm else "token"
    if global_pool == "token" and has_norm and not has_fc_norm:
        return "cls"
    if global_pool == "avg" and has_fc_norm and not has_norm:
        return "mean"
    norms = f"{'a' if has_norm else 'no'} final norm and {'an' if has_fc_norm else 'no'} fc_norm"
    raise ValueError(
        f"timm global_pool={global_pool!r} with {norms} is not supported: vit-custom pools like timm's defaults, "
        "'token' after the final norm or 'avg' followed by fc_norm."
    )


def _labels(timm_config: dict, num_classes: int) -> dict:
    names = timm_config.get("label_names") or timm_config.get("pretrained_cfg", {}).get("label_names")
    if names is not None and len(names) == num_classes:
        return label_fields([names[key] for key in sorted(names, key=int)] if isinstance(names, dict) else names)
    return {"num_labels": num_classes} if num_classes else {}


def _default_num_heads(hidden_size: int, intermediate_size: int) -> int | None:
    """The heads of the standard ViT size of this width, else 64-wide heads; None when neither fits."""
    from configuration_vit_custom import PRESETS

    for preset in PRESETS.values():
        if (preset["hidden_size"], preset["intermediate_size"]) == (hidden_size, intermediate_size):
            return preset["num_attention_heads"]
    return hidden_size // 64 if hidden_size % 64 == 0 else None
