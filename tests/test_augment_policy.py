"""Per-image augmentation policy and random erasing (loader workers' path): named policies, erasing's fill."""

import pytest
import torch

from vit_training.augment import SampleAugment
from vit_training.errors import TrainingError


def images(channels: int, count: int = 12) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (count, channels, 28, 28), dtype=torch.uint8, generator=generator)


def augment_each(augment: SampleAugment, batch: torch.Tensor) -> torch.Tensor:
    """Each image augmented after seeding the global generator with its position, as a loader worker does."""
    augmented = []
    for seed, image in enumerate(batch):
        torch.manual_seed(seed)
        augmented.append(augment(image))
    return torch.stack(augmented)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("policy", ["trivial", "rand-m9-n2"])
def test_the_policy_changes_images_and_keeps_their_type(channels, policy):
    batch = images(channels)
    augmented = augment_each(SampleAugment(policy, 0.0, [0.5] * channels), batch)
    assert augmented.shape == batch.shape and augmented.dtype == torch.uint8
    assert not torch.equal(augmented, batch)
    assert torch.equal(augment_each(SampleAugment(policy, 0.0, [0.5] * channels), batch), augmented)


@pytest.mark.parametrize("channels", [1, 3])
def test_erasing_probability_zero_and_one(channels):
    batch = images(channels)
    assert torch.equal(augment_each(SampleAugment("none", 0.0, [0.5] * channels), batch), batch)
    mean = [0.2, 0.4, 0.6][:channels]
    erased = augment_each(SampleAugment("none", 1.0, mean), batch)
    fill = torch.tensor([round(255 * m) for m in mean], dtype=torch.uint8).view(-1, 1, 1)
    for image, original in zip(erased, batch):
        changed = (image != original).any(dim=0)
        assert changed.any()
        assert (image[:, changed] == fill.view(-1, 1)).all()  # filled with the mean, which normalises to 0
    erased_float = augment_each(SampleAugment("none", 1.0, mean), batch / 255)
    for image, original in zip(erased_float, batch / 255):
        changed = (image != original).any(dim=0)
        torch.testing.assert_close(image[:, changed], torch.tensor(mean).view(-1, 1).expand(-1, int(changed.sum())))


def test_policy_names():
    assert SampleAugment("none", 0.0, [0.5]).policy is None
    assert type(SampleAugment("trivial", 0.0, [0.5]).policy).__name__ == "TrivialAugmentWide"
    rand = SampleAugment("rand-m7-n3", 0.0, [0.5]).policy
    assert (rand.magnitude, rand.num_ops) == (7, 3)
    with pytest.raises(TrainingError, match="--auto_augment rand-m40-n2: must be"):
        SampleAugment("rand-m40-n2", 0.0, [0.5])
