"""Per-sample augmentation policy and random erasing: seeded per sample, for grayscale and RGB batches."""

import pytest
import torch

from vit_training.errors import TrainingError
from vit_training.augment import SampleAugment, augment_batch


def images(channels: int, count: int = 12) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (count, channels, 28, 28), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("policy", ["trivial", "rand-m9-n2"])
def test_a_samples_augmentation_does_not_depend_on_its_batch(channels, policy):
    augment = SampleAugment(policy, 0.5, [0.5] * channels)
    batch, seeds = images(channels), list(range(100, 112))
    whole = augment_batch(augment, batch, seeds)
    assert whole.shape == batch.shape and whole.dtype == torch.uint8
    assert not torch.equal(whole, batch)
    order = [7, 3, 11, 0]
    torch.manual_seed(5)
    part = augment_batch(augment, batch[order], [seeds[i] for i in order])
    assert torch.equal(part, whole[order])
    for index in order:
        torch.default_generator.manual_seed(seeds[index])
        assert torch.equal(augment(batch[index]), whole[index])  # as the lazy path augments one image
    assert not torch.equal(augment_batch(augment, batch, [seed + 1 for seed in seeds]), whole)


def test_global_generator_left_alone():
    torch.manual_seed(3)
    state = torch.get_rng_state()
    augment_batch(SampleAugment("trivial", 0.25, [0.5]), images(1), list(range(12)))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("channels", [1, 3])
def test_erasing_probability_zero_and_one(channels):
    batch, seeds = images(channels), list(range(12))
    assert torch.equal(augment_batch(SampleAugment("none", 0.0, [0.5] * channels), batch, seeds), batch)
    mean = [0.2, 0.4, 0.6][:channels]
    erased = augment_batch(SampleAugment("none", 1.0, mean), batch, seeds)
    fill = torch.tensor([round(255 * m) for m in mean], dtype=torch.uint8).view(-1, 1, 1)
    for image, original in zip(erased, batch):
        changed = (image != original).any(dim=0)
        assert changed.any()
        assert (image[:, changed] == fill.view(-1, 1)).all()  # filled with the mean, which normalises to 0
    erased_float = augment_batch(SampleAugment("none", 1.0, mean), batch / 255, seeds)
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
