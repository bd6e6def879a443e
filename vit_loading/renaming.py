"""What the transformers ViT and timm mappings share: renaming tensors by module, and square patch sizes."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def rename_tensors(
    state_dict: dict[str, torch.Tensor],
    names: dict[str, str],
    block_pattern: re.Pattern,
    block_names: dict[str, str],
    strip_prefix: str = "",
) -> dict[str, torch.Tensor]:
    """Rename each tensor by its module: `names` outside the blocks, `block_names` inside block N (`block_pattern`
    matches the module and captures N and the name within the block) to `vit.layers.N.<name>`.

    Tensors of modules neither map names keep their own, so that the check of the result can name them.
    """
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


def square(size: int | list[int] | tuple[int, int], name: str) -> int:
    """The side of a square size given as one number or a pair; a ValueError naming `name` for a rectangle."""
    if isinstance(size, int):
        return size
    if len(size) != 2 or size[0] != size[1]:
        raise ValueError(f"{name}={list(size)} is not square; vit-custom uses square patches.")
    return int(size[0])
