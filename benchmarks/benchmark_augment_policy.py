"""CPU time of the per-sample augmentation policy and random erasing on one batch of small images, on one thread.

Compare it with a training step (about 700 ms for a batch of 128 on the CPU): what the in-memory path adds to each
step when the batch is augmented in the training process.

    .venv/bin/python benchmarks/benchmark_augment_policy.py
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vit_training.augment import SampleAugment, augment_batch  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch_size", type=int, default=128, help="Images per batch.")
    parser.add_argument("--repeats", type=int, default=5, help="Batches timed per case.")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for channels, side in ((1, 28), (3, 32)):
        images = torch.randint(0, 256, (args.batch_size, channels, side, side), dtype=torch.uint8)
        for policy, erasing in (("none", 0.25), ("trivial", 0.25), ("rand-m9-n2", 0.25)):
            augment = SampleAugment(policy, erasing, [0.5] * channels)
            augment_batch(augment, images, list(range(args.batch_size)))
            start = time.process_time()
            for repeat in range(args.repeats):
                seeds = list(range(repeat * args.batch_size, (repeat + 1) * args.batch_size))
                augment_batch(augment, images, seeds)
            milliseconds = (time.process_time() - start) / args.repeats * 1000
            print(f"{channels}x{side}x{side}, {policy}, erasing {erasing}: {milliseconds:.1f} ms CPU per batch")


if __name__ == "__main__":
    main()
