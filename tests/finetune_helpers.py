"""Helpers for the run_finetune.py tests: in-process runs, image folders and a tiny checkpoint to fine-tune."""

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from accelerate.state import AcceleratorState, GradientState
from conftest import REPO_ROOT, tiny_config
from PIL import Image
from transformers import ViTImageProcessor

import run_finetune
from modeling_vit_custom import ViTCustomForImageClassification

# A 2-block, 32-wide model and a few dozen images: a run takes seconds.
TINY_MODEL = [
    "--hidden_size",
    "32",
    "--num_hidden_layers",
    "2",
    "--num_attention_heads",
    "2",
    "--intermediate_size",
    "64",
]
SHORT_RUN = ["--num_train_epochs", "1", "--max_train_samples", "64", "--max_eval_samples", "40"]


@contextmanager
def fresh_accelerate_state():
    """A fresh Accelerate state and one CPU thread for code that creates an `Accelerator` in this process.

    Both are restored afterwards, so that one in-process run does not leak into the next test.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the models are tiny: more threads only wait for each other on a shared machine
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        torch.set_num_threads(threads)


def run_main(*argv) -> dict:
    """`run_finetune.main(argv)` in this process, with a fresh Accelerate state."""
    with fresh_accelerate_state():
        return run_finetune.main([str(arg) for arg in argv])


def run_script(
    *argv, timeout: float = 300, script: str = "run_finetune.py", **popen_kwargs
) -> subprocess.CompletedProcess:
    """Runs `python <script> argv` (default: run_finetune.py) in a new process, from the repository root, capturing its
    output."""
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / script), *map(str, argv)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=script_env(),
        **popen_kwargs,
    )


def kill_at_checkpoint(
    argv: list, output_dir: Path, checkpoint: str, log_path: Path, script: str = "run_finetune.py"
):
    """Run `python <script> argv --output_dir output_dir` (default: run_finetune.py) and SIGKILL it once `checkpoint`
    exists in the folder, as a crash or a preempted job would stop it; asserts that it was still running then and
    wrote no results."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / script), *map(str, argv), "--output_dir", str(output_dir)],
            cwd=REPO_ROOT, env=script_env(), stdout=log, stderr=log,
        )  # fmt: skip
        deadline = time.monotonic() + 240
        while not (output_dir / checkpoint).exists():
            assert process.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no {checkpoint} within 4 minutes"
            time.sleep(0.01)
        assert process.poll() is None, "the run finished before it could be killed"
        process.kill()
        process.wait()
    assert not (output_dir / "all_results.json").exists()


def script_env() -> dict:
    """The environment for a script run: offline, one thread per process."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def make_image_folder(root: Path, classes: list[str], images_per_class: int, size: int = 20, seed: int = 0) -> Path:
    """`root/<class>/<n>.png`: RGB images whose colour depends on the class, so that a model can learn them."""
    rng = np.random.default_rng(seed)
    for class_index, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        colour = np.array([255 * (class_index == c) for c in range(3)], dtype=np.float64)
        for n in range(images_per_class):
            pixels = np.clip(colour * 0.7 + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{n}.png")
    return root


def save_tiny_checkpoint(path: Path, labels: list[str], **config_overrides) -> ViTCustomForImageClassification:
    """A vit_custom folder with a `len(labels)`-class head and an image processor, as run_finetune.py saves them."""
    config = tiny_config(
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        **config_overrides,
    )
    torch.manual_seed(0)
    model = ViTCustomForImageClassification(config)
    model.save_pretrained(path)
    height, width = config.image_height_width
    ViTImageProcessor(
        size={"height": height, "width": width}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    ).save_pretrained(path)
    return model
