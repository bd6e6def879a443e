"""The one reproducible augmentation of training images, and the evaluation transform beside it.

Training images get a random resized crop, optionally a horizontal flip, an augmentation policy (TrivialAugmentWide or
RandAugment) and random erasing, all drawn from (seed, epoch, sample) only:
not from the batch, the process, the loader worker or what was drawn before, so a resumed or distributed run sees
exactly the images of an uninterrupted single-process one. `Augmentation` holds that recipe and the epoch; two
implementations apply it: `TrainTransform` image by image with torchvision (in loader workers, for images decoded as
the loop asks for them), and `BatchAugment` a whole batch of in-memory uint8 images at once (one `grid_sample` for the
crops, the policy and erasing by `batch_policy.BatchPolicy`).
"""

import math

import torch
from PIL import Image
from torchvision.transforms import v2 as T

from vit_training import images as image_files
from vit_training.batch_policy import BatchPolicy
from vit_training.errors import TrainingError
from vit_training.recipes import policy_parameters

# The column that numbers the training samples (positions in the training split, or a stream's image hashes): the
# sample part of each image's augmentation seed.
SAMPLE_INDEX = "sample_index"
# The label of a sample whose image could not be decoded, with --on_bad_image skip: the loss and the metrics ignore
# it, as transformers' losses ignore -100.
SKIPPED_LABEL = -100


class Augmentation:
    """Random resized crop (area fraction uniform in `crop_scale`, log aspect ratio uniform in `crop_ratio`) to
    `output_size`, a horizontal flip with `flip`, then `policy` (a `SampleAugment`), seeded by (seed, epoch, sample).

    The epoch lives in shared memory, so that persistent loader worker processes see the epoch the loop sets.
    """

    def __init__(
        self, output_size: tuple[int, int], crop_scale: tuple[float, float], flip: bool, seed: int,
        policy: "SampleAugment | None" = None, crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ):  # fmt: skip
        self.output_size, self.crop_scale, self.flip, self.seed = tuple(output_size), tuple(crop_scale), flip, seed
        self.crop_ratio = tuple(crop_ratio)
        self.policy = policy if policy is not None and policy.active else None
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    @epoch.setter
    def epoch(self, epoch: int):
        self._epoch.fill_(epoch)

    def sample_seed(self, sample: int) -> int:
        """The seed of one sample's augmentation in the current epoch."""
        return hash((self.seed, self.epoch, sample)) % 2**63

    def epoch_seed(self) -> int:
        """The seed of the current epoch's table of draws for all samples (see `BatchAugment`)."""
        return hash((self.seed, self.epoch)) % 2**63

    def torchvision(self) -> T.Transform:
        """The augmentation of one PIL image, as a uint8 tensor."""
        flip = [T.RandomHorizontalFlip()] if self.flip else []
        policy = [self.policy] if self.policy is not None else []
        crop = T.RandomResizedCrop(self.output_size, scale=self.crop_scale, ratio=self.crop_ratio)
        return T.Compose([crop, *flip, T.ToImage(), *policy])


class SampleAugment:
    """An augmentation policy (`none`, `trivial`: TrivialAugmentWide, `rand-m<M>-n<N>`: RandAugment), then random
    erasing with probability `random_erasing`, of one `(C, H, W)` image tensor: uint8, or float in [0, 1]. Erasing
    fills with the normalisation mean, which normalises to 0. Its draws come from torch's global generator: seed it
    first. `batched` gives the same augmentation of whole batches, from draws the caller makes."""

    def __init__(self, auto_augment: str, random_erasing: float, image_mean: list[float]):
        parameters = policy_parameters(auto_augment)
        self.policy = None if auto_augment == "none" else T.TrivialAugmentWide()
        if parameters is not None:
            self.policy = T.RandAugment(magnitude=parameters[0], num_ops=parameters[1])
        self.random_erasing = random_erasing
        self.erase_float = T.RandomErasing(p=random_erasing, value=list(image_mean))
        self.erase_uint8 = T.RandomErasing(p=random_erasing, value=[round(255 * mean) for mean in image_mean])

    @property
    def active(self) -> bool:
        return self.policy is not None or self.random_erasing > 0

    def batched(self, image_size: tuple[int, int]) -> BatchPolicy:
        """The same policy and erasing for whole batches of float images of `image_size`, drawn by the caller."""
        return BatchPolicy(self.policy, self.erase_float, image_size)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.policy is not None:
            image = self.policy(image)
        if self.random_erasing > 0:
            image = (self.erase_uint8 if image.dtype == torch.uint8 else self.erase_float)(image)
        return image


class EvalTransform:
    """Turns a batch of examples into `pixel_values` of the model's size, channels and normalisation, and `labels`.

    The images arrive undecoded (`datasets.Image(decode=False)`), so that a bad file is named: it stops the run, or,
    with `skip_bad_images`, becomes a blank image with the label `SKIPPED_LABEL`. `prepare` crops or resizes one PIL
    image and makes it a uint8 tensor; the stacked batch is then scaled and normalised at once, which is faster
    than doing it image by image.
    """

    def __init__(
        self,
        prepare: T.Transform,
        mean: list[float],
        std: list[float],
        image_mode: str,
        columns: tuple[str, str],
        skip_bad_images: bool = False,
    ):
        self.prepare, self.mean, self.std, self.image_mode = prepare, list(mean), list(std), image_mode
        self.image_column, self.label_column = columns
        self.skip_bad_images = skip_bad_images
        self.normalize = T.Compose([T.ToDtype(torch.float32, scale=True), T.Normalize(mean=self.mean, std=self.std)])

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
                images.append(self.prepare(image_files.to_mode(image_files.open_image(value), self.image_mode)))
            except image_files.BadImageError as error:
                if not self.skip_bad_images:
                    raise image_files.BadImageError(f"{error}. Remove or replace the file, or pass "
                                                    "--on_bad_image skip to train without it.") from None
                images.append(None)
                labels[position] = SKIPPED_LABEL
        blank = next((image for image in images if image is not None), None)
        if blank is None:
            blank = self.prepare(Image.new(self.image_mode, (8, 8)))
        return [torch.zeros_like(blank) if image is None else image for image in images], labels


class TrainTransform(EvalTransform):
    """An `EvalTransform` that applies `augmentation` to each image, seeded by its `SAMPLE_INDEX`."""

    def __init__(self, augmentation: Augmentation, *args, **kwargs):
        super().__init__(augmentation.torchvision(), *args, **kwargs)
        self.augmentation = augmentation

    def __call__(self, batch: dict) -> dict:
        seeds = [self.augmentation.sample_seed(index) for index in batch[SAMPLE_INDEX]]
        with torch.random.fork_rng(devices=[]):  # leaves the global generator, which dropout draws from, untouched
            images, labels = self.prepare_images(batch, seeds)
        return {"pixel_values": self.normalize(torch.stack(images)), "labels": labels}


def build_transforms(
    image_processor, num_channels: int, columns: tuple[str, str], *, crop_scale: tuple[float, float], flip: bool,
    seed: int, skip_bad_images: bool = False, auto_augment: str = "none", random_erasing: float = 0.0,
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[TrainTransform, EvalTransform]:
    """Training (`Augmentation`) and evaluation (resize, center crop) transforms with the size, mean and standard
    deviation of `image_processor`, converting every image to the model's channels. `columns`: the image column and
    the label column."""
    mean, std = list(image_processor.image_mean), list(image_processor.image_std)
    if len(mean) != num_channels or len(std) != num_channels:
        raise TrainingError(
            f"The image processor normalises {len(mean)} channels but the model takes {num_channels}; save a "
            f"processor whose image_mean and image_std have {num_channels} values."
        )
    size = image_processor.size
    resize = size["shortest_edge"] if "shortest_edge" in size else (size["height"], size["width"])
    crop = image_processor.crop_size if getattr(image_processor, "do_center_crop", False) else None
    crop = (crop["height"], crop["width"]) if crop else resize
    policy = SampleAugment(auto_augment, random_erasing, mean)
    augmentation = Augmentation(crop, crop_scale, flip, seed, policy, crop_ratio)
    resize_and_crop = T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToImage()])
    common = (mean, std, "RGB" if num_channels == 3 else "L", columns)
    train = TrainTransform(augmentation, *common, skip_bad_images=skip_bad_images)
    return train, EvalTransform(resize_and_crop, *common, skip_bad_images=skip_bad_images)


class BatchNormalize:
    """collate_fn for an `InMemoryImages` loader: uint8 images to normalised float `pixel_values`."""

    def __init__(self, mean: list[float], std: list[float]):
        self.std_255 = torch.tensor(std).view(1, -1, 1, 1) * 255
        self.mean_255 = torch.tensor(mean).view(1, -1, 1, 1) * 255

    def __call__(self, batch: dict) -> dict:
        return {"pixel_values": (batch["images"].float() - self.mean_255) / self.std_255, "labels": batch["labels"]}


class BatchAugment(BatchNormalize):
    """collate_fn that applies `augmentation` to a whole batch of in-memory uint8 images at once, then normalises.

    The crop is clamped to the image instead of retried, and sampled bilinearly by one `grid_sample` for the batch;
    the policy and erasing (`BatchPolicy`) then run once per op over the images that drew it. Each sample's draws
    come from tables made per epoch from (seed, epoch), indexed by the sample's position in the dataset.
    """

    def __init__(self, augmentation: Augmentation, mean: list[float], std: list[float], num_samples: int):
        super().__init__(mean, std)
        self.augmentation, self.num_samples = augmentation, num_samples
        policy = augmentation.policy
        self.policy = policy.batched(augmentation.output_size) if policy is not None else None
        self._table_epoch, self._table, self._policy_table = None, None, None

    def epoch_table(self) -> torch.Tensor:
        """`(num_samples, 5)` uniforms of the current epoch: area, aspect ratio, horizontal and vertical position,
        flip."""
        if self._table_epoch != self.augmentation.epoch:
            generator = torch.Generator().manual_seed(self.augmentation.epoch_seed())
            self._table = torch.rand(self.num_samples, 5, generator=generator, dtype=torch.float64)
            if self.policy is not None:  # drawn after the crops, which stay as they were without a policy
                self._policy_table = torch.rand(self.num_samples, self.policy.columns, generator=generator,
                                                dtype=torch.float64)  # fmt: skip
            self._table_epoch = self.augmentation.epoch
        return self._table

    def __call__(self, batch: dict) -> dict:
        images = batch["images"].float()
        boxes = self.crop_boxes(self.epoch_table()[batch["indices"]], images.shape[-2:])
        images = resized_crops(images, boxes, self.augmentation.output_size)
        if self.policy is not None:  # on [0, 1] floats, as torchvision's policies take them
            images = self.policy(images / 255, self._policy_table[batch["indices"]]) * 255
        return {"pixel_values": (images - self.mean_255) / self.std_255, "labels": batch["labels"]}

    def crop_boxes(self, draws: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
        """`(batch, 5)` crops from the uniform draws: left, top, width, height in pixels, and 1 to mirror."""
        height, width = input_size
        low, high = self.augmentation.crop_scale
        area = (low + (high - low) * draws[:, 0]) * height * width
        log_low, log_high = (math.log(bound) for bound in self.augmentation.crop_ratio)
        ratio = torch.exp(log_low + (log_high - log_low) * draws[:, 1])
        crop_width = torch.sqrt(area * ratio).clamp(max=width)
        crop_height = torch.sqrt(area / ratio).clamp(max=height)
        left = (width - crop_width) * draws[:, 2]
        top = (height - crop_height) * draws[:, 3]
        mirror = ((draws[:, 4] < 0.5) & self.augmentation.flip).double()
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
