"""Is run_finetune.py's training loop the bottleneck? Its img/s on the default run against bare training steps.

Runs `run_finetune.main()` with its defaults in this process (only --output_dir points to a temporary folder) and
times its training epochs, data loading, augmentation, logging and progress bar included, evaluation left out. Then
it times bare training steps of a model with the same config at the same batch size and image size on random data,
in the same process and with the same threads:

- "bare step": forward, cross-entropy, backward, fused AdamW, as benchmarks/benchmark_speed.py times it;
- "bare step as run_finetune": the same with run_finetune's own optimisation (its AdamW, label smoothing, gradient
  clipping), so that the gap to the run is the loop itself: data, logging and bookkeeping.

The run should reach at least 90% of the bare step's img/s.

    python benchmarks/benchmark_finetune_overhead.py
    python benchmarks/benchmark_finetune_overhead.py -- --num_train_epochs 5   # flags after -- go to run_finetune
"""

import argparse
import inspect
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import run_finetune  # noqa: E402
from benchmark_speed import Size, make_step  # noqa: E402
from configuration_vit_custom import ViTCustomConfig  # noqa: E402
from modeling_vit_custom import ViTCustomForImageClassification  # noqa: E402


TARGET = 0.9


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory() as output_dir:
        run_argv = ["--output_dir", output_dir, *args.run_finetune_args]
        run_args = run_finetune.parse_args(run_argv)
        timer = EpochTimer()
        run_finetune.train_one_epoch = timer.wrap(run_finetune.train_one_epoch)
        run_finetune.main(run_argv)
        config = ViTCustomConfig.from_pretrained(output_dir)

    batch = run_args.per_device_train_batch_size
    run_rate = timer.images / timer.seconds
    steady_rate = timer.images_after_first / timer.seconds_after_first
    bare = {
        "bare step": bare_step(config, batch),
        "bare step as run_finetune": bare_step_as_run_finetune(config, batch, run_args),
    }
    bare_rates = {name: median_rate(step, batch, args.rounds) for name, step in bare.items()}

    print(f"\n# {torch.get_num_threads()} threads, batch {batch}, image size {config.image_size}, "
          f"{config.num_hidden_layers} blocks of width {config.hidden_size}, pooling {config.pooling}")  # fmt: skip
    print(f"run_finetune: {timer.images} images, {len(timer.epoch_seconds)} epochs, {timer.seconds:.1f} s of training")
    print("| | img/s | run_finetune / this |")
    print("|---|---|---|")
    print(f"| run_finetune, all epochs | {run_rate:.0f} | |")
    print(f"| run_finetune, after the first epoch | {steady_rate:.0f} | |")
    for name, rate in bare_rates.items():
        print(f"| {name} | {rate:.0f} | {run_rate / rate:.2f} (after the first epoch {steady_rate / rate:.2f}) |")
    ratio = run_rate / bare_rates["bare step"]
    print(f"\nrun_finetune reaches {ratio:.0%} of the bare step's img/s: target >= {TARGET:.0%} "
          f"{'holds' if ratio >= TARGET else 'does NOT hold'}")  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="measurements of each bare step (1 s each); the median")
    parser.add_argument("run_finetune_args", nargs="*", help="flags for run_finetune.py, after --")
    return parser.parse_args()


class EpochTimer:
    """Wraps run_finetune.train_one_epoch to add up the wall time of the training epochs and the images they saw."""

    def __init__(self):
        self.epoch_seconds, self.epoch_images = [], []

    def wrap(self, train_one_epoch):
        signature = inspect.signature(train_one_epoch)

        def timed(*args, **kwargs):
            dataloader = signature.bind(*args, **kwargs).arguments["train_dataloader"]
            start = time.perf_counter()
            loss = train_one_epoch(*args, **kwargs)
            self.epoch_seconds.append(time.perf_counter() - start)
            self.epoch_images.append(len(dataloader.dataset))
            return loss

        return timed

    @property
    def seconds(self) -> float:
        return sum(self.epoch_seconds)

    @property
    def images(self) -> int:
        return sum(self.epoch_images)

    @property
    def seconds_after_first(self) -> float:
        return sum(self.epoch_seconds[1:])

    @property
    def images_after_first(self) -> int:
        return sum(self.epoch_images[1:])


def bare_step(config: ViTCustomConfig, batch: int):
    size = Size(
        image_size=config.image_size, patch_size=config.patch_size, dim=config.hidden_size,
        depth=config.num_hidden_layers, heads=config.num_attention_heads, mlp_dim=config.intermediate_size,
        num_labels=config.num_labels,
    )  # fmt: skip
    model = ViTCustomForImageClassification(config)
    return make_step(model, "train", size, batch, argparse.Namespace(device="cpu", dtype="float32"))


def bare_step_as_run_finetune(config: ViTCustomConfig, batch: int, run_args: argparse.Namespace):
    """One optimizer step with run_finetune's optimisation, on random data and without the loop around it."""
    model = ViTCustomForImageClassification(config).train()
    optimizer = torch.optim.AdamW(
        run_finetune.parameter_groups(model, run_args.weight_decay), lr=run_args.learning_rate
    )
    pixel_values = torch.randn(batch, config.num_channels, config.image_size, config.image_size)
    labels = torch.randint(0, config.num_labels, (batch,))

    def step():
        logits = model(pixel_values=pixel_values).logits
        loss = nn.functional.cross_entropy(logits.float(), labels, label_smoothing=run_args.label_smoothing)
        loss.backward()
        if run_args.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), run_args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        loss.item()

    return step


def median_rate(step, batch: int, rounds: int) -> float:
    """Median img/s over `rounds` measurements of about a second, on the wall clock like the run's."""
    for _ in range(5):
        step()
    start = time.perf_counter()
    step()
    repeats = max(1, round(1.0 / (time.perf_counter() - start)))
    rates = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        rates.append(repeats * batch / (time.perf_counter() - start))
    return statistics.median(rates)


if __name__ == "__main__":
    main()
