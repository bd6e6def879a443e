"""The batched policy and erasing of in-memory images against torchvision's, image by image, on real photos."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F

from vit_training.augment import Augmentation, BatchAugment, SampleAugment
from vit_training.batch_policy import BatchPolicy, apply_op
from vit_training.images import InMemoryImages

POLICIES = {"trivial": T.TrivialAugmentWide, "rand-m9-n2": lambda: T.RandAugment(num_ops=2, magnitude=9)}


def photos(channels: int, side: int, count: int = 6) -> torch.Tensor:
    """`count` different small crops of a scikit-image photo, as floats in [0, 1]."""
    photo = Image.fromarray(data.astronaut() if channels == 3 else data.camera()).resize((side * 4, side * 4))
    crops = [photo.crop((5 * i, 3 * i, 5 * i + 2 * side, 3 * i + 2 * side)).resize((side, side)) for i in range(count)]
    tensors = [torch.from_numpy(np.array(crop)).float() / 255 for crop in crops]
    return torch.stack([t.permute(2, 0, 1) if channels == 3 else t[None] for t in tensors])


def torchvision_op(policy, image: torch.Tensor, name: str, magnitude: float) -> torch.Tensor:
    return policy._apply_image_or_video_transform(image, name, magnitude, policy.interpolation, policy._fill)


@pytest.mark.parametrize("channels,side", [(1, 28), (3, 32)])
@pytest.mark.parametrize("policy_name", POLICIES)
def test_every_op_across_its_magnitudes_computes_what_torchvision_computes_image_by_image(channels, side, policy_name):
    policy, images = POLICIES[policy_name](), photos(channels, side, count=4)
    for name, (bins, signed) in policy._AUGMENTATION_SPACE.items():
        magnitudes = bins(policy.num_magnitude_bins, side, side)
        values = [0.0] if magnitudes is None else [float(m) for m in magnitudes[::5]]  # 7 of the 31 bins, both ends
        values += [-value for value in values if signed and value]
        for value in values:
            batched = apply_op(name, images, torch.full((len(images),), value, dtype=torch.float64))
            for image, result in zip(images, batched, strict=True):
                expected = torchvision_op(policy, image, name, value)
                torch.testing.assert_close(result, expected, rtol=0, atol=1e-6, msg=f"{name} {value}")


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("policy_name", POLICIES)
def test_each_image_gets_its_own_ops_and_erasing_from_its_row_of_draws(channels, policy_name):
    policy, images = POLICIES[policy_name](), photos(channels, 28, count=16)
    mean = [0.25, 0.5, 0.75][:channels]
    batch_policy = BatchPolicy(policy, T.RandomErasing(p=0.5, value=mean), (28, 28))
    draws = torch.rand(16, batch_policy.columns, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    augmented = batch_policy(images, draws)
    slots, boxes = batch_policy.ops(draws), batch_policy.erase_boxes(draws)
    assert len({name for slot in slots for name, _ in slot}) >= 8  # different images drew different ops
    assert 0 < int(boxes[:, 0].sum()) < 16
    for index, image in enumerate(images):
        for slot in slots:
            image = torchvision_op(policy, image, *slot[index])
        erase, top, left, height, width = boxes[index].tolist()
        if erase:
            image = F.erase(image, top, left, height, width, torch.tensor(mean).view(-1, 1, 1))
        torch.testing.assert_close(augmented[index], image, rtol=0, atol=1e-6)
    order = [9, 2, 14]
    torch.testing.assert_close(batch_policy(images[order], draws[order]), augmented[order], rtol=0, atol=0)


@pytest.mark.parametrize("policy_name", POLICIES)
def test_draws_pick_ops_magnitudes_signs_and_rectangles_as_torchvision_does(policy_name):
    policy = POLICIES[policy_name]()
    erasing = T.RandomErasing(p=0.25)
    batch_policy = BatchPolicy(policy, erasing, (28, 20))
    draws = torch.rand(20000, batch_policy.columns, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    slots = batch_policy.ops(draws)
    assert len(slots) == getattr(policy, "num_ops", 1)
    space = policy._AUGMENTATION_SPACE
    for slot in slots:
        counts = {name: 0 for name in space}
        for name, _ in slot:
            counts[name] += 1
        expected = len(slot) / len(space)
        assert all(abs(count - expected) < 0.1 * expected for count in counts.values()), counts
        rotations = [magnitude for name, magnitude in slot if name == "Rotate"]
        assert 0.45 < sum(magnitude < 0 for magnitude in rotations) / len(rotations) < 0.55
        all_angles = space["Rotate"][0](policy.num_magnitude_bins, 28, 20).tolist()
        drawn = {abs(round(magnitude, 4)) for magnitude in rotations}
        if isinstance(policy, T.RandAugment):  # one magnitude, the policy's
            assert drawn == {round(all_angles[policy.magnitude], 4)}
        else:  # every bin of TrivialAugmentWide's range
            assert drawn == {round(angle, 4) for angle in all_angles}
    boxes = batch_policy.erase_boxes(draws)
    erased = boxes[boxes[:, 0] == 1]
    assert abs(len(erased) / len(boxes) - 0.25) < 0.02
    top, left, height, width = erased[:, 1:].unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + height <= 28).all() and (left + width <= 20).all()
    area = height * width / (28 * 20)
    assert area.min() >= 0.01 and area.max() <= 0.33 * 1.3  # erasing's scale, give or take the rounding to pixels
    assert math.log(0.3) - 0.5 < torch.log(height / width).mean() < math.log(3.3) + 0.5


def test_in_memory_batches_apply_the_recipes_policy_by_sample_and_epoch():
    augmentation = Augmentation((28, 28), (0.8, 1.0), True, seed=3, policy=SampleAugment("trivial", 0.25, [0.5]))
    batch_augment = BatchAugment(augmentation, [0.5], [0.5], num_samples=64)
    images = (photos(1, 28, count=8).repeat(8, 1, 1, 1) * 255).round().to(torch.uint8)
    dataset = InMemoryImages(images, torch.zeros(64, dtype=torch.long))
    whole = batch_augment(dataset.__getitems__(list(range(64))))["pixel_values"]
    part = batch_augment(dataset.__getitems__([40, 5, 17]))["pixel_values"]
    torch.testing.assert_close(part, whole[[40, 5, 17]], rtol=0, atol=0)
    plain = BatchAugment(Augmentation((28, 28), (0.8, 1.0), True, seed=3), [0.5], [0.5], num_samples=64)
    cropped = plain(dataset.__getitems__(list(range(64))))["pixel_values"]
    changed = [not torch.equal(a, b) for a, b in zip(whole, cropped, strict=True)]
    assert 32 < sum(changed) < 64  # the same crops; most images changed further, Identity draws and others not
    augmentation.epoch = 1
    assert not torch.equal(batch_augment(dataset.__getitems__([40, 5, 17]))["pixel_values"], part)
