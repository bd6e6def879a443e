"""Data-parallel training on two CPU processes (gloo): disjoint halves of each batch, every sample evaluated once."""

import json
import subprocess
import sys

import numpy as np
import torch
from conftest import REPO_ROOT
from finetune_helpers import TINY_MODEL, script_env
from safetensors.torch import load_file
from transformers import AutoModelForImageClassification

import run_finetune
from modeling_vit_custom import ViTCustomForImageClassification
from vit_training.augment import build_transforms
from vit_training.data import load_image_dataset

# 64 training images: 4 steps of 2 x 8. 50 evaluation images in batches of 2 x 16: the last one is padded with repeats.
# Without repeated augmentation: every image once per epoch.
ARGUMENTS = [
    *TINY_MODEL,
    "--num_train_epochs", "1", "--max_train_samples", "64", "--max_eval_samples", "50",
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--cpu", "--repeated_augmentation", "1",
]  # fmt: skip


def run_on_two_processes(arguments: list[str], tmp_path) -> list[dict]:
    """run_finetune on two CPU processes; what each recorded (tests/record_batches.py)."""
    # `accelerate launch --cpu --num_processes 2` starts a single process; --multi_gpu with --cpu starts two on the CPU.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    result = subprocess.run(
        [*launch, str(REPO_ROOT / "tests" / "record_batches.py"), *arguments],
        cwd=REPO_ROOT,
        env={**script_env(), "RECORD_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def test_repeated_augmentation_trains_each_processes_copy_of_the_same_images(tmp_path):
    arguments = [*ARGUMENTS, "--repeated_augmentation", "2", "--output_dir", str(tmp_path / "out")]
    records = run_on_two_processes(arguments, tmp_path)

    steps = list(zip(records[0]["train_batches"], records[1]["train_batches"], strict=True))
    assert len(steps) == 4  # an epoch still holds 64 images: 32 of them, twice
    for first_half, second_half in steps:
        # Copy 0 (index s) on one process, copy 1 (index 64 + s) of the same images on the other.
        assert all(index < 64 for index in first_half) and all(index >= 64 for index in second_half)
        assert sorted(first_half) == sorted(index - 64 for index in second_half)
    assert len({index % 64 for step in steps for half in step for index in half}) == 32


def test_two_processes_train_on_disjoint_halves_and_evaluate_every_sample_once(tmp_path):
    output_dir = tmp_path / "out"
    records = run_on_two_processes([*ARGUMENTS, "--output_dir", str(output_dir)], tmp_path)
    assert [(record["rank"], record["world_size"]) for record in records] == [(0, 2), (1, 2)]
    steps = list(zip(records[0]["train_batches"], records[1]["train_batches"], strict=True))
    assert len(steps) == 4
    for first_half, second_half in steps:
        assert len(first_half) == len(second_half) == 8
        assert not set(first_half) & set(second_half)
    assert sorted(index for step in steps for half in step for index in half) == list(range(64))

    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["eval_samples"] == results["test_samples"] == 50
    # The metrics equal those of one process evaluating the saved model on the same images.
    args = run_finetune.parse_args([*ARGUMENTS, "--output_dir", str(output_dir)])
    dataset = load_image_dataset(
        max_train_samples=args.data.max_train_samples, max_eval_samples=args.data.max_eval_samples,
        seed=args.training.seed,
    )  # fmt: skip
    model = ViTCustomForImageClassification.from_pretrained(output_dir).eval()
    _, image_processor = run_finetune.load_model(args.model, labels=dataset["train"].features["label"].names)
    _, eval_transform = build_transforms(
        image_processor, model.config.num_channels, ("image", "label"), crop_scale=args.data.crop_scale,
        flip=args.data.horizontal_flip, seed=args.training.seed,
    )  # fmt: skip
    for split, prefix in (("validation", "eval"), ("test", "test")):
        batch = eval_transform(dataset[split][:])
        with torch.no_grad():
            logits = model(pixel_values=batch["pixel_values"]).logits
        labels = torch.tensor(batch["labels"])
        # Computed in another process, the logits may differ in the last bits: a near-tie may flip its prediction.
        near_ties = (logits.topk(2).values.diff(dim=-1).abs() < 1e-5).sum().item()
        accuracy = np.mean((logits.argmax(-1) == labels).numpy())
        assert abs(results[f"{prefix}_accuracy"] - accuracy) <= near_ties / len(labels)
        assert abs(results[f"{prefix}_loss"] - torch.nn.functional.cross_entropy(logits, labels).item()) < 1e-5


def test_fsdp2_on_two_processes_saves_a_model_folder_that_loads_with_trust_remote_code(tmp_path):
    """configs/8gpu_fsdp2.yaml on 2 CPU processes: sharded training saves the model under its own class and code."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", REPO_ROOT / "configs" /
              "8gpu_fsdp2.yaml", "--num_processes", 2, "--num_machines", 1, "--mixed_precision", "no",
              "--main_process_port", 0, REPO_ROOT / "run_finetune.py", *ARGUMENTS]  # fmt: skip

    def run(*argv):
        command = [*launch, *argv]
        return subprocess.run(
            list(map(str, command)), cwd=REPO_ROOT, env=script_env(), capture_output=True, text=True, timeout=300
        )

    # The weight average copies the whole model on each process: refused under FSDP before anything is written.
    refused = run("--ema_decay", 0.999, "--output_dir", tmp_path / "ema")
    assert refused.returncode != 0 and "--ema_decay 0.999" in refused.stderr and "FSDP shards" in refused.stderr
    assert not (tmp_path / "ema").exists()

    result = run("--output_dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Distributed environment: DistributedType.FSDP" in result.stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    classifier = config["auto_map"]["AutoModelForImageClassification"]
    assert classifier == "modeling_vit_custom.ViTCustomForImageClassification"
    assert sorted(path.name for path in (tmp_path / "out").glob("*.py")) == [
        "configuration_vit_custom.py", "modeling_vit_custom.py"
    ]  # fmt: skip
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "out", trust_remote_code=True)
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert saved.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
