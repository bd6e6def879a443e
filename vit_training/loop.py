"""The training loop: optimizer steps over accumulated batches, and evaluation."""

import contextlib
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator, skip_first_batches
from torch import nn
from tqdm.auto import tqdm

from vit_training.augment import SKIPPED_LABEL
from vit_training.checkpoints import check_weights
from vit_training.errors import DivergedError
from vit_training.mixing import BatchMixing, classification_loss
from vit_training.run_state import TrainingProgress

logger = logging.getLogger(__name__)

# `evaluate.load("accuracy")` fetches its script from the Hub; this copy loads offline.
METRIC_PATH = Path(__file__).resolve().parent.parent / "metrics" / "accuracy"


@dataclass(frozen=True)
class StepSettings:
    """How `train_one_epoch` makes each optimizer step."""

    accumulation_steps: int = 1  # batches per optimizer step
    label_smoothing: float = 0.0
    max_grad_norm: float = 0.0  # clip the gradients to this norm; 0 does not clip
    skip_nonfinite_steps: bool = False  # skip (and count) a step whose loss is not finite, instead of stopping
    max_steps: int = 2**63  # stop the epoch once the run has taken this many steps
    # A stream: the processes may hold different numbers of images, and a resumed epoch continues from the loader's
    # saved position instead of skipping the batches trained on.
    stream: bool = False
    mixing: BatchMixing | None = None  # Mixup / CutMix of each batch, seeded by (seed, step, batch, process)
    ema: nn.Module | None = None  # a timm ModelEmaV3 of the model, updated after every optimizer step


def train_one_epoch(
    accelerator: Accelerator,
    model: nn.Module,
    train_dataloader,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    progress: TrainingProgress,
    settings: StepSettings,
    after_step: Callable[[list[dict], float], None] = lambda window, loss: None,
    batch_loss: Callable[[nn.Module, dict], torch.Tensor] | None = None,
) -> float:
    """Train on the batches of `progress.epoch` that were not trained on yet; return the epoch's mean loss.

    `batch_loss(model, batch)`, if given, is the loss summed over the batch's images that count (not labelled
    `SKIPPED_LABEL`), in place of the classification loss (a masked autoencoder's reconstruction error).

    `after_step(window, loss)` is called after every optimizer step with its batches and mean loss (to report, or to
    save a checkpoint). A step whose loss is not finite raises `DivergedError` before the weights change, or is
    skipped with `settings.skip_nonfinite_steps`; the weights are checked at the end of the epoch.
    """
    model.train()
    train_dataloader.set_epoch(progress.epoch)
    # A resumed run skips the batches of this epoch it trained on before it stopped (the data order is seeded); a
    # stream's loader continues from the position saved in the checkpoint instead.
    resumed = progress.batches_seen and not settings.stream
    batches = skip_first_batches(train_dataloader, progress.batches_seen) if resumed else train_dataloader
    for window in accumulation_windows(batches, settings.accumulation_steps):
        window_loss_sum, window_samples = accumulate_gradients(
            accelerator, model, window, settings.label_smoothing, uneven=settings.stream, batch_loss=batch_loss,
            mix=settings.mixing and functools.partial(
                settings.mixing, step=progress.completed_steps, process=accelerator.process_index
            ),
        )  # fmt: skip
        if not settings.stream:  # a stream pads its last batches with unlabelled images, which are no bad images
            progress.skipped_images += sum(len(batch["labels"]) for batch in window) - window_samples
        loss_everywhere = sum_over_processes(accelerator, window_loss_sum)  # all processes step, skip or stop alike
        if math.isfinite(loss_everywhere):
            if settings.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:
                lr_scheduler.step()
                if settings.ema is not None:
                    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
                    settings.ema.update(unwrapped, step=progress.completed_steps + 1)
            progress.loss_sum += window_loss_sum
            progress.samples_seen += window_samples
        elif settings.skip_nonfinite_steps:
            progress.skipped_steps += 1
            logger.warning(f"Skipped step {progress.completed_steps + 1}: its training loss is {loss_everywhere}.")
        else:
            step = f"step {progress.completed_steps + 1} (epoch {progress.epoch + 1})"
            raise DivergedError(f"the training loss is {loss_everywhere} at {step}")
        optimizer.zero_grad()
        progress.batches_seen += len(window)
        progress.completed_steps += 1
        after_step(window, window_loss_sum / max(window_samples, 1))
        if progress.completed_steps >= settings.max_steps:
            break
    check_weights(accelerator, model, progress.completed_steps)  # before they are evaluated
    if progress.samples_seen == 0:
        raise DivergedError(f"every step of epoch {progress.epoch + 1} had a non-finite loss")
    mean_loss = torch.tensor(progress.loss_sum / progress.samples_seen, device=accelerator.device)
    return accelerator.reduce(mean_loss, "mean").item()


def sum_over_processes(accelerator: Accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return value
    return accelerator.reduce(torch.tensor(value, dtype=torch.float64, device=accelerator.device), "sum").item()


def flags_on_any_process(accelerator: Accelerator) -> Callable[[list[bool]], list[bool]]:
    """A function of this process's flags that says, for each, whether it is set on any process (one all-reduce)."""
    def any_process(flags: list[bool]) -> list[bool]:
        counts = accelerator.reduce(torch.tensor(flags, dtype=torch.int64, device=accelerator.device), "sum")
        return (counts > 0).tolist()

    return any_process


def accumulation_windows(batches, size: int):
    """Groups consecutive batches into the windows of one optimizer step each; the last window may be shorter."""
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def accumulate_gradients(
    accelerator: Accelerator,
    model: nn.Module,
    window: list[dict],
    label_smoothing: float,
    uneven: bool = False,
    batch_loss: Callable[[nn.Module, dict], torch.Tensor] | None = None,
    mix: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
):
    """Forward and backward over the batches of one optimizer step; returns the window's summed loss and images.

    Each image's loss is divided by the images of the whole window, not of its batch, so the gradient equals that
    of one batch of all of them, however the window splits (a short last batch, a short last window). Processes
    synchronise their gradients once, after the last batch.

    `uneven`: the processes may hold different numbers of images (a stream, at the end of an epoch or after skipping
    bad images; its padding images, labelled -100, count for none). As the processes' gradients are averaged, each
    divides by the mean number of images per process, so the update is still that of all the images together.

    `mix(pixel_values, labels, micro_batch=index)`, if given, mixes each batch (Mixup / CutMix) into soft targets.
    """
    # Skipped images (--on_bad_image skip, a stream's padding) carry SKIPPED_LABEL, which cross_entropy ignores.
    num_samples = sum(int((batch["labels"] != SKIPPED_LABEL).sum()) for batch in window)
    if uneven:
        images = torch.tensor(float(num_samples), device=accelerator.device)
        divisor = accelerator.reduce(images, "mean").clamp(min=1)
    else:
        divisor = max(num_samples, 1)
    loss_sum = 0.0
    for index, batch in enumerate(window):
        is_last = index == len(window) - 1
        with contextlib.nullcontext() if is_last else accelerator.no_sync(model):
            if batch_loss is None:
                pixel_values, targets = batch["pixel_values"], batch["labels"]
                if mix is not None:
                    pixel_values, targets = mix(pixel_values, targets, micro_batch=index)
                logits = model(pixel_values=pixel_values).logits
                losses = classification_loss(logits, targets, label_smoothing, reduction="sum")
            else:
                losses = batch_loss(model, batch)
            accelerator.backward(losses / divisor)
        loss_sum += losses.item()
    return loss_sum, num_samples


def run_evaluation(accelerator: Accelerator, model: nn.Module, dataloader, prefix: str) -> dict:
    """Loss, accuracy and (for more than 5 classes) top-5 accuracy, counting every sample once on all processes."""
    import evaluate

    model.eval()
    metric = evaluate.load(str(METRIC_PATH), keep_in_memory=True)
    loss_sum, num_samples = 0.0, 0
    for batch in tqdm(dataloader, desc=prefix, leave=False, disable=not accelerator.is_local_main_process):
        with torch.no_grad():
            logits = model(pixel_values=batch["pixel_values"]).logits.float()
        # Gathers every process's batch, minus the samples repeated to give every process a full last batch.
        logits, labels = accelerator.gather_for_metrics((logits, batch["labels"]))
        kept = labels != SKIPPED_LABEL
        logits, labels = logits[kept], labels[kept]
        loss_sum += classification_loss(logits, labels, reduction="sum").item()
        num_samples += len(labels)
        metric.add_batch(predictions=logits.cpu().numpy(), references=labels.cpu().numpy())
    results = {"loss": loss_sum / num_samples, **metric.compute(), "samples": num_samples}
    return {f"{prefix}_{name}": value for name, value in results.items()}


def warmup_steps(warmup: int | float, max_train_steps: int) -> int:
    return math.ceil(warmup * max_train_steps) if isinstance(warmup, float) else warmup
