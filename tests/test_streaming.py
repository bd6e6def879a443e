"""--streaming: Parquet and WebDataset shards made here, read once per epoch on 2 processes x 2 loader workers,
resumed exactly after a kill, and bad shards or images reported (or skipped) without losing the run."""

import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import REPO_ROOT
from finetune_helpers import TINY_MODEL, kill_at_checkpoint, run_main, script_env
from PIL import Image
from safetensors.torch import load_file

from vit_training import streaming
from vit_training.augment import SAMPLE_INDEX
from vit_training.checkpoints import list_checkpoints
from vit_training.errors import TrainingError

CLASSES = ["red", "green", "blue", "grey"]


def png(label: int, rng: np.random.Generator) -> bytes:
    """An 8x8 PNG whose colour depends on the label, with noise that makes every image different."""
    colour = np.array([255 * (label % 3 == c) for c in range(3)], dtype=np.float64) * (0.4 if label == 3 else 0.7)
    pixels = np.clip(colour + rng.normal(0, 40, size=(8, 8, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet_shards(folder: Path, sizes: list[int], seed: int = 0) -> Path:
    """`folder/shard-<n>.parquet` with `image` and a ClassLabel `label` (CLASSES), as `datasets` writes them."""
    rng, index = np.random.default_rng(seed), 0
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    folder.mkdir(parents=True)
    for shard, size in enumerate(sizes):
        labels = [(index + i) % len(CLASSES) for i in range(size)]
        images = [{"bytes": png(label, rng), "path": None} for label in labels]
        split = datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)
        split.to_parquet(folder / f"shard-{shard}.parquet")
        index += size
    return folder


def write_tar_shards(folder: Path, sizes: list[int], num_classes: int, seed: int = 0, bad: tuple = ()) -> Path:
    """`folder/shard-<n>.tar` in WebDataset layout: `<key>.png` and `<key>.cls` per image, the n-th image of all
    shards labelled n % num_classes. The images numbered in `bad` hold bytes that are not an image."""
    rng, index = np.random.default_rng(seed), 0
    folder.mkdir(parents=True)
    for shard, size in enumerate(sizes):
        with tarfile.open(folder / f"shard-{shard}.tar", "w") as tar:
            for n in range(index, index + size):
                image = b"not a png" if n in bad else png(n % num_classes % len(CLASSES), rng)
                for extension, data in (("png", image), ("cls", str(n % num_classes).encode())):
                    member = tarfile.TarInfo(f"{n:05d}.{extension}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
        index += size
    return folder


WEBDATASET_COLUMNS = ["--image_column_name", "png", "--label_column_name", "cls"]


def test_parquet_and_webdataset_shards_stream_every_image_once(tmp_path):
    parquet = write_parquet_shards(tmp_path / "parquet", [5, 3, 4])
    tars = write_tar_shards(tmp_path / "tars", [5, 3, 4], num_classes=4)
    for source, columns in ((parquet, ("image", "label")), (tars, ("png", "cls"))):
        data = streaming.load_streaming_data(*columns, seed=0, train=source, validation=source)
        assert data.shard_sizes in ([5, 3, 4], [5, 4, 3], [3, 5, 4], [3, 4, 5], [4, 5, 3], [4, 3, 5])
        assert len(data.validation) == 12 and data.test is None
        seen = []

        def transform(batch, seen=seen):  # the collate_fn's transform: sees the images and their ids
            seen.extend(zip(batch[SAMPLE_INDEX], batch[columns[1]], strict=True))
            return {"pixel_values": torch.zeros(len(batch[columns[1]])), "labels": batch[columns[1]]}

        loader = streaming.StreamLoader(
            data.train, transform, *columns, data.labels, data.labels_are_names, batch_size=5, num_workers=0,
            seed=0, shuffle_buffer_size=4, process_index=0, num_processes=1, device=torch.device("cpu"),
            image_shape=(3, 16, 16),
        )  # fmt: skip
        for epoch in (0, 1):
            seen.clear()
            loader.set_epoch(epoch)
            assert [len(batch["labels"]) for batch in loader] == [5, 5, 2]
            assert len({sample for sample, _ in seen}) == 12
            assert sorted(label for _, label in seen) == sorted(n % 4 for n in range(12))
        assert data.labels == (CLASSES if source == parquet else ["0", "1", "2", "3"])


def test_two_processes_with_two_workers_each_train_on_every_image_once_per_epoch(tmp_path):
    # 40 images, each of its own class, in 4 shards of uneven sizes: one process may run out before the other.
    shards = write_tar_shards(tmp_path / "train", [17, 3, 7, 13], num_classes=40)
    validation = write_tar_shards(tmp_path / "validation", [40], num_classes=40, seed=1)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    arguments = [
        *TINY_MODEL, *WEBDATASET_COLUMNS, "--streaming", "--train_dir", shards, "--validation_dir", validation,
        "--num_train_epochs", 2, "--per_device_train_batch_size", 4, "--dataloader_num_workers", 2,
        "--shuffle_buffer_size", 5, "--cpu", "--output_dir", tmp_path / "out",
    ]  # fmt: skip
    result = subprocess.run(
        [*launch, str(REPO_ROOT / "tests" / "record_batches.py"), *map(str, arguments)],
        cwd=REPO_ROOT, env={**script_env(), "RECORD_DIR": str(tmp_path)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [(record["rank"], record["world_size"]) for record in records] == [(0, 2), (1, 2)]
    first, second = (record["train_labels"] for record in records)
    assert len(first) == len(second)  # the processes took the same steps
    steps = [a + b for a, b in zip(first, second, strict=True)]
    assert -100 in sum(steps, [])  # a process out of images trained on padding meanwhile
    # Each epoch is a run of steps that holds every image exactly once.
    images = [[label for label in step if label != -100] for step in steps]
    epoch_ends = [end for end in range(len(images) + 1) if sorted(sum(images[:end], [])) == list(range(40))]
    assert len(epoch_ends) == 1, images
    assert sorted(sum(images[epoch_ends[0] :], [])) == list(range(40))
    results = json.loads((tmp_path / "out" / "all_results.json").read_text())
    assert results["epoch"] == 2 and results["train_samples"] == 40 and results["skipped_images"] == 0
    assert results["eval_samples"] == 40


# 3 epochs of 9-10 steps of 4 images on 2 loader workers, a checkpoint every 4 steps, dropout.
def resumable_run(shards: Path) -> list:
    return [
        *TINY_MODEL, "--streaming", "--train_dir", shards, "--validation_dir", shards, "--num_train_epochs", 3,
        "--per_device_train_batch_size", 4, "--dataloader_num_workers", 2, "--shuffle_buffer_size", 6,
        "--checkpointing_steps", 4, "--hidden_dropout_prob", 0.1, "--max_eval_samples", 8,
    ]  # fmt: skip


def assert_same_weights(first: Path, second: Path):
    first, second = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert first.keys() == second.keys()
    for name, tensor in first.items():  # bit for bit
        assert torch.equal(second[name], tensor), name


def test_a_killed_stream_resumes_where_it_stopped_to_the_same_weights(tmp_path):
    shards = write_parquet_shards(tmp_path / "shards", [9, 7, 10, 6])
    run_main(*resumable_run(shards), "--output_dir", tmp_path / "reference")

    killed_dir = tmp_path / "killed"
    # Mid-way through the first epoch.
    kill_at_checkpoint(resumable_run(shards), killed_dir, "checkpoint-4", tmp_path / "killed.log")

    resumed = run_main(*resumable_run(shards), "--output_dir", killed_dir, "--resume_from_checkpoint", "latest")
    assert resumed["epoch"] == 3
    assert_same_weights(tmp_path / "reference", killed_dir)


@pytest.mark.parametrize("shard_format", ["parquet", "tar"])
def test_a_corrupt_shard_is_named_before_training(tmp_path, shard_format):
    if shard_format == "parquet":
        shards = write_parquet_shards(tmp_path / "shards", [4, 4])
    else:
        shards = write_tar_shards(tmp_path / "shards", [4, 4], num_classes=4)
    corrupt = shards / f"shard-1.{shard_format}"
    corrupt.write_bytes(corrupt.read_bytes()[:300])  # a copy cut short
    flags = WEBDATASET_COLUMNS if shard_format == "tar" else []
    fix = "Copy or download it again, or move it out of the folder"
    with pytest.raises(TrainingError, match=rf"(?s){re.escape(str(corrupt))}.*{fix}"):
        run_main(*TINY_MODEL, *flags, "--streaming", "--train_dir", shards, "--validation_dir", shards,
                 "--output_dir", tmp_path / "out")  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_a_bad_image_is_skipped_and_counted_or_stops_the_run_after_a_checkpoint(tmp_path):
    # The 10th of 16 images is not an image; batches of 4, read in order.
    shards = write_tar_shards(tmp_path / "shards", [8, 8], num_classes=4, bad=(9,))
    validation = write_tar_shards(tmp_path / "validation", [8], num_classes=4, seed=1)
    run = [
        *TINY_MODEL, *WEBDATASET_COLUMNS, "--streaming", "--train_dir", shards, "--validation_dir", validation,
        "--num_train_epochs", 2, "--per_device_train_batch_size", 4, "--dataloader_num_workers", 0,
        "--shuffle_buffer_size", 1, "--hidden_dropout_prob", 0.1,
    ]  # fmt: skip
    skipped = run_main(*run, "--on_bad_image", "skip", "--output_dir", tmp_path / "skip")
    assert skipped["skipped_images"] == 2  # once per epoch

    stopped_dir = tmp_path / "stop"
    with pytest.raises(TrainingError, match=r"sample '00009' of shard .*shard-1\.tar.*--resume_from_checkpoint latest"):
        run_main(*run, "--output_dir", stopped_dir)
    assert len(list_checkpoints(stopped_dir)) == 1  # the images trained on so far
    assert not (stopped_dir / "all_results.json").exists()
    # The run goes on after the bad image; it stops again at the next one, in the second epoch.
    with pytest.raises(TrainingError, match="sample '00009'"):
        run_main(*run, "--output_dir", stopped_dir, "--resume_from_checkpoint", "latest")
    resumed = run_main(*run, "--output_dir", stopped_dir, "--resume_from_checkpoint", "latest")
    assert resumed["skipped_images"] == 2
    assert_same_weights(tmp_path / "skip", stopped_dir)  # as if it had skipped the image without stopping
