"""Where a second CPU thread starts to pay: training steps of small ViTs on one thread against all cores.

`run_finetune.py` trains on every core of its process when the model's MLP layer is large enough to share between
threads, on one when it is small, and times a few steps on both between the two (`TRIAL_WORK_PER_THREAD` in
`vit_training/hardware.py`: batch x tokens x width x MLP width per thread). This benchmark times full training steps
(forward, backward, AdamW) of models around that range, one thread against all cores in alternating rounds in one
process, and prints the ratio beside the choice the script makes on this machine (`hardware.choose_threads`).

    python benchmarks/benchmark_threads.py             # about 3 minutes on 2 cores
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from configuration_vit_custom import ViTCustomConfig  # noqa: E402
from modeling_vit_custom import ViTCustomForImageClassification  # noqa: E402
from vit_training.hardware import TRIAL_WORK_PER_THREAD, choose_threads, mlp_work  # noqa: E402

# (name, batch, config): the digits default run, and Fashion-MNIST models of 7 px patches.
MODELS = [
    ("digits default (32 px, 8 px patches, width 64)", 32,
     dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128)),
    ("28 px, 7 px patches, width 64", 64, dict(image_size=28, patch_size=7, hidden_size=64, intermediate_size=256)),
    ("28 px, 7 px patches, width 96", 64, dict(image_size=28, patch_size=7, hidden_size=96, intermediate_size=384)),
    ("28 px, 7 px patches, width 128", 64, dict(image_size=28, patch_size=7, hidden_size=128, intermediate_size=512)),
]  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="Alternating rounds of one thread and all cores.")
    parser.add_argument("--steps", type=int, default=40, help="Timed training steps per round and side.")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    print(f"{cores} cores, torch {torch.__version__}, {args.rounds} rounds of {args.steps} steps per side\n")
    print(f"| model | batch | MLP work per thread at {cores} threads | script's choice | "
          f"img/s at 1 thread | img/s at {cores} | {cores} threads / 1 |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for name, batch, fields in MODELS:
        config = ViTCustomConfig(num_channels=1, num_labels=10, num_hidden_layers=4, num_attention_heads=4,
                                 pooling="mean", **fields)  # fmt: skip
        step = training_step(config, batch)
        speeds = {1: [], cores: []}
        for _ in range(args.rounds):
            for threads in speeds:
                torch.set_num_threads(threads)
                step(5)  # warm-up at this thread count
                start = time.perf_counter()
                step(args.steps)
                speeds[threads].append(batch * args.steps / (time.perf_counter() - start))
        ratios = [many / one for one, many in zip(speeds[1], speeds[cores])]
        work, (choice, _) = mlp_work(config, batch), choose_threads(config, batch, cores, torch.device("cpu"))
        print(f"| {name} | {batch} | {work / cores / 2**20:.1f} Mi | {choice} | "
              f"{statistics.median(speeds[1]):.0f} | {statistics.median(speeds[cores]):.0f} | "
              f"{statistics.median(ratios):.2f} |")  # fmt: skip
    low, high = (work / 2**20 for work in TRIAL_WORK_PER_THREAD)
    print(f"\nTRIAL_WORK_PER_THREAD: {low:.0f} to {high:.0f} Mi multiply-adds")


def training_step(config: ViTCustomConfig, batch: int):
    torch.manual_seed(0)
    model = ViTCustomForImageClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)  # as run_finetune.py
    images = torch.randn(batch, config.num_channels, config.image_size, config.image_size)
    labels = torch.randint(0, config.num_labels, (batch,))

    def run(steps: int):
        for _ in range(steps):
            model(pixel_values=images, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    return run


if __name__ == "__main__":
    main()
