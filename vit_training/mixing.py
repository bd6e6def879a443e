"""Mixup and CutMix of training batches with soft targets, and the one classification loss for hard and soft targets.

A batch's mixing (whether it is mixed, Mixup or CutMix, λ, the CutMix box) is drawn from a generator seeded with
(seed, step, micro-batch, process) only, so a resumed run or one with another number of loader workers mixes
exactly as an uninterrupted one. torchvision pairs each image with its neighbour in the (shuffled) batch, for any
batch size.
"""

import torch
from torchvision.transforms import v2 as T

from vit_training.errors import TrainingError
from vit_training.augment import SKIPPED_LABEL


class BatchMixing:
    """Mixup (`mixup_alpha`) and CutMix (`cutmix_alpha`) of a batch with probability `mix_prob`; with both on, CutMix
    is chosen with probability `switch_prob`. An alpha of 0 turns that method off."""

    def __init__(
        self, num_classes: int, mixup_alpha: float, cutmix_alpha: float, mix_prob: float, switch_prob: float, seed: int
    ):
        self.num_classes, self.mix_prob, self.seed = num_classes, mix_prob, seed
        self.mixup = T.MixUp(alpha=mixup_alpha, num_classes=num_classes) if mixup_alpha > 0 else None
        self.cutmix = T.CutMix(alpha=cutmix_alpha, num_classes=num_classes) if cutmix_alpha > 0 else None
        self.switch_prob = switch_prob if self.mixup and self.cutmix else float(self.cutmix is not None)

    @property
    def active(self) -> bool:
        return (self.mixup is not None or self.cutmix is not None) and self.mix_prob > 0

    def __call__(
        self, pixel_values: torch.Tensor, labels: torch.Tensor, step: int, micro_batch: int = 0, process: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixed images and their `(batch, num_classes)` class probabilities.

        Images labelled SKIPPED_LABEL are neither mixed nor mixed into others; their target rows are all zero, which
        `classification_loss` ignores.
        """
        check_mixable(labels)
        kept = labels != SKIPPED_LABEL
        targets = torch.zeros(len(labels), self.num_classes, device=labels.device)
        targets[kept] = torch.nn.functional.one_hot(labels[kept], self.num_classes).float()
        if not self.active or not kept.any():
            return pixel_values, targets
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(hash((self.seed, step, micro_batch, process)) % 2**63)
            if torch.rand(()) >= self.mix_prob:
                return pixel_values, targets
            mix = self.cutmix if torch.rand(()) < self.switch_prob else self.mixup
            mixed_images, mixed_targets = mix(pixel_values[kept], labels[kept])
        pixel_values = pixel_values.clone()
        pixel_values[kept], targets[kept] = mixed_images, mixed_targets
        return pixel_values, targets


def check_mixable(labels: torch.Tensor):
    """Refuse labels Mixup and CutMix cannot mix: they mix one class per image into class probabilities."""
    if labels.ndim != 1 or labels.is_floating_point():
        kind = "multi-label (one 0/1 column per class)" if labels.ndim == 2 else "regression (real values)"
        raise TrainingError(
            f"Mixup and CutMix mix single-label classes, but these labels look like {kind}: dtype {labels.dtype}, "
            f"shape {tuple(labels.shape)}. Train them with --mixup_alpha 0 --cutmix_alpha 0."
        )


def classification_loss(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of `logits` against class indices (SKIPPED_LABEL ignored) or class probabilities (all-zero
    rows, skipped images, ignored), in float32, with label smoothing towards the uniform distribution.

    `reduction`: "sum" or "mean" over the counted images, or "none" (0 for the ignored ones).
    """
    logits = logits.float()
    if not targets.is_floating_point():
        return torch.nn.functional.cross_entropy(
            logits, targets, ignore_index=SKIPPED_LABEL, label_smoothing=label_smoothing, reduction=reduction
        )
    kept = targets.sum(dim=1) > 0
    losses = torch.nn.functional.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction="none")
    losses = losses * kept
    if reduction == "none":
        return losses
    total = losses.sum()
    return total if reduction == "sum" else total / kept.sum()
