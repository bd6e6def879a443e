"""Real data at real scale: run_finetune.py on Fashion-MNIST's 60,000 training images, beside a plain PyTorch loop.

Reads Debian's `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`: the IDX files under
/usr/share/datasets/fashion-mnist), writes it once as an image folder (`train/<class>/*.png`, `test/<class>/*.png`,
70,000 PNGs), then:

1. start-up: `run_finetune.py` in a fresh process, `--max_train_steps 1`: the seconds from the process's start to the
   end of its first optimizer step (listing 60,000 files, decoding them, building the model, all included);
2. the run: `run_finetune.main()` in this process with the test images as validation set, so that the accuracy
   after every epoch is the test accuracy. After every epoch, while the run waits, a plain loop trains the same
   model (the run's flags decide its size and batch) on the same images for a few seconds: the images held in
   memory as a uint8 tensor, a random shift of up to 2 px and a flip per batch, label smoothing, gradient clipping
   and fused AdamW, as one would write by hand. The run's img/s over the epoch is divided by the plain loop's img/s
   measured right after it (the speed of a shared machine drifts), at the same threads, and the median of these
   ratios is reported.

    python benchmarks/benchmark_fashion_mnist.py                       # 5 epochs, about 20-30 minutes on 2 cores
    python benchmarks/benchmark_fashion_mnist.py --epochs 1 -- --max_train_samples 10000   # flags after -- go to run
"""

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import run_finetune  # noqa: E402
from modeling_vit_custom import ViTCustomForImageClassification  # noqa: E402

SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]
# The model: 28 px grey images, 4 px patches (49 tokens), 6 blocks of width 192, 1.8M parameters.
MODEL = (
    "--num_channels 1 --image_size 28 --patch_size 4 --hidden_size 192 --num_hidden_layers 6 --num_attention_heads 3 "
    "--intermediate_size 768 --pooling mean --per_device_train_batch_size 128"
).split()


def main():
    args = parse_args()
    folder = image_folder(args.data_dir)
    run_argv = [
        "--train_dir", str(folder / "train"), "--validation_dir", str(folder / "test"), *MODEL,
        "--num_train_epochs", str(args.epochs), *args.run_finetune_args,
    ]  # fmt: skip
    with tempfile.TemporaryDirectory() as workdir:
        startup = time_to_first_step(run_argv, Path(workdir) / "startup")
        print(f"time to first step (fresh process, imports included): {startup:.1f} s", flush=True)
        observer = PlainLoopComparison(run_argv, args.plain_seconds)
        run_start = time.perf_counter()
        results = run_finetune.main([*run_argv, "--output_dir", str(Path(workdir) / "run")], on_event=observer)
        total = time.perf_counter() - run_start - observer.plain_seconds_total

    threads = torch.get_num_threads()
    print(f"\n# Fashion-MNIST, {os.cpu_count()} cores, {threads} training thread(s), run_finetune {' '.join(run_argv)}")
    print(f"time to first step: {startup:.1f} s; wall time of the run without the plain loops: {total / 60:.1f} min")
    print("| epoch | wall time (min) | test accuracy | run img/s | plain loop img/s | run / plain |")
    print("|---|---|---|---|---|---|")
    for row in observer.rows:
        print(f"| {row['epoch']} | {row['minutes']:.1f} | {row['accuracy']:.4f} | {row['run']:.0f} | "
              f"{row['plain']:.0f} | {row['run'] / row['plain']:.2f} |")  # fmt: skip
    ratios = [row["run"] / row["plain"] for row in observer.rows]
    print(f"\nmedian run / plain loop: {statistics.median(ratios):.2f} (target >= 0.9); final test accuracy "
          f"{results['eval_accuracy']:.4f}; train_loop_samples_per_second {results['train_loop_samples_per_second']}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", type=Path, default=Path(tempfile.gettempdir()) / "fashion-mnist-folder",
                        help="Where the image folder is written once and then reused.")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=5, help="Epochs of the run.")
    parser.add_argument("--plain_seconds", type=float, default=20.0, help="Seconds of plain loop after each epoch.")
    parser.add_argument("run_finetune_args", nargs="*", help="more flags for run_finetune.py, after --")
    return parser.parse_args()


def read_idx(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST's `train` or `t10k` images `(N, 28, 28)` and labels from the Debian package's IDX files."""
    if not SOURCE.is_dir():
        sys.exit(f"{SOURCE} is missing: apt-get install dataset-fashion-mnist")
    with gzip.open(SOURCE / f"{kind}-images-idx3-ubyte.gz") as file:
        images = np.frombuffer(file.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(SOURCE / f"{kind}-labels-idx1-ubyte.gz") as file:
        labels = np.frombuffer(file.read(), np.uint8, offset=8)
    return images, labels


def image_folder(folder: Path) -> Path:
    """Write Fashion-MNIST as `folder/{train,test}/<class>/<index>.png` once; reuse it when complete."""
    done = folder / ".complete"
    if done.exists():
        return folder
    start = time.perf_counter()
    for kind, split in (("train", "train"), ("t10k", "test")):
        images, labels = read_idx(kind)
        for name in CLASSES:
            (folder / split / name).mkdir(parents=True, exist_ok=True)
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            Image.fromarray(image).save(folder / split / CLASSES[label] / f"{index:05d}.png")
    done.touch()
    print(f"wrote {folder} in {time.perf_counter() - start:.0f} s", flush=True)
    return folder


def time_to_first_step(run_argv: list[str], output_dir: Path) -> float:
    """Seconds from a fresh run_finetune.py process's start to the end of its first optimizer step."""
    command = [sys.executable, str(REPO_ROOT / "run_finetune.py"), *run_argv, "--max_train_steps", "1",
               "--max_eval_samples", "128", "--output_dir", str(output_dir)]  # fmt: skip
    run = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"run_finetune.py failed:\n{run.stderr[-3000:]}")
    return json.loads((output_dir / "all_results.json").read_text())["seconds_to_first_step"]


class PlainLoopComparison:
    """run_finetune's `on_event` observer: after each epoch, times a plain loop on the same model and images."""

    def __init__(self, run_argv: list[str], seconds: float):
        self.seconds, self.rows, self.plain_seconds_total = seconds, [], 0.0
        # The model and batch of the run itself, flags after -- included (they come last, so they win).
        args = run_finetune.parse_args([*run_argv, "--output_dir", tempfile.gettempdir()])
        self.config = args.model.new_config(CLASSES)
        self.batch = args.training.per_device_train_batch_size
        if self.config.num_channels != 1 or tuple(self.config.image_height_width) != (28, 28):
            sys.exit("The plain loop trains on the 28 px grey images as they are: keep --num_channels 1 and "
                     "--image_size 28 in the flags after --.")  # fmt: skip
        images, labels = read_idx("train")
        self.images = torch.from_numpy(images.copy()).unsqueeze(1)
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.start = time.perf_counter()
        self.model = self.optimizer = None

    def __call__(self, event: str, values: dict):
        if event != "epoch":
            return
        pause = time.perf_counter()
        with torch.random.fork_rng(devices=[]):  # the run's own random numbers stay as they would be
            plain = self.plain_loop_rate()
        self.rows.append({
            "epoch": values["epoch"], "accuracy": values["eval_accuracy"], "plain": plain,
            "run": values["train_images"] / values["train_seconds"],
            "minutes": (pause - self.start - self.plain_seconds_total) / 60,
        })  # fmt: skip
        print(f"epoch {values['epoch']}: test accuracy {values['eval_accuracy']:.4f}, run "
              f"{self.rows[-1]['run']:.0f} img/s, plain loop {plain:.0f} img/s", flush=True)  # fmt: skip
        self.plain_seconds_total += time.perf_counter() - pause

    def plain_loop_rate(self) -> float:
        """img/s of a hand-written loop over about `self.seconds`, after a few warm-up steps."""
        if self.model is None:
            self.model = ViTCustomForImageClassification(self.config).train()
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.05, fused=True)
        batch = self.batch
        order = torch.randperm(len(self.labels))
        steps, start = 0, None
        for first in range(0, len(order) - batch, batch):
            if steps == 3:
                start = time.perf_counter()
            self.plain_step(order[first : first + batch])
            steps += 1
            if start is not None and time.perf_counter() - start > self.seconds:
                break
        return (steps - 3) * batch / (time.perf_counter() - start)

    def plain_step(self, indices: torch.Tensor):
        images = self.images[indices].float()
        dy, dx = torch.randint(-2, 3, (2,)).tolist()
        images = torch.roll(images, shifts=(dy, dx), dims=(2, 3))
        images = torch.where(torch.rand(len(images), 1, 1, 1) < 0.5, images.flip(3), images)
        pixel_values = (images / 255 - 0.5) / 0.5
        logits = self.model(pixel_values=pixel_values).logits
        loss = nn.functional.cross_entropy(logits, self.labels[indices], label_smoothing=0.1)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        loss.item()


if __name__ == "__main__":
    main()
