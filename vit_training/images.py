"""Images in: image folders listed in one pass, images decoded and converted to the model's channels, bad files
named, and a small dataset decoded once, in parallel, into one uint8 tensor held in memory."""

import io
import logging
import math
import multiprocessing
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vit_loading import shorten
from vit_training.errors import TrainingError

logger = logging.getLogger(__name__)

# The extensions `datasets`' imagefolder reads, and the metadata files that carry labels or other columns instead of
# class sub-folders (such folders are read by imagefolder itself).
IMAGE_EXTENSIONS = frozenset(
    ".bmp .gif .jpeg .jpg .png .ppm .pgm .pbm .tif .tiff .webp .jp2 .j2k .jpx .tga .ico .icns .dds .pcx .sgi .im "
    ".eps .psd .blp .xbm .xpm .ras .dib .fli .flc .apng".split()
)
METADATA_FILES = frozenset({"metadata.csv", "metadata.jsonl", "metadata.parquet"})


class BadImageError(Exception):
    """An image file that cannot be decoded; the message names the file."""


# ----------------------------------------------------------------------------------------------------------------------
# Listing


def list_image_folder(folder: Path) -> tuple[list[str], list[str], list[str], list[str]]:
    """One pass over `folder/<class>/.../<image>`: O(n), no image is opened.

    Returns:
        `(paths, class_of_each_path, other_files, empty_classes)`: the image files (sorted), the class sub-folder each
        one lies in, the files that are not images (relative paths), and the class folders that hold no image.
    """
    paths, classes, others, empty = [], [], [], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_file():
            others.append(entry.name)
            continue
        found = sorted(_walk_files(entry.path))
        images = [path for path in found if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS]
        if len(images) < len(found):
            image_set = set(images)
            others.extend(os.path.relpath(path, folder) for path in found if path not in image_set)
        if not images:
            empty.append(entry.name)
        paths.extend(images)
        classes.extend([entry.name] * len(images))
    return paths, classes, others, empty


def _walk_files(folder: str):
    for entry in os.scandir(folder):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from _walk_files(entry.path)
        elif entry.is_file():
            yield entry.path


# ----------------------------------------------------------------------------------------------------------------------
# Decoding


def open_image(value: dict | Image.Image) -> Image.Image:
    """A decoded PIL image from a `datasets` image value (`{"bytes", "path"}`) or an image; names the file if bad."""
    if isinstance(value, Image.Image):
        return value
    path = value.get("path")
    try:
        source = value["bytes"] if value.get("bytes") is not None else path
        image = Image.open(source if isinstance(source, str) else io.BytesIO(source))
        image.load()  # decode now: a truncated file fails here, with its name at hand
        return image
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise BadImageError(f"{path or 'an image in the dataset'}: {error}") from error


def to_mode(image: Image.Image, mode: str) -> Image.Image:
    """Convert an image of any PIL mode to `mode` ("RGB" or "L"), correctly.

    16- and 32-bit integer images are scaled from their 16-bit range to 8 bits (a plain conversion clips them, which
    turns most of the image white). Transparent images (RGBA, LA, P with transparency) are composited on white, as
    transformers' image processors do. Colour becomes grey with ITU-R 601 luma, grey becomes RGB by repetition.
    """
    if image.mode == mode:
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(array * (255 / 65535)), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        raise BadImageError(
            f"floating-point image ({image.size[0]}x{image.size[1]}, mode F): its value range is unknown; save it as "
            "8- or 16-bit PNG or TIFF."
        )
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert(mode)


def decode(value, mode: str, prepare=None) -> np.ndarray:
    """Decode one image, convert it to `mode`, apply `prepare` (PIL image -> tensor) if given; a `(C, H, W)` array."""
    image = to_mode(open_image(value), mode)
    if prepare is not None:
        return np.asarray(prepare(image))
    array = np.asarray(image)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


# ----------------------------------------------------------------------------------------------------------------------
# In memory


def image_shapes(dataset, image_column: str, count: int = 32) -> set[tuple[int, int]]:
    """The (height, width) of up to `count` images spread over the dataset, read from their headers."""
    values = dataset.cast_column(image_column, _undecoded(dataset, image_column))
    indices = np.linspace(0, len(dataset) - 1, num=min(count, len(dataset))).astype(int).tolist()
    shapes = set()
    for value in values.select(indices)[image_column]:
        try:
            with Image.open(value["path"] if value.get("bytes") is None else io.BytesIO(value["bytes"])) as image:
                shapes.add((image.height, image.width))
        except (UnidentifiedImageError, OSError):
            continue
    return shapes


def _undecoded(dataset, image_column: str):
    import datasets

    return datasets.Image(decode=False, mode=getattr(dataset.features[image_column], "mode", None))


def undecoded_images(dataset, image_column: str) -> list[dict]:
    """Every image of `dataset` as its `{"bytes", "path"}` value, read as one column."""
    undecoded = dataset.cast_column(image_column, _undecoded(dataset, image_column))
    return undecoded.with_format(None, columns=[image_column])[:][image_column]


def find_bad_images(dataset, image_column: str, processes: int = 1) -> list[str]:
    """Decode every image of `dataset` in `processes` worker processes; one message per file that cannot be decoded."""
    jobs = [values for _, values in _chunks(undecoded_images(dataset, image_column), processes)]
    return [message for messages in _map(_check_chunk, jobs, processes) for message in messages]


def verify_images(splits: dict, image_column: str, processes: int):
    """Decode every image of every split before training, in parallel, and name the ones that fail."""
    start = time.perf_counter()
    bad = [message for split in splits.values() for message in find_bad_images(split, image_column, processes)]
    if bad:
        raise TrainingError(
            f"{len(bad)} image(s) cannot be decoded: {shorten(bad, limit=5)}. Remove or replace them, or pass "
            "--on_bad_image skip to train without them."
        )
    images = sum(len(split) for split in splits.values())
    logger.info(f"Verified {images} images in {time.perf_counter() - start:.1f} s")


def _check_chunk(values: list) -> list[str]:
    bad = []
    for value in values:
        try:
            open_image(value)
        except BadImageError as error:
            bad.append(str(error))
    return bad


def _chunks(values: list, processes: int) -> list[tuple[int, list]]:
    """`values` cut into 8 pieces per process (so that a slow piece does not leave a process idle), with offsets."""
    size = max(1, math.ceil(len(values) / (processes * 8)))
    return [(start, values[start : start + size]) for start in range(0, len(values), size)]


def _map(function, jobs: list, processes: int) -> list:
    if processes > 1 and len(jobs) > 1:
        # fork: the workers inherit the transform and need not import torch again.
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            return pool.map(function, jobs)
    return [function(job) for job in jobs]


def decode_all(
    dataset, image_column: str, mode: str, size: tuple[int, int], prepare=None, processes: int = 1
) -> tuple[torch.Tensor, list[int], list[str], Counter]:
    """Decode every image of `dataset` into one uint8 tensor `(N, C, H, W)`, with `processes` worker processes.

    Images are converted to `mode`; with `prepare` (a PIL -> tensor transform giving `size`) it is applied to each,
    else an image of another size than `size` is resized to it (bilinear, antialiased).

    Returns:
        The tensor of the decodable images, their indices in `dataset`, one message per bad file, and the count of
        each source image mode.
    """
    chunks = _chunks(undecoded_images(dataset, image_column), processes)
    results = _map(_decode_chunk, [(values, mode, size, prepare) for _, values in chunks], processes)
    arrays, kept, bad, modes = [], [], [], Counter()
    for (offset, _), (chunk_arrays, chunk_kept, chunk_bad, chunk_modes) in zip(chunks, results, strict=True):
        arrays.append(chunk_arrays)
        kept.extend(offset + index for index in chunk_kept)
        bad.extend(chunk_bad)
        modes.update(chunk_modes)
    channels = 3 if mode == "RGB" else 1
    images = torch.from_numpy(np.concatenate(arrays)) if kept else torch.empty(0, channels, *size, dtype=torch.uint8)
    return images, kept, bad, modes


def _decode_chunk(job) -> tuple[np.ndarray, list[int], list[str], Counter]:
    values, mode, size, prepare = job
    torch.set_num_threads(1)
    channels = 3 if mode == "RGB" else 1
    arrays = np.empty((len(values), channels, *size), dtype=np.uint8)
    kept, bad, modes = [], [], Counter()
    for index, value in enumerate(values):
        try:
            image = open_image(value)
            modes[image.mode] += 1
            image = to_mode(image, mode)
            if prepare is None and (image.height, image.width) != tuple(size):
                image = image.resize(size[::-1], Image.BILINEAR, reducing_gap=None)
            array = decode(image, mode, prepare)
        except BadImageError as error:
            bad.append(str(error))
            continue
        arrays[len(kept)] = array
        kept.append(index)
    return arrays[: len(kept)], kept, bad, modes


class InMemoryImages(torch.utils.data.Dataset):
    """Decoded images and their labels, as tensors. A batch is fetched with one indexing operation.

    With `repeats`, the images stand `repeats` times in a row: index `c * N + s` is copy `c` of image `s` (for
    repeated augmentation); a batch's `indices` are these, which seed each copy's augmentation its own way.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, repeats: int = 1):
        self.images, self.labels, self.repeats = images, labels, repeats

    def __len__(self) -> int:
        return len(self.labels) * self.repeats

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> dict:
        indices = torch.as_tensor(indices)
        rows = indices % len(self.labels)
        return {"images": self.images[rows], "labels": self.labels[rows], "indices": indices}
