"""Time to accuracy from scratch: one run_finetune.py command with the from-scratch recipe on Fashion-MNIST.

Reads Debian's `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`), writes it once as an image folder
(benchmark_fashion_mnist.py's), then runs, as a user would, in a fresh process:

    python run_finetune.py --train_dir FOLDER/train --validation_dir FOLDER/test RECIPE_RUN

with the 10,000 test images as validation set, so that the accuracy logged after every epoch is the test accuracy.
It prints each epoch's test accuracy with the wall time since the command started (start-up, loading and the
evaluations included). Then the cost of the recipe's augmentation, two ways: the training img/s of short runs with
the recipe as given against the same runs with augmentation off (no policy, erasing, Mixup/CutMix), in alternating
rounds, and, steadier on a machine whose speed drifts, the same two in one process: training steps with the script's
own parts (`BatchAugment` on the in-memory images, `BatchMixing`, the loss, fused AdamW, the EMA), the two settings in
alternating rounds of a few seconds.

    python benchmarks/benchmark_recipe_fashion_mnist.py                  # about 25 minutes on 2 cores, all included
    python benchmarks/benchmark_recipe_fashion_mnist.py --no-run          # only the augmentation cost
    python benchmarks/benchmark_recipe_fashion_mnist.py --no-run --rounds 0   # only its in-process part, 2 minutes
    python benchmarks/benchmark_recipe_fashion_mnist.py -- --num_train_epochs 2   # flags after -- go to the run
"""

import argparse
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmark_fashion_mnist import image_folder

REPO_ROOT = Path(__file__).resolve().parent.parent
# The command the README documents: a 0.45M-parameter ViT (7 px patches: 16 tokens of width 96, 4 blocks) and the
# from-scratch recipe with flips, random erasing and EMA, 27 epochs of batch 64, about 22 minutes on 2 CPU cores
# (benchmarks/README.md has the curve and the alternatives measured). Width 96 learns as much per epoch as 128 at 1.4x
# the speed, so 30 minutes hold 27 epochs; by then the model fits its training images, and erasing turns part of that
# gap into test accuracy. Crops, the policy, Mixup/CutMix and drop path cost more accuracy per epoch than they give
# back at this budget. No compile trial (30 s): compiling saves nothing over the run (benchmarks/README.md).
RECIPE_RUN = (
    "--recipe from-scratch --num_channels 1 --image_size 28 --patch_size 7 --hidden_size 96 --num_hidden_layers 4 "
    "--num_attention_heads 4 --intermediate_size 384 --pooling mean --per_device_train_batch_size 64 "
    "--torch_compile off --num_train_epochs 27 --auto_augment none --random_erasing 0.25 --mixup_alpha 0 "
    "--cutmix_alpha 0 --drop_path_rate 0 --crop_scale 1 1 --crop_ratio 1 1"
).split()
AUGMENTATION_OFF = "--auto_augment none --random_erasing 0 --mixup_alpha 0 --cutmix_alpha 0".split()
CHOICE_LINE = re.compile(r"torch\.compile (on|off):|thread\(s\) per process")
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+): .*?eval_accuracy ([\d.]+)")


def main():
    args = parse_args()
    folder = image_folder(args.data_dir)
    data = ["--train_dir", str(folder / "train"), "--validation_dir", str(folder / "test")]
    with tempfile.TemporaryDirectory() as workdir:
        if args.run:
            curve = timed_run([*data, *RECIPE_RUN, *args.run_finetune_args], Path(workdir) / "run")
            print(f"\n# Fashion-MNIST from scratch, {os.cpu_count()} cores: run_finetune.py "
                  f"{' '.join([*RECIPE_RUN, *args.run_finetune_args])}")  # fmt: skip
            print("| epoch | wall time (min) | test accuracy |\n|---|---|---|")
            for epoch, minutes, accuracy in curve:
                print(f"| {epoch} | {minutes:.1f} | {accuracy:.4f} |")
        if args.rounds:
            ratios = augmentation_cost(data, args.recipe_flags, args.rounds, Path(workdir))
            print(f"\ntraining img/s, recipe {' '.join(args.recipe_flags)} / augmentation off, by round: "
                  f"{', '.join(f'{ratio:.3f}' for ratio in ratios)}; median {statistics.median(ratios):.3f} "
                  "(target >= 0.9)")  # fmt: skip
    if args.steps_rounds:
        ratios, threads = augmentation_cost_in_process(args.recipe_flags, args.steps_rounds, args.steps)
        print(f"\nthe same in one process ({threads} threads, {args.steps_rounds} alternating rounds of {args.steps} "
              f"steps): {', '.join(f'{ratio:.3f}' for ratio in ratios)}; median {statistics.median(ratios):.3f} "
              "(target >= 0.9)")  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_dir", type=Path, default=Path(tempfile.gettempdir()) / "fashion-mnist-folder",
                        help="Where the image folder is written once and then reused.")  # fmt: skip
    parser.add_argument("--run", action=argparse.BooleanOptionalAction, default=True, help="Time the full run.")
    parser.add_argument("--rounds", type=int, default=2, help="Alternating rounds of the augmentation cost (runs).")
    parser.add_argument("--steps_rounds", type=int, default=15, help="Alternating rounds of it in one process.")
    parser.add_argument("--steps", type=int, default=30, help="Training steps per round and side in one process.")
    parser.add_argument(
        "--recipe_flags", nargs="*", default=["--recipe", "from-scratch"],
        help="The recipe whose augmentation is timed (default: the whole from-scratch recipe).",
    )  # fmt: skip
    parser.add_argument("run_finetune_args", nargs="*", help="more flags for the timed run, after --")
    return parser.parse_args()


def timed_run(run_argv: list[str], output_dir: Path) -> list[tuple[int, float, float]]:
    """Run run_finetune.py in a fresh process; (epoch, minutes since its start, test accuracy) as each epoch ends."""
    command = [sys.executable, str(REPO_ROOT / "run_finetune.py"), *run_argv, "--output_dir", str(output_dir)]
    start, curve = time.perf_counter(), []
    with subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.PIPE, text=True,
                          stdout=subprocess.DEVNULL) as process:  # fmt: skip
        for line in process.stderr:
            match = EPOCH_LINE.search(line)
            if match:
                minutes = (time.perf_counter() - start) / 60
                curve.append((int(match[1]), minutes, float(match[3])))
                print(f"epoch {match[1]}/{match[2]}: test accuracy {float(match[3]):.4f} at {minutes:.1f} min",
                      flush=True)  # fmt: skip
            elif CHOICE_LINE.search(line):  # what the script chose for this machine, and why
                print(line.split(": ", 1)[-1].strip(), flush=True)
    if process.returncode != 0:
        sys.exit(f"run_finetune.py failed with exit code {process.returncode}")
    minutes = (time.perf_counter() - start) / 60
    final = json.loads((output_dir / "all_results.json").read_text())
    print(f"finished in {minutes:.1f} min: test accuracy {final['eval_accuracy']:.4f}", flush=True)
    return curve


def augmentation_cost(data: list[str], recipe_flags: list[str], rounds: int, workdir: Path) -> list[float]:
    """Per round: train_loop_samples_per_second of a short run with the recipe over the same run without its
    augmentation (the same model, images and steps), the two run back to back."""
    short = [*data, *RECIPE_RUN[: RECIPE_RUN.index("--num_train_epochs")], "--max_train_samples", "12800",
             "--max_eval_samples", "256", "--num_train_epochs", "1"]  # fmt: skip
    ratios = []
    for index in range(rounds):
        rates = {}
        for name, extra in (("recipe", recipe_flags), ("off", [*recipe_flags, *AUGMENTATION_OFF])):
            output_dir = workdir / f"cost-{name}-{index}"
            command = [sys.executable, str(REPO_ROOT / "run_finetune.py"), *short, *extra, "--output_dir",
                       str(output_dir)]  # fmt: skip
            subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, check=True)
            rates[name] = json.loads((output_dir / "all_results.json").read_text())["train_loop_samples_per_second"]
        print(f"round {index + 1}: recipe {rates['recipe']} img/s, augmentation off {rates['off']} img/s", flush=True)
        ratios.append(rates["recipe"] / rates["off"])
    return ratios


def augmentation_cost_in_process(recipe_flags: list[str], rounds: int, steps: int) -> tuple[list[float], int]:
    """Per round: img/s of `steps` training steps with the recipe's augmentation over `steps` without, in this
    process, each side with its own model, optimizer and weight average, as run_finetune.py builds them from the same
    flags; and the threads (as the script would choose them)."""
    import torch
    from benchmark_fashion_mnist import CLASSES, read_idx
    from accelerate import Accelerator

    import run_finetune
    from vit_training import hardware
    from vit_training.augment import BatchAugment, build_transforms
    from vit_training.ema import weight_average
    from vit_training.images import InMemoryImages
    from vit_training.loop import accumulate_gradients
    from vit_training.mixing import BatchMixing

    images, labels = read_idx("train")
    dataset = InMemoryImages(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype("int64")))
    accelerator = Accelerator(cpu=True)
    model_flags = RECIPE_RUN[: RECIPE_RUN.index("--num_train_epochs")]
    sides = {}
    for name, extra in (("recipe", recipe_flags), ("off", [*recipe_flags, *AUGMENTATION_OFF])):
        args = run_finetune.parse_args([*model_flags, *extra, "--output_dir", "unused"])
        recipe, batch = args.recipe.settings, args.training.per_device_train_batch_size
        torch.manual_seed(args.training.seed)
        model, processor = run_finetune.load_model(args.model, CLASSES)
        train_transform, _ = build_transforms(
            processor, 1, ("image", "label"), crop_scale=args.data.crop_scale, flip=True,  # as the folder run does
            seed=args.training.seed, auto_augment=recipe["auto_augment"], random_erasing=recipe["random_erasing"],
            crop_ratio=args.data.crop_ratio,
        )  # fmt: skip
        collate = BatchAugment(train_transform.augmentation, train_transform.mean, train_transform.std, len(dataset))
        mixing = BatchMixing(len(CLASSES), recipe["mixup_alpha"], recipe["cutmix_alpha"], recipe["mix_prob"],
                             recipe["mix_switch_prob"], args.training.seed)  # fmt: skip
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05, fused=True)
        ema = weight_average(model, recipe["ema_decay"]) if recipe["ema_decay"] is not None else None
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).split(batch)
        sides[name] = (model, collate, mixing if mixing.active else None, optimizer, ema, order, args)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads, _ = hardware.choose_threads(sides["recipe"][0].config, batch, cores, torch.device("cpu"))
    torch.set_num_threads(threads)
    counters = dict.fromkeys(sides, 0)

    def train(name: str, count: int) -> float:
        model, collate, mixing, optimizer, ema, order, args = sides[name]
        model.train()
        start = time.perf_counter()
        for _ in range(count):
            step = counters[name]
            batch = collate(dataset.__getitems__(order[step % len(order)].tolist()))
            mix = mixing and functools.partial(mixing, step=step)
            accumulate_gradients(accelerator, model, [batch], args.training.label_smoothing, mix=mix)
            optimizer.step()
            optimizer.zero_grad()
            if ema is not None:
                ema.update(model, step=step + 1)
            counters[name] += 1
        return count * len(order[0]) / (time.perf_counter() - start)

    for name in sides:
        train(name, 5)  # warm-up, and each side's table of the epoch's draws
    ratios = []
    for index in range(rounds):
        rates = {name: train(name, steps) for name in (sides if index % 2 == 0 else reversed(list(sides)))}
        ratios.append(rates["recipe"] / rates["off"])
    return ratios, threads


if __name__ == "__main__":
    main()
