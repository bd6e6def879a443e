#!/usr/bin/env python
"""Import a transformers ViT or timm checkpoint as a ready vit-custom folder, or export vit-custom to transformers' ViT.

    python convert_checkpoint.py google/vit-base-patch16-224 vit-base-in1k
    python convert_checkpoint.py timm/vit_base_patch16_224.augreg2_in21k_ft_in1k vit-b16-384 --image_size 384
    python convert_checkpoint.py vit-base-in1k vit-base-hf --to_hf_vit

The flags are spelled as run_finetune.py spells them. The work is `vit_loading`'s: from Python,
`vit_loading.load_model(source)` returns the model and its image processor without writing a folder.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

# vit_loading imports torch and transformers only when loading: --help and usage errors are answered at once.
from vit_loading import check_output_folder, export_to_hf_vit, load_model, staged_folder

logger = logging.getLogger(__name__)

# The flags that shape an import, refused beside --to_hf_vit, which exports the model as it is.
IMPORT_FLAGS = ("image_size", "num_labels", "labels", "ignore_mismatched_sizes", "num_attention_heads")


def main(argv: list[str] | None = None):
    parser = build_parser()
    args = parse_args(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.to_hf_vit:
            output_dir = export(args.source, args.output_dir, args.model_revision, args.overwrite_output_dir)
        else:
            output_dir = convert(
                args.source,
                args.output_dir,
                overwrite=args.overwrite_output_dir,
                revision=args.model_revision,
                labels=args.labels,
                num_labels=args.num_labels,
                head="new" if args.ignore_mismatched_sizes else "check",
                image_size=args.image_size[0] if args.image_size and len(args.image_size) == 1 else args.image_size,
                num_attention_heads=args.num_attention_heads,
            )
    except (ValueError, OSError) as error:
        parser.exit(1, f"error: {error}\n")
    logger.info(f"Wrote {output_dir}")


def convert(source: str | Path, output_dir: str | Path, overwrite: bool = False, **load_arguments) -> Path:
    """Write `vit_loading.load_model(source, **load_arguments)` as a vit-custom folder: config, safetensors, model
    code and image processor.

    The output folder is checked before anything is read, and written whole or not at all.
    """
    output_dir = Path(output_dir)
    check_output_folder(output_dir, overwrite)
    model, image_processor = load_model(source, **load_arguments)
    with staged_folder(output_dir) as staging:
        model.save_pretrained(staging)
        image_processor.save_pretrained(staging)
    return output_dir


def export(source: str | Path, output_dir: str | Path, revision: str | None = None, overwrite: bool = False) -> Path:
    """Write the vit-custom model `source` as a transformers ViT folder, checked before anything is read."""
    check_output_folder(Path(output_dir), overwrite)
    model, image_processor = load_model(source, revision=revision)
    return export_to_hf_vit(model, output_dir, image_processor, overwrite=overwrite)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments, with the values no conversion could use refused as usage errors."""
    args = parser.parse_args(argv)
    if args.image_size is not None and (len(args.image_size) > 2 or min(args.image_size) <= 0):
        parser.error(
            f"--image_size {' '.join(map(str, args.image_size))}: give one side or height and width, in pixels"
        )
    for flag in ("num_labels", "num_attention_heads"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            parser.error(f"--{flag} {value}: must be a positive number")
    given = [flag for flag in IMPORT_FLAGS if getattr(args, flag)]
    if args.to_hf_vit and given:
        parser.error(
            f"--to_hf_vit exports the model as it is; {', '.join(f'--{flag}' for flag in given)} apply to an import. "
            "Import with them first, then export the result."
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
    parser.add_argument(
        "output_dir", help="Folder to write; it must not exist yet, or be empty, unless --overwrite_output_dir."
    )
    parser.add_argument(
        "--model_revision",
        help="Branch, tag or commit of a Hub repo source (default: main); a commit sha pins the exact weights.",
    )
    parser.add_argument(
        "--image_size",
        type=int,
        nargs="+",
        metavar="PIXELS",
        help="Resolution of the converted model, one side or height and width (default: the checkpoint's); the "
        "position embeddings are resampled once, as timm does.",
    )
    parser.add_argument(
        "--labels",
        nargs="+",
        metavar="LABEL",
        help="Class names, in the order of the classifier's outputs (default: the checkpoint's).",
    )
    parser.add_argument(
        "--num_labels", type=int, help="Number of classes, when they have no names (default: the checkpoint's)."
    )
    parser.add_argument(
        "--ignore_mismatched_sizes",
        action="store_true",
        help="Replace the checkpoint's classification head with a new, randomly initialised one when --labels or "
        "--num_labels differ from its classes (without it such a conversion is refused).",
    )
    parser.add_argument(
        "--num_attention_heads",
        type=int,
        help="Attention heads of a bare timm state dict, which does not record them (default: the standard ViT "
        "size with that width, else width / 64).",
    )
    parser.add_argument(
        "--overwrite_output_dir", action="store_true", help="Replace output_dir if it already has files."
    )
    parser.add_argument(
        "--to_hf_vit",
        action="store_true",
        help="Write a plain transformers ViTForImageClassification folder (no remote code) instead; the source must "
        "use pooling='cls'.",
    )
    return parser


if __name__ == "__main__":
    main()
