"""Mixup/CutMix of training batches and the loss for hard and soft targets."""

import pytest
import torch
from torchvision.transforms import v2 as T

from vit_training.errors import TrainingError
from vit_training.augment import SKIPPED_LABEL
from vit_training.mixing import BatchMixing, classification_loss


def batch(size: int = 8, num_classes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(size)
    return torch.rand(size, 3, 8, 8, generator=generator), torch.randint(0, num_classes, (size,), generator=generator)


def mixing(**overrides) -> BatchMixing:
    values = dict(num_classes=5, mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=1.0, switch_prob=0.5, seed=0)
    return BatchMixing(**(values | overrides))


def test_mixing_depends_on_seed_and_step_only():
    images, labels = batch()
    mix = mixing()
    torch.manual_seed(1)
    first = mix(images, labels, step=7, micro_batch=1)
    torch.manual_seed(2)
    torch.rand(100)
    state = torch.get_rng_state()
    second = mix(images, labels, step=7, micro_batch=1)
    assert torch.equal(torch.get_rng_state(), state)  # the global generator (dropout's) is left alone
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    others = [mix(images, labels, step=8, micro_batch=1), mix(images, labels, step=7, micro_batch=0)]
    others.append(mix(images, labels, step=7, micro_batch=1, process=1))
    for other in others:
        assert not torch.equal(other[0], first[0])


@pytest.mark.parametrize("size", [1, 3, 7])
def test_soft_targets_sum_to_one_for_any_batch_size(size):
    images, labels = batch(size)
    for step in range(10):
        mixed, targets = mixing()(images, labels, step=step)
        assert mixed.shape == images.shape and targets.shape == (size, 5)
        torch.testing.assert_close(targets.sum(dim=1), torch.ones(size))


def test_mixup_follows_torchvisions_formula():
    images, labels = batch()
    mixed, targets = mixing(cutmix_alpha=0.0)(images, labels, step=3)
    one_hot = torch.nn.functional.one_hot(labels, 5).float()
    # Image 0's own class has weight λ (plus 1 - λ if its neighbour shares it); recover λ where they differ.
    row = next(i for i in range(8) if labels[i] != labels[i - 1])
    lam = targets[row, labels[row]].item()
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.roll(1, 0))
    torch.testing.assert_close(targets, lam * one_hot + (1 - lam) * one_hot.roll(1, 0))
    assert 0 < lam < 1


def test_cutmix_pastes_a_box_with_its_area_as_weight():
    images, labels = batch()
    mixed, targets = mixing(mixup_alpha=0.0)(images, labels, step=3)
    pasted = (mixed != images).any(dim=1)[0]  # the pixels taken from the neighbour
    row = next(i for i in range(8) if labels[i] != labels[i - 1])
    torch.testing.assert_close(targets[row, labels[row]], 1 - pasted.float().mean())
    torch.testing.assert_close(mixed[:, :, pasted], images.roll(1, 0)[:, :, pasted])


def test_mix_prob_zero_gives_one_hot_targets():
    images, labels = batch()
    mixed, targets = mixing(mix_prob=0.0)(images, labels, step=0)
    assert torch.equal(mixed, images)
    assert torch.equal(targets, torch.nn.functional.one_hot(labels, 5).float())


def test_skipped_images_are_not_mixed_and_not_counted():
    images, labels = batch()
    labels[[2, 5]] = SKIPPED_LABEL
    mixed, targets = mixing()(images, labels, step=1)
    assert torch.equal(mixed[[2, 5]], images[[2, 5]]) and not targets[[2, 5]].any()
    kept = labels != SKIPPED_LABEL
    expected = mixing()(images[kept], labels[kept], step=1)
    assert torch.equal(mixed[kept], expected[0]) and torch.equal(targets[kept], expected[1])

    logits = torch.randn(8, 5)
    loss = classification_loss(logits, targets, label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(loss, classification_loss(logits[kept], targets[kept], 0.1, reduction="sum"))
    torch.testing.assert_close(
        classification_loss(logits, targets, 0.1), classification_loss(logits[kept], targets[kept], 0.1)
    )


def test_one_loss_for_hard_and_soft_targets():
    logits, labels = torch.randn(6, 5), torch.tensor([0, 4, SKIPPED_LABEL, 2, 2, 1])
    kept = labels != SKIPPED_LABEL
    one_hot = torch.zeros(6, 5)
    one_hot[kept] = torch.nn.functional.one_hot(labels[kept], 5).float()
    for reduction in ("sum", "mean"):
        hard = classification_loss(logits, labels, 0.1, reduction)
        torch.testing.assert_close(hard, classification_loss(logits, one_hot, 0.1, reduction))
        reference = torch.nn.functional.cross_entropy(
            logits[kept], labels[kept], label_smoothing=0.1, reduction=reduction
        )
        torch.testing.assert_close(hard, reference)


@pytest.mark.parametrize(
    "labels, kind",
    [(torch.randint(0, 2, (4, 5)).float(), "multi-label"), (torch.randn(4), "regression")],
)
def test_multi_label_and_regression_labels_are_refused(labels, kind):
    with pytest.raises(TrainingError, match=f"mix single-label classes, but these labels look like {kind}"):
        mixing()(torch.rand(4, 3, 8, 8), labels, step=0)


def test_torchvision_pairs_neighbours():
    # The premise of the formula tests: torchvision mixes each image with the one before it in the batch.
    images, labels = batch()
    torch.manual_seed(0)
    mixed, _ = T.MixUp(alpha=1.0, num_classes=5)(images, labels)
    lam = ((mixed - images.roll(1, 0)) / (images - images.roll(1, 0))).median()
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.roll(1, 0))
