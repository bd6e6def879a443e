"""The data and reporting halves of run_finetune.py: images in, model card and Hub upload out."""

import argparse
import logging
import math
import os
import shlex
from collections.abc import Callable
from pathlib import Path

import accelerate
import datasets
import numpy as np
import torch
import transformers
from accelerate.utils import get_int_from_env
from datasets import ClassLabel, Dataset, DatasetDict, Features, load_dataset
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from matplotlib.figure import Figure
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T
from transformers import ViTImageProcessor

import image_data
from configuration_vit_custom import ViTCustomConfig
from convert_checkpoint import shorten
from finetune_errors import FinetuneError

logger = logging.getLogger(__name__)

# The digits' train/test split is fixed, so that runs with different --seed values are scored on the same images.
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
# How model cards name the digits.
DIGITS_DATASET_ID = "sklearn-digits"

# Where launchers say how many processes run on this machine: torchrun and `accelerate launch`, then MPI's.
LOCAL_PROCESS_COUNT_VARIABLES = ["LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"]

# A column that numbers the training samples, so that each one's augmentation depends only on (seed, epoch, sample).
SAMPLE_INDEX = image_data.SAMPLE_INDEX

# The output folder goes to the Hub without its checkpoints and unfinished checkpoint saves (`*` matches across `/`).
NOT_UPLOADED = ["checkpoint-*", "tmp/*"]


# ----------------------------------------------------------------------------------------------------------------------
# Data


def load_image_dataset(args: argparse.Namespace) -> DatasetDict:
    """The images as `train`, `validation` and, when the data has one, `test` splits, with checked columns."""
    if args.dataset_name and split_folders(Path(args.dataset_name)):
        dataset = load_image_folders(**split_folders(Path(args.dataset_name)))
    elif args.dataset_name:
        dataset = load_hub_dataset(args.dataset_name, args.dataset_config_name)
    elif args.train_dir:
        dataset = load_image_folders(train=args.train_dir, validation=args.validation_dir, test=args.test_dir)
    else:
        dataset = load_digits_dataset()
    if "train" not in dataset:
        raise FinetuneError(f"The dataset has no `train` split, only {sorted(dataset)}; it needs one to train on.")
    check_columns(dataset, args.image_column_name, args.label_column_name)
    dataset = encode_labels(dataset, args.label_column_name)
    dataset = DatasetDict({name: split for name, split in dataset.items() if name in ("train", "validation", "test")})
    if "validation" not in dataset:
        dataset = carve_validation_split(dataset, args.train_val_split, args.label_column_name, args.seed)
    if args.max_train_samples is not None:
        dataset["train"] = subsample(dataset["train"], args.max_train_samples, args.seed)
    if args.max_eval_samples is not None:
        for name in ("validation", "test"):
            if name in dataset:
                dataset[name] = subsample(dataset[name], args.max_eval_samples, args.seed)
    for name, split in dataset.items():
        if len(split) == 0:
            raise FinetuneError(f"The {name} split is empty: it has no images. Check the data you passed.")
    return dataset


def load_digits_dataset() -> DatasetDict:
    """scikit-learn's 1,797 8x8 handwritten digits as grayscale images, split 80/20 (stratified) into train and test."""
    from sklearn.datasets import load_digits  # only the digits need scikit-learn, a second of import time

    digits = load_digits()
    # The pixel values are ink counts from 0 to 16.
    images = [Image.fromarray(np.round(image * 255 / 16).astype(np.uint8)) for image in digits.images]
    features = Features({"image": datasets.Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    dataset = Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)
    return dataset.train_test_split(test_size=DIGITS_TEST_FRACTION, stratify_by_column="label", seed=DIGITS_SPLIT_SEED)


def load_hub_dataset(name: str, config_name: str | None) -> DatasetDict:
    try:
        return load_dataset(name, config_name)
    except Exception as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")
        fix = (
            "HF_HUB_OFFLINE=1 is set (the Makefile sets it): unset it to download, "
            if offline
            else "Check the name and your connection (or `hf auth login` for a private dataset), "
        )
        raise FinetuneError(
            f"Could not load the dataset {name!r} from the Hugging Face Hub: {error}. {fix}"
            "or train on local images with --train_dir (and --validation_dir)."
        ) from error


def load_image_folders(**folders: Path | None) -> DatasetDict:
    """Read `<folder>/<class>/.../<image>` folders: the classes are the training folder's sub-folders.

    One pass over the files, O(n), opening none of them: images are decoded (and bad ones met) during training, or
    all at once by `--verify_images` or the in-memory path. A folder with a metadata file (`metadata.csv`, ...),
    which carries labels or other columns, is read by `datasets`' imagefolder instead.
    """
    listings = {}
    for split, folder in folders.items():
        if folder is None:
            continue
        flag = f"--{split}_dir {folder}"
        if not folder.is_dir():
            raise FinetuneError(f"{flag} is not a folder. Pass a folder with one sub-folder of images per class.")
        if any((folder / name).is_file() for name in image_data.METADATA_FILES):
            return load_dataset("imagefolder", data_dir=None, data_files=metadata_data_files(folders))
        paths, classes, others, empty = image_data.list_image_folder(folder)
        loose = [n for n in others if "/" not in n and Path(n).suffix.lower() in image_data.IMAGE_EXTENSIONS]
        if not paths:
            found = f"only {len(others)} other file(s): {shorten(others, limit=3)}" if others else "no class sub-folder"
            raise FinetuneError(
                f"{flag} holds no images in class sub-folders ({found}). Put the images in one sub-folder per class "
                f"({folder}/<label>/<image>.png), in a format Pillow reads (.png, .jpg, ...)."
            )
        if loose:
            raise FinetuneError(
                f"{flag} holds {len(loose)} image(s) outside any class sub-folder ({shorten(loose, limit=3)}); their "
                f"class is unknown. Move them into {folder}/<label>/, or delete them."
            )
        if empty and split == "train":
            raise FinetuneError(
                f"{flag}: the class folder(s) {shorten(empty)} hold no images, so the model would have classes it "
                "never sees. Add images to them, or remove the empty folders."
            )
        if others:
            logger.warning(f"{flag}: ignoring {len(others)} file(s) that are not images: {shorten(others)}")
        listings[split] = (paths, classes)
    names = sorted(set(listings["train"][1]))
    for split, (_, classes) in listings.items():
        unknown = sorted(set(classes) - set(names))
        if unknown:
            raise FinetuneError(
                f"--{split}_dir {folders[split]} has class folder(s) {shorten(unknown)} that --train_dir lacks: the "
                "model could never predict them. Add training images for them, or remove them from that folder."
            )
    features = Features({"image": datasets.Image(), "label": ClassLabel(names=names)})
    index = {name: i for i, name in enumerate(names)}
    return DatasetDict(
        {
            split: Dataset.from_dict({"image": paths, "label": [index[c] for c in classes]}, features=features)
            for split, (paths, classes) in listings.items()
        }
    )


def split_folders(folder: Path) -> dict[str, Path]:
    """A local dataset folder's `train`, `validation` (or `val`, `valid`, `dev`) and `test` sub-folders, when it has a
    `train` one holding class folders, to be listed as --train_dir and friends are; else nothing."""
    if not (folder / "train").is_dir() or any((folder / name).is_file() for name in image_data.METADATA_FILES):
        return {}
    splits = {"train": folder / "train"}
    for split, names in (("validation", ("validation", "val", "valid", "dev")), ("test", ("test",))):
        found = [folder / name for name in names if (folder / name).is_dir()]
        if found:
            splits[split] = found[0]
    return splits


def metadata_data_files(folders: dict[str, Path | None]) -> dict[str, list[str]]:
    """Every file of each folder, for imagefolder, which pairs the images with the metadata files' rows."""
    return {
        split: [str(path) for path in sorted(folder.rglob("*")) if path.is_file() and not path.name.startswith(".")]
        for split, folder in folders.items()
        if folder is not None
    }


def check_columns(dataset: DatasetDict, image_column: str, label_column: str):
    features = dataset["train"].features
    image_columns = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if image_column not in features:
        hint = f"the image columns are {image_columns}" if image_columns else f"the columns are {list(features)}"
        raise FinetuneError(
            f"The dataset has no image column {image_column!r}; {hint}. Pass --image_column_name with the column "
            "that holds the images."
        )
    if not isinstance(features[image_column], datasets.Image):
        raise FinetuneError(
            f"Column {image_column!r} holds {features[image_column]}, not images; pass --image_column_name with the "
            f"column that holds the images ({image_columns or 'none found'})."
        )
    if label_column not in features:
        candidates = [name for name in features if name != image_column]
        raise FinetuneError(
            f"The dataset has no label column {label_column!r}; its other columns are {candidates}. Pass "
            "--label_column_name with the column that holds the classes, or, for image folders, put each class's "
            "images in a sub-folder named after the class."
        )


def encode_labels(dataset: DatasetDict, label_column: str) -> DatasetDict:
    """Make the label column a `ClassLabel`, the same for every split, if it holds plain names or indices."""
    feature = dataset["train"].features[label_column]
    if isinstance(feature, ClassLabel):
        return dataset
    values = set(dataset["train"][label_column])
    if isinstance(feature, datasets.Value) and feature.dtype == "string":
        names = sorted(values)
    elif isinstance(feature, datasets.Value) and feature.dtype.startswith("int") and min(values) >= 0:
        names = [str(i) for i in range(max(values) + 1)]
    else:
        raise FinetuneError(
            f"Column {label_column!r} holds {feature}; a label column holds class names or class indices. Pass "
            "--label_column_name with the column that holds the classes."
        )
    try:
        return dataset.cast_column(label_column, ClassLabel(names=names))
    except ValueError as error:
        raise FinetuneError(f"Some evaluation images have a class the training images lack: {error}") from error


def carve_validation_split(dataset: DatasetDict, fraction: float, label_column: str, seed: int) -> DatasetDict:
    """Hold out a stratified `fraction` of the training images for validation (unstratified for rare classes)."""
    train = dataset["train"]
    try:
        try:
            split = stratified_split(train, fraction, label_column, seed)
        except ValueError:  # a class with a single image cannot be stratified
            split = train.train_test_split(test_size=fraction, seed=seed)
    except ValueError as error:
        raise FinetuneError(
            f"Could not hold out {fraction:.0%} of the {len(train)} training images for validation: {error}. Pass "
            "a --validation_dir, or a larger --train_val_split."
        ) from error
    return DatasetDict({**dataset, "train": split["train"], "validation": split["test"]})


def column(split: Dataset, name: str) -> np.ndarray:
    """One column as an array, read at once (`split[name]` is read row by row when listed: seconds per 100,000)."""
    return split.with_format("numpy", columns=[name])[:][name]


def stratified_split(split: Dataset, test_fraction: float, label_column: str, seed: int) -> DatasetDict:
    """`split.train_test_split(test_size=test_fraction, stratify_by_column=label_column, seed=seed)`: the same
    indices, drawn by the same `datasets` function, but with the labels read as one column (datasets 5 reads them
    row by row there: 25 s for 100,000 images)."""
    from datasets.utils.stratify import stratified_shuffle_split_generate_indices

    labels = column(split, label_column)
    num_test = math.ceil(test_fraction * len(labels))
    if not 0 < num_test < len(labels):
        raise ValueError(f"a fraction of {test_fraction} leaves no image on one side")
    try:
        train_indices, test_indices = next(stratified_shuffle_split_generate_indices(
            labels, len(labels) - num_test, num_test, rng=np.random.default_rng(seed)
        ))  # fmt: skip
    except Exception as error:  # datasets raises a bare Exception for a class of one image
        raise ValueError(str(error)) from error
    return DatasetDict({"train": split.select(train_indices), "test": split.select(test_indices)})


def subsample(split: Dataset, max_samples: int, seed: int) -> Dataset:
    return split.shuffle(seed=seed).select(range(min(max_samples, len(split))))


def number_samples(split: Dataset) -> Dataset:
    return split.add_column(SAMPLE_INDEX, np.arange(len(split)))


# The label of a sample whose image could not be decoded, with --on_bad_image skip: the loss and the metrics ignore
# it, as transformers' losses ignore -100.
SKIPPED_LABEL = -100


class EvalTransform:
    """Turns a batch of examples into `pixel_values` of the model's size, channels and normalisation, and `labels`.

    The images arrive undecoded (`datasets.Image(decode=False)`), so that a bad file is named: it stops the run, or,
    with `skip_bad_images`, becomes a blank image with the label `SKIPPED_LABEL`. `prepare` crops or resizes one PIL
    image and makes it a uint8 tensor; `normalize` scales and normalises the stacked batch at once, which is several
    times faster than doing it image by image.
    """

    def __init__(
        self,
        prepare: T.Transform,
        normalize: T.Transform,
        image_mode: str,
        image_column: str,
        label_column: str,
        skip_bad_images: bool = False,
    ):
        self.prepare, self.normalize, self.image_mode = prepare, normalize, image_mode
        self.image_column, self.label_column = image_column, label_column
        self.skip_bad_images = skip_bad_images

    def __call__(self, batch: dict) -> dict:
        images, labels = self.prepare_images(batch, [None] * len(batch[self.label_column]))
        return {"pixel_values": self.normalize(torch.stack(images)), "labels": labels}

    def prepare_images(self, batch: dict, seeds: list[int | None]) -> tuple[list[torch.Tensor], list[int]]:
        """Decode, convert and prepare each image, seeding the random generator with its seed first (if any)."""
        images, labels = [], list(batch[self.label_column])
        for position, (value, seed) in enumerate(zip(batch[self.image_column], seeds, strict=True)):
            if seed is not None:
                torch.default_generator.manual_seed(seed)
            try:
                images.append(self.prepare(image_data.to_mode(image_data.open_image(value), self.image_mode)))
            except image_data.BadImageError as error:
                if not self.skip_bad_images:
                    raise image_data.BadImageError(f"{error}. Remove or replace the file, or pass "
                                                   "--on_bad_image skip to train without it.") from None
                images.append(None)
                labels[position] = SKIPPED_LABEL
        blank = next((image for image in images if image is not None), None)
        if blank is None:
            blank = self.prepare(Image.new(self.image_mode, (8, 8)))
        return [torch.zeros_like(blank) if image is None else image for image in images], labels


class TrainTransform(EvalTransform):
    """An `EvalTransform` whose `prepare` augments the images at random.

    Each image's augmentation is seeded with (seed, epoch, sample), so it does not depend on which process or worker
    loads the image, or on what was loaded before: a resumed run and a run on several processes see exactly the
    images an uninterrupted single-process run sees.
    """

    def __init__(self, *args, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.seed = seed
        # In shared memory, so that the loader's persistent worker processes see the epoch the training loop sets.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    @epoch.setter
    def epoch(self, epoch: int):
        self._epoch.fill_(epoch)

    def __call__(self, batch: dict) -> dict:
        epoch = self.epoch
        seeds = [hash((self.seed, epoch, index)) % 2**63 for index in batch[SAMPLE_INDEX]]
        with torch.random.fork_rng(devices=[]):  # leaves the global generator, which dropout draws from, untouched
            images, labels = self.prepare_images(batch, seeds)
        pixel_values = self.normalize(torch.stack(images))
        return {"pixel_values": pixel_values, "labels": labels, SAMPLE_INDEX: batch[SAMPLE_INDEX]}


def build_transforms(
    image_processor: ViTImageProcessor, num_channels: int, args: argparse.Namespace
) -> tuple[TrainTransform, EvalTransform]:
    """Training (random resized crop, optional flip) and evaluation (resize, center crop) transforms, with the size,
    mean and standard deviation of the image processor, converting every image to the model's channels."""
    if len(image_processor.image_mean) != num_channels or len(image_processor.image_std) != num_channels:
        raise FinetuneError(
            f"The image processor normalises {len(image_processor.image_mean)} channels but the model takes "
            f"{num_channels}; save a processor whose image_mean and image_std have {num_channels} values."
        )
    size = image_processor.size
    resize = size["shortest_edge"] if "shortest_edge" in size else (size["height"], size["width"])
    crop = image_processor.crop_size if getattr(image_processor, "do_center_crop", False) else None
    crop = (crop["height"], crop["width"]) if crop else resize
    flip = [T.RandomHorizontalFlip()] if args.horizontal_flip else []
    augment = T.Compose([T.RandomResizedCrop(crop, scale=tuple(args.crop_scale)), *flip, T.ToImage()])
    resize_and_crop = T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToImage()])
    normalize = T.Compose(
        [
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean=image_processor.image_mean, std=image_processor.image_std),
        ]
    )
    image_mode = "RGB" if num_channels == 3 else "L"
    columns = (image_mode, args.image_column_name, args.label_column_name)
    skip = args.on_bad_image == "skip"
    train = TrainTransform(augment, normalize, *columns, seed=args.seed, skip_bad_images=skip)
    evaluation = EvalTransform(resize_and_crop, normalize, *columns, skip_bad_images=skip)
    # What the in-memory path (image_data.BatchAugment) needs to augment the same way, a batch at a time.
    train.output_size, train.crop_scale, train.flip = crop, tuple(args.crop_scale), args.horizontal_flip
    train.image_mean, train.image_std = list(image_processor.image_mean), list(image_processor.image_std)
    return train, evaluation


def lazy_split(split: Dataset, transform: EvalTransform) -> Dataset:
    """`split` with its images left undecoded until `transform` reads them, in the loader (workers)."""
    undecoded = datasets.Image(decode=False)
    return split.cast_column(transform.image_column, undecoded).with_transform(transform)


def collate_fn(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack the transformed examples of a batch (the images, decoded and augmented, arrive as tensors)."""
    batch = {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples]),
    }
    if SAMPLE_INDEX in examples[0]:  # training batches: which samples they hold, for observers of the run
        batch[SAMPLE_INDEX] = torch.tensor([example[SAMPLE_INDEX] for example in examples])
    return batch


def in_memory_plan(
    setting: str, dataset: DatasetDict, train_transform: TrainTransform, budget_bytes: int
) -> tuple[bool, str]:
    """Whether to decode the images once into memory (`--images_in_memory`), and why, for the log.

    `auto` says yes when the training images sampled share one size, at most twice the model's input on each side
    (a bilinear crop of a larger image would alias), and all splits fit in `budget_bytes` as uint8.
    """
    if setting != "auto":
        return setting == "on", f"--images_in_memory {setting}"
    shapes = image_data.image_shapes(dataset["train"], train_transform.image_column)
    if len(shapes) != 1:
        return False, f"the training images have several sizes ({shorten(sorted(shapes))})"
    (height, width), (out_height, out_width) = next(iter(shapes)), train_transform.output_size
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
) -> tuple[dict[str, image_data.InMemoryImages], list[str]]:
    """Decode every split once into uint8 tensors: training images at their own size (augmented per batch later),
    evaluation images resized and cropped as `eval_transform` does. Returns the splits and the bad files met; bad
    files raise unless the transforms skip them."""
    splits, bad = {}, []
    for name, split in dataset.items():
        if name == "train":
            size = next(iter(image_data.image_shapes(split, train_transform.image_column)))
            prepare = None
        else:
            size, prepare = train_transform.output_size, eval_transform.prepare
        images, kept, split_bad, modes = image_data.decode_all(
            split, train_transform.image_column, train_transform.image_mode, size, prepare, processes
        )
        if split_bad and not train_transform.skip_bad_images:
            raise FinetuneError(
                f"{len(split_bad)} {name} image(s) cannot be decoded: {shorten(split_bad, limit=3)}. Remove or "
                "replace them, or pass --on_bad_image skip to train without them."
            )
        converted = {mode: count for mode, count in modes.items() if mode != train_transform.image_mode}
        if converted:
            counts = ", ".join(f"{count} {mode}" for mode, count in sorted(converted.items()))
            logger.info(f"{name}: converted {counts} image(s) to {train_transform.image_mode}")
        labels = column(split, train_transform.label_column)
        labels = torch.from_numpy(labels.astype(np.int64))[kept] if kept else torch.empty(0, dtype=torch.long)
        splits[name] = image_data.InMemoryImages(images, labels)
        bad.extend(split_bad)
    return splits, bad


def memory_budget() -> int:
    """A quarter of the memory available now: what the in-memory path may take."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 2**30


def make_dataloader(
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    seed: int,
    device: torch.device,
    shuffle: bool = False,
    persistent_workers: bool = True,
    collate: Callable[[list[dict]], dict] = collate_fn,
) -> DataLoader:
    """A loader of `dataset` in batches; `collate` turns the fetched examples into the batch the loop trains on."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        collate_fn=collate,
        num_workers=num_workers,
        # Workers started once, not every epoch: starting them costs more than an epoch of the digits.
        persistent_workers=persistent_workers and num_workers > 0,
        worker_init_fn=share_batches_as_files,
        pin_memory=device.type == "cuda",
        # Seeds the workers without drawing from the global generator, which dropout uses.
        generator=torch.Generator().manual_seed(seed),
    )


def share_batches_as_files(worker_id: int):
    """Run in each loader worker: hand batches to the training process as named shared-memory files.

    With file descriptors, torch's default, the training process waits for the busy worker's Python to pass each
    descriptor over a socket: 5% slower steps on the digits. Set in the worker, which is the one that shares.
    """
    torch.multiprocessing.set_sharing_strategy("file_system")


def cores_per_process(accelerator: accelerate.Accelerator) -> int:
    """The CPU cores of this machine (as the process may use them) divided among its training processes."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # Without a launcher's count, as if every process ran on this machine.
    local_processes = get_int_from_env(LOCAL_PROCESS_COUNT_VARIABLES, accelerator.num_processes)
    return max(1, cores // local_processes)


def default_num_workers(accelerator: accelerate.Accelerator) -> int:
    """Loader workers per training process, for images decoded and augmented as the loop asks for them.

    Beside a GPU, every core but the one that launches the kernels, at most 4 (enough to keep a GPU fed with small
    images). On the CPU, the training threads take every core and one worker per 4 cores (at least one) decodes
    beside them: it needs a fraction of a core for small images, and sleeps while its queue is full.
    """
    cores = cores_per_process(accelerator)
    if accelerator.device.type != "cpu":
        return max(0, min(4, cores - 1))
    return min(4, max(1, cores // 4)) if cores > 1 else 0


# ----------------------------------------------------------------------------------------------------------------------
# Training curves, model card and Hub


def checkpoint_origin(args: argparse.Namespace) -> str:
    if args.model_name_or_path is None:
        return "trained from scratch"
    revision = f" at revision `{args.model_revision}`" if args.model_revision is not None else ""
    return f"fine-tuned from `{args.model_name_or_path}`{revision}"


def plot_training_curves(history: list[dict], path: Path):
    """Loss, accuracy and learning rate per epoch, as a PNG."""
    epochs = [record["epoch"] for record in history]
    figure = Figure(figsize=(13, 3.6), layout="tight")  # no pyplot: no global state, no display needed
    loss_axis, accuracy_axis, lr_axis = figure.subplots(1, 3)
    loss_axis.plot(epochs, [r["train_loss"] for r in history], label="train (with label smoothing)")
    loss_axis.plot(epochs, [r["eval_loss"] for r in history], label="validation")
    loss_axis.set(title="loss", xlabel="epoch")
    loss_axis.legend()
    accuracy_axis.plot(epochs, [r["eval_accuracy"] for r in history], label="top-1")
    if "eval_top5_accuracy" in history[0]:
        accuracy_axis.plot(epochs, [r["eval_top5_accuracy"] for r in history], label="top-5")
    accuracy_axis.set(title="validation accuracy", xlabel="epoch")
    accuracy_axis.legend()
    lr_axis.plot(epochs, [r["learning_rate"] for r in history])
    lr_axis.set(title="learning rate (end of epoch)", xlabel="epoch")
    figure.savefig(path, dpi=100)


MODEL_CARD = """---
{card_data}
---

# {model_name}

A Vision Transformer ([vit-custom](https://huggingface.co/docs/transformers/custom_models)) for image classification,
{origin} on {dataset_description} with `run_finetune.py`.

| | |
|---|---|
{architecture}

## Results

{results_table}

![Training curves](training_curves.png)

## What the model looks at

Attention rollout ([Abnar & Zuidema, 2020](https://arxiv.org/abs/2005.00928)) of a few validation images: how much
the pooled image vector draws from each patch through all the layers. vit-custom's `explain.py` draws more (every
head's attention, the ViT paper's Figure 7).

![Attention rollout](attention_rollout.png)

## How to use

The model code lives in this repository, so loading it runs that code on your machine: pin the `revision` to a commit
you have reviewed.

```python
from transformers import pipeline

classifier = pipeline(
    "image-classification", model="{repo_id}", trust_remote_code=True, revision="{revision}"
)
classifier("image.png")
```

or, without the pipeline:

```python
from transformers import AutoImageProcessor, AutoModelForImageClassification

model = AutoModelForImageClassification.from_pretrained("{repo_id}", trust_remote_code=True, revision="{revision}")
processor = AutoImageProcessor.from_pretrained("{repo_id}", revision="{revision}")
```

## Training

{hyperparameters}

Framework versions: transformers {transformers_version}, PyTorch {torch_version}, Accelerate {accelerate_version},
Datasets {datasets_version}.
"""


def write_model_card(
    output_dir: Path,
    args: argparse.Namespace,
    config: ViTCustomConfig,
    results: dict,
    repo_id: str | None,
    revision: str = "main",
):
    """A README.md with Hub metadata (library, task, dataset, metrics as model-index) and a loading snippet."""
    model_name = (repo_id or output_dir.name).split("/")[-1]
    dataset_id, dataset_description = describe_dataset(args)
    from_hub_model = args.model_name_or_path is not None and not Path(args.model_name_or_path).exists()
    split = "test" if "test_accuracy" in results else "validation"
    prefix = "test" if split == "test" else "eval"
    metrics = {"accuracy": results[f"{prefix}_accuracy"]}
    if f"{prefix}_top5_accuracy" in results:
        metrics["top5_accuracy"] = results[f"{prefix}_top5_accuracy"]
    card_data = ModelCardData(
        license=args.license,
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["vit-custom", "vision", "image-classification", "custom_code"],
        datasets=[dataset_id],
        metrics=list(metrics),
        base_model=args.model_name_or_path if from_hub_model else None,
        model_name=model_name,
        eval_results=[
            EvalResult(
                task_type="image-classification",
                task_name="Image Classification",
                dataset_type=dataset_id,
                dataset_name=dataset_description,
                dataset_split=split,
                metric_type=name,
                metric_name=name.replace("_", " ").replace("top5", "top-5").capitalize(),
                metric_value=round(value, 4),
            )
            for name, value in metrics.items()
        ],
    )
    height, width = config.image_height_width
    num_patches = config.grid_size[0] * config.grid_size[1]
    architecture = {
        "resolution": f"{height}x{width} px, {config.num_channels} channel(s)",
        "patches": f"{config.patch_size}x{config.patch_size} px, {num_patches} tokens",
        "encoder": f"{config.num_hidden_layers} blocks, width {config.hidden_size}, "
        f"{config.num_attention_heads} heads, MLP {config.intermediate_size}",
        "pooling": f"{config.pooling} ({'with' if config.use_cls_token else 'without'} CLS token)",
        "classes": f"{config.num_labels}: {', '.join(config.id2label[i] for i in range(min(config.num_labels, 10)))}"
        + (", ..." if config.num_labels > 10 else ""),
    }
    results_table = "| split | metric | value |\n|---|---|---|\n" + "\n".join(
        f"| {split} | {name.replace('_', ' ')} | {value:.4f} |" for name, value in metrics.items()
    )
    hyperparameters = {
        "epochs": results.get("epoch"),
        "batch size per device": args.per_device_train_batch_size,
        "gradient accumulation": args.gradient_accumulation_steps,
        "optimizer": f"AdamW, learning rate {args.learning_rate}, weight decay {args.weight_decay}",
        "schedule": f"{args.lr_scheduler_type}, warmup {args.warmup_steps}",
        "label smoothing": args.label_smoothing,
        "augmentation": f"random resized crop (scale {args.crop_scale[0]}-{args.crop_scale[1]})"
        + (", horizontal flip" if args.horizontal_flip else ""),
        "seed": args.seed,
        "training images": results.get("train_samples"),
    }
    card = ModelCard(
        MODEL_CARD.format(
            card_data=card_data.to_yaml(),
            model_name=model_name,
            origin=checkpoint_origin(args),
            dataset_description=dataset_description,
            architecture="\n".join(f"| {key} | {value} |" for key, value in architecture.items()),
            results_table=results_table,
            repo_id=repo_id or f"<user>/{model_name}",
            revision=revision,
            hyperparameters="\n".join(f"- {key}: {value}" for key, value in hyperparameters.items()),
            transformers_version=transformers.__version__,
            torch_version=torch.__version__,
            accelerate_version=accelerate.__version__,
            datasets_version=datasets.__version__,
        )
    )
    card.save(output_dir / "README.md")


def describe_dataset(args: argparse.Namespace) -> tuple[str, str]:
    """An identifier and a human description of the training data, for the model card."""
    if args.dataset_name:
        return args.dataset_name, args.dataset_name
    if args.train_dir:
        return "imagefolder", f"local images ({args.train_dir.name})"
    return DIGITS_DATASET_ID, "scikit-learn's handwritten digits (8x8 grayscale, 10 classes)"


def create_hub_repo(args: argparse.Namespace, output_dir: Path) -> str:
    """Create (or find) the Hub repo before training, so that a missing token or connection shows up at once."""
    api = HfApi(token=args.hub_token)
    try:
        repo_id = api.create_repo(
            args.hub_model_id or output_dir.name, private=args.hub_private_repo, exist_ok=True
        ).repo_id
        if args.hub_revision:
            api.create_branch(repo_id, branch=args.hub_revision, exist_ok=True)
    except Exception as error:
        raise FinetuneError(
            f"Cannot push to the Hub: creating the repo {args.hub_model_id or output_dir.name!r} failed ({error}). "
            "Check your connection, that HF_HUB_OFFLINE is not set, and your token (`hf auth login` or "
            "--hub_token); or drop --push_to_hub. Nothing was trained or written."
        ) from error
    return repo_id


def push_to_hub(output_dir: Path, repo_id: str, args: argparse.Namespace, config: ViTCustomConfig, results: dict):
    """Upload the output folder without its checkpoints, then pin the model card's snippet to that upload's commit."""
    api = HfApi(token=args.hub_token)
    try:
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=output_dir,
            revision=args.hub_revision,
            ignore_patterns=NOT_UPLOADED,
            commit_message="Upload vit-custom model trained with run_finetune.py",
        )
        write_model_card(output_dir, args, config, results, repo_id, revision=commit.oid)
        api.upload_file(
            path_or_fileobj=output_dir / "README.md",
            path_in_repo="README.md",
            repo_id=repo_id,
            revision=args.hub_revision,
            commit_message=f"Pin the model card's loading snippet to {commit.oid[:8]}",
        )
    except Exception as error:
        raise FinetuneError(
            f"Training finished and everything is saved in {output_dir}, but uploading it to {repo_id} failed "
            f"({error}). Upload it later with `hf upload {repo_id} {shlex.quote(str(output_dir))} "
            + " ".join(f"--exclude {shlex.quote(pattern)}" for pattern in NOT_UPLOADED)
            + "`."
        ) from error
    logger.info(f"Pushed {output_dir} to {commit.repo_url} at commit {commit.oid}")
