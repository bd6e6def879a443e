"""The one way in: `load_model` reads any supported checkpoint as a vit-custom classifier and its image processor.

Sources: vit-custom folders, transformers ViT checkpoints (`ViTModel` or `ViTForImageClassification`, the Hub's classic
layout or transformers 5's), timm `VisionTransformer` Hub folders or bare state dicts; each a local path or a Hub repo.
The tensors are renamed, query, key and value fused, the position embeddings resampled once for a new resolution, and
the classification head kept, replaced or refused by the `head` policy when the labels differ from the checkpoint's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vit_loading import hf_vit, sources, timm_vit
from vit_loading.folders import shorten
from vit_loading.labels import label_fields, label_overrides

if TYPE_CHECKING:
    import torch
    from transformers import ViTImageProcessor

    from configuration_vit_custom import ViTCustomConfig
    from modeling_vit_custom import ViTCustomForImageClassification

logger = logging.getLogger(__name__)

# The config fields a checkpoint takes new values of: its resolution (the position embeddings are resampled) and the
# training settings. The weights fix every other field of ViTCustomConfig: an override may repeat it, not change it;
# those are settings of new models only.
ADJUSTABLE_FIELDS = (
    "image_size",
    "interpolate_pos_encoding",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "drop_path_rate",
    "initializer_range",
)
# What to do with the checkpoint's classification head when the labels asked for are not its labels. Where they are,
# or no labels are asked for, the head is kept; a checkpoint without one always gets a new head.
HEAD_POLICIES = {
    "check": "refuse to load, naming both sets of labels",
    "new": "replace it with a new, randomly initialised head for the labels asked for",
}
CLASSIFIER_KEYS = ("classifier.weight", "classifier.bias")


def load_model(
    source: str | Path,
    *,
    revision: str | None = None,
    labels: Sequence[str] | None = None,
    num_labels: int | None = None,
    head: str = "check",
    **config_overrides,
) -> tuple[ViTCustomForImageClassification, ViTImageProcessor]:
    """Load any supported checkpoint as a vit-custom image classifier, in eval mode, with its image processor.

    Args:
        source: a vit-custom, transformers ViT or timm folder, a timm state-dict file, or a Hub repo id.
        revision: branch, tag or commit of a Hub repo (default: main); a commit sha pins the exact weights.
        labels: class names, in the order of the classifier's outputs (default: the checkpoint's).
        num_labels: the number of classes, when they have no names (default: the checkpoint's).
        head: what to do with a head whose labels differ from `labels` / `num_labels`: `"check"` refuses,
            `"new"` replaces it (transformers' `ignore_mismatched_sizes=True`); see `HEAD_POLICIES`.
        **config_overrides: `ViTCustomConfig` fields. `image_size` resamples the position embeddings; fine-tuning
            settings (`drop_path_rate`, `hidden_dropout_prob`, `interpolate_pos_encoding`, ...) are taken as they are
            (`ADJUSTABLE_FIELDS`); the other fields may only repeat the checkpoint's values. For a bare timm state dict,
            `num_attention_heads`, `layer_norm_eps` and `hidden_act` state what it does not record. `None` keeps the
            checkpoint's value.

    Returns:
        The model and a `ViTImageProcessor` at its resolution with the checkpoint's mean, std and resampling (from a
        `preprocessor_config.json`, a timm `pretrained_cfg`; transformers' ViT defaults when it has none, ImageNet's
        for a bare timm state dict).

    Raises:
        ValueError: the checkpoint is not a ViT vit-custom can represent, lacks tensors or has tensors of the wrong
            size, an override changes its architecture, or its head does not fit the labels under `head="check"`;
            the message names what and the fix.
        OSError: the source cannot be found, downloaded or read.
    """
    if head not in HEAD_POLICIES:
        raise ValueError(f"head={head!r}: choose one of {', '.join(map(repr, HEAD_POLICIES))}.")
    overrides = {name: value for name, value in config_overrides.items() if value is not None}
    overrides.update(label_overrides(num_labels, labels))
    folder = sources.resolve_source(source, revision)
    config, state_dict, preprocessing = read_checkpoint(folder, **overrides)
    config, state_dict = adapt_checkpoint(config, state_dict, head=head, **overrides)
    return model_from_state_dict(config, state_dict).eval(), image_processor_for(config, preprocessing)


def new_model(config: ViTCustomConfig) -> tuple[ViTCustomForImageClassification, ViTImageProcessor]:
    """A new, randomly initialised classifier of `config` and its image processor (mean 0.5 and std 0.5)."""
    from modeling_vit_custom import ViTCustomForImageClassification

    return ViTCustomForImageClassification(config), image_processor_for(config)


def image_processor_for(config: ViTCustomConfig, preprocessing: dict | None = None) -> ViTImageProcessor:
    """Resize to the model's resolution, convert to its channels, scale to [0, 1] and normalise every channel.

    `preprocessing` may set `image_mean`, `image_std` and `resample`; the normalisation is otherwise mean 0.5 and std
    0.5 (transformers' ViT defaults), with `ViTImageProcessor`'s bilinear resampling.
    """
    from transformers import ViTImageProcessor

    height, width = config.image_height_width
    settings = {"image_mean": [0.5] * config.num_channels, "image_std": [0.5] * config.num_channels}
    return ViTImageProcessor(
        **{**settings, **(preprocessing or {})},
        size={"height": height, "width": width},
        do_convert_rgb=config.num_channels == 3,
    )


def read_checkpoint(source: Path, **hints) -> tuple[ViTCustomConfig, dict[str, torch.Tensor], dict]:
    """The vit-custom configuration and tensors of a local checkpoint, checked against each other, and its
    preprocessing (`image_processor_for`'s settings).

    `hints` may state what a bare timm state dict does not record (see `timm_vit.TIMM_HINTS`); other keys are ignored.
    """
    from transformers import ViTConfig

    from configuration_vit_custom import ViTCustomConfig

    kind, source_config = sources.identify_checkpoint(source)
    weights = sources.read_weights(source)
    if kind == "timm":
        timm_hints = {key: hints[key] for key in timm_vit.TIMM_HINTS if key in hints}
        config = timm_vit.vit_custom_config_from_timm(weights, source_config, **timm_hints)
        state_dict = timm_vit.vit_custom_state_dict_from_timm(weights)
        preprocessing = timm_vit.timm_preprocessing(source_config, source)
    else:
        if kind == "vit":
            config = hf_vit.vit_custom_config_from_hf_vit(ViTConfig.from_dict(source_config))
            state_dict = hf_vit.vit_custom_state_dict_from_hf_vit(weights)
        else:
            config, state_dict = ViTCustomConfig.from_dict(source_config), weights
            if not any(key.startswith("vit.") for key in weights):
                # An encoder alone (a `ViTCustomModel`, as MAE pre-training saves it), under the classifier's names.
                state_dict = {f"vit.{key}": tensor for key, tensor in weights.items()}
        preprocessing = sources.folder_preprocessing(source)
    check_state_dict(state_dict, config, source)
    return config, state_dict, preprocessing


def adapt_checkpoint(
    config: ViTCustomConfig, state_dict: dict[str, torch.Tensor], head: str = "check", **overrides
) -> tuple[ViTCustomConfig, dict[str, torch.Tensor]]:
    """Apply config overrides: a new resolution resamples the position embeddings; labels that differ from the
    checkpoint's drop its classifier under `head="new"` and are refused under `head="check"`."""
    from configuration_vit_custom import ViTCustomConfig
    from modeling_vit_custom import resample_position_embeddings

    fixed = [name for name in ViTCustomConfig.__annotations__ if name not in ADJUSTABLE_FIELDS]
    changed = [
        f"{name}={overrides[name]!r} (the checkpoint has {getattr(config, name)!r})"
        for name in fixed
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
        overrides = {**overrides, **label_fields([id2label[index] for index in sorted(id2label)])}
    elif overrides.get("num_labels", config.num_labels) != config.num_labels:
        del values["id2label"], values["label2id"]
    new_config = ViTCustomConfig.from_dict({**values, **overrides})

    reason = _new_head_reason(config, new_config, state_dict)
    if reason and head == "check" and "classifier.weight" in state_dict:
        old_labels, new_labels = (
            [labelled.id2label[index] for index in range(labelled.num_labels)] for labelled in (config, new_config)
        )
        raise ValueError(
            f"The checkpoint's head predicts {len(old_labels)} classes ({shorten(old_labels)}) but the data has "
            f"{len(new_labels)} ({shorten(new_labels)}). Pass --ignore_mismatched_sizes (head='new' in Python) to "
            "replace the head with a new one for the data's classes."
        )
    state_dict = dict(state_dict)
    if reason:
        for key in CLASSIFIER_KEYS:
            state_dict.pop(key, None)
        logger.info(f"New classification head with {new_config.num_labels} labels, randomly initialised: {reason}.")
    if new_config.grid_size != config.grid_size:
        key = "vit.embeddings.position_embeddings"
        state_dict[key] = resample_position_embeddings(
            state_dict[key], new_config.grid_size, config.grid_size, config.num_prefix_tokens
        )
        logger.info(f"Resampled the position embeddings from {config.grid_size} to {new_config.grid_size} patches.")
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


def model_from_state_dict(
    config: ViTCustomConfig, state_dict: dict[str, torch.Tensor]
) -> ViTCustomForImageClassification:
    """The classifier of `config` holding the (checked, adapted) `state_dict`."""
    from modeling_vit_custom import ViTCustomForImageClassification

    model = ViTCustomForImageClassification(config)
    # read_checkpoint has checked every tensor; a missing classifier is the new head, left to its initialisation.
    model.load_state_dict(state_dict, strict="classifier.weight" in state_dict)
    return model


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
