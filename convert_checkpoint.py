"""Start vit-custom from pretrained Vision Transformers, and export vit-custom models back to transformers' ViT.

Sources, each a local folder, a local weights file or a Hub repo id:
- transformers ViT checkpoints (`model_type: "vit"`, `ViTModel` or `ViTForImageClassification`), in the Hub's classic
  layout (`vit.encoder.layer.N.attention.attention.query.*`, what `save_pretrained` writes) or in transformers 5's
  in-memory layout (`vit.layers.N.attention.q_proj.*`);
- timm `VisionTransformer` weights: a timm Hub folder (`config.json` with `architecture` and `pretrained_cfg`) or a bare
  state dict (`.safetensors`, `.pth`, `.bin`);
- vit-custom folders, so that one loader serves every starting point.

The tensors are renamed, the query, key and value projections fused into one, and the position embeddings resampled
once when the resolution changes. Examples:

    python convert_checkpoint.py google/vit-base-patch16-224 vit-base-in1k
    python convert_checkpoint.py timm/vit_base_patch16_224.augreg2_in21k_ft_in1k vit-b16-384 --image-size 384
    python convert_checkpoint.py vit-base-in1k vit-base-hf --to-hf-vit

From Python, `load_vit_custom` returns the model and `load_image_processor` its preprocessing.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

# torch and transformers take seconds to import: each function imports what it uses, so that the command line answers
# --help and usage errors at once. These names are for the annotations only.
if TYPE_CHECKING:
    import torch
    from transformers import ViTConfig, ViTImageProcessor

    from configuration_vit_custom import ViTCustomConfig
    from modeling_vit_custom import ViTCustomForImageClassification

logger = logging.getLogger(__name__)

# transformers ViT -> vit-custom outside the blocks: the same names, less the `vit.` prefix that a `ViTModel` lacks.
HF_VIT_NAMES = {
    "embeddings.cls_token": "vit.embeddings.cls_token",
    "embeddings.position_embeddings": "vit.embeddings.position_embeddings",
    "embeddings.patch_embeddings.projection": "vit.embeddings.patch_embeddings.projection",
    "layernorm": "vit.layernorm",
    "classifier": "classifier",
}
# Inside block N: `encoder.layer.N.` in the Hub's files, `layers.N.` in transformers 5. Query, key and value are fused
# into `attention.qkv` afterwards.
HF_VIT_BLOCK = re.compile(r"(?:vit\.)?(?:encoder\.layer|layers)\.(\d+)\.(.+)")
HF_VIT_BLOCK_NAMES = {
    "layernorm_before": "layernorm_before",
    "attention.attention.query": "attention.query",
    "attention.attention.key": "attention.key",
    "attention.attention.value": "attention.value",
    "attention.output.dense": "attention.proj",
    "layernorm_after": "layernorm_after",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "attention.q_proj": "attention.query",
    "attention.k_proj": "attention.key",
    "attention.v_proj": "attention.value",
    "attention.o_proj": "attention.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
# vit-custom -> transformers 5's in-memory names inside block N, for the export; the query/key/value split is separate.
HF_VIT_EXPORT_BLOCK_NAMES = {
    "layernorm_before": "layernorm_before",
    "attention.proj": "attention.o_proj",
    "layernorm_after": "layernorm_after",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}

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

# Fixed by the pretrained weights: an override may repeat them, not change them.
ARCHITECTURE_FIELDS = (
    "patch_size",
    "num_channels",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "layer_norm_eps",
    "qkv_bias",
    "use_cls_token",
    "pooling",
)
CLASSIFIER_KEYS = ("classifier.weight", "classifier.bias")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def main(argv: list[str] | None = None):
    parser = build_parser()
    args = parse_args(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.to_hf_vit:
            model, image_processor = load_with_image_processor(args.source, args.revision)
            output_dir = export_to_hf_vit(model, args.output_dir, image_processor, overwrite=args.overwrite)
        else:
            image_size = args.image_size[0] if args.image_size and len(args.image_size) == 1 else args.image_size
            output_dir = convert(
                args.source,
                args.output_dir,
                image_size=image_size,
                num_labels=args.num_labels,
                labels=args.labels,
                overwrite=args.overwrite,
                revision=args.revision,
                num_attention_heads=args.num_attention_heads,
            )
    except (ValueError, OSError) as error:
        parser.exit(1, f"error: {error}\n")
    logger.info(f"Wrote {output_dir}")


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, with the values no conversion could use refused as usage errors."""
    args = parser.parse_args(argv)
    if args.image_size is not None and (len(args.image_size) > 2 or min(args.image_size) <= 0):
        parser.error(
            f"--image-size {' '.join(map(str, args.image_size))}: give one side or height and width, in pixels"
        )
    for flag, value in (("--num-labels", args.num_labels), ("--num-attention-heads", args.num_attention_heads)):
        if value is not None and value <= 0:
            parser.error(f"{flag} {value}: must be a positive number")
    import_flags = [
        flag for flag in ("image_size", "num_labels", "labels", "num_attention_heads") if getattr(args, flag)
    ]
    if args.to_hf_vit and import_flags:
        flags = ", ".join(f"--{flag.replace('_', '-')}" for flag in import_flags)
        parser.error(
            f"--to-hf-vit exports the model as it is; {flags} apply to an import. Import with them first, then export "
            "the result."
        )
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Import a transformers ViT or timm VisionTransformer checkpoint as a ready vit-custom folder "
        "(config, safetensors, model code, image processor), or export vit-custom to transformers' ViT.",
    )
    parser.add_argument(
        "source",
        help="Checkpoint to read: a local folder, a local .safetensors/.pth/.bin state dict (timm layout) or a Hub "
        "repo id such as google/vit-base-patch16-224.",
    )
    parser.add_argument("output_dir", help="Folder to write; it must not exist yet, or be empty, unless --overwrite.")
    parser.add_argument(
        "--revision",
        help="Branch, tag or commit of a Hub repo source (default: main); a commit sha pins the exact weights.",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        nargs="+",
        metavar="PIXELS",
        help="Resolution of the converted model, one side or height and width (default: the checkpoint's); the "
        "position embeddings are resampled once, as timm does.",
    )
    parser.add_argument(
        "--num-labels",
        type=int,
        help="Classes of the converted model; a number that differs from the checkpoint's gives a new, randomly "
        "initialised classification head.",
    )
    parser.add_argument(
        "--labels",
        nargs="+",
        metavar="LABEL",
        help="Class names, in the order of the classifier's outputs; names that differ from the checkpoint's give a "
        "new, randomly initialised classification head.",
    )
    parser.add_argument(
        "--num-attention-heads",
        type=int,
        help="Attention heads of a bare timm state dict, which does not record them (default: the standard ViT "
        "size with that width, else width / 64).",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace output_dir if it already has files.")
    parser.add_argument(
        "--to-hf-vit",
        action="store_true",
        help="Write a plain transformers ViTForImageClassification folder (no remote code) instead; the source must "
        "use pooling='cls'.",
    )
    return parser


def load_vit_custom(
    path_or_repo: str | Path, revision: str | None = None, **config_overrides
) -> ViTCustomForImageClassification:
    """Load any supported checkpoint as a vit-custom image classifier, in eval mode.

    Args:
        path_or_repo: a vit-custom, transformers ViT or timm folder, a timm state-dict file, or a Hub repo id.
        revision: branch, tag or commit of a Hub repo (default: main); a commit sha pins the exact weights.
        **config_overrides: `ViTCustomConfig` fields. `image_size` resamples the position embeddings; `num_labels` or
            `id2label` (and `label2id`) that differ from the checkpoint's give a new, randomly initialised classifier;
            fine-tuning settings (`drop_path_rate`, `hidden_dropout_prob`, `interpolate_pos_encoding`, ...) are taken
            as they are; the fields fixed by the weights (`hidden_size`, `pooling`, ...) cannot change. For a bare
            timm state dict, `num_attention_heads`, `layer_norm_eps` and `hidden_act` state what it does not record.
            `None` keeps the checkpoint's value.

    Raises:
        ValueError: the checkpoint is not a ViT vit-custom can represent, lacks tensors or has tensors of the wrong
            size; the message names them. Nothing is returned half-loaded.
    """
    overrides = {name: value for name, value in config_overrides.items() if value is not None}
    source = resolve_source(path_or_repo, revision)
    config, state_dict = read_checkpoint(source, **overrides)
    config, state_dict = adapt_checkpoint(config, state_dict, **overrides)
    return model_from_state_dict(config, state_dict).eval()


def model_from_state_dict(
    config: ViTCustomConfig, state_dict: dict[str, torch.Tensor]
) -> ViTCustomForImageClassification:
    """The classifier of `config` holding the (checked, adapted) `state_dict`."""
    from modeling_vit_custom import ViTCustomForImageClassification

    model = ViTCustomForImageClassification(config)
    # read_checkpoint has checked every tensor; a missing classifier is the new head, left to its initialisation.
    model.load_state_dict(state_dict, strict="classifier.weight" in state_dict)
    return model


def load_image_processor(
    path_or_repo: str | Path, image_size: int | list[int], revision: str | None = None
) -> ViTImageProcessor:
    """The checkpoint's preprocessing (mean, std, resampling) as a `ViTImageProcessor` that resizes to `image_size`.

    Sources: the `preprocessor_config.json` of a transformers or vit-custom folder (transformers' ViT defaults when it
    has none), the `pretrained_cfg` of a timm folder, ImageNet's mean and std for a bare state dict. `revision` as in
    `load_vit_custom`.
    """
    from transformers import ViTImageProcessor

    source = resolve_source(path_or_repo, revision)
    kind, config = identify_checkpoint(source)
    if kind == "timm":
        settings = _timm_preprocessing(config, source)
    else:
        settings = _hf_preprocessing(source)
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    return ViTImageProcessor(**settings, size={"height": height, "width": width})


def load_with_image_processor(
    path_or_repo: str | Path, revision: str | None = None, **config_overrides
) -> tuple[ViTCustomForImageClassification, ViTImageProcessor]:
    """`load_vit_custom` and `load_image_processor` at the model's resolution, both from one download."""
    source = resolve_source(path_or_repo, revision)  # once: a branch could move between two downloads
    model = load_vit_custom(source, **config_overrides)
    return model, load_image_processor(source, model.config.image_size)


def convert(
    source: str | Path,
    output_dir: str | Path,
    image_size: int | list[int] | None = None,
    num_labels: int | None = None,
    labels: list[str] | None = None,
    overwrite: bool = False,
    revision: str | None = None,
    **config_overrides,
) -> Path:
    """Write a ready vit-custom folder: config, safetensors, model code and image processor.

    Args:
        source: see `load_vit_custom`.
        output_dir: folder to write; it must be absent or empty unless `overwrite`.
        image_size: resolution of the converted model (default: the checkpoint's).
        num_labels: classes; a new classifier when they differ from the checkpoint's.
        labels: class names, in the order of the outputs; a new classifier when they differ from the checkpoint's.
        overwrite: replace an output folder that has files.
        revision: as in `load_vit_custom`.
        **config_overrides: as in `load_vit_custom`.

    Returns:
        `output_dir`. When the import fails nothing is written.
    """
    output_dir = Path(output_dir)
    _check_output_dir(output_dir, overwrite)
    overrides = {**label_overrides(num_labels, labels), **config_overrides}
    if image_size is not None:
        overrides["image_size"] = image_size
    model, image_processor = load_with_image_processor(source, revision, **overrides)
    return _write_folder(output_dir, model.save_pretrained, image_processor.save_pretrained)


def export_to_hf_vit(
    model: ViTCustomForImageClassification,
    output_dir: str | Path,
    image_processor: ViTImageProcessor | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a CLS-pooled vit-custom model as a transformers `ViTForImageClassification` folder (no remote code).

    Raises:
        ValueError: the model pools the mean of the patch tokens, which transformers' ViT cannot.
    """
    from transformers import ViTForImageClassification

    output_dir = Path(output_dir)
    _check_output_dir(output_dir, overwrite)
    vit_config = hf_vit_config_from_vit_custom(model.config)
    vit_model = ViTForImageClassification(vit_config)
    vit_model.load_state_dict(hf_vit_state_dict_from_vit_custom(model.state_dict()))
    savers = [vit_model.save_pretrained] + ([image_processor.save_pretrained] if image_processor else [])
    return _write_folder(output_dir, *savers)


def resolve_source(path_or_repo: str | Path, revision: str | None = None) -> Path:
    """A local path as it is; otherwise a Hub repo id at `revision`, downloaded (configs and weights only) or found in
    the cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled

    path = Path(path_or_repo)
    if path.exists():
        if revision is not None:
            raise ValueError(
                f"revision={revision!r} picks a version of a Hub repo, but {str(path)!r} is a local path, which has "
                "one version. Drop the revision, or pass the Hub repo id."
            )
        return path
    repo_id = str(path_or_repo)
    try:
        download = functools.partial(snapshot_download, repo_id, revision=revision)
        folder = Path(download(allow_patterns=["*.json", "*.safetensors"]))
        if not any(folder.glob("*.safetensors")):
            folder = Path(download(allow_patterns=["*.json", "*.bin", "*.pth"]))
    except (HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError) as error:
        at_revision = f" at revision {revision!r}" if revision is not None else ""
        download_command = f"hf download {repo_id}" + (f" --revision {revision}" if revision is not None else "")
        raise FileNotFoundError(
            f"{repo_id!r} is not a local file or folder, and not a Hub repo that could be downloaded{at_revision} or "
            f"found in the cache ({type(error).__name__}: {error}). Offline (HF_HUB_OFFLINE=1) a repo must already "
            f"be cached: fetch it with `{download_command}` where there is internet access, or pass a local folder."
        ) from error
    return folder


def identify_checkpoint(source: Path) -> tuple[str, dict]:
    """The kind of a local checkpoint, `"vit"`, `"timm"` or `"vit_custom"`, and its config.json (empty if none)."""
    config_file = source / "config.json"
    if not source.is_dir() or not config_file.is_file():
        # A bare state dict: only timm's layout describes its own sizes, so it is read as timm's.
        return "timm", {}
    config = _read_json(config_file)
    if "architecture" in config and "model_type" not in config:
        return "timm", config
    model_type = config.get("model_type")
    if model_type not in ("vit", "vit_custom"):
        raise ValueError(
            f"{source} holds a {model_type!r} checkpoint ({', '.join(config.get('architectures') or [])}). Only "
            "transformers ViT (model_type 'vit'), timm VisionTransformer and vit-custom checkpoints can be imported."
        )
    return model_type, config


def read_checkpoint(source: Path, **hints) -> tuple[ViTCustomConfig, dict[str, torch.Tensor]]:
    """The vit-custom configuration and tensors of a local checkpoint, checked against each other.

    `hints` may state what a bare timm state dict does not record (see `TIMM_HINTS`); other keys are ignored here.
    """
    from transformers import ViTConfig

    from configuration_vit_custom import ViTCustomConfig

    kind, source_config = identify_checkpoint(source)
    weights = read_weights(source)
    if kind == "vit":
        config = vit_custom_config_from_hf_vit(ViTConfig.from_dict(source_config))
        state_dict = vit_custom_state_dict_from_hf_vit(weights)
    elif kind == "timm":
        timm_hints = {key: hints[key] for key in TIMM_HINTS if key in hints}
        config = vit_custom_config_from_timm(weights, source_config, **timm_hints)
        state_dict = vit_custom_state_dict_from_timm(weights)
    else:
        config, state_dict = ViTCustomConfig.from_dict(source_config), weights
    check_state_dict(state_dict, config, source)
    return config, state_dict


def adapt_checkpoint(
    config: ViTCustomConfig, state_dict: dict[str, torch.Tensor], **overrides
) -> tuple[ViTCustomConfig, dict[str, torch.Tensor]]:
    """Apply user overrides: a new resolution resamples the position embeddings, new labels drop the classifier."""
    from configuration_vit_custom import ViTCustomConfig
    from modeling_vit_custom import resample_position_embeddings

    changed = [
        f"{name}={overrides[name]!r} (the checkpoint has {getattr(config, name)!r})"
        for name in ARCHITECTURE_FIELDS
        if name in overrides and overrides[name] != getattr(config, name)
    ]
    if changed:
        raise ValueError(
            f"These settings are fixed by the pretrained weights and cannot change at import: {', '.join(changed)}. "
            "Drop them, or train a model of that architecture from scratch."
        )
    values = config.to_dict()
    if "id2label" in overrides:
        id2label = {int(index): label for index, label in overrides["id2label"].items()}
        label2id = overrides.get("label2id") or {label: index for index, label in id2label.items()}
        overrides = {**overrides, "id2label": id2label, "label2id": label2id}
    elif overrides.get("num_labels", config.num_labels) != config.num_labels:
        del values["id2label"], values["label2id"]
    new_config = ViTCustomConfig.from_dict({**values, **overrides})

    state_dict = dict(state_dict)
    if new_config.grid_size != config.grid_size:
        key = "vit.embeddings.position_embeddings"
        state_dict[key] = resample_position_embeddings(
            state_dict[key], new_config.grid_size, config.grid_size, config.num_prefix_tokens
        )
        logger.info(f"Resampled the position embeddings from {config.grid_size} to {new_config.grid_size} patches.")
    reason = _new_head_reason(config, new_config, state_dict)
    if reason:
        for key in CLASSIFIER_KEYS:
            state_dict.pop(key, None)
        logger.info(f"New classification head with {new_config.num_labels} labels, randomly initialised: {reason}.")
    return new_config, state_dict


def check_state_dict(state_dict: dict[str, torch.Tensor], config: ViTCustomConfig, source: Path | str = "checkpoint"):
    """Raise a ValueError naming every missing, unexpected or wrongly sized tensor. The classifier may be absent."""
    import torch

    from modeling_vit_custom import ViTCustomForImageClassification

    with torch.device("meta"):
        expected_model = ViTCustomForImageClassification(config)
    expected = {key: tuple(tensor.shape) for key, tensor in expected_model.state_dict().items()}
    optional = set(CLASSIFIER_KEYS) if not any(key in state_dict for key in CLASSIFIER_KEYS) else set()
    missing = sorted(set(expected) - set(state_dict) - optional)
    unexpected = sorted(set(state_dict) - set(expected))
    wrong_sizes = [
        f"{key}: {tuple(tensor.shape)} in the checkpoint, {expected[key]} for the config"
        for key, tensor in state_dict.items()
        if key in expected and tuple(tensor.shape) != expected[key]
    ]
    problems = [
        f"{title} ({len(keys)}): {shorten(keys)}"
        for title, keys in (
            ("missing tensors, vit-custom names", missing),
            ("tensors vit-custom has no place for", unexpected),
            ("wrong sizes", wrong_sizes),
        )
        if keys
    ]
    if problems:
        raise ValueError(
            f"Cannot import {source} into vit-custom ({config.hidden_size} wide, {config.num_hidden_layers} blocks, "
            f"{config.grid_size[0]}x{config.grid_size[1]} patches, pooling={config.pooling!r}): "
            + "; ".join(problems)
            + ". Pass a complete checkpoint whose weights match its config."
        )


def vit_custom_config_from_hf_vit(vit_config: ViTConfig) -> ViTCustomConfig:
    """The vit-custom configuration of a transformers ViT: CLS pooling, its LayerNorm eps, bias and activation."""
    from configuration_vit_custom import ViTCustomConfig

    head_dim = getattr(vit_config, "head_dim", None)
    if head_dim and head_dim * vit_config.num_attention_heads != vit_config.hidden_size:
        raise ValueError(
            f"head_dim={head_dim} times num_attention_heads={vit_config.num_attention_heads} is not hidden_size="
            f"{vit_config.hidden_size}; vit-custom's heads split the hidden size."
        )
    return ViTCustomConfig(
        image_size=vit_config.image_size,
        patch_size=_square(vit_config.patch_size, "patch_size"),
        num_channels=vit_config.num_channels,
        hidden_size=vit_config.hidden_size,
        num_hidden_layers=vit_config.num_hidden_layers,
        num_attention_heads=vit_config.num_attention_heads,
        intermediate_size=vit_config.intermediate_size,
        hidden_act=vit_config.hidden_act,
        hidden_dropout_prob=vit_config.hidden_dropout_prob,
        attention_probs_dropout_prob=vit_config.attention_probs_dropout_prob,
        layer_norm_eps=vit_config.layer_norm_eps,
        initializer_range=vit_config.initializer_range,
        qkv_bias=vit_config.qkv_bias,
        use_cls_token=True,
        pooling="cls",
        id2label=vit_config.id2label,
        label2id=vit_config.label2id,
        problem_type=vit_config.problem_type,
    )


def hf_vit_config_from_vit_custom(config: ViTCustomConfig) -> ViTConfig:
    """The transformers ViT configuration of a CLS-pooled vit-custom model."""
    from transformers import ViTConfig

    if config.pooling != "cls":
        raise ValueError(
            f"Only pooling='cls' models can be exported to transformers' ViT, which classifies the CLS token; this "
            f"one has pooling={config.pooling!r}."
        )
    return ViTConfig(
        image_size=config.image_size,
        patch_size=config.patch_size,
        num_channels=config.num_channels,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_act=config.hidden_act,
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        layer_norm_eps=config.layer_norm_eps,
        initializer_range=config.initializer_range,
        qkv_bias=config.qkv_bias,
        id2label=config.id2label,
        label2id=config.label2id,
        problem_type=config.problem_type,
    )


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
    _reject_unsupported_timm_tensors(state_dict)
    _require_timm_sizes(state_dict)
    hidden_size, num_channels, patch_height, patch_width = state_dict["patch_embed.proj.weight"].shape
    patch_size = _square([patch_height, patch_width], "patch_size")
    intermediate_size = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    use_cls_token = "cls_token" in state_dict
    image_size = _timm_image_size(state_dict, timm_config, patch_size, use_cls_token)

    # What timm recorded wins over the hints, so that a contradicting override is reported by `adapt_checkpoint`.
    known = {**hints, **_timm_recorded_args(timm_config), **_timm_architecture_args(timm_config)}
    fallbacks = {
        "num_attention_heads": _default_num_heads(hidden_size, intermediate_size),
        "layer_norm_eps": TIMM_DEFAULT_EPS,
        "hidden_act": "gelu",
    }
    assumed = {name: value for name, value in fallbacks.items() if name not in known}
    if assumed.get("num_attention_heads", 1) is None:
        raise ValueError(
            f"The timm checkpoint does not record its attention heads, and its width {hidden_size} is no standard "
            "ViT's: pass num_attention_heads (--num-attention-heads)."
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
        pooling=_timm_pooling(settings.get("global_pool"), state_dict),
        interpolate_pos_encoding=settings.get("dynamic_img_size", False),
        **_timm_labels(timm_config, 0 if head is None else head.shape[0]),
    )


def vit_custom_state_dict_from_hf_vit(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename transformers ViT tensors (either layout, with or without `vit.`) and fuse query, key and value.

    `ViTModel`'s tanh pooler is dropped; tensors with no vit-custom name keep their own, for `check_state_dict`.
    """
    pooler = [key for key in state_dict if key.removeprefix("vit.").startswith("pooler.dense.")]
    if pooler:
        logger.info(
            "Dropped ViTModel's tanh pooler (pooler.dense): vit-custom classifies the CLS token after the final "
            "LayerNorm, as transformers' ViTForImageClassification does."
        )
    kept = {key: tensor for key, tensor in state_dict.items() if key not in pooler}
    return _fuse_qkv(_rename(kept, HF_VIT_NAMES, HF_VIT_BLOCK, HF_VIT_BLOCK_NAMES, strip_prefix="vit."))


def vit_custom_state_dict_from_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename timm VisionTransformer tensors; tensors with no vit-custom name keep their own."""
    return _rename(state_dict, TIMM_NAMES, TIMM_BLOCK, TIMM_BLOCK_NAMES)


def hf_vit_state_dict_from_vit_custom(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vit-custom tensors under transformers 5's ViT names (`save_pretrained` then writes the Hub's classic layout)."""
    renamed = {}
    for key, tensor in state_dict.items():
        block = re.fullmatch(r"vit\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if block is None:
            renamed[key] = tensor
        elif block[2] == "attention.qkv":
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3), strict=True):
                renamed[f"vit.layers.{block[1]}.attention.{name}.{block[3]}"] = part.clone()
        else:
            renamed[f"vit.layers.{block[1]}.{HF_VIT_EXPORT_BLOCK_NAMES[block[2]]}.{block[3]}"] = tensor
    return renamed


def read_weights(source: Path) -> dict[str, torch.Tensor]:
    """All tensors of a weights file, or of the (possibly sharded) weights of a folder, on the CPU.

    Raises:
        ValueError: a file is truncated or corrupt, or holds something other than named tensors; the message names it.
    """
    files = [source] if source.is_file() else _weight_files(source)
    state_dict = {}
    for file in files:
        state_dict.update(_read_safetensors(file) if file.suffix == ".safetensors" else _read_torch_weights(file))
    return state_dict


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except SafetensorError as error:
        raise ValueError(
            f"{file} is not a readable safetensors file, it is truncated or corrupt ({error}). Download or save it "
            "again."
        ) from error


def _read_torch_weights(file: Path) -> dict[str, torch.Tensor]:
    """The named tensors of a `torch.save` file (.pth, .bin), unpickling nothing else."""
    import torch

    try:
        loaded = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch reports a truncated or foreign file with several exception types
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if unsafe:
            raise ValueError(
                f"{file} holds a pickled {unsafe[1]}, not only tensors; it is not unpickled, which could run any "
                "code. Save the weights alone where you trust the file: torch.save(model.state_dict(), path), or "
                "safetensors' save_file."
            ) from error
        reason = f"{type(error).__name__}: {str(error).split('. ')[0]}" if str(error) else type(error).__name__
        raise ValueError(
            f"{file} is not a readable PyTorch weights file: it is truncated, corrupt or of another format ({reason}). "
            "Download or save it again."
        ) from error
    # Training checkpoints wrap the weights; DistributedDataParallel prefixes them.
    if isinstance(loaded, dict):
        loaded = loaded.get("state_dict", loaded.get("model", loaded))
    if isinstance(loaded, dict) and all(isinstance(tensor, torch.Tensor) for tensor in loaded.values()):
        return {key.removeprefix("module."): tensor for key, tensor in loaded.items()}
    if isinstance(loaded, torch.Tensor):
        found = f"a single tensor of shape {tuple(loaded.shape)}"
    elif isinstance(loaded, dict):
        others = [key for key, value in loaded.items() if not isinstance(value, torch.Tensor)]
        found = f"entries that are not tensors ({shorten(others, 3)})"
    else:
        found = f"a {type(loaded).__name__}"
    raise ValueError(
        f"{file} holds {found}, not a state dict of named tensors. Save one with torch.save(model.state_dict(), path)."
    )


def label_overrides(num_labels: int | None = None, labels: list[str] | None = None) -> dict:
    """`num_labels` or `id2label`/`label2id` overrides from a number of classes or their names."""
    if num_labels is not None and num_labels < 0:
        raise ValueError(f"num_labels={num_labels}: pass the number of classes, or 0 for a model without a classifier.")
    duplicates = sorted(label for label, count in Counter(labels or []).items() if count > 1)
    if duplicates:
        raise ValueError(f"The labels name {shorten(duplicates)} more than once; give every class one distinct name.")
    if labels is None:
        return {} if num_labels is None else {"num_labels": num_labels}
    if num_labels is not None and num_labels != len(labels):
        raise ValueError(f"num_labels={num_labels} but {len(labels)} labels were given; give one or make them agree.")
    return {"id2label": dict(enumerate(labels)), "label2id": {label: index for index, label in enumerate(labels)}}


def _rename(
    state_dict: dict[str, torch.Tensor],
    names: dict[str, str],
    block_pattern: re.Pattern,
    block_names: dict[str, str],
    strip_prefix: str = "",
) -> dict[str, torch.Tensor]:
    renamed = {}
    for key, tensor in state_dict.items():
        module, leaf = key, ""
        if key.endswith((".weight", ".bias")):
            module, _, leaf = key.rpartition(".")
            leaf = "." + leaf
        block = block_pattern.fullmatch(module)
        if block and block[2] in block_names:
            renamed[f"vit.layers.{block[1]}.{block_names[block[2]]}{leaf}"] = tensor
        elif not block and module.removeprefix(strip_prefix) in names:
            renamed[names[module.removeprefix(strip_prefix)] + leaf] = tensor
        else:
            renamed[key] = tensor
    return renamed


def _fuse_qkv(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate every block's `attention.{query,key,value}` into `attention.qkv`: rows q, k, v, as in timm."""
    import torch

    fused = dict(state_dict)
    for key in state_dict:
        if re.fullmatch(r"vit\.layers\.\d+\.attention\.query\.(weight|bias)", key):
            parts = [key.replace(".query.", f".{name}.") for name in ("query", "key", "value")]
            if all(part in fused for part in parts):
                fused[key.replace(".query.", ".qkv.")] = torch.cat([fused.pop(part) for part in parts])
    return fused


def _reject_unsupported_timm_tensors(state_dict: dict[str, torch.Tensor]):
    found = {}
    for pattern, feature in TIMM_UNSUPPORTED_TENSORS.items():
        keys = [key for key in state_dict if re.fullmatch(pattern, key)]
        if keys:
            found[feature] = keys
    if found:
        listed = "; ".join(f"{feature} ({shorten(keys, 3)})" for feature, keys in found.items())
        raise ValueError(f"The timm checkpoint uses options vit-custom does not have: {listed}.")


def _require_timm_sizes(state_dict: dict[str, torch.Tensor]):
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


def _timm_image_size(
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


def _timm_recorded_args(timm_config: dict) -> dict:
    """What newer timm exports record beside the weights: `model_args` and the global pooling."""
    model_args = timm_config.get("model_args", {})
    recorded = {
        "num_attention_heads": model_args.get("num_heads"),
        "global_pool": model_args.get("global_pool", timm_config.get("global_pool")),
        "dynamic_img_size": model_args.get("dynamic_img_size"),
    }
    return {name: value for name, value in recorded.items() if value is not None}


def _timm_architecture_args(timm_config: dict) -> dict:
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
        f"activation {type(getattr(block.mlp, 'act', None)).__name__}": _timm_activation(block.mlp) is None,
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
        "hidden_act": _timm_activation(block.mlp),
        "global_pool": model.global_pool,
        "dynamic_img_size": model.dynamic_img_size,
    }


def _timm_activation(mlp: torch.nn.Module) -> str | None:
    act = getattr(mlp, "act", None)
    name = type(act).__name__
    if name == "GELU" and getattr(act, "approximate", "none") == "tanh":
        name = "GELUTanh"
    return TIMM_ACTIVATIONS.get(name)


def _timm_pooling(global_pool: str | None, state_dict: dict[str, torch.Tensor]) -> str:
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


def _timm_labels(timm_config: dict, num_classes: int) -> dict:
    names = timm_config.get("label_names") or timm_config.get("pretrained_cfg", {}).get("label_names")
    if names is not None and len(names) == num_classes:
        id2label = {int(i): name for i, name in names.items()} if isinstance(names, dict) else dict(enumerate(names))
        return {"id2label": id2label, "label2id": {name: index for index, name in id2label.items()}}
    return {"num_labels": num_classes} if num_classes else {}


def _default_num_heads(hidden_size: int, intermediate_size: int) -> int | None:
    """The heads of the standard ViT size of this width, else 64-wide heads; None when neither fits."""
    from configuration_vit_custom import PRESETS

    for preset in PRESETS.values():
        if (preset["hidden_size"], preset["intermediate_size"]) == (hidden_size, intermediate_size):
            return preset["num_attention_heads"]
    return hidden_size // 64 if hidden_size % 64 == 0 else None


def _timm_preprocessing(timm_config: dict, source: Path) -> dict:
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


def _hf_preprocessing(source: Path) -> dict:
    from transformers import ViTImageProcessor

    processor_file = source / "preprocessor_config.json"
    defaults = ViTImageProcessor()
    settings = _read_json(processor_file) if processor_file.is_file() else {}
    return {
        "image_mean": settings.get("image_mean", defaults.image_mean),
        "image_std": settings.get("image_std", defaults.image_std),
        "resample": settings.get("resample", defaults.resample),
    }


def _weight_files(folder: Path) -> list[Path]:
    for index in WEIGHT_INDEXES:
        if (folder / index).is_file():
            weight_map = _read_json(folder / index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{folder / index} has no weight_map; restore the file or download it again.")
            return [folder / name for name in sorted(set(weight_map.values()))]
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    candidates = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.pth"))
    if len(candidates) == 1:
        return candidates
    raise FileNotFoundError(
        f"No weights in {folder}: expected {' or '.join(WEIGHT_FILES)}, a sharded index, or a single .safetensors or "
        f".pth file (found {[path.name for path in candidates]})."
    )


def _read_json(path: Path) -> dict:
    try:
        content = json.loads(path.read_text())
    except ValueError as error:  # invalid JSON or text
        raise ValueError(f"{path} is not valid JSON ({error}); restore the file or download it again.") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path} holds a JSON {type(content).__name__}, not an object; restore the file.")
    return content


def _new_head_reason(
    config: ViTCustomConfig, new_config: ViTCustomConfig, state_dict: dict[str, torch.Tensor]
) -> str | None:
    if "classifier.weight" not in state_dict:
        return "the checkpoint has no classifier"
    if state_dict["classifier.weight"].shape[0] != new_config.num_labels:
        return f"the checkpoint's has {state_dict['classifier.weight'].shape[0]} labels"
    if new_config.id2label != config.id2label:
        return "the labels differ from the checkpoint's"
    return None


def unwritable_folder_reason(folder: Path) -> str | None:
    """Why `folder` cannot be created or written into (a file in the way, no permission), or None when it can."""
    for path in [folder, *folder.parents]:
        if path.is_dir():
            return None if os.access(path, os.W_OK | os.X_OK) else f"{path} is not writable"
        if path.exists():
            return f"{path} is a file" if path == folder else f"{path} is a file, not a folder"
    return None


def _check_output_dir(output_dir: Path, overwrite: bool):
    reason = unwritable_folder_reason(output_dir)
    if reason:
        raise OSError(f"Cannot write the folder {output_dir}: {reason}. Choose another output folder.")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{output_dir} already has files; choose another folder or pass --overwrite (overwrite=True in Python)."
        )


def _write_folder(output_dir: Path, *savers) -> Path:
    """Save into a temporary sibling folder, then move it into place, so that a failure leaves nothing half-written."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}-", dir=output_dir.parent))
    try:
        for save in savers:
            save(staging)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir


def _square(size: int | list[int] | tuple[int, int], name: str) -> int:
    if isinstance(size, int):
        return size
    if len(size) != 2 or size[0] != size[1]:
        raise ValueError(f"{name}={list(size)} is not square; vit-custom uses square patches.")
    return int(size[0])


def shorten(items: list, limit: int = 8) -> str:
    """The first `limit` items, comma-separated, with how many more there are."""
    shown = ", ".join(map(str, items[:limit]))
    return shown if len(items) <= limit else f"{shown}, ... ({len(items) - limit} more)"


if __name__ == "__main__":
    main()
