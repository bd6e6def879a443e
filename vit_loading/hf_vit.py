"""transformers ViT <-> vit-custom: configurations and tensors in both directions, and the export to a ViT folder.

transformers' `ViTForImageClassification` is vit-custom with `pooling="cls"` and separate query, key and value
projections; its `ViTModel` adds a tanh pooler, which vit-custom does not have.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING

from vit_loading.folders import check_output_folder, staged_folder
from vit_loading.renaming import rename_tensors, square

if TYPE_CHECKING:
    import torch
    from transformers import ViTConfig, ViTImageProcessor

    from configuration_vit_custom import ViTCustomConfig
    from modeling_vit_custom import ViTCustomForImageClassification

logger = logging.getLogger(__name__)

# Block N: `encoder.layer.N.` in the Hub's files (what save_pretrained writes), `layers.N.` in transformers 5's memory.
HF_VIT_BLOCK = re.compile(r"(?:vit\.)?(?:encoder\.layer|layers)\.(\d+)\.(.+)")
# Outside the blocks vit-custom's names are ViTForImageClassification's; a ViTModel's lack the `vit.` prefix.
HF_VIT_NAMES = {
    "classifier": "classifier",
    **{
        name: f"vit.{name}"
        for name in (
            "embeddings.cls_token",
            "embeddings.position_embeddings",
            "embeddings.patch_embeddings.projection",
            "layernorm",
        )
    },
}
# transformers 5's names inside a block -> vit-custom's: the same but for the attention projections. Query, key and
# value are fused into `attention.qkv` after.
BLOCK_NAMES = {
    **{name: name for name in ("layernorm_before", "layernorm_after", "mlp.fc1", "mlp.fc2")},
    "attention.q_proj": "attention.query",
    "attention.k_proj": "attention.key",
    "attention.v_proj": "attention.value",
    "attention.o_proj": "attention.proj",
}
# The Hub's classic names of the same modules, read at import only: the export writes transformers 5's.
CLASSIC_BLOCK_NAMES = {
    "layernorm_before": "layernorm_before",
    "attention.attention.query": "attention.query",
    "attention.attention.key": "attention.key",
    "attention.attention.value": "attention.value",
    "attention.output.dense": "attention.proj",
    "layernorm_after": "layernorm_after",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
# The label fields, which both configs take from PreTrainedConfig, copied with the fields both declare.
LABEL_FIELDS = ("id2label", "label2id", "problem_type")
QKV = ("query", "key", "value")


def shared_config_fields() -> list[str]:
    """The fields that transformers' ViTConfig and ViTCustomConfig both declare, with one meaning: copied both ways.

    `patch_size` is not among them: ViTConfig's may be a pair, vit-custom's patches are square. Nor is
    `encoder_stride`: ViTConfig's is 16 whatever the patch size, vit-custom's the patch size.
    """
    from transformers import ViTConfig

    from configuration_vit_custom import ViTCustomConfig

    declared = [name for name in ViTCustomConfig.__annotations__ if name in ViTConfig.__annotations__]
    return [name for name in declared if name not in ("patch_size", "encoder_stride")] + list(LABEL_FIELDS)


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
        **{name: getattr(vit_config, name) for name in shared_config_fields()},
        patch_size=square(vit_config.patch_size, "patch_size"),
        use_cls_token=True,
        pooling="cls",
    )


def hf_vit_config_from_vit_custom(config: ViTCustomConfig) -> ViTConfig:
    """The transformers ViT configuration of a CLS-pooled vit-custom model."""
    from transformers import ViTConfig

    if config.pooling != "cls":
        raise ValueError(
            f"Only pooling='cls' models can be exported to transformers' ViT, which classifies the CLS token; this "
            f"one has pooling={config.pooling!r}."
        )
    shared = {name: getattr(config, name) for name in shared_config_fields()}
    return ViTConfig(**shared, patch_size=config.patch_size, encoder_stride=config.patch_size)


def vit_custom_state_dict_from_hf_vit(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename transformers ViT tensors (either layout, with or without `vit.`) and fuse query, key and value.

    `ViTModel`'s tanh pooler is dropped; tensors with no vit-custom name keep their own, for the check that follows.
    """
    import torch

    pooler = [key for key in state_dict if key.removeprefix("vit.").startswith("pooler.dense.")]
    if pooler:
        logger.info(
            "Dropped ViTModel's tanh pooler (pooler.dense): vit-custom classifies the CLS token after the final "
            "LayerNorm, as transformers' ViTForImageClassification does."
        )
    kept = {key: tensor for key, tensor in state_dict.items() if key not in pooler}
    renamed = rename_tensors(kept, HF_VIT_NAMES, HF_VIT_BLOCK, {**CLASSIC_BLOCK_NAMES, **BLOCK_NAMES}, "vit.")
    # Rows q, k, v in `attention.qkv`, as in timm.
    for key in list(renamed):
        if re.fullmatch(r"vit\.layers\.\d+\.attention\.query\.(weight|bias)", key):
            parts = [key.replace(".query.", f".{name}.") for name in QKV]
            if all(part in renamed for part in parts):
                renamed[key.replace(".query.", ".qkv.")] = torch.cat([renamed.pop(part) for part in parts])
    return renamed


def hf_vit_state_dict_from_vit_custom(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """vit-custom tensors under transformers 5's ViT names (`save_pretrained` then writes the Hub's classic layout)."""
    export_names = {custom: name for name, custom in BLOCK_NAMES.items()}
    renamed = {}
    for key, tensor in state_dict.items():
        block = re.fullmatch(r"vit\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
        if block is None:
            renamed[key] = tensor
            continue
        if block[2] == "attention.qkv":
            parts = {f"attention.{name}": part.clone() for name, part in zip(QKV, tensor.chunk(3), strict=True)}
        else:
            parts = {block[2]: tensor}
        for name, part in parts.items():
            renamed[f"vit.layers.{block[1]}.{export_names[name]}.{block[3]}"] = part
    return renamed


def export_to_hf_vit(
    model: ViTCustomForImageClassification,
    output_dir: str | Path,
    image_processor: ViTImageProcessor | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a CLS-pooled vit-custom model as a transformers `ViTForImageClassification` folder (no remote code).

    Raises:
        ValueError: the model pools the mean of the patch tokens, which transformers' ViT cannot.
        OSError: `output_dir` cannot be written, or has files and not `overwrite`.
    """
    from transformers import ViTForImageClassification

    output_dir = Path(output_dir)
    check_output_folder(output_dir, overwrite)
    vit_model = ViTForImageClassification(hf_vit_config_from_vit_custom(model.config))
    vit_model.load_state_dict(hf_vit_state_dict_from_vit_custom(model.state_dict()))
    with staged_folder(output_dir) as staging:
        vit_model.save_pretrained(staging)
        if image_processor is not None:
            image_processor.save_pretrained(staging)
    return output_dir
