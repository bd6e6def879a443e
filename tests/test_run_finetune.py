"""run_finetune.py trains, evaluates and saves a model a practitioner can share, on the CPU and offline."""

import json
import os
import re

import datasets
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from datasets import Dataset
from finetune_helpers import (
    TINY_MODEL,
    fresh_accelerate_state,
    make_image_folder,
    run_main,
    run_script,
    save_tiny_checkpoint,
)
from huggingface_hub import ModelCard
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    pipeline,
)

import run_finetune
from modeling_vit_custom import ViTCustomForImageClassification, resample_position_embeddings
from vit_training import hardware, loaders
from vit_training.augment import SAMPLE_INDEX, build_transforms
from vit_training.checkpoints import list_checkpoints
from vit_training.data import load_image_dataset, number_samples
from vit_training.param_groups import parameter_groups
from vit_training.outputs import save_model
from vit_training.run_state import TrainingProgress

SHAREABLE_FILES = (
    "config.json",
    "model.safetensors",
    "configuration_vit_custom.py",
    "modeling_vit_custom.py",
    "preprocessor_config.json",
    "README.md",
    "all_results.json",
    "training_curves.png",
    "attention_rollout.png",
)


def test_default_command_trains_on_digits_and_saves_a_folder_ready_to_share(tmp_path):
    output_dir = tmp_path / "vit-custom-digits"
    # The README's main command, shortened: the full run is measured by benchmarks/benchmark_default_run.py.
    result = run_script("--num_train_epochs", 2, "--max_train_samples", 320, "--output_dir", output_dir)
    assert result.returncode == 0, result.stderr[-3000:]

    log = result.stderr
    assert "training: 100%" in log  # the progress bar
    epoch_logs = [epoch_metrics(log, epoch, num_epochs=2) for epoch in (1, 2)]
    for metrics in epoch_logs:
        assert {"train_loss", "learning_rate", "eval_loss", "eval_accuracy", "eval_top5_accuracy"} <= set(metrics)
    assert epoch_logs[1]["train_loss"] < epoch_logs[0]["train_loss"]
    assert "test: test_loss" in log

    assert all((output_dir / name).is_file() for name in SHAREABLE_FILES)
    assert not list(output_dir.glob("checkpoint-*"))
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["test_samples"] == 360  # 20% of the 1,797 digits
    assert results["eval_samples"] == 144  # 10% of the other 80%, held out for validation
    assert results["train_samples"] == 320
    # The training epochs alone run faster than the whole run, whose time includes evaluating after every epoch.
    assert results["train_loop_samples_per_second"] > 2 * 320 / results["train_runtime"]
    assert 0 <= results["test_accuracy"] <= results["test_top5_accuracy"] <= 1

    config = json.loads((output_dir / "config.json").read_text())
    assert set(config["auto_map"]) == {
        "AutoConfig",
        "AutoModel",
        "AutoModelForImageClassification",
        "AutoModelForMaskedImageModeling",
    }
    assert config["id2label"] == {str(d): str(d) for d in range(10)}

    card = ModelCard.load(output_dir / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.pipeline_tag == "image-classification"
    eval_results = {result.metric_type: result for result in card.data.eval_results}
    assert eval_results["accuracy"].metric_value == round(results["test_accuracy"], 4)
    assert eval_results["top5_accuracy"].metric_value == round(results["test_top5_accuracy"], 4)
    assert eval_results["accuracy"].dataset_split == "test"
    assert "trust_remote_code=True" in card.text and 'revision="' in card.text

    with Image.open(output_dir / "training_curves.png") as curves:
        assert curves.format == "PNG" and curves.width > 500
    assert "![Attention rollout](attention_rollout.png)" in card.text
    with Image.open(output_dir / "attention_rollout.png") as rollout:
        assert rollout.format == "PNG" and rollout.width > 500

    # The folder loads in a process that never imported the model code (this one uses the copies in the folder).
    model = AutoModelForImageClassification.from_pretrained(output_dir, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules")
    processor = AutoImageProcessor.from_pretrained(output_dir)
    classifier = pipeline("image-classification", model=model, image_processor=processor)
    digit = Image.fromarray(np.kron(np.eye(8, dtype=np.uint8) * 255, np.ones((4, 4), dtype=np.uint8)))
    predictions = classifier(digit, top_k=3)
    assert len(predictions) == 3 and all(p["label"] in config["id2label"].values() for p in predictions)


def transforms_of(args, image_processor, num_channels):
    """The training and evaluation transforms of the run `args` describes."""
    return build_transforms(
        image_processor, num_channels, ("image", "label"), crop_scale=args.data.crop_scale,
        flip=args.data.horizontal_flip, seed=args.training.seed,
    )  # fmt: skip


def epoch_metrics(log: str, epoch: int, num_epochs: int) -> dict[str, float]:
    """The metrics of the log line `... epoch 1/2: step 10, train_loss 2.28, ...`."""
    line = next(line for line in log.splitlines() if f"epoch {epoch}/{num_epochs}:" in line)
    pairs = (item.split() for item in line.split(f"epoch {epoch}/{num_epochs}:")[1].split(","))
    return {name: float(value) for name, value in pairs}


def test_checkpoint_is_fine_tuned_on_image_folders_with_a_new_head_at_a_new_resolution(tmp_path):
    checkpoint = tmp_path / "pretrained"
    save_tiny_checkpoint(checkpoint, labels=["a", "b", "c", "d", "e"], image_size=16, patch_size=4)
    make_image_folder(tmp_path / "flowers" / "train", ["red", "green", "blue"], images_per_class=8)
    make_image_folder(tmp_path / "flowers" / "val", ["red", "green", "blue"], images_per_class=3, seed=1)
    output_dir = tmp_path / "out"

    results = run_main(
        "--model_name_or_path", checkpoint, "--ignore_mismatched_sizes", "--image_size", 24,
        "--train_dir", tmp_path / "flowers" / "train", "--validation_dir", tmp_path / "flowers" / "val",
        "--num_train_epochs", 2, "--per_device_train_batch_size", 8, "--with_tracking",
        "--checkpointing_steps", "epoch", "--output_dir", output_dir,
    )  # fmt: skip

    assert results["eval_samples"] == 9 and "test_accuracy" not in results
    assert "eval_top5_accuracy" not in results  # 3 classes: top-5 says nothing
    model = ViTCustomForImageClassification.from_pretrained(output_dir)
    assert model.config.id2label == {0: "blue", 1: "green", 2: "red"}
    assert model.config.image_size == 24
    assert model.vit.embeddings.position_embeddings.shape == (1, 1 + 6 * 6, 32)
    assert AutoImageProcessor.from_pretrained(output_dir).size == {"height": 24, "width": 24}
    assert list((output_dir / "runs").rglob("events.out.tfevents.*")), "--with_tracking wrote no TensorBoard log"
    assert [p.name for p in list_checkpoints(output_dir)] == ["checkpoint-3", "checkpoint-6"]  # 24 / 8
    card = ModelCard.load(output_dir / "README.md")
    assert card.data.eval_results[0].dataset_split == "validation"


def test_load_model_resamples_position_embeddings_and_keeps_the_backbone(tmp_path):
    checkpoint = tmp_path / "pretrained"
    pretrained = save_tiny_checkpoint(checkpoint, labels=["a", "b", "c", "d", "e"], image_size=16, patch_size=4)
    args = run_finetune.parse_args(
        ["--model_name_or_path", str(checkpoint), "--image_size", "32", "--ignore_mismatched_sizes"]
    )

    model, image_processor = run_finetune.load_model(args.model, labels=["cat", "dog"])

    expected = resample_position_embeddings(pretrained.vit.embeddings.position_embeddings, (8, 8), (4, 4), 1)
    torch.testing.assert_close(model.vit.embeddings.position_embeddings, expected, rtol=0, atol=0)
    for name, tensor in pretrained.state_dict().items():
        if name.startswith("vit.") and name != "vit.embeddings.position_embeddings":
            torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)
    assert model.classifier.weight.shape == (2, 32)
    assert image_processor.size == {"height": 32, "width": 32}


def test_a_transformers_vit_checkpoint_is_read_through_the_converter(tmp_path):
    vit_config = ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, id2label={0: "cat", 1: "dog"}, label2id={"cat": 0, "dog": 1},
    )  # fmt: skip
    vit = ViTForImageClassification(vit_config).eval()
    vit.save_pretrained(tmp_path / "vit")
    args = run_finetune.parse_args(["--model_name_or_path", str(tmp_path / "vit")])

    model, image_processor = run_finetune.load_model(args.model, labels=["cat", "dog"])

    pixel_values = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(pixel_values).logits, vit(pixel_values).logits, rtol=1e-4, atol=1e-4)
    assert image_processor.size == {"height": 16, "width": 16}


def test_same_labels_keep_the_checkpoint_head(tmp_path):
    checkpoint = tmp_path / "pretrained"
    pretrained = save_tiny_checkpoint(checkpoint, labels=["cat", "dog"])
    args = run_finetune.parse_args(["--model_name_or_path", str(checkpoint)])
    model, _ = run_finetune.load_model(args.model, labels=["cat", "dog"])
    torch.testing.assert_close(model.classifier.weight, pretrained.classifier.weight, rtol=0, atol=0)


def test_weight_decay_spares_biases_norms_cls_token_and_position_embeddings():
    model, _ = run_finetune.load_model(run_finetune.parse_args(TINY_MODEL).model, labels=["a", "b"])
    decay, no_decay = parameter_groups(model, weight_decay=0.05, learning_rate=1e-3)
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}

    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert decayed | not_decayed == set(names.values()) and not decayed & not_decayed
    assert {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings"} <= not_decayed
    assert all(
        name.endswith(".bias") or "layernorm" in name
        for name in not_decayed - {"vit.embeddings.cls_token", "vit.embeddings.position_embeddings"}
    )
    assert decayed == {name for name in names.values() if name.endswith(".weight") and "layernorm" not in name}


def test_digits_are_split_80_20_and_a_stratified_validation_split_is_carved_out():
    dataset = load_image_dataset(seed=42)
    assert {name: len(split) for name, split in dataset.items()} == {"train": 1293, "validation": 144, "test": 360}
    for split in dataset.values():
        counts = np.bincount(split["label"], minlength=10)
        np.testing.assert_allclose(counts / len(split), np.full(10, 0.1), atol=0.012)

    small = load_image_dataset(max_train_samples=50, max_eval_samples=20, seed=42)
    assert {name: len(split) for name, split in small.items()} == {"train": 50, "validation": 20, "test": 20}


@pytest.mark.parametrize("num_channels", [1, 3])
def test_transforms_convert_grayscale_and_rgb_images_to_the_model_channels(num_channels):
    args = run_finetune.parse_args(["--num_channels", str(num_channels)])
    model, image_processor = run_finetune.load_model(args.model, labels=["a", "b"])
    train_transform, eval_transform = transforms_of(args, image_processor, num_channels)
    images = [Image.new("L", (8, 8), 200), Image.new("RGB", (30, 20), (10, 200, 30))]
    batch = {"image": images, "label": [0, 1], SAMPLE_INDEX: [0, 1]}

    for transform in (train_transform, eval_transform):
        pixel_values = transform(dict(batch))["pixel_values"]
        assert pixel_values.shape == (2, num_channels, *model.config.image_height_width)
        assert model(pixel_values=pixel_values).logits.shape == (2, 2)
    # A uniform gray image normalised with mean 0.5 and std 0.5: (200 / 255 - 0.5) / 0.5 everywhere.
    eval_gray = eval_transform(dict(batch))["pixel_values"][0]
    torch.testing.assert_close(eval_gray, torch.full_like(eval_gray, (200 / 255 - 0.5) / 0.5))


def test_an_image_gets_the_same_augmentation_whatever_else_is_in_its_batch():
    args = run_finetune.parse_args([])
    _, image_processor = run_finetune.load_model(args.model, labels=["a", "b"])
    train_transform, _ = transforms_of(args, image_processor, 3)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)) for _ in range(3)]

    alone = train_transform({"image": images[2:], "label": [0], SAMPLE_INDEX: [2]})
    batched = train_transform({"image": images, "label": [0, 0, 0], SAMPLE_INDEX: [0, 1, 2]})
    torch.testing.assert_close(alone["pixel_values"][0], batched["pixel_values"][2], rtol=0, atol=0)
    train_transform.augmentation.epoch = 1
    next_epoch = train_transform({"image": images[2:], "label": [0], SAMPLE_INDEX: [2]})
    assert not torch.equal(next_epoch["pixel_values"][0], alone["pixel_values"][0])


@pytest.mark.parametrize("images_in_memory", ["off", "on"])
def test_worker_processes_load_the_images_the_training_process_would_load_every_epoch(tmp_path, images_in_memory):
    # The workers live for the whole run: each epoch's augmentations must still reach them, so two epochs with workers
    # train to the same weights as two epochs loaded in the training process; with the whole from-scratch recipe
    # (RandAugment, erasing, Mixup/CutMix, EMA, drop path). Images decoded every epoch by the workers ("off"), or
    # held in memory and augmented a batch at a time by them ("on").
    common = [*TINY_MODEL, "--num_train_epochs", 2, "--max_train_samples", 24, "--max_eval_samples", 10]
    common += ["--recipe", "from-scratch", "--auto_augment", "rand-m9-n2", "--random_erasing", 0.5]
    common += ["--images_in_memory", images_in_memory]
    run_main(*common, "--dataloader_num_workers", 0, "--output_dir", tmp_path / "in_process")
    run_main(*common, "--dataloader_num_workers", 2, "--output_dir", tmp_path / "workers")

    in_process = load_file(tmp_path / "in_process" / "model.safetensors")
    workers = load_file(tmp_path / "workers" / "model.safetensors")
    for name, tensor in in_process.items():
        assert torch.equal(workers[name], tensor), name


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])  # forkserver: Linux's default from Python 3.14
def test_persistent_workers_augment_each_epoch_as_the_training_process_would(start_method):
    args = run_finetune.parse_args([])
    _, image_processor = run_finetune.load_model(args.model, labels=["a", "b"])
    train_transform, _ = transforms_of(args, image_processor, 3)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)) for _ in range(6)]
    dataset = number_samples(Dataset.from_dict({"image": images, "label": [0, 1] * 3}))
    dataset = dataset.cast_column("image", datasets.Image()).with_transform(train_transform)
    loader = DataLoader(
        dataset, batch_size=3, collate_fn=loaders.collate_fn, num_workers=1, persistent_workers=True,
        worker_init_fn=loaders.share_batches_as_files, multiprocessing_context=start_method,
    )  # fmt: skip

    epochs = []
    for epoch in (0, 1):
        train_transform.augmentation.epoch = epoch
        from_workers = torch.cat([batch["pixel_values"] for batch in loader])
        in_process = torch.cat([batch["pixel_values"] for batch in DataLoader(
            dataset, batch_size=3, collate_fn=loaders.collate_fn
        )])  # fmt: skip
        assert torch.equal(from_workers, in_process)
        epochs.append(from_workers)
    assert not torch.equal(epochs[0], epochs[1])


def test_default_worker_count_is_one_per_four_cores_of_each_training_process(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    with fresh_accelerate_state():
        accelerator = Accelerator(cpu=True)
        assert hardware.default_num_workers(accelerator) == 4  # at most 4
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
        assert hardware.default_num_workers(accelerator) == 2  # 8 cores per process
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
        assert hardware.default_num_workers(accelerator) == 0  # a single core each: load in the process
        monkeypatch.delenv("LOCAL_WORLD_SIZE")
        assert hardware.default_num_workers(accelerator) == 1  # one process on 2 cores: at least one worker


IN_MEMORY = ["--images_in_memory", "on"]
WORKERS = ["--images_in_memory", "off", "--dataloader_num_workers", "2"]


@pytest.mark.parametrize("loading", [IN_MEMORY, WORKERS], ids=["in-memory", "workers"])
def test_accumulated_batches_train_like_one_large_batch(tmp_path, loading):
    # 20 images: one batch of 20, or batches of 8, 8 and a short 4 accumulated into the same single update. Not with
    # Mixup/CutMix, which mix the images of a batch, so the `basic` recipe (no mixing, no drop path).
    common = [*TINY_MODEL, "--num_train_epochs", 1, "--max_train_samples", 20, "--max_eval_samples", 10, *loading]
    common += ["--recipe", "basic"]
    run_main(*common, "--per_device_train_batch_size", 20, "--output_dir", tmp_path / "large")
    run_main(
        *common, "--per_device_train_batch_size", 8, "--gradient_accumulation_steps", 3,
        "--output_dir", tmp_path / "accumulated",
    )  # fmt: skip

    large = load_file(tmp_path / "large" / "model.safetensors")
    accumulated = load_file(tmp_path / "accumulated" / "model.safetensors")
    for name, tensor in large.items():
        torch.testing.assert_close(accumulated[name], tensor, rtol=1e-5, atol=1e-6)
    large_results = json.loads((tmp_path / "large" / "all_results.json").read_text())
    accumulated_results = json.loads((tmp_path / "accumulated" / "all_results.json").read_text())
    assert accumulated_results["train_loss"] == pytest.approx(large_results["train_loss"], rel=1e-5)


def test_a_compiled_model_is_saved_under_its_own_parameter_names(tmp_path):
    args = run_finetune.parse_args([*TINY_MODEL, "--torch_compile"])  # a bare flag: on
    model, image_processor = run_finetune.load_model(args.model, labels=["a", "b"])
    with fresh_accelerate_state():
        accelerator = hardware.create_accelerator(args.output.output_dir, args.training.seed, compile_model=True)
        compiled = accelerator.prepare(model)  # compiles lazily, at the first forward pass: nothing is compiled here
        assert type(compiled).__name__ == "OptimizedModule"
        save_model(accelerator, compiled, image_processor, tmp_path)

    assert set(load_file(tmp_path / "model.safetensors")) == set(model.state_dict())


def test_torch_compile_auto_compiles_only_where_it_saves_time_and_a_resumed_run_keeps_the_choice(tmp_path):
    args = run_finetune.parse_args(TINY_MODEL)
    assert args.training.torch_compile == "auto"
    model, _ = run_finetune.load_model(args.model, labels=["a", "b"])
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    cpu = torch.device("cpu")
    compiled, reason = hardware.plan_compile("auto", model, 8, 10, cpu, None)
    assert not compiled and "would not repay compiling" in reason  # 10 tiny steps: not even tried
    compiled, reason = hardware.plan_compile("auto", model, 8, 10**9, cpu, None)
    saved, compile_seconds = map(float, re.search(r"(-?[\d.]+) s saved, ([\d.]+) s to compile", reason).groups())
    assert compiled == (saved > compile_seconds) and "ms compiled" in reason  # tried, and kept if it pays
    # Timing trains nothing.
    assert all(torch.equal(tensor, weights[name]) for name, tensor in model.state_dict().items())
    assert all(parameter.grad is None for parameter in model.parameters())

    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    torch.save(TrainingProgress(compiled=True).state_dict(), checkpoint / "custom_checkpoint_0.pkl")
    assert hardware.plan_compile("auto", model, 8, 10, cpu, checkpoint)[0] is True
    assert hardware.plan_compile("off", model, 8, 10**9, cpu, None)[0] is False
