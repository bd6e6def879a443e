"""Loading vit-custom models from every checkpoint kind, the mappings to and from transformers ViT and timm, and
writing model folders.

`load_model` is the entry point; the modules import torch and transformers only when a function needs them, so that
importing this package is instant.
"""

from vit_loading.folders import check_output_folder, shorten, staged_folder, unwritable_folder_reason
from vit_loading.hf_vit import export_to_hf_vit
from vit_loading.labels import label_fields, label_overrides
from vit_loading.load import ADJUSTABLE_FIELDS, HEAD_POLICIES, image_processor_for, load_model, new_model
from vit_loading.sources import resolve_source

__all__ = [
    "ADJUSTABLE_FIELDS",
    "HEAD_POLICIES",
    "check_output_folder",
    "export_to_hf_vit",
    "image_processor_for",
    "label_fields",
    "label_overrides",
    "load_model",
    "new_model",
    "resolve_source",
    "shorten",
    "staged_folder",
    "unwritable_folder_reason",
]
