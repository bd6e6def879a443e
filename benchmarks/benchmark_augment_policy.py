"""CPU time of the augmentation policy and random erasing on one batch of small images, on one thread: torchvision
image by image (what loader workers do) against `BatchPolicy` over the whole batch (what in-memory images get), in
alternating rounds.

Compare it with a training step (about 110 ms for a batch of 64 of the Fashion-MNIST recipe's model on 2 cores):
what the in-memory path adds to each step, as the batch is augmented in the training process.

    .venv/bin/python benchmarks/benchmark_augment_policy.py
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vit_training.augment import SampleAugment  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=64, help="Images per batch.")
    parser.add_argument("--rounds", type=int, default=5, help="Alternating rounds per case.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| images | policy | erasing | image by image (ms) | batched (ms) | speed-up |\n|---|---|---|---|---|---|")
    for channels, side in ((1, 28), (3, 32)):
        images = torch.rand(args.batch_size, channels, side, side)
        for policy, erasing in (("none", 0.25), ("trivial", 0.25), ("rand-m9-n2", 0.25)):
            augment = SampleAugment(policy, erasing, [0.5] * channels)
            batched = augment.batched((side, side))
            draws = torch.rand(args.batch_size, batched.columns, dtype=torch.float64)
            cases = {"each": lambda: each(augment, images), "batched": lambda: batched(images, draws)}
            times = {name: [] for name in cases}
            for _ in range(args.rounds):
                for name, case in cases.items():
                    start = time.process_time()
                    case()
                    times[name].append((time.process_time() - start) * 1000)
            each_ms, batched_ms = statistics.median(times["each"]), statistics.median(times["batched"])
            print(f"| {args.batch_size}x{channels}x{side}x{side} | {policy} | {erasing} | {each_ms:.1f} | "
                  f"{batched_ms:.1f} | {each_ms / batched_ms:.1f}x |")  # fmt: skip


def each(augment: SampleAugment, images: torch.Tensor) -> torch.Tensor:
    augmented = []
    for seed, image in enumerate(images):
        torch.manual_seed(seed)
        augmented.append(augment(image))
    return torch.stack(augmented)


if __name__ == "__main__":
    main()
