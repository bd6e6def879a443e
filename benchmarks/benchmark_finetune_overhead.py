"""Is run_finetune.py's training loop the bottleneck? Its img/s on the default run against bare training steps.

Runs `run_finetune.main()` with its defaults in this process (only --output_dir points to a temporary folder) and
times each training epoch, data loading (by the worker processes run_finetune starts), augmentation, logging and
progress bar included, evaluation left out. After every epoch, while the run's loader workers are idle, it times
bare training steps of a model with the same config at the same batch size and image size on random data, in the same
process and with the same threads, for about a second each:

- "bare step": forward, cross-entropy, backward, fused AdamW, as benchmarks/benchmark_speed.py times it;
- "bare step as run_finetune": the same with run_finetune's own optimisation (label smoothing, gradient clipping),
  so that the gap to the run is the loop itself: data, logging and bookkeeping.

Each epoch is compared with the bare steps timed right after it, because the speed of a shared machine drifts; the
median of these per-epoch ratios should be at least 0.9. Since 2026-12-01 the default run augments the digits with
RandAugment (the `randaugment` recipe), 8-19 ms a batch of 32 on a 2 GHz Xeon, which counts as loop time here; pass
`-- --auto_augment none` to time the loop without the policy.

    python benchmarks/benchmark_finetune_overhead.py
    python benchmarks/benchmark_finetune_overhead.py -- --dataloader_num_workers 0   # flags after -- go to run_finetune
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import run_finetune  # noqa: E402
from vit_training.arguments import TrainingArguments  # noqa: E402
from vit_training.param_groups import parameter_groups  # noqa: E402
from vit_training.recipes import learning_rate  # noqa: E402
from benchmark_speed import Size, clock_of, make_step  # noqa: E402
from configuration_vit_custom import ViTCustomConfig  # noqa: E402
from modeling_vit_custom import ViTCustomForImageClassification  # noqa: E402


TARGET = 0.9


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory() as output_dir:
        run_argv = ["--output_dir", output_dir, *args.run_finetune_args]
        run_args = run_finetune.parse_args(run_argv)
        # The model the run trains, with the digits' 10 classes (the head's size hardly changes a step's time).
        config = run_finetune.load_model(run_args.model, labels=[str(digit) for digit in range(10)])[0].config
        training = run_args.training
        batch = training.per_device_train_batch_size
        training.learning_rate = learning_rate(run_args.recipe.settings, batch)  # as run_finetune sets it
        # Where and in which precision run_finetune trains: a GPU when there is one, bf16 with --mixed_precision bf16.
        step_args = argparse.Namespace(
            device="cuda" if torch.cuda.is_available() and not training.cpu else "cpu",
            dtype="bfloat16" if training.mixed_precision == "bf16" else "float32",
            clock="wall",
        )
        bare = {
            "bare step": bare_step(config, batch, step_args),
            "bare step as run_finetune": bare_step_as_run_finetune(config, batch, training, step_args),
        }
        timer = EpochTimer(bare, batch, clock_of(step_args))
        results = run_finetune.main(run_argv, on_event=timer)

    epochs = len(timer.epoch_rates)
    print(f"\n# {step_args.device}, {step_args.dtype}, {torch.get_num_threads()} threads, batch {batch}, "
          f"image size {config.image_size}, {config.num_hidden_layers} blocks of width {config.hidden_size}, "
          f"pooling {config.pooling}")  # fmt: skip
    print(f"run_finetune: {epochs} epochs, test accuracy {results.get('test_accuracy', float('nan')):.4f}")
    print("| | median img/s | run_finetune / this, median of per-epoch ratios (range) |")
    print("|---|---|---|")
    print(f"| run_finetune epoch | {statistics.median(timer.epoch_rates):.0f} | |")
    for name, rates in timer.bare_rates.items():
        ratios = [run / bare for run, bare in zip(timer.epoch_rates, rates, strict=True)]
        print(f"| {name} | {statistics.median(rates):.0f} | {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}-{max(ratios):.2f}) |")  # fmt: skip
    bare_rates = timer.bare_rates["bare step"]
    ratio = statistics.median(run / bare for run, bare in zip(timer.epoch_rates, bare_rates, strict=True))
    print(f"\nrun_finetune reaches {ratio:.0%} of the bare step's img/s: target >= {TARGET:.0%} "
          f"{'holds' if ratio >= TARGET else 'does NOT hold'}")  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_finetune_args", nargs="*", help="flags for run_finetune.py, after --")
    return parser.parse_args()


class EpochTimer:
    """run_finetune's `on_event` observer: takes each epoch's training img/s, then times each bare step for about a
    second while the run waits."""

    def __init__(self, bare_steps: dict, batch: int, clock):
        self.bare_steps, self.batch, self.clock = bare_steps, batch, clock
        self.epoch_rates = []
        self.bare_rates = {name: [] for name in bare_steps}
        for step in bare_steps.values():
            for _ in range(5):  # warm-up
                step()

    def __call__(self, event: str, values: dict):
        if event != "epoch":
            return
        self.epoch_rates.append(values["train_images"] / values["train_seconds"])
        with torch.random.fork_rng(devices=[]):  # the run's own random numbers stay as they would be
            for name, step in self.bare_steps.items():
                self.bare_rates[name].append(rate(step, self.batch, self.clock))


def bare_step(config: ViTCustomConfig, batch: int, step_args: argparse.Namespace):
    size = Size(
        image_size=config.image_size, patch_size=config.patch_size, dim=config.hidden_size,
        depth=config.num_hidden_layers, heads=config.num_attention_heads, mlp_dim=config.intermediate_size,
        num_labels=config.num_labels,
    )  # fmt: skip
    model = ViTCustomForImageClassification(config).to(step_args.device)
    return make_step(model, "train", size, batch, step_args)


def bare_step_as_run_finetune(
    config: ViTCustomConfig, batch: int, training: TrainingArguments, step_args: argparse.Namespace
):
    """One optimizer step with run_finetune's optimisation, on random data and without the loop around it."""
    model = ViTCustomForImageClassification(config).to(step_args.device).train()
    optimizer = torch.optim.AdamW(
        parameter_groups(model, training.weight_decay, training.learning_rate), fused=True
    )
    pixel_values = torch.randn(batch, config.num_channels, config.image_size, config.image_size)
    pixel_values = pixel_values.to(step_args.device)
    labels = torch.randint(0, config.num_labels, (batch,)).to(step_args.device)
    autocast = torch.autocast(step_args.device, dtype=torch.bfloat16, enabled=step_args.dtype == "bfloat16")

    def step():
        with autocast:
            logits = model(pixel_values=pixel_values).logits
        loss = nn.functional.cross_entropy(logits.float(), labels, label_smoothing=training.label_smoothing)
        loss.backward()
        if training.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), training.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        loss.item()

    return step


def rate(step, batch: int, clock, seconds: float = 1.0) -> float:
    """img/s of `step` over about `seconds` of `clock` (wall time, after a GPU sync, like the run's epochs)."""
    start = clock()
    step()
    repeats = max(1, round(seconds / (clock() - start)))
    start = clock()
    for _ in range(repeats):
        step()
    return repeats * batch / (clock() - start)


if __name__ == "__main__":
    main()
