"""What MAE pre-training adds to the training loop: the masks of every batch, the reconstruction loss of the images
that count, its evaluation, and the figure of masked inputs and their reconstructions."""

from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from explain_figures import DPI
from vit_loading import shorten
from vit_training.augment import SKIPPED_LABEL
from vit_training.errors import TrainingError
from vit_training.mae import MaskedAutoencoder, masking_generator, normalised_patches, reconstruction_figure
from vit_training.reporting import RECONSTRUCTIONS_FILE
from vit_training.run_state import TrainingProgress

# The masks of evaluation batch `i` are those of step `EVALUATION_MASKS + i`: the same every epoch, so that the
# validation losses of the epochs compare, and never those of a training step.
EVALUATION_MASKS = 1 << 62


class TrainingMasks:
    """The masks of each training batch, drawn from (seed, epoch, batch of the epoch, process) only, so that a resumed
    run hides the patches an uninterrupted one hides.

    `loss(model, batch)` is `train_one_epoch`'s `batch_loss`: it reads the batch's place from `progress`, which the
    loop advances after each accumulation window, and counts the batches within the window itself.
    """

    def __init__(self, seed: int, rank: int, progress: TrainingProgress, patch_size: int):
        self.seed, self.rank, self.progress, self.patch_size = seed, rank, progress, patch_size
        self._window, self._in_window = None, 0

    def generator(self) -> torch.Generator:
        window = (self.progress.epoch, self.progress.batches_seen)
        self._in_window = self._in_window + 1 if window == self._window else 0
        self._window = window
        batch = self.progress.batches_seen + self._in_window
        return masking_generator(self.seed, self.progress.epoch << 32 | batch, self.rank)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return image_losses(model, batch, self.generator(), self.patch_size).sum()


def image_losses(model: nn.Module, batch: dict, generator: torch.Generator, patch_size: int) -> torch.Tensor:
    """Each image's mean squared error on its hidden patches; 0 for an image that does not count (`SKIPPED_LABEL`)."""
    pixel_values = batch["pixel_values"]
    output = model(pixel_values, generator=generator)
    errors = (output.reconstruction.float() - normalised_patches(pixel_values, patch_size)).square().mean(dim=-1)
    losses = (errors * output.mask).sum(dim=1) / output.mask.sum(dim=1).clamp(min=1)
    return losses * (batch["labels"] != SKIPPED_LABEL)


def evaluate(accelerator: Accelerator, model: nn.Module, dataloader, seed: int, patch_size: int) -> dict:
    """The mean reconstruction loss of the validation images, each counted once on all processes, with the same masks
    every epoch."""
    model.eval()
    loss_sum, num_samples = 0.0, 0
    for index, batch in enumerate(tqdm(dataloader, desc="eval", leave=False, disable=not accelerator.is_main_process)):
        generator = masking_generator(seed, EVALUATION_MASKS + index, accelerator.process_index)
        with torch.no_grad():
            losses = image_losses(model, batch, generator, patch_size)
        losses, labels = accelerator.gather_for_metrics((losses, batch["labels"]))
        loss_sum += losses.sum().item()
        num_samples += int((labels != SKIPPED_LABEL).sum())
    return {"eval_loss": loss_sum / max(num_samples, 1), "eval_samples": num_samples}


def save_reconstructions(
    accelerator: Accelerator, model: nn.Module, pixel_values: torch.Tensor, seed: int, image_processor,
    output_dir: Path, epoch: int,
):  # fmt: skip
    """Draw `pixel_values` masked and reconstructed (`mae.reconstruction_figure`) into the output folder.

    Every process runs the model on the same images, as a sharded model needs; the main process saves the figure.
    """
    model.eval()
    with torch.no_grad():
        output = model(pixel_values.to(accelerator.device), generator=masking_generator(seed, EVALUATION_MASKS))
    if accelerator.is_main_process:
        output = output.__class__(**{name: value.cpu() for name, value in output.items()})
        patch_size = accelerator.unwrap_model(model).patch_size
        mean, std = image_processor.image_mean, image_processor.image_std
        figure = reconstruction_figure(pixel_values, output, patch_size, mean, std, title=f"epoch {epoch}")
        figure.savefig(output_dir / RECONSTRUCTIONS_FILE.format(epoch=epoch), dpi=DPI)


def freeze_unused(mae: MaskedAutoencoder):
    """Freeze the encoder's pooling norm (mean pooling), which pre-training does not reach: data-parallel training
    refuses parameters without gradients. It is saved as initialised, the identity, for fine-tuning to train."""
    mae.encoder.pooler.requires_grad_(False)


def check_checkpoint_shapes(checkpoint: Path, mae: MaskedAutoencoder):
    """Refuse a checkpoint whose tensors have other shapes than the masked autoencoder the flags build, naming them.

    Reads the shapes from the weights file's header; a sharded (FSDP) checkpoint is checked as it loads.
    """
    from safetensors import safe_open

    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        return
    expected = {name: tuple(tensor.shape) for name, tensor in mae.state_dict().items()}
    with safe_open(weights, framework="pt") as saved:
        shapes = {name: tuple(saved.get_slice(name).get_shape()) for name in saved.keys()}
    wrong = [
        f"{name} {shapes.get(name, 'missing')} (this run: {shape})"
        for name, shape in expected.items()
        if shapes.get(name) != shape
    ]
    if wrong:
        raise TrainingError(
            f"{checkpoint} holds a masked autoencoder of another shape than the model flags ask for: "
            f"{shorten(wrong, limit=3)}. Pass the model and decoder flags of the run that wrote it (its config.json "
            "lists the encoder's), or start a new run in another --output_dir."
        )
