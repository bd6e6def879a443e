"""An augmentation policy (TrivialAugmentWide or RandAugment) and random erasing, drawn for each sample on its own.

`SampleAugment` transforms one image tensor; `augment_batch` applies it to each image of a batch, seeding the random
generator with each sample's seed first, so that a sample's augmentation depends on its seed alone: not on the
batch it lands in, the process or the loader worker. Erasing fills with the normalisation mean, which normalises
to 0 (the value torchvision and timm erase normalised images with).
"""

import re

import torch
from torchvision.transforms import v2 as T

from vit_training.errors import TrainingError

POLICIES = "`none`, `trivial` (TrivialAugmentWide) or `rand-m<magnitude>-n<ops>` (RandAugment, e.g. rand-m9-n2)"


def augment_policy(name: str) -> T.Transform | None:
    """The torchvision transform that `--auto_augment name` names, or None for `none`."""
    if name == "none":
        return None
    if name == "trivial":
        return T.TrivialAugmentWide()
    match = re.fullmatch(r"rand-m(\d+)-n(\d+)", name)
    if match and int(match[1]) <= 30 and int(match[2]) >= 1:
        return T.RandAugment(num_ops=int(match[2]), magnitude=int(match[1]))
    raise TrainingError(f"--auto_augment {name}: must be {POLICIES}, with a magnitude in [0, 30] and at least 1 op.")


class SampleAugment:
    """The policy, then random erasing with probability `random_erasing`, on one `(C, H, W)` image tensor: uint8, or
    float in [0, 1]. Its draws come from torch's global generator: seed it first (or use `augment_batch`)."""

    def __init__(self, auto_augment: str, random_erasing: float, image_mean: list[float]):
        self.policy = augment_policy(auto_augment)
        self.random_erasing = random_erasing
        self.erase_float = T.RandomErasing(p=random_erasing, value=list(image_mean))
        self.erase_uint8 = T.RandomErasing(p=random_erasing, value=[round(255 * mean) for mean in image_mean])

    @property
    def active(self) -> bool:
        return self.policy is not None or self.random_erasing > 0

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.policy is not None:
            image = self.policy(image)
        if self.random_erasing > 0:
            image = (self.erase_uint8 if image.dtype == torch.uint8 else self.erase_float)(image)
        return image


def augment_batch(augment: SampleAugment, images: torch.Tensor, seeds: list[int]) -> torch.Tensor:
    """`augment` applied to each image of the `(N, C, H, W)` batch after seeding with its seed; the global random
    generator is left as it was."""
    if not augment.active:
        return images
    with torch.random.fork_rng(devices=[]):
        augmented = []
        for image, seed in zip(images, seeds, strict=True):
            torch.default_generator.manual_seed(seed)
            augmented.append(augment(image))
    return torch.stack(augmented)
