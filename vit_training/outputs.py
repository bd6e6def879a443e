"""The output folder of a run: refuse another run's folder, clear what a run must not mix with its own files, save
the model. `RUN_OUTPUTS` is made of the names the writers write."""

import logging
import shutil
from contextlib import contextmanager
from pathlib import Path

from accelerate import Accelerator
from torch import nn

from configuration_vit_custom import AUTO_MAP
from vit_loading import shorten
from vit_training import reporting
from vit_training.checkpoints import STAGING_DIR, checkpoint_step, list_checkpoints
from vit_training.errors import TrainingError
from vit_training.hardware import LOGGING_DIR

logger = logging.getLogger(__name__)


def model_files() -> tuple[str, ...]:
    """What `save_model` writes: the config, the weights (one file, or shards and their index), the model code files
    that `auto_map` names, and the image processor. Glob patterns."""
    from transformers.utils import CONFIG_NAME, IMAGE_PROCESSOR_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    code_files = sorted({f"{reference.split('.')[0]}.py" for reference in AUTO_MAP.values()})
    shards = SAFE_WEIGHTS_NAME.replace(".safetensors", "-*-of-*.safetensors")
    return (CONFIG_NAME, SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, shards, *code_files, IMAGE_PROCESSOR_NAME)


# What a run writes into its output folder besides checkpoints; --overwrite_output_dir deletes these, and only these.
RUN_OUTPUTS = (*model_files(), *reporting.OUTPUT_FILES, LOGGING_DIR, STAGING_DIR)


def check_output_dir(output_dir: Path, checkpoint: Path | None, overwrite: bool):
    """Refuse an output folder that holds another run's files, unless resuming that run or told to overwrite it."""
    previous = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
    if not previous or overwrite:
        return
    if checkpoint is not None and checkpoint.resolve().parent == output_dir.resolve():
        return
    raise TrainingError(
        f"--output_dir {output_dir} already holds the files of another run ({shorten(previous)}); nothing was changed. "
        "Continue that run with --resume_from_checkpoint latest, replace it with --overwrite_output_dir, "
        "or choose another --output_dir."
    )


def prepare_output_dir(output_dir: Path, checkpoint: Path | None, overwrite: bool, accelerator: Accelerator):
    """Create the output folder and clear what the run must not mix with its own files.

    Resuming from a checkpoint of this folder drops the checkpoints newer than it: they continue another timeline,
    which `latest` must not pick if this run stops too. `overwrite` deletes the previous run's outputs and
    checkpoints (only those: other files in the folder stay).
    """
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if checkpoint is not None and checkpoint.resolve().parent == output_dir.resolve():
            resumed_step = checkpoint_step(checkpoint)
            stale = [path for path in list_checkpoints(output_dir) if checkpoint_step(path) > resumed_step]
        elif overwrite:
            stale = list_checkpoints(output_dir) + [path for name in RUN_OUTPUTS for path in output_dir.glob(name)]
        else:
            stale = []
        for path in stale:
            if path.is_dir():
                logger.info(f"Deleting {path} of an earlier run")
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    accelerator.wait_for_everyone()


def save_model(accelerator: Accelerator, model: nn.Module, image_processor, output_dir: Path, part: str = ""):
    """Weights, config (with `auto_map`), both model code files and the image processor: a loadable model folder.

    `part`: the submodule of `model` to save, if not all of it (a masked autoencoder's `encoder`).
    """
    from accelerate.utils import DistributedType

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False).get_submodule(part)
    # FSDP and DeepSpeed shard the weights: gather them. Otherwise the unwrapped model holds them, under their own
    # names (a compiled model's state dict would prefix them with `_orig_mod.`).
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    state_dict = accelerator.get_state_dict(model) if sharded else None
    if state_dict is not None and part:
        prefix = f"{part}."
        state_dict = {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}
    with own_class(unwrapped):
        unwrapped.save_pretrained(output_dir, is_main_process=accelerator.is_main_process, state_dict=state_dict)
    if accelerator.is_main_process:
        image_processor.save_pretrained(output_dir)
    accelerator.wait_for_everyone()


@contextmanager
def own_class(module: nn.Module):
    """`module` as an instance of its own class for the duration: FSDP2 gives a sharded module a subclass defined in
    torch (`FSDPViTCustomForImageClassification`), which `save_pretrained` would write into `auto_map` and whose
    source files it would copy in place of modeling_vit_custom.py."""
    from torch.distributed.fsdp import FSDPModule

    sharded_class = type(module)
    module.__class__ = next(cls for cls in sharded_class.__mro__ if not issubclass(cls, FSDPModule))
    try:
        yield module
    finally:
        module.__class__ = sharded_class

