#!/usr/bin/env python
"""Train or fine-tune a vit-custom image classifier with Accelerate, and save a folder ready for the Hugging Face Hub.

With no arguments it trains a small ViT from scratch on the 8x8 handwritten digits that ship with scikit-learn:

    python run_finetune.py

Fine-tune a checkpoint on your own images (one sub-folder per class), here on two GPUs:

    accelerate launch --multi_gpu --num_processes 2 run_finetune.py \\
        --model_name_or_path path/to/vit-custom --ignore_mismatched_sizes \\
        --train_dir photos/train --validation_dir photos/val --output_dir outputs/my-classifier

The flags may also come from a JSON or YAML file of `{flag: value}` (`python run_finetune.py args.yaml`). Every
problem with the inputs is reported before anything is written, and a folder that holds another run's results is
never overwritten unless `--overwrite_output_dir` is given.
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()  # before the imports, which take seconds: the start-up a user waits for

import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import vit_loading
from vit_loading import shorten
from vit_training.arguments import Arguments, ModelArguments
from vit_training.arguments import parse_args as parse_arguments
from vit_training.errors import DivergedError, TrainingError

# torch, transformers, accelerate and datasets take seconds to import: `main` imports them after parsing, so that
# --help and a mistyped flag are answered at once. These names are for the annotations only.
if TYPE_CHECKING:
    from transformers import ViTImageProcessor

    from modeling_vit_custom import ViTCustomForImageClassification

logger = logging.getLogger(__name__)

TRACKER_PROJECT = "vit-custom"
# Validation images in the attention rollout figure of the output folder and model card.
ROLLOUT_IMAGES = 8
def main(argv: list[str] | None = None, on_event: Callable[[str, dict], None] | None = None) -> dict[str, float]:
    """Train, evaluate and save a model as `argv` (default: the command line) describes; returns the final metrics.

    `on_event(name, values)`, if given, observes the run: `"batch"` as each training batch of in-memory images is
    assembled (its samples' positions in the training split and its labels), `"step"` after every optimizer step
    (the step, the seconds since the process started, and the labels of each batch of the step), and `"epoch"` after
    every epoch's evaluation (the epoch's record, with the seconds it trained and the images it trained on).
    """
    args = parse_args(argv)
    import torch
    from accelerate.utils import DistributedType, TorchDynamoPlugin, gather_object, set_seed
    from datasets import DatasetDict, concatenate_datasets
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from vit_training import checkpoints, hardware, hub, loaders, outputs, reporting
    from vit_training.augment import BatchAugment, BatchNormalize, build_transforms
    from vit_training.data import load_image_dataset, number_samples
    from vit_training.images import BadImageError, verify_images
    from vit_training.ema import weight_average
    from vit_training.loop import StepSettings, flags_on_any_process, run_evaluation, train_one_epoch, warmup_steps
    from vit_training.mixing import BatchMixing
    from vit_training.param_groups import parameter_groups
    from vit_training.recipes import check_mixing, learning_rate
    from vit_training.repeated import RepeatedAugmentationSampler
    from vit_training.run_state import TrainingProgress

    data, training, recipe, output = args.data, args.training, args.recipe.settings, args.output
    output_dir = Path(output.output_dir)
    accelerator = hardware.create_accelerator(
        output_dir, training.seed, cpu=training.cpu, mixed_precision=training.mixed_precision,
        tracker=output.tracker, compile_model=training.torch_compile == "on", num_threads=training.num_threads,
    )  # fmt: skip
    set_seed(training.seed)
    if recipe["ema_decay"] is not None and accelerator.distributed_type == DistributedType.FSDP:
        raise TrainingError(
            f"--ema_decay {recipe['ema_decay']} (from --recipe {recipe['recipe']} or the flag): the weight average "
            "copies the whole model on every process, which FSDP shards. Pass --ema_decay none, or train data "
            "parallel (configs/8gpu.yaml)."
        )

    # 1. Check everything that can go wrong before anything is written.
    checkpoint = checkpoints.find_checkpoint(args.checkpoints.resume_from_checkpoint, output_dir)
    outputs.check_output_dir(output_dir, checkpoint, output.overwrite_output_dir)
    if args.model.model_name_or_path is None:
        args.model.new_config(labels=[])  # a model the flags cannot build is refused before the data is read
    columns = (data.image_column_name, data.label_column_name)
    with accelerator.main_process_first():
        if data.streaming:
            from vit_training import streaming  # only streamed runs need torchdata

            streams = streaming.load_streaming_data(
                *columns, training.seed, train=data.train_dir, validation=data.validation_dir, test=data.test_dir,
                dataset_name=data.dataset_name, dataset_config_name=data.dataset_config_name,
                max_eval_samples=data.max_eval_samples,
            )  # fmt: skip
            dataset = DatasetDict(validation=streams.validation, **({"test": streams.test} if streams.test else {}))
            labels = streams.labels
        else:
            dataset = load_image_dataset(
                dataset_name=data.dataset_name, dataset_config_name=data.dataset_config_name,
                train_dir=data.train_dir, validation_dir=data.validation_dir, test_dir=data.test_dir,
                image_column=data.image_column_name, label_column=data.label_column_name,
                validation_fraction=data.train_val_split, max_train_samples=data.max_train_samples,
                max_eval_samples=data.max_eval_samples, seed=training.seed,
            )  # fmt: skip
            labels = dataset["train"].features[data.label_column_name].names
    model, image_processor = load_model(args.model, labels)
    hub_repo_id = None
    if output.push_to_hub and accelerator.is_main_process:
        hub_repo_id = hub.create_hub_repo(
            output.hub_model_id or output_dir.name, output.hub_token, output.hub_private_repo, output.hub_revision
        )

    # 2. Data: a small dataset is decoded once into memory and augmented a batch at a time in this process; a large
    # one is decoded and augmented image by image in loader worker processes, as the loop asks for batches.
    train_transform, eval_transform = build_transforms(
        image_processor, model.config.num_channels, columns, crop_scale=data.crop_scale, flip=data.horizontal_flip,
        seed=training.seed, skip_bad_images=data.on_bad_image == "skip", auto_augment=recipe["auto_augment"],
        random_erasing=recipe["random_erasing"], crop_ratio=data.crop_ratio,
    )  # fmt: skip
    augmentation = train_transform.augmentation
    cores = hardware.cores_per_process(accelerator)
    if data.verify_images and not data.streaming:
        verify_images(dataset, data.image_column_name, cores)
    if data.streaming:
        in_memory, reason = False, "--streaming"
    else:
        plan = loaders.in_memory_plan(data.images_in_memory, dataset, train_transform, hardware.memory_budget())
        in_memory, reason = plan
    logger.info(f"Images {'decoded once into memory' if in_memory else 'decoded as the loaders need them'}: {reason}")
    batch_size = training.per_device_train_batch_size
    # DeiT's repeated augmentation: with several processes, each image of an epoch in several copies, augmented
    # differently and trained on by different processes.
    copies = recipe["repeated_augmentation"] if accelerator.num_processes > 1 and not data.streaming else 1
    threads = hardware.set_threads(training.num_threads, accelerator, cores, model.config, batch_size, checkpoint)
    if in_memory:
        splits, bad_images = loaders.load_in_memory(dataset, train_transform, eval_transform, processes=cores)
        train_dataset, eval_dataset, test_dataset = splits["train"], splits["validation"], splits.get("test")
        train_dataset.repeats = copies
        mean, std = train_transform.mean, train_transform.std
        train_collate = BatchAugment(augmentation, mean, std, len(train_dataset))
        if on_event is not None:
            train_collate = reporting_batches(train_collate, on_event)
        collates, num_workers = (train_collate, BatchNormalize(mean, std)), data.dataloader_num_workers
        if num_workers == "auto":
            # A batch's crop is one grid_sample, fast in this process. A policy's image-by-image work in one worker
            # beside the training threads measured no faster on 2 cores (benchmarks/README.md): none by default.
            num_workers = 0
        if bad_images:
            logger.warning(f"Skipping {len(bad_images)} image(s) that cannot be decoded: {shorten(bad_images)}")
    else:
        bad_images = []
        if not data.streaming:
            copies_of_train = concatenate_datasets([dataset["train"]] * copies)  # copy c: rows c * N ...
            train_dataset = loaders.lazy_split(number_samples(copies_of_train), train_transform)
        eval_dataset = loaders.lazy_split(dataset["validation"], eval_transform)
        test_dataset = loaders.lazy_split(dataset["test"], eval_transform) if "test" in dataset else None
        collates = (loaders.collate_fn, loaders.collate_fn)
        num_workers = data.dataloader_num_workers
        if num_workers == "auto":
            num_workers = hardware.default_num_workers(accelerator)
    logger.info(
        f"{num_workers} data loader worker process(es) and {torch.get_num_threads()} thread(s) per process ({threads})"
    )
    loader_options = {"num_workers": num_workers, "seed": training.seed, "device": accelerator.device}
    if data.streaming:
        # Its own loader, not prepared by Accelerate (which would split the shards a second time); it saves each
        # process's stream position in the checkpoints.
        train_dataloader = streaming.StreamLoader(
            streams.train, train_transform, *columns, labels, streams.labels_are_names, batch_size, num_workers,
            training.seed, data.shuffle_buffer_size, accelerator.process_index, accelerator.num_processes,
            accelerator.device, image_shape=(model.config.num_channels, *model.config.image_height_width),
            on_bad_image=data.on_bad_image, any_process=flags_on_any_process(accelerator), gather=gather_object,
        )  # fmt: skip
        num_train_samples = streams.num_train_samples
    else:
        num_train_samples = len(dataset["train"])
        sampler = None
        if copies > 1:
            sampler = RepeatedAugmentationSampler(
                num_train_samples, copies, accelerator.num_processes, batch_size, training.seed
            )
        train_dataloader = loaders.make_dataloader(
            train_dataset, batch_size, **loader_options, shuffle=True, collate=collates[0], sampler=sampler
        )
    eval_batch_size = training.per_device_eval_batch_size
    eval_dataloader = loaders.make_dataloader(eval_dataset, eval_batch_size, **loader_options, collate=collates[1])
    test_dataloader = None
    if test_dataset is not None:  # read once: its workers need not outlive it
        test_dataloader = loaders.make_dataloader(
            test_dataset, eval_batch_size, **loader_options, persistent_workers=False, collate=collates[1]
        )

    # 3. Optimisation: AdamW, warmup then decay, everything placed on the devices by Accelerate.
    accumulation = training.gradient_accumulation_steps
    training.learning_rate = learning_rate(recipe, batch_size * accumulation * accelerator.num_processes)
    recipe["learning_rate"] = training.learning_rate  # reported as resolved
    check_mixing(recipe, model.config.problem_type or "single_label_classification")
    mixing = BatchMixing(
        len(labels), recipe["mixup_alpha"], recipe["cutmix_alpha"], recipe["mix_prob"], recipe["mix_switch_prob"],
        training.seed,
    )
    if data.streaming:
        # An epoch is a pass over all shards. Its steps depend on which process reads which shards, so the schedule
        # spans the most they can take (from the counted shards); the last pass ends it, or --max_train_steps does.
        if training.max_train_steps is None and streams.shard_sizes is None:
            raise TrainingError("A streamed Hub dataset's size is not counted in advance: pass --max_train_steps.")
        max_train_steps = training.max_train_steps or training.num_train_epochs * streams.max_steps_per_epoch(
            accelerator.num_processes, num_workers, batch_size, accumulation
        )
        num_epochs = sys.maxsize if training.max_train_steps else training.num_train_epochs
    else:
        # Each process gets as many batches, the last ones filled up with repeated images (Accelerate's even_batches).
        epoch_images = len(sampler) if sampler is not None else len(train_dataset)
        batches = math.ceil(epoch_images / (batch_size * accelerator.num_processes))
        steps_per_epoch = math.ceil(batches / accumulation)
        max_train_steps = training.max_train_steps or training.num_train_epochs * steps_per_epoch
        num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    compiled, compile_reason = hardware.plan_compile(
        training.torch_compile, model, batch_size, max_train_steps, accelerator.device, checkpoint
    )
    logger.info(f"torch.compile {'on' if compiled else 'off'}: {compile_reason}")
    if compiled and training.torch_compile == "auto":
        accelerator.state.dynamo_plugin = TorchDynamoPlugin(backend="inductor")
    # The fused kernel updates all parameters in one call (benchmarks/README.md has the gain).
    optimizer = torch.optim.AdamW(
        parameter_groups(model, training.weight_decay, training.learning_rate, recipe["layer_decay"]), fused=True
    )
    if data.streaming:
        model, optimizer, eval_dataloader = accelerator.prepare(model, optimizer, eval_dataloader)
    else:
        model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
            model, optimizer, train_dataloader, eval_dataloader
        )
    if test_dataloader is not None:
        test_dataloader = accelerator.prepare(test_dataloader)
    warmup = warmup_steps(training.warmup_steps, max_train_steps)
    schedule = get_scheduler(
        training.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=max_train_steps
    )
    lr_scheduler = accelerator.prepare(schedule)
    # The average of the weights, evaluated and saved in their place.
    ema = None
    if recipe["ema_decay"] is not None:
        ema = weight_average(accelerator.unwrap_model(model, keep_torch_compile=False), recipe["ema_decay"])
    evaluated = ema.module if ema is not None else model

    # 4. Pick up where a previous run stopped, or start a new one.
    settings = {**args.resumed_settings(), "processes": accelerator.num_processes, "training images": num_train_samples}
    progress = TrainingProgress(
        settings=settings, planned_steps=max_train_steps, compiled=compiled, threads=torch.get_num_threads()
    )
    accelerator.register_for_checkpointing(progress)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    if data.streaming:
        accelerator.register_for_checkpointing(train_dataloader)
    if checkpoint is not None:
        checkpoints.load_checkpoint(accelerator, checkpoint, progress)
        progress.threads = torch.get_num_threads()
    outputs.prepare_output_dir(output_dir, checkpoint, output.overwrite_output_dir, accelerator)
    if output.with_tracking:
        accelerator.init_trackers(TRACKER_PROJECT, reporting.tracker_config(args.flat()))
    logger.info(
        f"Training on {num_train_samples or 'a stream of'} images for "
        f"{num_epochs if num_epochs < sys.maxsize else 'as many'} epochs ({max_train_steps} optimizer steps of "
        f"{batch_size * accelerator.num_processes * accumulation} images: {batch_size} per device x "
        f"{accelerator.num_processes} processes x {accumulation} accumulated), writing to {output_dir}"
    )
    if checkpoint is not None:
        logger.info(f"Continuing at epoch {progress.epoch + 1}, step {progress.completed_steps}")

    # 5. Train, evaluating after every epoch.
    start_time = time.perf_counter()
    progress_bar = tqdm(
        total=max_train_steps, initial=progress.completed_steps, desc="training",
        disable=not accelerator.is_local_main_process,
    )  # fmt: skip
    step_settings = StepSettings(
        accumulation_steps=accumulation, label_smoothing=training.label_smoothing,
        max_grad_norm=training.max_grad_norm, skip_nonfinite_steps=training.skip_nonfinite_steps,
        max_steps=max_train_steps, stream=data.streaming, mixing=mixing if mixing.active else None, ema=ema,
    )  # fmt: skip
    keep_last, every = args.checkpoints.checkpoints_total_limit, args.checkpoints.checkpointing_steps
    training_seconds, trained_images = 0.0, 0  # the training epochs of this run, without evaluation
    first_step_seconds = None

    def save_checkpoint():
        checkpoints.save_checkpoint(accelerator, model, output_dir, progress, keep_last, checkpoint)

    def after_step(window: list[dict], loss: float):
        nonlocal first_step_seconds
        progress_bar.update(1)
        progress_bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        seconds = time.perf_counter() - PROCESS_START
        first_step_seconds = first_step_seconds or seconds
        if on_event is not None:
            step_labels = [batch["labels"].tolist() for batch in window]
            on_event("step", {"step": progress.completed_steps, "seconds": seconds, "labels": step_labels})
        if isinstance(every, int) and progress.completed_steps % every == 0:
            save_checkpoint()

    try:
        for epoch in range(progress.epoch, num_epochs):
            augmentation.epoch = epoch  # seeds this epoch's augmentations
            epoch_start, images_before = time.perf_counter(), progress.samples_seen
            try:
                train_loss = train_one_epoch(
                    accelerator, model, train_dataloader, optimizer, lr_scheduler, progress, step_settings, after_step
                )
            except BadImageError as error:
                checkpoints.stop_at_bad_image(error, accelerator, progress, save_checkpoint)
            epoch_seconds = time.perf_counter() - epoch_start
            epoch_images = (progress.samples_seen - images_before) * accelerator.num_processes
            training_seconds, trained_images = training_seconds + epoch_seconds, trained_images + epoch_images
            if data.streaming and train_dataloader.stop_reason:  # a bad image, with --on_bad_image stop
                save_checkpoint()
                raise TrainingError(
                    f"Stopped at a bad training image: {train_dataloader.stop_reason}. The images trained on so far "
                    f"are saved in {output_dir}/checkpoint-{progress.completed_steps}. Replace or remove the image, "
                    "then continue with --resume_from_checkpoint latest (the run goes on after it); add "
                    "--on_bad_image skip to skip bad images without stopping."
                )
            eval_metrics = run_evaluation(accelerator, evaluated, eval_dataloader, prefix="eval")
            if not math.isfinite(eval_metrics["eval_loss"]):  # weights so large that the logits overflow
                raise DivergedError(
                    f"the validation loss is {eval_metrics['eval_loss']} after step {progress.completed_steps}"
                )
            record = {
                "epoch": epoch + 1,
                "step": progress.completed_steps,
                "train_loss": train_loss,
                "learning_rate": lr_scheduler.get_last_lr()[0],
                **eval_metrics,
            }
            if data.on_bad_image == "skip":
                skipped = torch.tensor(progress.skipped_images, device=accelerator.device)
                record["skipped_images"] = len(bad_images) + int(accelerator.reduce(skipped, "sum"))
            progress.finish_epoch(record)
            if on_event is not None:
                on_event("epoch", {**record, "train_seconds": epoch_seconds, "train_images": epoch_images})
            of_epochs = f"/{num_epochs}" if num_epochs < sys.maxsize else ""  # a stream bound by --max_train_steps
            logger.info(f"epoch {epoch + 1}{of_epochs}: " + reporting.format_metrics(record, exclude=("epoch",)))
            if output.with_tracking:
                accelerator.log(record, step=progress.completed_steps)
            if every == "epoch":
                save_checkpoint()
            if progress.completed_steps >= max_train_steps:
                break
    except DivergedError as error:
        raise checkpoints.divergence_error(str(error), output_dir) from None
    progress_bar.close()
    train_runtime = time.perf_counter() - start_time

    # 6. Score the final model on the held-out test images, and save everything a user of the model needs.
    results = {k: v for k, v in progress.history[-1].items() if k not in ("step", "learning_rate")}
    if test_dataloader is not None:
        results.update(run_evaluation(accelerator, evaluated, test_dataloader, prefix="test"))
        test_metrics = {k: v for k, v in results.items() if k.startswith("test_")}
        logger.info("test: " + reporting.format_metrics(test_metrics))
    results.update(
        train_samples=num_train_samples, train_runtime=round(train_runtime, 2), torch_compile=compiled,
        train_threads=torch.get_num_threads(),
    )
    if data.streaming:
        results["skipped_images"] = train_dataloader.total_skipped_images()
    # Images (on all processes) per second of the training epochs: what the data loading and the loop let the model
    # reach. Not transformers.Trainer's train_samples_per_second, whose time includes the evaluations.
    results["train_loop_samples_per_second"] = round(trained_images / training_seconds, 1) if trained_images else None
    # From the start of the process (imports included) to the end of this run's first optimizer step.
    results["seconds_to_first_step"] = round(first_step_seconds, 2) if first_step_seconds else None
    if training.skip_nonfinite_steps:
        results["train_skipped_nonfinite_steps"] = progress.skipped_steps
    if progress.schedule_changes:
        results["schedule_recomputed"] = progress.schedule_changes
    results["recipe"] = recipe
    outputs.save_model(accelerator, evaluated, image_processor, output_dir)
    if accelerator.is_main_process:
        config = accelerator.unwrap_model(model).config
        facts = card_facts(args, results)
        reporting.write_results(output_dir, results)
        reporting.plot_training_curves(progress.history, output_dir)
        first_images = next(iter(DataLoader(eval_dataset, batch_size=ROLLOUT_IMAGES, collate_fn=collates[1])))
        reporting.plot_attention_rollout(output_dir, first_images, image_processor)
        reporting.write_model_card(output_dir, config, results, facts, hub_repo_id)
        if hub_repo_id is not None:
            hub.push_to_hub(
                output_dir, hub_repo_id,
                lambda commit: reporting.write_model_card(output_dir, config, results, facts, hub_repo_id, commit),
                token=output.hub_token, branch=output.hub_revision,
            )  # fmt: skip
    accelerator.end_training()
    return results


def parse_args(argv: list[str] | None = None) -> Arguments:
    """The arguments of `argv` (default: the command line), by group; a bad value exits with a usage error."""
    return parse_arguments(argv, description=__doc__.split("\n\n")[0])


def reporting_batches(collate: Callable[[dict], dict], on_event: Callable[[str, dict], None]):
    """`collate`, telling `on_event("batch", ...)` the samples and labels of each in-memory batch it assembles (in the
    process that collates: the training process with --dataloader_num_workers 0)."""

    def collate_and_report(batch: dict) -> dict:
        on_event("batch", {"samples": batch["indices"].tolist(), "labels": batch["labels"].tolist()})
        return collate(batch)

    return collate_and_report


def card_facts(args: Arguments, results: dict):
    """What the model card says about the run: its data, its starting point and its hyperparameters."""
    from vit_training.data import describe_dataset
    from vit_training.reporting import CardFacts

    data, training, recipe = args.data, args.training, args.recipe.settings
    (low, high), (narrowest, widest) = data.crop_scale, data.crop_ratio
    crop = [] if low == high == narrowest == widest == 1 else [
        f"random resized crop (scale {low}-{high}, aspect ratio {narrowest:.3g}-{widest:.3g})"
    ]  # fmt: skip
    augmentation = crop + (["horizontal flip"] if data.horizontal_flip else [])
    if recipe["auto_augment"] != "none":
        augmentation.append(recipe["auto_augment"])
    if recipe["random_erasing"]:
        augmentation.append(f"random erasing {recipe['random_erasing']}")
    if recipe["mix_prob"] and (recipe["mixup_alpha"] or recipe["cutmix_alpha"]):
        augmentation.append(f"Mixup {recipe['mixup_alpha']} / CutMix {recipe['cutmix_alpha']} (p {recipe['mix_prob']})")
    hyperparameters = {
        "recipe": f"{recipe['recipe']} (every setting: `recipe` in all_results.json)",
        "epochs": results.get("epoch"),
        "batch size per device": training.per_device_train_batch_size,
        "gradient accumulation": training.gradient_accumulation_steps,
        "optimizer": f"AdamW, learning rate {training.learning_rate:.4g}, weight decay {training.weight_decay}"
        + (f", layer decay {recipe['layer_decay']}" if recipe["layer_decay"] else ""),
        "schedule": f"{training.lr_scheduler_type}, warmup {training.warmup_steps}",
        "label smoothing": training.label_smoothing,
        "augmentation": ", ".join(augmentation) or "none",
        "weights": f"EMA, decay {recipe['ema_decay']}" if recipe["ema_decay"] else "the last step's",
        "seed": training.seed,
        "training images": results.get("train_samples"),
    }
    return CardFacts(
        dataset=describe_dataset(data.dataset_name, data.train_dir),
        hyperparameters=hyperparameters,
        license=args.output.license,
        base_model=args.model.model_name_or_path,
        base_revision=args.model.model_revision,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Model


def load_model(model: ModelArguments, labels: list[str]) -> tuple[ViTCustomForImageClassification, ViTImageProcessor]:
    """A model for `labels` with its image processor: a checkpoint adapted to the data, or a new model."""
    if model.model_name_or_path is None:
        return vit_loading.new_model(model.new_config(labels))
    try:
        return vit_loading.load_model(
            model.model_name_or_path,
            revision=model.model_revision,
            labels=labels,
            head="new" if model.ignore_mismatched_sizes else "check",
            **model.config,
        )
    except (OSError, ValueError) as error:  # the message names what is wrong with the checkpoint or the flags
        raise TrainingError(f"Cannot fine-tune {model.model_name_or_path}: {error}") from error


if __name__ == "__main__":
    try:
        main()
    except TrainingError as error:
        sys.exit(f"error: {error}")
