#!/usr/bin/env python
"""Train or fine-tune a vit-custom image classifier with Accelerate, and save a folder ready for the Hugging Face Hub.

With no arguments it trains a small ViT from scratch on the 8x8 handwritten digits that ship with scikit-learn:

    python run_finetune.py

Fine-tune a checkpoint on your own images (one sub-folder per class), here on two GPUs:

    accelerate launch --multi_gpu --num_processes 2 run_finetune.py \\
        --model_name_or_path path/to/vit-custom --ignore_mismatched_sizes \\
        --train_dir photos/train --validation_dir photos/val --output_dir outputs/my-classifier

Every problem with the inputs is reported before anything is written, and a folder that holds another run's results
is never overwritten unless `--overwrite_output_dir` is given.
"""

from __future__ import annotations

import time

PROCESS_START = time.perf_counter()  # before the imports, which take seconds: the start-up a user waits for

import argparse
import contextlib
import json
import logging
import math
import os
import pickle
import re
import shutil
import sys
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

# torch, transformers, accelerate and datasets take seconds to import: each function imports what it uses, so that
# --help and a mistyped flag are answered at once. These names are for the annotations only.
if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from torch import nn
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import ViTImageProcessor

    from configuration_vit_custom import ViTCustomConfig
    from image_data import BadImageError
    from modeling_vit_custom import ViTCustomForImageClassification

import convert_checkpoint
from convert_checkpoint import shorten, unwritable_folder_reason
from finetune_errors import FinetuneError

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent
# `evaluate.load("accuracy")` fetches its script from the Hub; this copy loads offline.
METRIC_PATH = REPO_ROOT / "metrics" / "accuracy"
CHECKPOINT_PATTERN = re.compile(r"checkpoint-(\d+)")
# What a run writes into its output folder besides checkpoints; --overwrite_output_dir deletes these, and only these.
RUN_OUTPUTS = (
    "config.json",
    "model.safetensors",
    "configuration_vit_custom.py",
    "modeling_vit_custom.py",
    "preprocessor_config.json",
    "README.md",
    "all_results.json",
    "training_curves.png",
    "attention_rollout.png",
    "runs",
    "tmp",
)
TRACKER_PROJECT = "vit-custom"
# Multiply-adds of one MLP layer on a batch (batch x tokens x width x MLP width) below which a second thread costs more
# than it saves on the CPU (benchmarks/benchmark_fashion_mnist.py measures both sides of it).
MIN_WORK_PER_THREAD = 2**25
# --torch_compile auto tries compiling only when steps this much faster (about the best measured, on small models)
# would save this many seconds over the run: trying costs a compilation, 5-30 s.
BEST_COMPILE_SPEEDUP = 1.5
MIN_COMPILE_SECONDS = 30
# The names of configuration_vit_custom.PRESETS and of Accelerate's trackers (accelerate.utils.LoggerType), written out
# because importing either takes seconds; tests check that they agree.
PRESET_NAMES = ("tiny", "small", "base", "large", "huge")
TRACKERS = ("all", "aim", "tensorboard", "wandb", "trackio", "comet_ml", "mlflow", "clearml", "dvclive", "swanlab")

# Flags that mean something only beside another flag: alone they would be ignored.
FLAG_NEEDS = {
    "dataset_config_name": "dataset_name",
    "model_revision": "model_name_or_path",
    "ignore_mismatched_sizes": "model_name_or_path",
    "report_to": "with_tracking",
    "hub_model_id": "push_to_hub",
    "hub_token": "push_to_hub",
    "hub_revision": "push_to_hub",
    "hub_private_repo": "push_to_hub",
}
# The flags a resumed run must repeat: a checkpoint's place in the data and its optimizer and learning-rate state
# count in the steps, images and values of the run that wrote it.
RESUMED_FLAGS = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    "learning_rate",
    "weight_decay",
    "lr_scheduler_type",
    "warmup_steps",
)
# Validation images in the attention rollout figure of the output folder and model card.
ROLLOUT_IMAGES = 8

# The model trained when neither --model_name_or_path nor --preset is given: a 4-block ViT for the 8x8 digits, which
# are upscaled to 16 px and cut into 4x4 patches (16 tokens, each covering 2x2 original pixels).
DIGITS_MODEL = {
    "image_size": 16,
    "patch_size": 4,
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 128,
    "pooling": "mean",
}

# Flags that set fields of the model's config. A checkpoint accepts only a new image_size (its position embeddings are
# resampled) and the regularisation ones; the converter refuses the others, which its weights fix.
CONFIG_FLAGS = (
    "image_size",
    "patch_size",
    "num_channels",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "pooling",
    "use_cls_token",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "drop_path_rate",
)


def main(argv: list[str] | None = None, on_event: Callable[[str, dict], None] | None = None) -> dict[str, float]:
    """Train, evaluate and save a model as `argv` (default: the command line) describes; returns the final metrics.

    `on_event(name, values)`, if given, is called after every optimizer step (`"step"`: the step, the seconds since
    the process started, and for each batch of the step its labels and its samples' indices in the training split,
    which a stream lacks) and after every epoch's evaluation (`"epoch"`: the epoch's record, with the seconds it
    trained and the images it trained on): a seam for benchmarks and tests to observe the run.
    """
    args = parse_args(argv)
    import torch
    from accelerate.utils import TorchDynamoPlugin, gather_object, set_seed
    from datasets import DatasetDict
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from finetune_utils import (
        SAMPLE_INDEX,
        build_transforms,
        collate_fn,
        cores_per_process,
        create_hub_repo,
        default_num_workers,
        in_memory_plan,
        lazy_split,
        load_image_dataset,
        load_in_memory,
        make_dataloader,
        memory_budget,
        number_samples,
        plot_training_curves,
        push_to_hub,
        write_model_card,
    )
    from image_data import BadImageError, BatchAugment, BatchNormalize

    accelerator = create_accelerator(args)
    set_seed(args.seed)

    # 1. Check everything that can go wrong before anything is written.
    output_dir = Path(args.output_dir)
    checkpoint = find_checkpoint(args.resume_from_checkpoint, output_dir)
    check_output_dir(output_dir, checkpoint, args)
    if args.model_name_or_path is None:
        new_model_config(args, labels=[])  # a model the flags cannot build is refused before the data is read
    with accelerator.main_process_first():
        if args.streaming:
            import streaming_data  # only streamed runs need torchdata

            streams = streaming_data.load_streaming_data(
                args.image_column_name, args.label_column_name, args.seed, train=args.train_dir,
                validation=args.validation_dir, test=args.test_dir, dataset_name=args.dataset_name,
                dataset_config_name=args.dataset_config_name, max_eval_samples=args.max_eval_samples,
            )  # fmt: skip
            dataset = DatasetDict(validation=streams.validation, **({"test": streams.test} if streams.test else {}))
            labels = streams.labels
        else:
            dataset = load_image_dataset(args)
            labels = dataset["train"].features[args.label_column_name].names
    model, image_processor = load_model(args, labels)
    hub_repo_id = create_hub_repo(args, output_dir) if args.push_to_hub and accelerator.is_main_process else None

    # 2. Data: a small dataset is decoded once into memory and augmented a batch at a time in this process; a large
    # one is decoded and augmented image by image in loader worker processes, as the loop asks for batches.
    train_transform, eval_transform = build_transforms(image_processor, model.config.num_channels, args)
    cores = cores_per_process(accelerator)
    if args.verify_images and not args.streaming:
        check_images(dataset, args.image_column_name, cores)
    if args.streaming:
        in_memory, reason = False, "--streaming"
    else:
        in_memory, reason = in_memory_plan(args.images_in_memory, dataset, train_transform, memory_budget())
    logger.info(f"Images {'decoded once into memory' if in_memory else 'decoded as the loaders need them'}: {reason}")
    set_threads(args.num_threads, accelerator, cores, model.config, args.per_device_train_batch_size)
    if in_memory:
        splits, bad_images = load_in_memory(dataset, train_transform, eval_transform, processes=cores)
        train_dataset, eval_dataset, test_dataset = splits["train"], splits["validation"], splits.get("test")
        mean, std = train_transform.image_mean, train_transform.image_std
        train_transform = BatchAugment(
            train_transform.output_size, train_transform.crop_scale, train_transform.flip, mean, std,
            len(train_dataset), args.seed,
        )  # fmt: skip
        collates, num_workers = (train_transform, BatchNormalize(mean, std)), 0
        if bad_images:
            logger.warning(f"Skipping {len(bad_images)} image(s) that cannot be decoded: {shorten(bad_images)}")
    else:
        bad_images = []
        if not args.streaming:
            train_dataset = lazy_split(number_samples(dataset["train"]), train_transform)
        eval_dataset = lazy_split(dataset["validation"], eval_transform)
        test_dataset = lazy_split(dataset["test"], eval_transform) if "test" in dataset else None
        collates = (collate_fn, collate_fn)
        num_workers = args.dataloader_num_workers
        if num_workers == "auto":
            num_workers = default_num_workers(accelerator)
    logger.info(f"{num_workers} data loader worker process(es) and {torch.get_num_threads()} thread(s) per process")
    loader_options = {"num_workers": num_workers, "seed": args.seed, "device": accelerator.device}
    if args.streaming:
        # Its own loader, not prepared by Accelerate (which would split the shards a second time); it saves each
        # process's stream position in the checkpoints.
        train_dataloader = streaming_data.StreamLoader(
            streams.train, train_transform, args.image_column_name, args.label_column_name, labels,
            streams.labels_are_names, args.per_device_train_batch_size, num_workers, args.seed,
            args.shuffle_buffer_size, accelerator.process_index, accelerator.num_processes, accelerator.device,
            image_shape=(model.config.num_channels, *model.config.image_height_width),
            on_bad_image=args.on_bad_image, any_process=flags_on_any_process(accelerator), gather=gather_object,
        )  # fmt: skip
        num_train_samples = streams.num_train_samples
    else:
        train_dataloader = make_dataloader(
            train_dataset, args.per_device_train_batch_size, **loader_options, shuffle=True, collate=collates[0]
        )
        num_train_samples = len(dataset["train"])
    eval_dataloader = make_dataloader(
        eval_dataset, args.per_device_eval_batch_size, **loader_options, collate=collates[1]
    )
    test_dataloader = None
    if test_dataset is not None:  # read once: its workers need not outlive it
        test_dataloader = make_dataloader(
            test_dataset, args.per_device_eval_batch_size, **loader_options, persistent_workers=False,
            collate=collates[1],
        )  # fmt: skip

    # 3. Optimisation: AdamW, warmup then decay, everything placed on the devices by Accelerate.
    if args.streaming:
        # An epoch is a pass over all shards. Its steps depend on which process reads which shards, so the schedule
        # spans the most they can take (from the counted shards); the last pass ends it, or --max_train_steps does.
        if args.max_train_steps is None and streams.shard_sizes is None:
            raise FinetuneError("A streamed Hub dataset's size is not counted in advance: pass --max_train_steps.")
        max_train_steps = args.max_train_steps or args.num_train_epochs * streams.max_steps_per_epoch(
            accelerator.num_processes, num_workers, args.per_device_train_batch_size, args.gradient_accumulation_steps
        )
        num_epochs = sys.maxsize if args.max_train_steps else args.num_train_epochs
    else:
        # Each process gets as many batches, the last ones filled up with repeated images (Accelerate's even_batches).
        batches = math.ceil(len(train_dataset) / (args.per_device_train_batch_size * accelerator.num_processes))
        steps_per_epoch = math.ceil(batches / args.gradient_accumulation_steps)
        max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
        num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    compiled, compile_reason = plan_compile(
        args.torch_compile, model, args.per_device_train_batch_size, max_train_steps, accelerator.device, checkpoint
    )
    logger.info(f"torch.compile {'on' if compiled else 'off'}: {compile_reason}")
    if compiled and args.torch_compile == "auto":
        accelerator.state.dynamo_plugin = TorchDynamoPlugin(backend="inductor")
    # The fused kernel updates all parameters in one call: about 10% faster steps for small models.
    optimizer = torch.optim.AdamW(parameter_groups(model, args.weight_decay), lr=args.learning_rate, fused=True)
    if args.streaming:
        model, optimizer, eval_dataloader = accelerator.prepare(model, optimizer, eval_dataloader)
    else:
        model, optimizer, train_dataloader, eval_dataloader = accelerator.prepare(
            model, optimizer, train_dataloader, eval_dataloader
        )
    if test_dataloader is not None:
        test_dataloader = accelerator.prepare(test_dataloader)
    lr_scheduler = accelerator.prepare(
        get_scheduler(
            args.lr_scheduler_type,
            optimizer,
            num_warmup_steps=warmup_steps(args.warmup_steps, max_train_steps),
            num_training_steps=max_train_steps,
        )
    )

    # 4. Pick up where a previous run stopped, or start a new one.
    settings = resumed_settings(args, accelerator.num_processes, num_train_samples)
    progress = TrainingProgress(settings=settings, planned_steps=max_train_steps, compiled=compiled)
    accelerator.register_for_checkpointing(progress)
    if args.streaming:
        accelerator.register_for_checkpointing(train_dataloader)
    if checkpoint is not None:
        load_checkpoint(accelerator, checkpoint, progress)
    prepare_output_dir(output_dir, checkpoint, args, accelerator)
    if args.with_tracking:
        accelerator.init_trackers(TRACKER_PROJECT, tracker_config(args))
    log_training_plan(args, accelerator, num_train_samples, num_epochs, max_train_steps, checkpoint, progress)

    # 5. Train, evaluating after every epoch.
    start_time = time.perf_counter()
    progress_bar = tqdm(
        total=max_train_steps,
        initial=progress.completed_steps,
        desc="training",
        disable=not accelerator.is_local_main_process,
    )
    training_seconds, trained_images = 0.0, 0  # the training epochs of this run, without evaluation
    first_step_seconds = None

    def after_step(window: list[dict]):
        nonlocal first_step_seconds
        seconds = time.perf_counter() - PROCESS_START
        first_step_seconds = first_step_seconds or seconds
        if on_event is not None:
            samples = [batch[SAMPLE_INDEX].tolist() for batch in window if SAMPLE_INDEX in batch]
            labels = [batch["labels"].tolist() for batch in window]
            step = progress.completed_steps
            on_event("step", {"step": step, "seconds": seconds, "samples": samples, "labels": labels})

    for epoch in range(progress.epoch, num_epochs):
        train_transform.epoch = epoch  # seeds this epoch's augmentations
        epoch_start, images_before = time.perf_counter(), progress.samples_seen
        try:
            train_loss = train_one_epoch(
                args, accelerator, model, train_dataloader, optimizer, lr_scheduler, progress, progress_bar,
                max_train_steps, output_dir, checkpoint, after_step,
            )  # fmt: skip
        except BadImageError as error:
            stop_at_bad_image(
                error, accelerator, model, output_dir, progress, args.checkpoints_total_limit, checkpoint
            )
        epoch_seconds = time.perf_counter() - epoch_start
        epoch_images = (progress.samples_seen - images_before) * accelerator.num_processes
        training_seconds, trained_images = training_seconds + epoch_seconds, trained_images + epoch_images
        if args.streaming and train_dataloader.stop_reason:  # a bad image, with --on_bad_image stop
            save_checkpoint(accelerator, model, output_dir, progress, args.checkpoints_total_limit, checkpoint)
            raise FinetuneError(
                f"Stopped at a bad training image: {train_dataloader.stop_reason}. The images trained on so far are "
                f"saved in {output_dir}/checkpoint-{progress.completed_steps}. Replace or remove the image, then "
                "continue with --resume_from_checkpoint latest (the run goes on after it); add --on_bad_image skip to "
                "skip bad images without stopping."
            )
        eval_metrics = run_evaluation(accelerator, model, eval_dataloader, prefix="eval")
        if not math.isfinite(eval_metrics["eval_loss"]):  # weights so large that the logits overflow
            what = f"the validation loss is {eval_metrics['eval_loss']} after step {progress.completed_steps}"
            raise divergence_error(what, output_dir)
        record = {
            "epoch": epoch + 1,
            "step": progress.completed_steps,
            "train_loss": train_loss,
            "learning_rate": lr_scheduler.get_last_lr()[0],
            **eval_metrics,
        }
        if args.on_bad_image == "skip":
            skipped = torch.tensor(progress.skipped_images, device=accelerator.device)
            record["skipped_images"] = len(bad_images) + int(accelerator.reduce(skipped, "sum"))
        progress.finish_epoch(record)
        if on_event is not None:
            on_event("epoch", {**record, "train_seconds": epoch_seconds, "train_images": epoch_images})
        of_epochs = f"/{num_epochs}" if num_epochs < sys.maxsize else ""  # a stream bound by --max_train_steps
        logger.info(f"epoch {epoch + 1}{of_epochs}: " + format_metrics(record, exclude=("epoch",)))
        if args.with_tracking:
            accelerator.log(record, step=progress.completed_steps)
        if args.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, model, output_dir, progress, args.checkpoints_total_limit, checkpoint)
        if progress.completed_steps >= max_train_steps:
            break
    progress_bar.close()
    train_runtime = time.perf_counter() - start_time

    # 6. Score the final model on the held-out test images, and save everything a user of the model needs.
    results = {k: v for k, v in progress.history[-1].items() if k not in ("step", "learning_rate")}
    if test_dataloader is not None:
        results.update(run_evaluation(accelerator, model, test_dataloader, prefix="test"))
        logger.info("test: " + format_metrics({k: v for k, v in results.items() if k.startswith("test_")}))
    results.update(train_samples=num_train_samples, train_runtime=round(train_runtime, 2), torch_compile=compiled)
    if args.streaming:
        results["skipped_images"] = train_dataloader.total_skipped_images()
    # Images (on all processes) per second of the training epochs: what the data loading and the loop let the model
    # reach. Not transformers.Trainer's train_samples_per_second, whose time includes the evaluations.
    results["train_loop_samples_per_second"] = round(trained_images / training_seconds, 1) if trained_images else None
    # From the start of the process (imports included) to the end of this run's first optimizer step.
    results["seconds_to_first_step"] = round(first_step_seconds, 2) if first_step_seconds else None
    if args.skip_nonfinite_steps:
        results["train_skipped_nonfinite_steps"] = progress.skipped_steps
    if progress.schedule_changes:
        results["schedule_recomputed"] = progress.schedule_changes
    save_model(accelerator, model, image_processor, output_dir)
    if accelerator.is_main_process:
        (output_dir / "all_results.json").write_text(json.dumps(results, indent=2) + "\n")
        plot_training_curves(progress.history, output_dir / "training_curves.png")
        first_images = next(iter(DataLoader(eval_dataset, batch_size=ROLLOUT_IMAGES, collate_fn=collates[1])))
        plot_attention_rollout(output_dir, first_images, image_processor)
        write_model_card(output_dir, args, accelerator.unwrap_model(model).config, results, hub_repo_id)
        if hub_repo_id is not None:
            push_to_hub(output_dir, hub_repo_id, args, accelerator.unwrap_model(model).config, results)
    accelerator.end_training()
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    data = parser.add_argument_group("data (default: the scikit-learn digits, split 80/20 into train and test)")
    data.add_argument("--dataset_name", help="A dataset on the Hugging Face Hub, e.g. `uoft-cs/cifar10`.")
    data.add_argument("--dataset_config_name", help="The configuration of --dataset_name, if it has several.")
    data.add_argument(
        "--train_dir",
        type=Path,
        help="A folder of training images, one sub-folder per class (`train_dir/<label>/<image>`), read with "
        "`datasets`' imagefolder.",
    )
    data.add_argument("--validation_dir", type=Path, help="A folder of validation images, laid out as --train_dir.")
    data.add_argument("--test_dir", type=Path, help="A folder of test images, laid out as --train_dir.")
    data.add_argument("--image_column_name", default="image", help="The dataset column that holds the images.")
    data.add_argument("--label_column_name", default="label", help="The dataset column that holds the classes.")
    data.add_argument(
        "--train_val_split",
        type=split_fraction,
        default=0.1,
        help="Fraction of the training images held out for validation when the data has no validation split.",
    )
    data.add_argument("--max_train_samples", type=positive_int, help="Train on at most this many images.")
    data.add_argument(
        "--max_eval_samples", type=positive_int, help="Evaluate (validation and test) on at most this many images."
    )
    data.add_argument(
        "--crop_scale",
        type=fraction,
        nargs=2,
        default=(0.85, 1.0),
        metavar=("MIN", "MAX"),
        help="Area range of the random resized crop of training images, as fractions of the image. The default is "
        "mild: it suits fine-tuning and keeps the strokes of 8x8 digits.",
    )
    data.add_argument(
        "--horizontal_flip",
        action=argparse.BooleanOptionalAction,
        help="Mirror training images at random. Default: on, except for the digits, which a mirror turns into "
        "other symbols.",
    )
    data.add_argument(
        "--streaming",
        action="store_true",
        help="Stream the training images instead of loading them, for data that does not fit in memory or on disk: "
        "--train_dir is then a folder (or a glob) of Parquet files or WebDataset tar shards, or --dataset_name a Hub "
        "dataset read shard by shard. The validation (required) and test splits are read as usual. Epochs are "
        "passes over all shards; resuming continues each process's stream where it stopped.",
    )
    data.add_argument(
        "--shuffle_buffer_size",
        type=positive_int,
        default=1000,
        help="With --streaming: images that each loader worker reads ahead and shuffles together (kept encoded in "
        "memory); the order of the shards is shuffled every epoch too.",
    )
    data.add_argument(
        "--images_in_memory",
        choices=("auto", "on", "off"),
        default="auto",
        help="Decode every image once into memory as uint8 tensors and augment whole batches with tensor operations "
        "in the training process (no loader workers). `auto`: when the training images share one size, at most "
        "twice the model's input, and all splits fit in a quarter of the free memory. Otherwise images are decoded "
        "and augmented one by one in loader worker processes, every epoch.",
    )
    data.add_argument(
        "--verify_images",
        action="store_true",
        help="Decode every image before training (in parallel) and stop with the list of files that fail. Without "
        "it, a bad file is met when it is first loaded; see --on_bad_image.",
    )
    data.add_argument(
        "--on_bad_image",
        choices=("stop", "skip"),
        default="stop",
        help="An image that cannot be decoded (or, in a stream, has an unknown class): `stop` names it and stops, "
        "after saving a checkpoint of the steps done (unless several processes load images themselves); `skip` "
        "leaves it out and counts it (`skipped_images` in all_results.json).",
    )
    data.add_argument(
        "--dataloader_num_workers",
        type=worker_count,
        default="auto",
        help="Worker processes per training process that decode and augment images while the model trains, when "
        "they are not held in memory; 0 loads them in the training process. `auto`: on the CPU one per 4 cores (at "
        "least one), beside a GPU every core but one, at most 4.",
    )

    model = parser.add_argument_group("model (default: a 4-block ViT for the 8x8 digits, trained from scratch)")
    model.add_argument(
        "--model_name_or_path",
        help="A checkpoint to fine-tune: a vit_custom, transformers ViT or timm folder, or a Hub repo (read by "
        "convert_checkpoint.py). Without it, a new model is trained from scratch.",
    )
    model.add_argument(
        "--model_revision",
        help="Branch, tag or commit of a Hub repo --model_name_or_path (default: main); a commit sha pins the weights.",
    )
    model.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        help="Size of a new model (ViT/DeiT sizes); the flags below override single values.",
    )
    model.add_argument(
        "--image_size",
        type=positive_int,
        help="Input resolution. For a checkpoint, its position embeddings are resampled to the new resolution.",
    )
    model.add_argument("--patch_size", type=positive_int, help="Side of the square patches (new models only).")
    model.add_argument("--num_channels", type=int, choices=(1, 3), help="1 for grayscale, 3 for RGB (new models only).")
    model.add_argument("--hidden_size", type=positive_int, help="Width of the tokens (new models only).")
    model.add_argument("--num_hidden_layers", type=positive_int, help="Number of encoder blocks (new models only).")
    model.add_argument("--num_attention_heads", type=positive_int, help="Attention heads per block (new models only).")
    model.add_argument("--intermediate_size", type=positive_int, help="Hidden width of the MLPs (new models only).")
    model.add_argument(
        "--pooling",
        choices=("cls", "mean"),
        help="Classify from the CLS token or from the mean of the patch tokens (new models only).",
    )
    model.add_argument(
        "--use_cls_token",
        action=argparse.BooleanOptionalAction,
        help="Prepend a learned CLS token (new models only).",
    )
    model.add_argument(
        "--hidden_dropout_prob", type=probability, help="Dropout on embeddings, attention output and MLP."
    )
    model.add_argument("--attention_probs_dropout_prob", type=probability, help="Dropout on the attention weights.")
    model.add_argument("--drop_path_rate", type=probability, help="Stochastic depth rate of the last block.")
    model.add_argument(
        "--ignore_mismatched_sizes",
        action="store_true",
        help="Replace the checkpoint's classification head with a new one when its classes differ from the data's.",
    )

    training = parser.add_argument_group("training")
    training.add_argument("--num_train_epochs", type=positive_int, default=40, help="Passes over the training data.")
    training.add_argument(
        "--max_train_steps", type=positive_int, help="Stop after this many optimizer steps; overrides the epochs."
    )
    training.add_argument(
        "--per_device_train_batch_size", type=positive_int, default=32, help="Training images per device and step."
    )
    training.add_argument(
        "--per_device_eval_batch_size", type=positive_int, default=128, help="Evaluation images per device and step."
    )
    training.add_argument(
        "--gradient_accumulation_steps",
        type=positive_int,
        default=1,
        help="Batches per optimizer step; the update equals one on all their images together, also for a short "
        "last batch or a short last window of an epoch.",
    )
    training.add_argument("--learning_rate", type=positive_float, default=1e-3, help="Peak learning rate of AdamW.")
    training.add_argument(
        "--weight_decay",
        type=non_negative_float,
        default=0.05,
        help="AdamW weight decay; biases, norms, the CLS token and position embeddings are never decayed.",
    )
    training.add_argument(
        "--lr_scheduler_type",
        default="cosine",
        # The schedules that need nothing but the step counts (not reduce_lr_on_plateau, which needs metrics).
        choices=("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"),
        help="How the learning rate decays after the warmup (`transformers.get_scheduler`).",
    )
    training.add_argument(
        "--warmup_steps",
        type=warmup,
        default=0.05,
        help="Linear warmup: a number of optimizer steps, or a fraction in [0, 1) of all steps.",
    )
    training.add_argument(
        "--max_grad_norm", type=non_negative_float, default=1.0, help="Clip gradients to this norm; 0 disables."
    )
    training.add_argument(
        "--label_smoothing", type=probability, default=0.1, help="Label smoothing of the training loss, in [0, 1)."
    )
    training.add_argument(
        "--skip_nonfinite_steps",
        action="store_true",
        help="Skip an optimizer step whose loss is NaN or infinite, and count it in all_results.json, instead of "
        "stopping the run there.",
    )
    training.add_argument(
        "--seed", type=seed, default=42, help="Seed of the weights, data order and augmentation, in [0, 2**32)."
    )
    training.add_argument(
        "--mixed_precision",
        choices=("no", "fp16", "bf16"),
        help="Mixed precision (passed to Accelerate; default: `accelerate config` or the launcher's choice). fp16 "
        "needs a GPU; the CPU runs bf16.",
    )
    training.add_argument(
        "--torch_compile",
        nargs="?",
        const="on",
        default="auto",
        choices=("auto", "on", "off"),
        help="Compile the model with torch.compile (inductor). `auto`: when the run is long enough for the speed-up "
        "to repay the compile time: eager steps are timed before training, and a resumed run keeps the choice of "
        "the run it continues. A bare --torch_compile means `on`.",
    )
    training.add_argument("--cpu", action="store_true", help="Train on the CPU even when an accelerator is present.")
    training.add_argument(
        "--num_threads",
        type=positive_int,
        help="PyTorch threads per process. Default on the CPU: $OMP_NUM_THREADS if set (torchrun and `accelerate "
        "launch` set 1 for several processes), else the machine's cores divided among its training processes.",
    )

    checkpoints = parser.add_argument_group("checkpoints")
    checkpoints.add_argument(
        "--checkpointing_steps",
        type=checkpointing_interval,
        help="Save a resumable checkpoint every N optimizer steps, or after every epoch with `epoch`.",
    )
    checkpoints.add_argument(
        "--checkpoints_total_limit",
        type=non_negative_int,
        default=3,
        help="Keep the newest N checkpoints of --output_dir, deleting older ones after each save (never the one the "
        "run resumed from); 0 keeps them all.",
    )
    checkpoints.add_argument(
        "--resume_from_checkpoint",
        help="Continue from a `checkpoint-N` folder, or from the newest complete one in --output_dir with `latest`. "
        "The run must repeat the batch size, accumulation, process count, data and optimizer flags of the run that "
        "wrote it; it may train for more or fewer steps (the schedule is then recomputed and reported).",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--output_dir",
        help="Where the model, metrics, model card and checkpoints go. Default: outputs/vit-custom-<dataset>.",
    )
    output.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Replace the results of another run in --output_dir (its checkpoints are deleted).",
    )
    output.add_argument(
        "--with_tracking", action="store_true", help="Log metrics with an experiment tracker (see --report_to)."
    )
    output.add_argument(
        "--report_to",
        choices=TRACKERS,
        help="Tracker for --with_tracking (default: tensorboard, logging in <output_dir>/runs), or `all` the installed "
        "ones.",
    )
    output.add_argument(
        "--license", default="apache-2.0", help="License of the trained model, for the model card (a Hub identifier)."
    )
    output.add_argument("--push_to_hub", action="store_true", help="Upload the output folder to the Hugging Face Hub.")
    output.add_argument(
        "--hub_model_id",
        help="The Hub repo to push to, `user/name`. Default: the --output_dir folder name, in the token's namespace.",
    )
    output.add_argument("--hub_token", help="Hub token; default: the one saved by `hf auth login`.")
    output.add_argument("--hub_revision", help="Branch of the Hub repo to push to (created if needed); default: main.")
    output.add_argument(
        "--hub_private_repo", action="store_true", help="Create the Hub repo as private if it does not exist."
    )

    args = parser.parse_args(argv)
    for flag, needed in FLAG_NEEDS.items():
        if getattr(args, flag) and not getattr(args, needed):
            parser.error(f"--{flag} is used only with --{needed}, which is not given: add --{needed}, or drop --{flag}")
    if args.preset and args.model_name_or_path:
        parser.error(
            f"--preset {args.preset} picks the size of a new model, but --model_name_or_path fixes it: drop one"
        )
    if args.dataset_name and (args.train_dir or args.validation_dir or args.test_dir):
        parser.error("pass either --dataset_name or image folders (--train_dir, ...), not both")
    if (args.validation_dir or args.test_dir) and not args.train_dir:
        parser.error("--validation_dir and --test_dir need a --train_dir")
    if args.streaming and not (args.train_dir or args.dataset_name):
        parser.error("--streaming needs shards to stream: --train_dir (a folder or glob of shards) or --dataset_name")
    if args.streaming and args.train_dir and not args.validation_dir:
        parser.error("--streaming needs a --validation_dir of shards to evaluate on (and to read the classes from)")
    if args.streaming and args.max_train_samples:
        parser.error("--max_train_samples does not apply to --streaming; bound the run with --max_train_steps")
    if args.crop_scale[0] > args.crop_scale[1] or args.crop_scale[0] == 0:
        parser.error(f"--crop_scale {args.crop_scale[0]} {args.crop_scale[1]}: need 0 < MIN <= MAX <= 1")
    if args.output_dir is None:
        args.output_dir = f"outputs/vit-custom-{dataset_short_name(args)}"
    reason = unwritable_folder_reason(Path(args.output_dir))
    if reason:
        parser.error(f"--output_dir {args.output_dir} cannot be written: {reason}. Pass a folder path you can write to")
    if args.report_to is None:
        args.report_to = "tensorboard"
    if args.horizontal_flip is None:
        args.horizontal_flip = bool(args.dataset_name or args.train_dir)  # not for the built-in digits
    return args


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows the default of every flag that has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def worker_count(text: str) -> int | str:
    return text if text == "auto" else non_negative_int(text)


def seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**32 - 1 (the seeds NumPy accepts), got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive finite number, got {value}")
    return value


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction between 0 and 1, got {value}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {value}")
    return value


def split_fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (both sides need images), got {value}")
    return value


def warmup(text: str) -> int | float:
    value = float(text)
    if value < 0 or (value >= 1 and not value.is_integer()):
        raise argparse.ArgumentTypeError(f"must be a whole number of steps or a fraction in [0, 1), got {text}")
    return value if value < 1 else int(value)


def checkpointing_interval(text: str) -> int | str:
    if text == "epoch":
        return text
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of steps or `epoch`, got {text!r}")
    return int(text)


def dataset_short_name(args: argparse.Namespace) -> str:
    """`digits`, the name of a Hub dataset without its owner, or the name of the folder above --train_dir."""
    if args.dataset_name:
        return args.dataset_name.split("/")[-1]
    if args.train_dir:
        train_dir = args.train_dir.resolve()
        return train_dir.parent.name if train_dir.name in ("train", "training") else train_dir.name
    return "digits"


def create_accelerator(args: argparse.Namespace) -> Accelerator:
    import datasets
    import torch
    import transformers
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, TorchDynamoPlugin

    if args.with_tracking:
        check_tracker(args.report_to)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=args.mixed_precision,
        # A seedable sampler makes the data order a function of (seed, epoch), so a resumed run sees the same batches.
        # non_blocking: copying a batch from pinned memory to the GPU does not block the CPU.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed, non_blocking=True),
        # The scheduler is stepped once per optimizer update, on every process (see `train_one_epoch`).
        step_scheduler_with_optimizer=False,
        log_with=args.report_to if args.with_tracking else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "runs")),
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if args.torch_compile == "on" else None,
    )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        # Accelerate would report fp16 and train in fp32: it has no fp16 autocast on the CPU.
        raise FinetuneError(
            "Mixed precision fp16 (from --mixed_precision or `accelerate config`) needs a GPU, and this run is on the "
            "CPU. Pass --mixed_precision bf16, which the CPU runs, or --mixed_precision no."
        )
    # Only the main process reports progress; the others report only problems.
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.WARNING,
        force=True,
    )
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    state = ", ".join(line for line in str(accelerator.state).splitlines() if line.strip())
    logger.info(state)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    return accelerator


def set_threads(num_threads: int | None, accelerator: Accelerator, cores: int, config: ViTCustomConfig, batch: int):
    """PyTorch threads for training on the CPU: --num_threads, else $OMP_NUM_THREADS, else every core of this process
    when the model's layers are large enough to share, else one.

    A layer too small to split (the digits model's MLP on a batch of 32) only makes threads wait for each other, and
    far longer when another program uses a core too. Loading needs no core of its own: in memory it is a few tensor
    operations per batch, and a loader worker decoding small images needs a fraction of one.
    """
    import torch

    if num_threads is not None or accelerator.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    tokens = config.num_prefix_tokens + config.grid_size[0] * config.grid_size[1]
    mlp_work = batch * tokens * config.hidden_size * config.intermediate_size
    torch.set_num_threads(cores if mlp_work >= MIN_WORK_PER_THREAD * cores else 1)


def stop_at_bad_image(
    error: BadImageError, accelerator: Accelerator, model: nn.Module, output_dir: Path, progress: TrainingProgress,
    keep_last: int, resumed_from: Path | None,
):
    """Stop at an image that cannot be decoded, keeping the steps done: a single process saves a checkpoint first
    (with several, the others are waiting in a collective operation and cannot join a save)."""
    # A loader worker's exception arrives with the worker's traceback in its message: keep the original message.
    message = str(error).rsplit("BadImageError: ", 1)[-1].strip()
    saved = ""
    if accelerator.num_processes == 1 and progress.completed_steps > 0:
        save_checkpoint(accelerator, model, output_dir, progress, keep_last, resumed_from)
        saved = f" The {progress.completed_steps} steps done are saved: fix the file, then continue with " \
            "--resume_from_checkpoint latest."
    raise FinetuneError(f"Cannot decode an image: {message}{saved}") from None


def plan_compile(
    setting: str, model: nn.Module, batch_size: int, planned_steps: int, device: torch.device, checkpoint: Path | None
) -> tuple[bool, str]:
    """Whether to compile the model (`--torch_compile`), and why, for the log.

    `auto` keeps the choice of the run a checkpoint continues (compiled kernels sum in another order). Else it times a
    few eager training steps at the run's batch size; when the planned steps take long enough that a speed-up could
    repay compiling, it compiles, times compiled steps too, and keeps compiling when they save more time over the run
    than compiling took. Compiling pays for small models, whose steps are dominated by per-operation overhead, and
    may not for larger ones (benchmarks/benchmark_speed.py --compile measures both).
    """
    import torch

    if setting != "auto":
        return setting == "on", f"--torch_compile {setting}"
    if checkpoint is not None:
        state = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=True)
        return bool(state.get("compiled", False)), f"as the run {checkpoint} continues"
    eager, _ = time_training_steps(model, batch_size, device)
    plan = f"{planned_steps} steps of {eager * 1000:.0f} ms eagerly"
    if planned_steps * eager * (1 - 1 / BEST_COMPILE_SPEEDUP) < MIN_COMPILE_SECONDS:
        return False, f"{plan}: even {BEST_COMPILE_SPEEDUP}x faster steps would not repay compiling"
    compiled, compile_seconds = time_training_steps(torch.compile(model), batch_size, device)
    saved = planned_steps * (eager - compiled)
    reason = f"{plan}, {compiled * 1000:.0f} ms compiled: {saved:.0f} s saved, {compile_seconds:.0f} s to compile"
    return saved > compile_seconds, reason


def time_training_steps(
    model: nn.Module, batch_size: int, device: torch.device, repeats: int = 3
) -> tuple[float, float]:
    """Seconds of one forward and backward pass on a random batch (the median of `repeats`) and of the first one
    (which compiles a compiled model). The weights, gradients and random generators are left as they were."""
    import torch
    from torch import nn

    model.to(device).train()
    config = model.config
    times = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        pixel_values = torch.randn(batch_size, config.num_channels, *config.image_height_width, device=device)
        labels = torch.randint(0, max(config.num_labels, 1), (batch_size,), device=device)
        for _ in range(repeats + 1):
            start = time.perf_counter()
            logits = model(pixel_values=pixel_values).logits
            nn.functional.cross_entropy(logits.float(), labels).backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return sorted(times[1:])[len(times[1:]) // 2], times[0]


def check_images(dataset, image_column: str, processes: int):
    """--verify_images: decode every image before training, in parallel, and name the ones that fail."""
    from image_data import find_bad_images

    start = time.perf_counter()
    bad = [message for split in dataset.values() for message in find_bad_images(split, image_column, processes)]
    if bad:
        raise FinetuneError(
            f"{len(bad)} image(s) cannot be decoded: {shorten(bad, limit=5)}. Remove or replace them, or pass "
            "--on_bad_image skip to train without them."
        )
    images = sum(len(split) for split in dataset.values())
    logger.info(f"Verified {images} images in {time.perf_counter() - start:.1f} s")
def check_tracker(report_to: str):
    """Refuse a tracker whose package is missing: Accelerate would drop it and log nothing, without a word."""
    from accelerate.tracking import get_available_trackers

    installed = [tracker.value for tracker in get_available_trackers()]
    if report_to == "all" and not installed:
        raise FinetuneError(
            "--report_to all: no experiment tracker is installed. Install one (pip install tensorboard), or drop "
            "--with_tracking."
        )
    if report_to != "all" and report_to not in installed:
        raise FinetuneError(
            f"--report_to {report_to}: its package is not installed, so nothing would be logged. Install it (pip "
            f"install {report_to}), or pick an installed tracker ({', '.join(installed) or 'none is'})."
        )


# ----------------------------------------------------------------------------------------------------------------------
# Output folder and checkpoints


@dataclass
class TrainingProgress:
    """How far training got; saved in every checkpoint so that a resumed run continues exactly where it stopped."""

    epoch: int = 0
    batches_seen: int = 0  # batches of `epoch` already trained on (by each process)
    completed_steps: int = 0  # optimizer updates so far
    loss_sum: float = 0.0  # training loss summed over the images of `epoch` (by each process)
    samples_seen: int = 0  # images of `epoch` already trained on (by each process)
    skipped_images: int = 0  # images of `epoch` that could not be decoded, with --on_bad_image skip (by each process)
    history: list[dict] = field(default_factory=list)  # the metrics of every finished epoch
    compiled: bool = False  # whether the model runs under torch.compile: a resumed run keeps it, for the same sums
    settings: dict = field(default_factory=dict)  # what the counts above are in (see `resumed_settings`)
    planned_steps: int = 0  # the optimizer steps of the whole run, which the learning-rate schedule spans
    schedule_changes: list[dict] = field(default_factory=list)  # resumes with another number of steps
    skipped_steps: int = 0  # steps skipped for a non-finite loss (--skip_nonfinite_steps)

    def finish_epoch(self, record: dict):
        self.history.append(record)
        self.epoch, self.batches_seen, self.loss_sum, self.samples_seen = self.epoch + 1, 0, 0.0, 0
        self.skipped_images = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict):
        for name, value in state.items():
            setattr(self, name, value)


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
        raise FinetuneError(
            f"None of the {len(checkpoints)} checkpoints in {output_dir} can be resumed from (see the warnings). "
            "Start the run again with --overwrite_output_dir, or in another --output_dir."
        )
    checkpoint = Path(resume_from_checkpoint)
    problem = checkpoint_problem(checkpoint)
    if problem:
        raise FinetuneError(
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

    if not (checkpoint / "custom_checkpoint_0.pkl").is_file():
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


def check_output_dir(output_dir: Path, checkpoint: Path | None, args: argparse.Namespace):
    """Refuse an output folder that holds another run's files, unless resuming that run or told to overwrite it."""
    previous = sorted(p.name for p in output_dir.iterdir()) if output_dir.is_dir() else []
    if not previous or args.overwrite_output_dir:
        return
    if checkpoint is not None and checkpoint.resolve().parent == output_dir.resolve():
        return
    raise FinetuneError(
        f"--output_dir {output_dir} already holds the files of another run ({shorten(previous)}); nothing was changed. "
        "Continue that run with --resume_from_checkpoint latest, replace it with --overwrite_output_dir, "
        "or choose another --output_dir."
    )


def prepare_output_dir(output_dir: Path, checkpoint: Path | None, args: argparse.Namespace, accelerator: Accelerator):
    """Create the output folder and clear what the run must not mix with its own files.

    Resuming from a checkpoint of this folder drops the checkpoints newer than it: they continue another timeline,
    which `latest` must not pick if this run stops too. --overwrite_output_dir deletes the previous run's outputs and
    checkpoints (only those: other files in the folder stay).
    """
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if checkpoint is not None and checkpoint.resolve().parent == output_dir.resolve():
            resumed_step = checkpoint_step(checkpoint)
            stale = [path for path in list_checkpoints(output_dir) if checkpoint_step(path) > resumed_step]
        elif args.overwrite_output_dir:
            stale = list_checkpoints(output_dir) + [output_dir / name for name in RUN_OUTPUTS]
        else:
            stale = []
        for path in stale:
            if path.is_dir():
                logger.info(f"Deleting {path} of an earlier run")
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    accelerator.wait_for_everyone()


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
    import torch

    check_weights(accelerator, model, progress.completed_steps, output_dir)
    if accelerator.num_processes > 1:
        # Every process holds its own partial loss sum over as many images; keep their mean, which resumes to the
        # same epoch loss.
        loss_sum = torch.tensor(progress.loss_sum, dtype=torch.float64, device=accelerator.device)
        progress.loss_sum = accelerator.reduce(loss_sum, "mean").item()
    final = output_dir / f"checkpoint-{progress.completed_steps}"
    partial = output_dir / "tmp" / final.name
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
        raise FinetuneError(
            f"Could not resume from {checkpoint}: {error}. A checkpoint resumes only with the model arguments of the "
            "run that wrote it; pass the same ones, or start a new run."
        ) from error
    changed = [
        f"{name} {progress.settings[name]} (this run: {value})"
        for name, value in settings.items()
        if name in progress.settings and progress.settings[name] != value
    ]
    if changed:
        raise FinetuneError(
            f"{checkpoint} was written by a run with {', '.join(changed)}. Its place in the data and its optimizer "
            "and learning-rate state count in that run's steps and values, so only a run with the same ones continues "
            "it: pass the checkpoint's values, or start a new run in another --output_dir."
        )
    if progress.completed_steps > planned_steps:
        raise FinetuneError(
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


def resumed_settings(args: argparse.Namespace, num_processes: int, num_train_images: int) -> dict:
    """What a checkpoint's counts and optimizer state are in: the RESUMED_FLAGS, the processes and the images."""
    flags = {f"--{name}": getattr(args, name) for name in RESUMED_FLAGS}
    return {**flags, "processes": num_processes, "training images": num_train_images}


def check_weights(accelerator: Accelerator, model: nn.Module, step: int, output_dir: Path):
    """Stop the run if the weights hold NaN or infinite values: nothing computed from them may be saved or reported."""
    import torch

    nonfinite = torch.stack([parameter.isfinite().all().logical_not() for parameter in model.parameters()]).any()
    if accelerator.reduce(nonfinite.float(), "sum").item() > 0:  # every process stops, sharded or not
        raise divergence_error(f"the weights hold NaN or infinite values after step {step}", output_dir)


def divergence_error(what: str, output_dir: Path) -> FinetuneError:
    checkpoints = list_checkpoints(output_dir)
    kept = f"the last good checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was saved before it"
    return FinetuneError(
        f"Training diverged: {what}. Nothing from that point on was saved or scored; {kept}. Start again with a "
        "lower --learning_rate (and --max_grad_norm clipping on), or resume with --skip_nonfinite_steps to skip the "
        "steps whose loss is not finite."
    )


# ----------------------------------------------------------------------------------------------------------------------
# Model


def load_model(
    args: argparse.Namespace, labels: list[str]
) -> tuple[ViTCustomForImageClassification, ViTImageProcessor]:
    """A model for `labels` with its image processor: a checkpoint adapted to the data, or a new model."""
    from modeling_vit_custom import ViTCustomForImageClassification

    if args.model_name_or_path is None:
        config = new_model_config(args, labels)
        return ViTCustomForImageClassification(config), default_image_processor(config)
    overrides = {name: getattr(args, name) for name in CONFIG_FLAGS if getattr(args, name) is not None}
    try:
        # Any checkpoint the converter reads: vit_custom, transformers ViT or timm; a folder or a Hub repo.
        source = convert_checkpoint.resolve_source(args.model_name_or_path, args.model_revision)
        pretrained_config, state_dict = convert_checkpoint.read_checkpoint(source, **overrides)
        check_head(pretrained_config, labels, args)
        config, state_dict = convert_checkpoint.adapt_checkpoint(
            pretrained_config, state_dict, **overrides, **label_fields(labels)
        )
        image_processor = convert_checkpoint.load_image_processor(source, config.image_size)
    except (OSError, ValueError) as error:  # the converter names what is wrong with the checkpoint or the flags
        raise FinetuneError(f"Cannot fine-tune {args.model_name_or_path}: {error}") from error
    return convert_checkpoint.model_from_state_dict(config, state_dict), image_processor


def new_model_config(args: argparse.Namespace, labels: list[str]) -> ViTCustomConfig:
    """The configuration of a new model for `labels`: the --preset (default: the digits model) with the flags'
    values."""
    from configuration_vit_custom import PRESETS, ViTCustomConfig

    base = PRESETS[args.preset] if args.preset else DIGITS_MODEL
    overrides = {name: getattr(args, name) for name in CONFIG_FLAGS if getattr(args, name) is not None}
    try:
        return ViTCustomConfig(**{**base, **overrides, **label_fields(labels)})
    except ValueError as error:  # the config names the bad value and its fix
        raise FinetuneError(f"Invalid model configuration: {error}") from error


def label_fields(labels: list[str]) -> dict:
    return {"id2label": dict(enumerate(labels)), "label2id": {label: i for i, label in enumerate(labels)}}


def check_head(pretrained: ViTCustomConfig, labels: list[str], args: argparse.Namespace):
    """Refuse to replace the checkpoint's classification head, when its classes are not the data's, unless asked to."""
    old_labels = [pretrained.id2label[i] for i in range(pretrained.num_labels)]
    if old_labels != list(labels) and not args.ignore_mismatched_sizes:
        raise FinetuneError(
            f"The checkpoint's head predicts {len(old_labels)} classes ({shorten(old_labels)}) but the data has "
            f"{len(labels)} ({shorten(labels)}). Pass --ignore_mismatched_sizes to replace the head with a new one "
            "for the data's classes."
        )


def default_image_processor(config: ViTCustomConfig) -> ViTImageProcessor:
    """Resize to the model's resolution, scale to [0, 1], normalise every channel with mean 0.5 and std 0.5."""
    from transformers import ViTImageProcessor

    height, width = config.image_height_width
    return ViTImageProcessor(
        size={"height": height, "width": width},
        image_mean=[0.5] * config.num_channels,
        image_std=[0.5] * config.num_channels,
        do_convert_rgb=config.num_channels == 3,
    )


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on the weight matrices only, not on biases, norms, the CLS token or the position
    embeddings, which decay would pull towards zero for no regularising benefit."""
    from torch import nn

    decay, no_decay = [], []
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            skip = name in ("bias", "cls_token", "position_embeddings") or isinstance(module, nn.LayerNorm)
            (no_decay if skip else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_steps(warmup: int | float, max_train_steps: int) -> int:
    return math.ceil(warmup * max_train_steps) if isinstance(warmup, float) else warmup


# ----------------------------------------------------------------------------------------------------------------------
# Training and evaluation


def train_one_epoch(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: nn.Module,
    train_dataloader: DataLoader,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    progress: TrainingProgress,
    progress_bar: tqdm,
    max_train_steps: int,
    output_dir: Path,
    resumed_from: Path | None,
    after_step: Callable[[list[dict]], None] = lambda window: None,
) -> float:
    """Train on the batches of `progress.epoch` that were not trained on yet; return the epoch's mean loss.

    A step whose loss is not finite stops the run before the weights change, or is skipped with
    --skip_nonfinite_steps; the weights are checked before every checkpoint and at the end of the epoch.
    """
    import torch
    from accelerate import skip_first_batches

    model.train()
    train_dataloader.set_epoch(progress.epoch)
    # A resumed run skips the batches of this epoch it trained on before it stopped (the data order is seeded); a
    # stream's loader continues from the position saved in the checkpoint instead.
    resumed = progress.batches_seen and not args.streaming
    batches = skip_first_batches(train_dataloader, progress.batches_seen) if resumed else train_dataloader
    for window in accumulation_windows(batches, args.gradient_accumulation_steps):
        window_loss_sum, window_samples = accumulate_gradients(
            accelerator, model, window, args.label_smoothing, uneven=args.streaming
        )
        if not args.streaming:  # a stream pads its last batches with unlabelled images, which are no bad images
            progress.skipped_images += sum(len(batch["labels"]) for batch in window) - window_samples
        loss_everywhere = sum_over_processes(accelerator, window_loss_sum)  # all processes step, skip or stop alike
        if math.isfinite(loss_everywhere):
            if args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            if not accelerator.optimizer_step_was_skipped:
                lr_scheduler.step()
            progress.loss_sum += window_loss_sum
            progress.samples_seen += window_samples
        elif args.skip_nonfinite_steps:
            progress.skipped_steps += 1
            logger.warning(f"Skipped step {progress.completed_steps + 1}: its training loss is {loss_everywhere}.")
        else:
            step = f"step {progress.completed_steps + 1} (epoch {progress.epoch + 1})"
            raise divergence_error(f"the training loss is {loss_everywhere} at {step}", output_dir)
        optimizer.zero_grad()
        progress.batches_seen += len(window)
        progress.completed_steps += 1
        progress_bar.update(1)
        progress_bar.set_postfix(loss=f"{window_loss_sum / max(window_samples, 1):.4f}", refresh=False)
        after_step(window)
        if isinstance(args.checkpointing_steps, int) and progress.completed_steps % args.checkpointing_steps == 0:
            save_checkpoint(accelerator, model, output_dir, progress, args.checkpoints_total_limit, resumed_from)
        if progress.completed_steps >= max_train_steps:
            break
    check_weights(accelerator, model, progress.completed_steps, output_dir)  # before they are evaluated
    if progress.samples_seen == 0:
        raise divergence_error(f"every step of epoch {progress.epoch + 1} had a non-finite loss", output_dir)
    mean_loss = torch.tensor(progress.loss_sum / progress.samples_seen, device=accelerator.device)
    return accelerator.reduce(mean_loss, "mean").item()


def sum_over_processes(accelerator: Accelerator, value: float) -> float:
    import torch

    if accelerator.num_processes == 1:
        return value
    return accelerator.reduce(torch.tensor(value, dtype=torch.float64, device=accelerator.device), "sum").item()


def flags_on_any_process(accelerator: Accelerator) -> Callable[[list[bool]], list[bool]]:
    """A function of this process's flags that says, for each, whether it is set on any process (one all-reduce)."""
    import torch

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
    accelerator: Accelerator, model: nn.Module, window: list[dict], label_smoothing: float, uneven: bool = False
):
    """Forward and backward over the batches of one optimizer step; returns the window's summed loss and images.

    Each image's loss is divided by the images of the whole window, not of its batch, so the gradient equals that
    of one batch of all of them, however the window splits (a short last batch, a short last window). Processes
    synchronise their gradients once, after the last batch.

    `uneven`: the processes may hold different numbers of images (a stream, at the end of an epoch or after skipping
    bad images; its padding images, labelled -100, count for none). As the processes' gradients are averaged, each
    divides by the mean number of images per process, so the update is still that of all the images together.
    """
    import torch
    from torch import nn

    from finetune_utils import SKIPPED_LABEL

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
            logits = model(pixel_values=batch["pixel_values"]).logits
            losses = nn.functional.cross_entropy(
                logits.float(), batch["labels"], label_smoothing=label_smoothing, reduction="sum"
            )
            accelerator.backward(losses / divisor)
        loss_sum += losses.item()
    return loss_sum, num_samples


def run_evaluation(accelerator: Accelerator, model: nn.Module, dataloader: DataLoader, prefix: str) -> dict:
    """Loss, accuracy and (for more than 5 classes) top-5 accuracy, counting every sample once on all processes."""
    import evaluate
    import torch
    from torch import nn
    from tqdm.auto import tqdm

    from finetune_utils import SKIPPED_LABEL

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
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        num_samples += len(labels)
        metric.add_batch(predictions=logits.cpu().numpy(), references=labels.cpu().numpy())
    results = {"loss": loss_sum / num_samples, **metric.compute(), "samples": num_samples}
    return {f"{prefix}_{name}": value for name, value in results.items()}


def log_training_plan(
    args: argparse.Namespace,
    accelerator: Accelerator,
    num_train_samples: int | None,
    num_epochs: int,
    max_train_steps: int,
    checkpoint: Path | None,
    progress: TrainingProgress,
):
    total_batch_size = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"Training on {num_train_samples or 'a stream of'} images for "
        f"{num_epochs if num_epochs < sys.maxsize else 'as many'} epochs ({max_train_steps} optimizer steps of "
        f"{total_batch_size} images: {args.per_device_train_batch_size} per device x {accelerator.num_processes} "
        f"processes x {args.gradient_accumulation_steps} accumulated), writing to {args.output_dir}"
    )
    if checkpoint is not None:
        logger.info(f"Continuing at epoch {progress.epoch + 1}, step {progress.completed_steps}")


def format_metrics(metrics: dict, exclude: tuple[str, ...] = ()) -> str:
    return ", ".join(f"{name} {value:.4g}" for name, value in metrics.items() if name not in exclude)


def tracker_config(args: argparse.Namespace) -> dict:
    """The arguments as the scalar values that every tracker (TensorBoard's hparams included) accepts."""
    return {
        name: value if isinstance(value, (int, float, str, bool)) else str(value) for name, value in vars(args).items()
    }


# ----------------------------------------------------------------------------------------------------------------------
# Saving, reporting, sharing


def save_model(accelerator: Accelerator, model: nn.Module, image_processor: ViTImageProcessor, output_dir: Path):
    """Weights, config (with `auto_map`), both model code files and the image processor: a loadable model folder."""
    from accelerate.utils import DistributedType

    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    # FSDP and DeepSpeed shard the weights: gather them. Otherwise the unwrapped model holds them, under their own
    # names (a compiled model's state dict would prefix them with `_orig_mod.`).
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    state_dict = accelerator.get_state_dict(model) if sharded else None
    unwrapped.save_pretrained(output_dir, is_main_process=accelerator.is_main_process, state_dict=state_dict)
    if accelerator.is_main_process:
        image_processor.save_pretrained(output_dir)
    accelerator.wait_for_everyone()


def plot_attention_rollout(output_dir: Path, batch: dict, image_processor: ViTImageProcessor):
    """The attention rollout of a batch of validation images, as `attention_rollout.png`.

    Drawn by the saved model, reloaded on the CPU, so that neither a training wrapper (compile, FSDP, mixed precision)
    nor the devices change what the figure shows.
    """
    from explain_figures import DPI, rollout_figure
    from modeling_vit_custom import ViTCustomForImageClassification

    model = ViTCustomForImageClassification.from_pretrained(output_dir).eval()
    mean, std = image_processor.image_mean, image_processor.image_std
    figure = rollout_figure(model, batch["pixel_values"], mean, std, labels=batch["labels"].tolist())
    figure.savefig(output_dir / "attention_rollout.png", dpi=DPI)


if __name__ == "__main__":
    try:
        main()
    except FinetuneError as error:
        sys.exit(f"error: {error}")
