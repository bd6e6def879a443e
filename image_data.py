"""Images in: image folders listed in one pass, images decoded and converted to the model's channels, and a
small dataset held in memory as uint8 tensors and augmented a whole batch at a time.

Two paths lead from a dataset to training batches. A dataset that fits in memory is decoded once, in parallel, into
one uint8 tensor; each batch is then cropped, flipped and normalised with a single `grid_sample` in the training
process, so no core waits for a loader. A larger one is decoded and augmented image by image in loader worker
processes (`finetune_utils.TrainTransform`). Either way an image's augmentation depends only on (seed, epoch, sample),
so a resumed or distributed run sees the same images as an uninterrupted single-process one.
"""

import io
import logging
import math
import multiprocessing
import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

# The extensions `datasets`' imagefolder reads, and the metadata files that carry labels or other columns instead of
# class sub-folders (such folders are read by imagefolder itself).
IMAGE_EXTENSIONS = frozenset(
    ".bmp .gif .jpeg .jpg .png .ppm .pgm .pbm .tif .tiff .webp .jp2 .j2k .jpx .tga .ico .icns .dds .pcx .sgi .im "
    ".eps .psd .blp .xbm .xpm .ras .dib .fli .flc .apng".split()
)
METADATA_FILES = frozenset({"metadata.csv", "metadata.jsonl", "metadata.parquet"})


# The key under which training batches say which samples they hold (positions in the training split).
SAMPLE_INDEX = "sample_index"


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
    """Decoded images and their labels, as tensors. A batch is fetched with one indexing operation."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> dict:
        indices = torch.as_tensor(indices)
        return {"images": self.images[indices], "labels": self.labels[indices], "indices": indices}


class BatchNormalize:
    """collate_fn for an `InMemoryImages` loader: uint8 images to normalised float `pixel_values`."""

    def __init__(self, mean: list[float], std: list[float]):
        self.std_255 = torch.tensor(std).view(1, -1, 1, 1) * 255
        self.mean_255 = torch.tensor(mean).view(1, -1, 1, 1) * 255

    def __call__(self, batch: dict) -> dict:
        return {"pixel_values": (batch["images"].float() - self.mean_255) / self.std_255, "labels": batch["labels"]}


class BatchAugment(BatchNormalize):
    """collate_fn that augments a whole batch of uint8 images at once: random resized crop, optional flip, normalise.

    The crop follows torchvision's `RandomResizedCrop` (area fraction uniform in `scale`, log aspect ratio uniform
    in [3/4, 4/3]), clamped to the image instead of retried, and is sampled bilinearly by one `grid_sample` for the
    batch. Each sample's parameters are drawn from a table made per epoch from (seed, epoch), indexed by the
    sample's position in the dataset: they do not depend on the batch, the process or the draw order.
    """

    def __init__(
        self,
        output_size: tuple[int, int],
        scale: tuple[float, float],
        flip: bool,
        mean: list[float],
        std: list[float],
        num_samples: int,
        seed: int,
    ):
        super().__init__(mean, std)
        self.output_size, self.crop_scale, self.flip = tuple(output_size), tuple(scale), flip
        self.num_samples, self.seed = num_samples, seed
        self.epoch = 0
        self._table_epoch, self._table = None, None

    def epoch_table(self, epoch: int) -> torch.Tensor:
        """`(num_samples, 5)` uniforms: area, aspect ratio, horizontal and vertical position, flip."""
        if self._table_epoch != epoch:
            generator = torch.Generator().manual_seed(hash((self.seed, epoch)) % 2**63)
            self._table = torch.rand(self.num_samples, 5, generator=generator, dtype=torch.float64)
            self._table_epoch = epoch
        return self._table

    def __call__(self, batch: dict) -> dict:
        images = batch["images"].float()
        boxes = self.crop_boxes(self.epoch_table(self.epoch)[batch["indices"]], images.shape[-2:])
        images = resized_crops(images, boxes, self.output_size)
        normalized = (images - self.mean_255) / self.std_255
        return {"pixel_values": normalized, "labels": batch["labels"], SAMPLE_INDEX: batch["indices"]}

    def crop_boxes(self, draws: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
        """`(batch, 5)` crops from the uniform draws: left, top, width, height in pixels, and 1 to mirror."""
        height, width = input_size
        area = (self.crop_scale[0] + (self.crop_scale[1] - self.crop_scale[0]) * draws[:, 0]) * height * width
        ratio = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * draws[:, 1])
        crop_width = torch.sqrt(area * ratio).clamp(max=width)
        crop_height = torch.sqrt(area / ratio).clamp(max=height)
        left = (width - crop_width) * draws[:, 2]
        top = (height - crop_height) * draws[:, 3]
        mirror = ((draws[:, 4] < 0.5) & self.flip).double()
        return torch.stack([left, top, crop_width, crop_height, mirror], dim=1)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, output_size: tuple[int, int]) -> torch.Tensor:
    """Crop each image to its box (left, top, width, height, mirror) and resize it to `output_size`, bilinearly.

    One `grid_sample` for the whole batch. Output pixel centres map to the input as `F.interpolate(...,
    align_corners=False)` maps them, so for a whole-pixel box the result is torchvision's `resized_crop` without
    antialiasing (then `hflip` when mirrored), except on the box's edge rows and columns when it is enlarged: there
    the pixels just outside the box blend in, where torchvision repeats the edge.
    """
    height, width = images.shape[-2:]
    left, top, crop_width, crop_height, mirror = boxes.double().unbind(1)
    theta = torch.zeros(len(boxes), 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = crop_width / width * (1 - 2 * mirror)
    theta[:, 0, 2] = (2 * left + crop_width) / width - 1
    theta[:, 1, 1] = crop_height / height
    theta[:, 1, 2] = (2 * top + crop_height) / height - 1
    grid = torch.nn.functional.affine_grid(theta.float(), [len(images), images.shape[1], *output_size], False)
    return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
