"""Training data streamed from Parquet or WebDataset shards, local or on the Hub, read once per epoch in any order.

The training split is a `datasets.IterableDataset`: its shards are split across the training processes with
`split_dataset_by_node` and across each process's loader workers by `datasets` itself. Each worker shuffles its
stream in blocks of `shuffle_buffer_size` images (a batched `map`, whose state `datasets` saves as the position of the
block's start and the images yielded from it), so that a torchdata `StatefulDataLoader` resumes exactly where it
stopped: the block is read again, shuffled again the same way, and its yielded images are skipped. Images stay encoded
until the loader's `collate_fn` decodes and augments them; one that cannot be decoded is skipped and counted, or stops
the run, as `on_bad_image` says.

The validation and test splits are read as ordinary (not streamed) datasets, so that evaluation counts every image
once on any number of processes.
"""

import glob
import hashlib
import logging
import math
import tarfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import torch
from accelerate.utils import send_to_device
from datasets import ClassLabel, Dataset, IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node
from datasets.packaged_modules.webdataset.webdataset import base_plus_ext
from torchdata.stateful_dataloader import StatefulDataLoader

from vit_loading import shorten
from vit_training import images as image_files
from vit_training.augment import SAMPLE_INDEX, SKIPPED_LABEL
from vit_training.data import check_columns, subsample
from vit_training.errors import TrainingError
from vit_training.loaders import share_batches_as_files

logger = logging.getLogger(__name__)

# The shard formats a local stream can be made of, by file extension, as `datasets` names them.
SHARD_FORMATS = {".parquet": "parquet", ".tar": "webdataset"}
BAD_IMAGE_POLICIES = ("stop", "skip")


@dataclass
class StreamingData:
    """A streamed training split, the ordinary splits it is evaluated on, and the classes of all of them."""

    train: IterableDataset  # images not decoded: {"bytes", "path"}, decoded by the loader's collate_fn
    validation: Dataset
    test: Dataset | None
    labels: list[str]
    labels_are_names: bool  # the training stream's label column holds class names, not indices
    shard_sizes: list[int] | None  # the images in each training shard, for local shards

    @property
    def num_train_samples(self) -> int | None:
        return sum(self.shard_sizes) if self.shard_sizes is not None else None

    def max_steps_per_epoch(self, num_processes: int, num_workers: int, batch_size: int, accumulation: int) -> int:
        """The most optimizer steps that a pass over the shards can take, whichever process and worker reads which
        shard: the process with the largest share sets the pace, and each worker's last batch may be short."""
        sizes, num_shards = sorted(self.shard_sizes, reverse=True), len(self.shard_sizes)
        if num_shards % num_processes == 0:  # each process reads whole shards (see `split_dataset_by_node`)
            shards = num_shards // num_processes
            images = sum(sizes[:shards])
        else:  # each process reads every shard, keeping one image in `num_processes`
            shards = num_shards
            images = math.ceil(sum(sizes) / num_processes) + num_workers
        workers = max(1, min(num_workers, shards))
        return math.ceil((math.ceil(images / batch_size) + workers - 1) / accumulation)


# ----------------------------------------------------------------------------------------------------------------------
# Sources


def load_streaming_data(
    image_column: str,
    label_column: str,
    seed: int,
    train: str | Path | None = None,
    validation: str | Path | None = None,
    test: str | Path | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    max_eval_samples: int | None = None,
) -> StreamingData:
    """Open the training split of local shards (`train`, a folder or a glob) or of a Hub dataset as a stream.

    Local shards are checked first (Parquet footers, tar headers), which also counts their images; a shard that cannot
    be read is named with the fix. A Hub dataset's shards are not counted: its runs need a number of steps. The
    validation split is required: the classes of a stream are read from its features (a `ClassLabel`) or, failing
    that, from the validation labels.
    """
    if dataset_name is not None:
        try:
            split_names = datasets.get_dataset_split_names(dataset_name, dataset_config_name)
        except Exception as error:
            raise TrainingError(
                f"Could not open the dataset {dataset_name!r} on the Hugging Face Hub to stream it: {error}. Check the "
                "name, your connection and that HF_HUB_OFFLINE is not set, or stream local shards with --train_dir."
            ) from error
        if "validation" not in split_names:
            raise TrainingError(
                f"--streaming needs a validation split to evaluate on, and {dataset_name} has only {split_names}. "
                "Train without --streaming (a validation split is then held out), or use local shards with "
                "--train_dir and --validation_dir."
            )
        stream = load_dataset(dataset_name, dataset_config_name, split="train", streaming=True)
        shard_sizes = None
        evaluation = {
            name: load_dataset(dataset_name, dataset_config_name, split=name)
            for name in ("validation", "test")
            if name in split_names
        }
    else:
        if validation is None:
            raise TrainingError(
                "--streaming needs a --validation_dir of shards to evaluate on (and to read the classes from)."
            )
        shard_format, shards = list_shards(train, "--train_dir")
        # A seeded shard order for the first epoch; `datasets` reshuffles the shards every later epoch.
        shards = [shards[i] for i in np.random.default_rng(seed).permutation(len(shards))]
        shard_sizes = [count_samples(shard, shard_format) for shard in shards]
        stream = load_dataset(shard_format, data_files={"train": shards}, split="train", streaming=True)
        evaluation = {}
        for name, location in (("validation", validation), ("test", test)):
            if location is not None:
                eval_format, eval_shards = list_shards(location, f"--{name}_dir")
                for shard in eval_shards:
                    count_samples(shard, eval_format)
                evaluation[name] = load_dataset(eval_format, data_files={"train": eval_shards}, split="train")
    if stream.features is None:
        raise TrainingError(
            "The training stream does not say which columns it has; --streaming needs a dataset whose features are "
            "known (Parquet files, WebDataset tars, or a Hub dataset with metadata)."
        )
    check_columns({"train": stream}, image_column, label_column)
    check_columns({"train": evaluation["validation"]}, image_column, label_column)
    labels, labels_are_names = class_names(stream.features[label_column], evaluation["validation"], label_column)
    for name, split in evaluation.items():
        split = split.cast_column(label_column, ClassLabel(names=labels))
        evaluation[name] = subsample(split, max_eval_samples, seed) if max_eval_samples else split
    return StreamingData(
        train=stream.cast_column(image_column, datasets.Image(decode=False)),
        validation=evaluation["validation"],
        test=evaluation.get("test"),
        labels=labels,
        labels_are_names=labels_are_names,
        shard_sizes=shard_sizes,
    )


def list_shards(location: str | Path, flag: str) -> tuple[str, list[str]]:
    """The format and the files of a folder or glob of `*.parquet` or `*.tar` shards, in name order."""
    location = str(location)
    if Path(location).is_dir():
        files = sorted(str(p) for p in Path(location).iterdir() if p.is_file() and not p.name.startswith("."))
    else:
        files = sorted(glob.glob(location))
    shards = [f for f in files if Path(f).suffix in SHARD_FORMATS]
    formats = {SHARD_FORMATS[Path(f).suffix] for f in shards}
    if not shards or len(formats) > 1:
        found = f"{len(files)} file(s): {shorten([Path(f).name for f in files], limit=3)}" if files else "nothing"
        raise TrainingError(
            f"{flag} {location}: --streaming reads a folder (or a glob) of Parquet files (*.parquet) or of WebDataset "
            f"tar shards (*.tar), all of one format; found {found}. An image folder is read without --streaming."
        )
    others = [Path(f).name for f in files if f not in shards]
    if others:
        logger.warning(f"{flag}: ignoring {len(others)} file(s) that are not shards: {shorten(others)}")
    return formats.pop(), shards


def count_samples(shard: str, shard_format: str) -> int:
    """The images in a shard, from its Parquet footer or its tar headers; a shard that cannot be read is named."""
    try:
        if shard_format == "parquet":
            return pq.read_metadata(shard).num_rows
        with tarfile.open(shard, "r:") as tar:  # reads the headers only, seeking over the files
            keys = [base_plus_ext(member.name)[0] for member in tar if member.isfile()]
        return sum(1 for i, key in enumerate(keys) if key is not None and (i == 0 or key != keys[i - 1]))
    except (OSError, tarfile.TarError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        kind = "Parquet file" if shard_format == "parquet" else "tar archive"
        raise TrainingError(
            f"The shard {shard} is not a readable {kind} ({type(error).__name__}: {error}); it is probably truncated "
            "or corrupt. Copy or download it again, or move it out of the folder, then rerun."
        ) from error


def class_names(feature, validation: Dataset, label_column: str) -> tuple[list[str], bool]:
    """The classes of a stream, and whether its labels are class names: from a `ClassLabel`, else from the
    validation labels (their sorted names, or the indices up to the largest)."""
    if isinstance(feature, ClassLabel):
        return list(feature.names), False
    validation_feature = validation.features[label_column]
    if isinstance(validation_feature, ClassLabel):
        names = list(validation_feature.names)
    else:
        values = validation.unique(label_column)
        if isinstance(validation_feature, datasets.Value) and validation_feature.dtype == "string":
            names = sorted(values)
        elif isinstance(validation_feature, datasets.Value) and validation_feature.dtype.startswith("int"):
            names = [str(i) for i in range(max(values) + 1)]
        else:
            names = None
    string_labels = isinstance(feature, datasets.Value) and feature.dtype == "string"
    index_labels = isinstance(feature, datasets.Value) and feature.dtype.startswith("int")
    if names is None or not (string_labels or index_labels):
        raise TrainingError(
            f"Cannot tell the classes of the stream: its label column {label_column!r} holds {feature} and the "
            f"validation split's holds {validation_feature}. Label columns hold class names, class indices or a "
            "ClassLabel; pass --label_column_name with the column that holds the classes."
        )
    logger.info(f"The stream's {len(names)} classes, read from the validation split: {shorten(names)}")
    return names, string_labels


# ----------------------------------------------------------------------------------------------------------------------
# Per worker: shuffle, decode, augment


def sample_id(image: dict) -> int:
    """A stable id of an encoded image: the first 8 bytes of its BLAKE2b hash. It seeds the image's augmentation, so
    that it depends on (seed, epoch, image) only, not on the shard, process, worker or position that delivers it."""
    data = image["bytes"] if image["bytes"] is not None else image["path"].encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


class BlockShuffle:
    """A batched `map` function: shuffles each block of images with a generator seeded by (seed, epoch, block).

    Being a function of the block alone, the shuffle is repeated exactly when a resumed stream reads the block again.
    Adds the images' `SAMPLE_INDEX` (see `sample_id`), which seeds their augmentation.
    """

    def __init__(self, image_column: str, seed: int):
        self.image_column, self.seed = image_column, seed
        # In shared memory, so that persistent loader workers see the epoch the training loop sets.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int):
        self._epoch.fill_(epoch)

    def __call__(self, block: dict) -> dict:
        ids = [sample_id(image) for image in block[self.image_column]]
        generator = np.random.default_rng([self.seed, int(self._epoch), ids[0]])
        order = generator.permutation(len(ids))
        shuffled = {name: [values[i] for i in order] for name, values in block.items()}
        shuffled[SAMPLE_INDEX] = [ids[i] for i in order]
        return shuffled


class StreamCollate:
    """A loader's `collate_fn`: decodes the images of a batch and turns them into model inputs with `transform`.

    An image that cannot be decoded, or whose label is not one of the classes, is left out and described in the
    batch's `bad_images` (the training process decides what to do); so is the batch when none is left.
    """

    def __init__(
        self,
        transform: Callable[[dict], dict],
        image_column: str,
        label_column: str,
        labels: list[str],
        labels_are_names: bool,
    ):
        self.transform, self.image_column, self.label_column = transform, image_column, label_column
        self.label_ids = {name: i for i, name in enumerate(labels)} if labels_are_names else None
        self.num_labels = len(labels)

    def __call__(self, examples: list[dict]) -> dict:
        images, labels, ids, bad = [], [], [], []
        for example in examples:
            label = example[self.label_column]
            if self.label_ids is not None:
                label = self.label_ids.get(label, -1)
            try:
                if not 0 <= label < self.num_labels:
                    raise ValueError(f"its label {example[self.label_column]!r} is not one of the classes")
                image = image_files.open_image(example[self.image_column])  # decodes all pixels: a truncated one fails
            except (ValueError, TypeError, image_files.BadImageError) as error:
                bad.append(f"{describe(example, self.image_column)}: {error}")
                continue
            images.append(image)
            labels.append(label)
            ids.append(example[SAMPLE_INDEX])
        if not images:
            return {"bad_images": bad}
        batch = self.transform({self.image_column: images, self.label_column: labels, SAMPLE_INDEX: ids})
        return {"pixel_values": batch["pixel_values"], "labels": torch.tensor(batch["labels"]), "bad_images": bad}


def describe(example: dict, image_column: str) -> str:
    """Where an example comes from, as far as the stream says: its shard and key (WebDataset) or image path."""
    if example.get("__url__"):
        return f"sample {example.get('__key__')!r} of shard {example['__url__']}"
    path = (example.get(image_column) or {}).get("path")
    return f"image {path!r}" if path else "an image"


# ----------------------------------------------------------------------------------------------------------------------
# Per process: the training batches


class StreamLoader:
    """The training batches of one process, read from its share of a stream's shards by a `StatefulDataLoader`.

    Iterating it reads one epoch (a pass over all shards). Every process yields the same number of batches: one whose
    shards run out first yields padding batches (an image that adds no loss) until all have, so that data-parallel
    steps stay in step and no image is dropped or repeated. Its `state_dict` holds every process's loader position;
    a checkpoint of it resumes each process's stream exactly where it stopped.

    Args:
        stream: the training split, its images not decoded (`StreamingData.train`).
        transform: turns a batch `{image_column: PIL images, label_column: indices, "sample_index": ids}` into
            `{"pixel_values", "labels"}` (a `TrainTransform`).
        any_process: this process's flags -> whether each is set on any process (an all-reduce; `list` for one).
        gather: this process's list -> the lists of all processes, joined in process order (`accelerate.utils.
            gather_object`; the identity for one process).
        image_shape: (channels, height, width) of the transformed images: the shape of the one image of a padding
            batch, which a process yields when it has no images left (labelled `SKIPPED_LABEL`).
        on_bad_image: `skip` leaves undecodable images out and counts them; `stop` ends the epoch after the batch
            that held one, setting `stop_reason`.
    """

    def __init__(
        self,
        stream: IterableDataset,
        transform: Callable[[dict], dict],
        image_column: str,
        label_column: str,
        labels: list[str],
        labels_are_names: bool,
        batch_size: int,
        num_workers: int,
        seed: int,
        shuffle_buffer_size: int,
        process_index: int,
        num_processes: int,
        device: torch.device,
        image_shape: tuple[int, int, int],
        on_bad_image: str = "stop",
        any_process: Callable[[list[bool]], list[bool]] = list,
        gather: Callable[[list], list] = list,
    ):
        if on_bad_image not in BAD_IMAGE_POLICIES:
            raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}")
        self.shuffle = BlockShuffle(image_column, seed)
        self.stream = stream.map(self.shuffle, batched=True, batch_size=shuffle_buffer_size)
        if num_processes > 1:
            self.stream = split_dataset_by_node(self.stream, process_index, num_processes)
        if stream.num_shards % num_processes:
            logger.warning(
                f"The stream has {stream.num_shards} shard(s), not a multiple of the {num_processes} processes: every "
                "process reads all of them and keeps every other image. Split the data into a multiple of "
                f"{num_processes} shards to read each shard once."
            )
        with warnings.catch_warnings():  # torchdata 0.11 calls a deprecated torch function when it builds a loader
            warnings.filterwarnings("ignore", message=".*set_vital.*")
            self.loader = StatefulDataLoader(
                self.stream,
                batch_size=batch_size,
                collate_fn=StreamCollate(transform, image_column, label_column, labels, labels_are_names),
                num_workers=num_workers,
                persistent_workers=num_workers > 0,
                worker_init_fn=share_batches_as_files,
                pin_memory=device.type == "cuda",
                # Seeds the workers without drawing from the global generator, which dropout uses: a resumed run
                # starts its loader after the generator's state is restored.
                generator=torch.Generator().manual_seed(seed),
            )
        self.process_index, self.device = process_index, device
        self.padding_batch = {
            "pixel_values": torch.zeros(1, *image_shape),
            "labels": torch.tensor([SKIPPED_LABEL]),
        }
        self.on_bad_image, self.any_process, self.gather = on_bad_image, any_process, gather
        self.epoch = 0
        self.exhausted = False  # this process's shards of `epoch` are read
        self.skipped_images = 0  # by this process, over the whole run
        self.stop_reason: str | None = None
        self._resume_state: dict | None = None  # the loader position to continue `epoch` from

    def set_epoch(self, epoch: int):
        """Choose the epoch to read: its shard order and shuffles. A restored position applies to its own epoch."""
        if epoch != self.epoch:
            self.epoch, self.exhausted, self._resume_state = epoch, False, None
        self.stream.set_epoch(epoch)
        self.shuffle.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._resume_state is not None:
            self.loader.load_state_dict(self._resume_state)
            self._resume_state = None
        batches = iter(()) if self.exhausted else iter(self.loader)
        while True:
            batch, error = None, None
            if not self.exhausted:
                try:
                    batch = next(batches)
                except StopIteration:
                    self.exhausted = True
                except Exception as exception:  # noqa: BLE001 - told to every process below, then raised
                    error = exception
            bad = batch.pop("bad_images") if batch is not None else []
            stop = bool(bad) and self.on_bad_image == "stop"
            # One all-reduce per batch: whether any process failed, still reads, or stops.
            failed, reading, stopping = self.any_process([error is not None, batch is not None, stop])
            if failed:
                raise TrainingError(self._failure_message(error)) from error
            if not reading:
                return
            for description in bad:
                logger.warning(f"Skipping a bad training image: {description}")
            self.skipped_images += len(bad)
            if batch is None or "pixel_values" not in batch:
                batch = self.padding_batch
            yield send_to_device(batch, self.device, non_blocking=True)
            if stopping:
                self.stop_reason = "; ".join(self.gather(bad if stop else []))
                return

    def _failure_message(self, error: Exception | None) -> str:
        errors = self.gather([repr(error)] if error else [])
        return (
            f"Reading the training stream failed: {'; '.join(errors)}. A shard is probably corrupt or unreachable: "
            "check the shards (the log names the file where `datasets` can tell), replace or remove the bad one, "
            "and resume with --resume_from_checkpoint latest."
        )

    def total_skipped_images(self) -> int:
        """The images every process skipped so far."""
        return sum(self.gather([self.skipped_images]))

    def state_dict(self) -> dict:
        """Every process's position (gathered: call it on all processes); the main process writes it."""
        own = {
            "epoch": self.epoch,
            "exhausted": self.exhausted,
            "skipped_images": self.skipped_images,
            "loader": self.loader.state_dict() if not self.exhausted else None,
        }
        return {"processes": self.gather([own])}

    def load_state_dict(self, state: dict):
        processes = state["processes"]
        if len(processes) <= self.process_index:
            raise ValueError(
                f"the checkpoint holds the stream positions of {len(processes)} process(es); resume it with as many"
            )
        own = processes[self.process_index]
        self.epoch, self.exhausted, self.skipped_images = own["epoch"], own["exhausted"], own["skipped_images"]
        self._resume_state = own["loader"]
