"""Checkpoints in an output folder: find, check, save (staged, then renamed) and resume from them."""

import logging
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn

from vit_training.errors import DivergedError, TrainingError
from vit_training.images import BadImageError
from vit_training.run_state import TrainingProgress

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
# Where a checkpoint is written before it is renamed into place: a save cut short never carries a checkpoint's name.
STAGING_DIR = "tmp"
# The file of a checkpoint that holds the run's state (`TrainingProgress`): Accelerate's name for the first object
# registered for checkpointing.
PROGRESS_FILE = "custom_checkpoint_0.pkl"


def find_checkpoint(resume_from_checkpoint: str | None, output_dir: Path) -> Path | None:
    """The checkpoint folder to resume from: the one named, the newest complete one in `output_dir`, or none."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.info(f"No checkpoint in {output_dir} to resume from; starting a new run.")
            return None
        for checkpoint in reversed(checkpoints):
            problem = checkpoint_problem(checkpoint)
            if problem is None:
                return checkpoint
            logger.warning(f"Skipping {checkpoint}, which cannot be resumed from: {problem}.")
        raise TrainingError(
            f"None of the {len(checkpoints)} checkpoints in {output_dir} can be resumed from (see the warnings). "
            "Start the run again with --overwrite_output_dir, or in another --output_dir."
        )
    checkpoint = Path(resume_from_checkpoint)
    problem = checkpoint_problem(checkpoint)
    if problem:
        raise TrainingError(
            f"--resume_from_checkpoint {checkpoint} cannot be resumed from: {problem}. Pass another of the "
            "checkpoint-N folders of its --output_dir, or `latest`, which skips damaged ones."
        )
    return checkpoint


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from (not a checkpoint of this script, a truncated or corrupt file), or None.

    Reads the structure of every file (the header of a safetensors file, the zip directory of a torch.save one), not
    the tensors: quick, and enough to find a file cut short.
    """
    from safetensors import SafetensorError, safe_open

    if not (checkpoint / PROGRESS_FILE).is_file():
        return "it is not a checkpoint written by this script (it has no custom_checkpoint_0.pkl)"
    for path in sorted(checkpoint.iterdir()):
        try:
            if path.suffix == ".safetensors":
                with safe_open(path, framework="pt"):
                    pass
            elif path.suffix in (".bin", ".pkl"):  # torch.save's zip files
                with zipfile.ZipFile(path):
                    pass
        except (SafetensorError, zipfile.BadZipFile, OSError) as error:
            return f"{path.name} is truncated or corrupt ({error})"
    return None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """The complete checkpoints in `output_dir`, oldest first. Unfinished saves never carry the final name."""
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.fullmatch(p.name)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a `checkpoint-N` folder was saved at."""
    return int(CHECKPOINT_PATTERN.fullmatch(checkpoint.name)[1])


def save_checkpoint(
    accelerator: Accelerator,
    model: nn.Module,
    output_dir: Path,
    progress: TrainingProgress,
    keep_last: int,
    resumed_from: Path | None,
):
    """Save everything needed to resume, then delete the checkpoints older than the newest `keep_last` (0: none),
    except the one this run resumed from.

    The state is written to a temporary folder that is renamed when complete, so a run killed while saving leaves the
    previous checkpoints intact and `latest` never picks a partial one. Diverged weights are never saved.
    """
    check_weights(accelerator, model, progress.completed_steps)
    loss_sum = torch.tensor(progress.loss_sum, dtype=torch.float64, device=accelerator.device)
    progress.share_loss_sum(accelerator.reduce(loss_sum, "mean").item())
    final = output_dir / f"checkpoint-{progress.completed_steps}"
    partial = output_dir / STAGING_DIR / final.name
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # an older run's checkpoint of the same step, left by a resume from an earlier one
            shutil.rmtree(final)
        partial.rename(final)
        if not any(partial.parent.iterdir()):
            partial.parent.rmdir()
        logger.info(f"Saved checkpoint {final}")
        older = list_checkpoints(output_dir)[:-keep_last] if keep_last else []
        for path in older:
            if resumed_from is None or path.resolve() != resumed_from.resolve():
                logger.info(f"Deleting {path}: --checkpoints_total_limit {keep_last} keeps the newest")
                shutil.rmtree(path)
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, progress: TrainingProgress):
    """Restore the state saved in `checkpoint` into the prepared objects and `progress`, if this run can continue it.

    The run must have the checkpoint's settings (`progress.settings`) and steps left to train. Another number of steps
    recomputes the learning-rate schedule from the checkpoint's step on: that is logged and reported.
    """
    from safetensors import SafetensorError

    settings, planned_steps = progress.settings, progress.planned_steps
    logger.info(f"Resuming from {checkpoint}")
    try:
        accelerator.load_state(str(checkpoint))
    except (RuntimeError, KeyError, ValueError, OSError, EOFError, pickle.UnpicklingError, SafetensorError) as error:
        raise TrainingError(
            f"Could not resume from {checkpoint}: {error}. A checkpoint resumes only with the model arguments of the "
            "run that wrote it; pass the same ones, or start a new run."
        ) from error
    changed = [
        f"{name} {progress.settings[name]} (this run: {value})"
        for name, value in settings.items()
        if name in progress.settings and progress.settings[name] != value
    ]
    if changed:
        raise TrainingError(
            f"{checkpoint} was written by a run with {', '.join(changed)}. Its place in the data and its optimizer "
            "and learning-rate state count in that run's steps and values, so only a run with the same ones continues "
            "it: pass the checkpoint's values, or start a new run in another --output_dir."
        )
    if progress.completed_steps > planned_steps:
        raise TrainingError(
            f"{checkpoint} has trained {progress.completed_steps} optimizer steps, more than the {planned_steps} this "
            "run asks for: nothing is left to train. Pass a larger --num_train_epochs or --max_train_steps."
        )
    if progress.planned_steps != planned_steps:
        logger.warning(
            f"{checkpoint} belongs to a run of {progress.planned_steps} optimizer steps and this one has "
            f"{planned_steps}: the learning-rate schedule is recomputed for {planned_steps} steps from step "
            f"{progress.completed_steps} on (all_results.json reports it as schedule_recomputed)."
        )
        progress.schedule_changes.append(
            {"at_step": progress.completed_steps, "planned_steps": planned_steps, "before": progress.planned_steps}
        )
        progress.planned_steps = planned_steps


def check_weights(accelerator: Accelerator, model: nn.Module, step: int):
    """Stop the run if the weights hold NaN or infinite values: nothing computed from them may be saved or reported.

    Each process checks the weights it holds: all of them, or under FSDP its shard (a DTensor's local part).
    """
    local = [getattr(parameter, "to_local", lambda tensor=parameter: tensor)() for parameter in model.parameters()]
    nonfinite = torch.stack([tensor.isfinite().all().logical_not() for tensor in local]).any()
    if accelerator.reduce(nonfinite.float(), "sum").item() > 0:  # every process stops, sharded or not
        raise DivergedError(f"the weights hold NaN or infinite values after step {step}")


def divergence_error(what: str, output_dir: Path) -> TrainingError:
    """The message for a run stopped by `DivergedError(what)`: what is kept in `output_dir`, and how to go on."""
    checkpoints = list_checkpoints(output_dir)
    kept = f"the last good checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was saved before it"
    return TrainingError(
        f"Training diverged: {what}. Nothing from that point on was saved or scored; {kept}. Start again with a "
        "lower --learning_rate (and --max_grad_norm clipping on), or resume with --skip_nonfinite_steps to skip the "
        "steps whose loss is not finite."
    )


def stop_at_bad_image(
    error: BadImageError, accelerator: Accelerator, progress: TrainingProgress, save_checkpoint: Callable[[], None]
):
    """Stop at an image that cannot be decoded, keeping the steps done: a single process saves a checkpoint first
    (with several, the others are waiting in a collective operation and cannot join a save)."""
    # A loader worker's exception arrives with the worker's traceback in its message: keep the original message.
    message = str(error).rsplit("BadImageError: ", 1)[-1].strip()
    saved = ""
    if accelerator.num_processes == 1 and progress.completed_steps > 0:
        save_checkpoint()
        saved = f" The {progress.completed_steps} steps done are saved: fix the file, then continue with " \
            "--resume_from_checkpoint latest."
    raise TrainingError(f"Cannot decode an image: {message}{saved}") from None
