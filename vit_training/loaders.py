"""Data loaders: the undecoded path (images decoded and augmented in loader workers) and the in-memory path (images
decoded once into uint8 tensors, augmented a batch at a time in the training process), and the choice between them."""

import logging
from collections.abc import Callable

import datasets
import numpy as np
import torch
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader

from vit_loading import shorten
from vit_training import images as image_files
from vit_training.augment import EvalTransform, TrainTransform
from vit_training.data import column
from vit_training.errors import TrainingError

logger = logging.getLogger(__name__)


def lazy_split(split: Dataset, transform: EvalTransform) -> Dataset:
    """`split` with its images left undecoded until `transform` reads them, in the loader (workers)."""
    undecoded = datasets.Image(decode=False)
    return split.cast_column(transform.image_column, undecoded).with_transform(transform)


def collate_fn(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack the transformed examples of a batch (the images, decoded and augmented, arrive as tensors)."""
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples]),
    }


def in_memory_plan(
    setting: str, dataset: DatasetDict, train_transform: TrainTransform, budget_bytes: int
) -> tuple[bool, str]:
    """Whether to decode the images once into memory (`--images_in_memory`), and why, for the log.

    `auto` says yes when the training images sampled share one size, at most twice the model's input on each side
    (a bilinear crop of a larger image would alias), and all splits fit in `budget_bytes` as uint8.
    """
    if setting != "auto":
        return setting == "on", f"--images_in_memory {setting}"
    shapes = image_files.image_shapes(dataset["train"], train_transform.image_column)
    if len(shapes) != 1:
        return False, f"the training images have several sizes ({shorten(sorted(shapes))})"
    (height, width), (out_height, out_width) = next(iter(shapes)), train_transform.augmentation.output_size
    if height > 2 * out_height or width > 2 * out_width:
        return False, f"the training images ({height}x{width}) are over twice the model's input size"
    channels = 3 if train_transform.image_mode == "RGB" else 1
    evaluated = sum(len(split) for name, split in dataset.items() if name != "train")
    needed = channels * (len(dataset["train"]) * height * width + evaluated * out_height * out_width)
    if needed > budget_bytes:
        return False, f"they need {needed / 2**30:.1f} GiB, over the budget of {budget_bytes / 2**30:.1f} GiB"
    return True, f"{needed / 2**20:.0f} MiB of {height}x{width} images"


def load_in_memory(
    dataset: DatasetDict, train_transform: TrainTransform, eval_transform: EvalTransform, processes: int
) -> tuple[dict[str, image_files.InMemoryImages], list[str]]:
    """Decode every split once into uint8 tensors: training images at their own size (augmented per batch later),
    evaluation images resized and cropped as `eval_transform` does. Returns the splits and the bad files met; bad
    files raise unless the transforms skip them."""
    splits, bad = {}, []
    for name, split in dataset.items():
        if name == "train":
            size = next(iter(image_files.image_shapes(split, train_transform.image_column)))
            prepare = None
        else:
            size, prepare = train_transform.augmentation.output_size, eval_transform.prepare
        images, kept, split_bad, modes = image_files.decode_all(
            split, train_transform.image_column, train_transform.image_mode, size, prepare, processes
        )
        if split_bad and not train_transform.skip_bad_images:
            raise TrainingError(
                f"{len(split_bad)} {name} image(s) cannot be decoded: {shorten(split_bad, limit=3)}. Remove or "
                "replace them, or pass --on_bad_image skip to train without them."
            )
        converted = {mode: count for mode, count in modes.items() if mode != train_transform.image_mode}
        if converted:
            counts = ", ".join(f"{count} {mode}" for mode, count in sorted(converted.items()))
            logger.info(f"{name}: converted {counts} image(s) to {train_transform.image_mode}")
        labels = column(split, train_transform.label_column)
        labels = torch.from_numpy(labels.astype(np.int64))[kept] if kept else torch.empty(0, dtype=torch.long)
        splits[name] = image_files.InMemoryImages(images, labels)
        bad.extend(split_bad)
    return splits, bad


def make_dataloader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    device: torch.device,
    shuffle: bool = False,
    persistent_workers: bool = True,
    collate: Callable[[list[dict]], dict] = collate_fn,
    sampler: torch.utils.data.Sampler | None = None,
) -> DataLoader:
    """A loader of `dataset` in batches; `collate` turns the fetched examples into the batch the loop trains on.
    `sampler`, if given, orders the samples instead of `shuffle`."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        # Workers started once, not every epoch: for a small dataset, starting them costs more than an epoch.
        persistent_workers=persistent_workers and num_workers > 0,
        worker_init_fn=share_batches_as_files,
        pin_memory=device.type == "cuda",
        # Seeds the workers without drawing from the global generator, which dropout uses.
        generator=torch.Generator().manual_seed(seed),
    )


def share_batches_as_files(worker_id: int):
    """Run in each loader worker: hand batches to the training process as named shared-memory files.

    With file descriptors, torch's default, the training process waits for the busy worker's Python to pass each
    descriptor over a socket (benchmarks/README.md has the cost). Set in the worker, which is the one that shares.
    """
    torch.multiprocessing.set_sharing_strategy("file_system")

