#!/usr/bin/env python
"""Pre-train a vit-custom encoder as a masked autoencoder (MAE) with Accelerate, and save it for fine-tuning.

With no arguments it pre-trains the small ViT of `run_finetune.py` on the 8x8 scikit-learn digits, without their
labels, into outputs/vit-custom-digits-mae, which fine-tuning then starts from:

    python run_pretrain.py
    python run_finetune.py --model_name_or_path outputs/vit-custom-digits-mae

The data flags are run_finetune.py's (labels are not needed, and ignored if present: an image folder may hold its
images loosely); so are the checkpoint, resume, tracking and output flags. The output folder holds the encoder, which
`AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)` loads with a new classifier, the
training curves, and a figure of masked validation images and their reconstructions after every epoch.
"""

import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import vit_loading
from vit_loading import shorten
from vit_training import arguments
from vit_training.errors import DivergedError, TrainingError
from vit_training.flag_types import flag, positive_int

if TYPE_CHECKING:
    from transformers import ViTImageProcessor

    from vit_training.mae import MaskedAutoencoder

logger = logging.getLogger(__name__)

TRACKER_PROJECT = "vit-custom-mae"
# The decoder of the default digits model; other encoders get the MAE paper's (512 wide, 8 blocks, 16 heads).
DIGITS_DECODER = {"decoder_hidden_size": 64, "decoder_num_layers": 2, "decoder_num_heads": 4}
PAPER_DECODER = {"decoder_hidden_size": 512, "decoder_num_layers": 8, "decoder_num_heads": 16}


@dataclass
class MaskedAutoencoderArguments:
    """masked autoencoder"""

    mask_ratio: float = flag(
        0.75, type=float, help="Fraction of each image's patches hidden from the encoder, in [0, 1).", resumed=True
    )
    decoder_hidden_size: int | None = flag(
        type=positive_int, help="Width of the decoder. Default: 64 for the digits model, else 512.", resumed=True
    )
    decoder_num_layers: int | None = flag(
        type=positive_int, help="Blocks of the decoder. Default: 2 for the digits model, else 8.", resumed=True
    )
    decoder_num_heads: int | None = flag(
        type=positive_int, help="Attention heads of the decoder. Default: 4 for the digits model, else 16.",
        resumed=True,
    )  # fmt: skip
    reconstruction_images: int = flag(
        8, type=positive_int, help="Validation images in the figure of reconstructions saved after every epoch."
    )

    def check(self):
        if not 0 <= self.mask_ratio < 1:
            raise ValueError(
                f"--mask_ratio {self.mask_ratio} is outside [0, 1): it is the fraction of the patches hidden from the "
                "encoder, and at least one must stay visible. Pass a value such as 0.75 (the MAE paper's)."
            )


@dataclass
class PretrainingArguments(arguments.Arguments):
    """The arguments of run_pretrain.py, by group."""

    mae: MaskedAutoencoderArguments

    unused_flags: ClassVar[tuple[str, ...]] = (
        "mixup_alpha", "cutmix_alpha", "mix_prob", "mix_switch_prob", "label_smoothing", "ema_decay", "layer_decay",
    )  # fmt: skip

    def default_output_dir(self) -> str:
        return f"{super().default_output_dir()}-mae"

    def default_recipe(self) -> str:
        return "pretrain"

    def check_recipe(self):
        """Refuse the recipe settings of classification, which masked-image pre-training would ignore."""
        settings = self.recipe.settings
        # Mixing's probabilities are refused when given: every recipe sets them, and without mixing they do nothing.
        given = [name for name in self.unused_flags if name in self.recipe.explicit or not name.startswith("mix_")]
        unused = [f"--{name} {settings[name]}" for name in given if settings[name]]
        if unused:
            raise TrainingError(
                f"{', '.join(unused)} (from --recipe {settings['recipe']} or the flags) train classifiers: "
                "masked-image pre-training has no labels to mix or smooth and saves the last weights. Drop them, "
                "or pass --recipe pretrain."
            )


def main(argv: list[str] | None = None, on_event: Callable[[str, dict], None] | None = None) -> dict[str, float]:
    """Pre-train and save an encoder as `argv` (default: the command line) describes; returns the final metrics.

    `on_event(name, values)`, if given, observes the run: `"step"` after every optimizer step (the step and its
    loss) and `"epoch"` after every epoch's evaluation (the epoch's record).
    """
    args = parse_args(argv)
    import torch
    from accelerate.utils import gather_object, set_seed
    from datasets import DatasetDict
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from vit_training import checkpoints, hardware, loaders, outputs, pretraining, reporting
    from vit_training.augment import BatchAugment, BatchNormalize, build_transforms
    from vit_training.data import load_image_dataset, number_samples
    from vit_training.images import BadImageError
    from vit_training.loop import StepSettings, flags_on_any_process, train_one_epoch, warmup_steps
    from vit_training.param_groups import parameter_groups
    from vit_training.recipes import learning_rate
    from vit_training.run_state import TrainingProgress

    data, training, output, output_dir = args.data, args.training, args.output, Path(args.output.output_dir)
    set_seed(training.seed)
    accelerator = hardware.create_accelerator(
        output_dir, training.seed, cpu=training.cpu, mixed_precision=training.mixed_precision, tracker=output.tracker,
        compile_model=training.torch_compile == "on", num_threads=training.num_threads,
    )  # fmt: skip

    # 1. Check everything that can go wrong before anything is written: the model, the folder, the data.
    mae, image_processor = build_masked_autoencoder(args)
    checkpoint = checkpoints.find_checkpoint(args.checkpoints.resume_from_checkpoint, output_dir)
    outputs.check_output_dir(output_dir, checkpoint, output.overwrite_output_dir)
    if checkpoint is not None:
        pretraining.check_checkpoint_shapes(checkpoint, mae)
    columns = (data.image_column_name, data.label_column_name)
    sources = {
        "dataset_name": data.dataset_name, "dataset_config_name": data.dataset_config_name,
        "max_eval_samples": data.max_eval_samples,
    }  # fmt: skip
    folders = {"train": data.train_dir, "validation": data.validation_dir, "test": data.test_dir}
    with accelerator.main_process_first():
        if data.streaming:
            from vit_training import streaming  # only streamed runs need torchdata

            streams = streaming.load_streaming_data(*columns, training.seed, **folders, **sources)
            dataset = DatasetDict(validation=streams.validation)
        else:
            dataset = load_image_dataset(
                **sources, **{f"{split}_dir": folder for split, folder in folders.items()}, image_column=columns[0],
                label_column=columns[1], validation_fraction=data.train_val_split,
                max_train_samples=data.max_train_samples, seed=training.seed, labelled=False,
            )  # fmt: skip
            dataset.pop("test", None)  # pre-training is scored on the validation images

    # 2. Data, as run_finetune.py loads it: decoded once into memory when it fits, else by loader workers, or streamed.
    config = mae.encoder.config
    train_transform, eval_transform = build_transforms(
        image_processor, config.num_channels, columns, crop_scale=data.crop_scale, flip=data.horizontal_flip,
        seed=training.seed, skip_bad_images=data.on_bad_image == "skip", auto_augment=args.recipe.auto_augment,
        random_erasing=args.recipe.random_erasing, crop_ratio=data.crop_ratio,
    )  # fmt: skip
    cores = hardware.cores_per_process(accelerator)
    plan = (False, "--streaming") if data.streaming else loaders.in_memory_plan(
        data.images_in_memory, dataset, train_transform, hardware.memory_budget()
    )  # fmt: skip
    logger.info(f"Images {'decoded once into memory' if plan[0] else 'decoded as the loaders need them'}: {plan[1]}")
    batch_size = training.per_device_train_batch_size
    threads = hardware.set_threads(training.num_threads, accelerator, cores, config, batch_size, checkpoint)
    logger.info(f"{torch.get_num_threads()} thread(s) per process ({threads})")
    num_workers = 0 if plan[0] else data.dataloader_num_workers
    num_workers = hardware.default_num_workers(accelerator) if num_workers == "auto" else num_workers
    mean, std = train_transform.mean, train_transform.std
    if plan[0]:
        splits, bad_images = loaders.load_in_memory(dataset, train_transform, eval_transform, processes=cores)
        train_split, eval_split = splits["train"], splits["validation"]
        collate_train = BatchAugment(train_transform.augmentation, mean, std, len(train_split))
        collate_eval = BatchNormalize(mean, std)
        if bad_images:
            logger.warning(f"Skipping {len(bad_images)} image(s) that cannot be decoded: {shorten(bad_images)}")
    else:
        train_split = None if data.streaming else loaders.lazy_split(number_samples(dataset["train"]), train_transform)
        eval_split = loaders.lazy_split(dataset["validation"], eval_transform)
        collate_train = collate_eval = loaders.collate_fn
    if data.streaming:
        train_dataloader = streaming.StreamLoader(
            streams.train, train_transform, *columns, streams.labels, streams.labels_are_names, batch_size,
            num_workers, training.seed, data.shuffle_buffer_size, accelerator.process_index,
            accelerator.num_processes, accelerator.device,
            image_shape=(config.num_channels, *config.image_height_width),
            on_bad_image=data.on_bad_image, any_process=flags_on_any_process(accelerator), gather=gather_object,
        )  # fmt: skip
        num_train_samples = streams.num_train_samples
    else:
        train_dataloader = loaders.make_dataloader(
            train_split, batch_size, num_workers, training.seed, accelerator.device, shuffle=True, collate=collate_train
        )
        num_train_samples = len(train_split)
    eval_dataloader = loaders.make_dataloader(
        eval_split, training.per_device_eval_batch_size, num_workers, training.seed, accelerator.device,
        collate=collate_eval,
    )  # fmt: skip
    # Spread over the validation split, whose images are often grouped by class (an image folder's sub-folders).
    spread = torch.linspace(0, len(eval_split) - 1, min(args.mae.reconstruction_images, len(eval_split)))
    figure_images = next(iter(torch.utils.data.DataLoader(
        torch.utils.data.Subset(eval_split, spread.round().long().tolist()),
        batch_size=args.mae.reconstruction_images, collate_fn=collate_eval,
    )))["pixel_values"]  # fmt: skip

    # 3. The optimizer and schedule, with everything prepared for the devices and processes.
    global_batch = training.per_device_train_batch_size * training.gradient_accumulation_steps
    training.learning_rate = learning_rate(args.recipe.settings, global_batch * accelerator.num_processes)
    optimizer = torch.optim.AdamW(parameter_groups(mae, training.weight_decay, training.learning_rate), fused=True)
    if data.streaming:
        model, optimizer, eval_dataloader = accelerator.prepare(mae, optimizer, eval_dataloader)
    else:
        model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
            mae, optimizer, train_dataloader, eval_dataloader
        )
    accumulation = training.gradient_accumulation_steps
    if data.streaming:
        steps_per_epoch = streams.max_steps_per_epoch(accelerator.num_processes, num_workers, batch_size, accumulation)
    else:
        steps_per_epoch = math.ceil(len(train_dataloader) / accumulation)
    max_train_steps = training.max_train_steps or training.num_train_epochs * steps_per_epoch
    num_epochs = sys.maxsize if data.streaming and training.max_train_steps else math.ceil(
        max_train_steps / steps_per_epoch
    )  # fmt: skip
    lr_scheduler = accelerator.prepare(get_scheduler(
        training.lr_scheduler_type, optimizer, num_warmup_steps=warmup_steps(training.warmup_steps, max_train_steps),
        num_training_steps=max_train_steps,
    ))  # fmt: skip
    logger.info(
        f"Pre-training on {num_train_samples or 'a stream of'} images, {mae.mask_ratio:.0%} of each one's patches "
        f"hidden, for {max_train_steps} optimizer steps of {batch_size} images per device x "
        f"{accelerator.num_processes} processes x {accumulation} accumulated, writing to {output_dir}"
    )

    # 4. Pick up where a previous run stopped, or start a new one.
    settings = {**args.resumed_settings(), "processes": accelerator.num_processes, "training images": num_train_samples}
    progress = TrainingProgress(settings=settings, planned_steps=max_train_steps, threads=torch.get_num_threads())
    for stateful in [progress, train_dataloader] if data.streaming else [progress]:
        accelerator.register_for_checkpointing(stateful)
    if checkpoint is not None:
        checkpoints.load_checkpoint(accelerator, checkpoint, progress)
        progress.threads = torch.get_num_threads()
    outputs.prepare_output_dir(output_dir, checkpoint, output.overwrite_output_dir, accelerator)
    accelerator.init_trackers(TRACKER_PROJECT, reporting.tracker_config(args.flat()))  # none without --with_tracking

    # 5. Train, scoring the reconstructions of the validation images and drawing some after every epoch.
    masks = pretraining.TrainingMasks(training.seed, accelerator.process_index, progress, config.patch_size)
    progress_bar = tqdm(
        total=max_train_steps, initial=progress.completed_steps, desc="pre-training",
        disable=not accelerator.is_local_main_process,
    )  # fmt: skip
    step_settings = StepSettings(
        accumulation_steps=accumulation, max_grad_norm=training.max_grad_norm, max_steps=max_train_steps,
        skip_nonfinite_steps=training.skip_nonfinite_steps, stream=data.streaming,
    )  # fmt: skip
    keep_last, every = args.checkpoints.checkpoints_total_limit, args.checkpoints.checkpointing_steps

    def save_checkpoint():
        checkpoints.save_checkpoint(accelerator, model, output_dir, progress, keep_last, checkpoint)

    def after_step(window: list[dict], loss: float):
        progress_bar.update(1)
        progress_bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if on_event is not None:
            on_event("step", {"step": progress.completed_steps, "loss": loss})
        if isinstance(every, int) and progress.completed_steps % every == 0:
            save_checkpoint()

    try:
        for epoch in range(progress.epoch, num_epochs):
            train_transform.augmentation.epoch = epoch
            try:
                train_loss = train_one_epoch(
                    accelerator, model, train_dataloader, optimizer, lr_scheduler, progress, step_settings, after_step,
                    batch_loss=masks.loss,
                )  # fmt: skip
            except BadImageError as error:
                checkpoints.stop_at_bad_image(error, accelerator, progress, save_checkpoint)
            if data.streaming and train_dataloader.stop_reason:
                save_checkpoint()
                raise TrainingError(
                    f"Stopped at a bad training image: {train_dataloader.stop_reason}. Replace or remove it, then "
                    "continue with --resume_from_checkpoint latest, or pass --on_bad_image skip."
                )
            eval_metrics = pretraining.evaluate(accelerator, model, eval_dataloader, training.seed, config.patch_size)
            if not math.isfinite(eval_metrics["eval_loss"]):
                raise DivergedError(f"the validation loss is {eval_metrics['eval_loss']}")
            record = {
                "epoch": epoch + 1, "step": progress.completed_steps, "train_loss": train_loss,
                "learning_rate": lr_scheduler.get_last_lr()[0], **eval_metrics,
            }  # fmt: skip
            progress.finish_epoch(record)
            pretraining.save_reconstructions(
                accelerator, model, figure_images, training.seed, image_processor, output_dir, epoch + 1
            )
            logger.info(f"epoch {epoch + 1}: " + reporting.format_metrics(record, exclude=("epoch",)))
            accelerator.log(record, step=progress.completed_steps)  # to the --with_tracking tracker, if any
            if every == "epoch":
                save_checkpoint()
            if on_event is not None:
                on_event("epoch", record)
            if progress.completed_steps >= max_train_steps:
                break
    except DivergedError as error:
        raise checkpoints.divergence_error(str(error), output_dir) from None
    progress_bar.close()

    # 6. Save the encoder (the decoder is needed no more), the metrics and the curves.
    results = {name: value for name, value in progress.history[-1].items() if name != "learning_rate"}
    results.update(train_samples=num_train_samples, mask_ratio=mae.mask_ratio)
    outputs.save_model(accelerator, model, image_processor, output_dir, part="encoder")
    if accelerator.is_main_process:
        reporting.write_results(output_dir, results)
        reporting.plot_training_curves(progress.history, output_dir, loss="reconstruction loss", train="train")
    accelerator.end_training()
    return results


def parse_args(argv: list[str] | None = None) -> PretrainingArguments:
    """The arguments of `argv` (default: the command line), by group; a bad value exits with a usage error."""
    return arguments.parse_args(argv, description=__doc__.split("\n\n")[0], arguments=PretrainingArguments)


def build_masked_autoencoder(args: PretrainingArguments) -> tuple["MaskedAutoencoder", "ViTImageProcessor"]:
    """The masked autoencoder of a new encoder (the digits model, or --preset, with the config flags) or of the
    --model_name_or_path checkpoint's, and the encoder's image processor."""
    from modeling_vit_custom import ViTCustomModel
    from vit_training import pretraining
    from vit_training.mae import MaskedAutoencoder

    model = args.model
    if model.model_name_or_path is None:
        config = model.new_config(labels=[])
        encoder, image_processor = ViTCustomModel(config), vit_loading.image_processor_for(config)
    else:
        try:
            classifier, image_processor = vit_loading.load_model(
                model.model_name_or_path, revision=model.model_revision, head="new", **model.config
            )
        except (OSError, ValueError) as error:  # the message names what is wrong with the checkpoint or the flags
            raise TrainingError(f"Cannot pre-train {model.model_name_or_path}: {error}") from error
        encoder = classifier.vit
    decoder = DIGITS_DECODER if model.model_name_or_path is None and model.preset is None else PAPER_DECODER
    decoder = {name: getattr(args.mae, name) or default for name, default in decoder.items()}
    try:
        mae = MaskedAutoencoder(encoder, args.mae.mask_ratio, **decoder)
    except ValueError as error:  # a mask ratio that hides every patch, a decoder width its heads do not divide
        raise TrainingError(f"Invalid masked autoencoder: {error}") from error
    pretraining.freeze_unused(mae)
    return mae, image_processor


if __name__ == "__main__":
    try:
        main()
    except TrainingError as error:
        sys.exit(f"error: {error}")
