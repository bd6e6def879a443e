"""What MAE pre-training buys: fine-tuning on few Fashion-MNIST labels from an MAE encoder, against from scratch.

Writes Fashion-MNIST as an image folder once (benchmark_fashion_mnist.py's conversion of Debian's
`dataset-fashion-mnist`), then:

1. pre-trains `run_pretrain.py` on the 60,000 training images, their labels unused, with a 1.2M-parameter ViT
   (28 px grey images, 7 px patches: 16 tokens of width 128, 6 blocks, mean pooling) and a light decoder (2 blocks
   of width 128), 75% of the patches masked;
2. for each labelled-set size (default: 100 images per class, 1,000 in all) and each seed, draws that many training
   images per class and fine-tunes `run_finetune.py` on them for the same number of optimizer steps (default 300 of
   64 images, about a minute) twice: from the pre-trained encoder (`--recipe finetune`: layer decay) and from scratch
   (`--recipe basic`), watching 500 other training images and scoring both on the 10,000 test images at the end;
3. prints every run's test accuracy and time, then the accuracies' mean and standard deviation over the seeds, and
   the gain.

    python benchmarks/benchmark_mae_fashion_mnist.py                      # about 30 minutes on 2 CPU cores
    python benchmarks/benchmark_mae_fashion_mnist.py --per_class 100 600 6000   # also 6,000 and 60,000 labels
    python benchmarks/benchmark_mae_fashion_mnist.py --pretrained FOLDER --finetune_steps 600  # reuse a pre-training
    python benchmarks/benchmark_mae_fashion_mnist.py --pretrain_epochs 1 --finetune_steps 5 --seeds 0 \\
        -- --max_train_samples 500 --max_eval_samples 200                 # a smoke test; flags after -- go to both
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmark_fashion_mnist import CLASSES, image_folder

REPO_ROOT = Path(__file__).resolve().parent.parent
# The encoder (the from-scratch benchmark's model when these figures were measured, before it dropped to 4 blocks);
# a fine-tuning from the pre-trained folder takes it from its config.
ARCHITECTURE = (
    "--num_channels 1 --image_size 28 --patch_size 7 --hidden_size 128 --num_hidden_layers 6 --num_attention_heads 4 "
    "--intermediate_size 512 --pooling mean"
).split()
# A decoder as wide as this small encoder (the MAE paper's 512 x 8 is for ViT-B and larger), on batches of 256.
PRETRAINING = [
    "--decoder_hidden_size", "128", "--decoder_num_layers", "2", "--decoder_num_heads", "4",
    "--per_device_train_batch_size", "256", "--learning_rate", "1.5e-3",
]  # fmt: skip
FINETUNING = ["--per_device_train_batch_size", "64"]
VALIDATION_SEED = 1000  # of the 500 training images watched during fine-tuning
STARTS = {"from scratch": ["--recipe", "basic", *ARCHITECTURE], "from MAE": ["--recipe", "finetune"]}


def main():
    args = parse_args()
    folder = image_folder(args.data_dir)
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        if args.pretrained:
            pretrained = args.pretrained
            pretraining = json.loads((pretrained / "all_results.json").read_text())
            print(f"pre-trained: {pretrained}, {pretraining['epoch']} epochs", flush=True)
        else:
            pretrained = work / "mae"
            pretraining, minutes = run_script(
                "run_pretrain.py", "--train_dir", folder / "train", "--validation_dir", folder / "test",
                *ARCHITECTURE, *PRETRAINING, "--num_train_epochs", args.pretrain_epochs, *args.script_args,
                output_dir=pretrained,
            )  # fmt: skip
            print(f"pre-trained {args.pretrain_epochs} epochs in {minutes:.1f} min: reconstruction loss "
                  f"{pretraining['eval_loss']:.4f} on the test images", flush=True)  # fmt: skip
        if args.save_reconstructions:
            figures = sorted(pretrained.glob("reconstructions-epoch-*.png"), key=epoch_of)
            args.save_reconstructions.write_bytes(figures[-1].read_bytes())
        # Watched during training on 500 training images; the test images are scored once, at the end.
        validation = labelled_subset(folder / "train", 50, VALIDATION_SEED, work / "validation")
        for per_class in args.per_class:
            accuracies = {"from scratch": [], "from MAE": []}
            for seed in args.seeds:
                labelled = labelled_subset(folder / "train", per_class, seed, work / f"labelled-{per_class}-{seed}")
                common = ["--train_dir", labelled, "--validation_dir", validation, "--test_dir", folder / "test"]
                common += [*FINETUNING, "--seed", seed]
                common += ["--max_train_steps", args.finetune_steps, *args.script_args]
                starts = {**STARTS, "from MAE": [*STARTS["from MAE"], "--model_name_or_path", pretrained]}
                for name, start in starts.items():
                    output_dir = work / f"{name.replace(' ', '-')}-{per_class}-{seed}"
                    results, minutes = run_script("run_finetune.py", *common, *start, output_dir=output_dir)
                    accuracies[name].append(results["test_accuracy"])
                    print(f"{per_class * len(CLASSES)} labels, seed {seed}, {name}: test accuracy "
                          f"{results['test_accuracy']:.4f} in {minutes:.1f} min", flush=True)  # fmt: skip
            rows.append((per_class * len(CLASSES), accuracies))

    print(f"\n# Fashion-MNIST: MAE pre-training ({pretraining['epoch']} epochs on {pretraining['train_samples']:,} "
          f"unlabelled images) against none; fine-tuning {args.finetune_steps} steps, seeds {args.seeds}; test "
          "accuracy, mean ± std")  # fmt: skip
    print("| labels | from scratch | from MAE | gain |")
    print("|---|---|---|---|")
    for labels, accuracies in rows:
        scratch, mae = (summary(accuracies[name]) for name in ("from scratch", "from MAE"))
        gain = statistics.mean(accuracies["from MAE"]) - statistics.mean(accuracies["from scratch"])
        print(f"| {labels:,} | {scratch} | {mae} | {gain:+.4f} |")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per_class", type=int, nargs="+", default=[100],
                        help="Labelled images per class (6000: all 60,000).")  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Seeds of the subsets and runs.")
    parser.add_argument("--pretrain_epochs", type=int, default=12, help="Epochs of MAE pre-training.")
    parser.add_argument("--finetune_steps", type=int, default=300, help="Optimizer steps of every fine-tuning.")
    parser.add_argument("--pretrained", type=Path, help="Fine-tune from this run_pretrain.py folder: no pre-training.")
    parser.add_argument("--save_reconstructions", type=Path, help="Copy the last reconstruction figure here.")
    parser.add_argument("--data_dir", type=Path, default=Path(tempfile.gettempdir()) / "fashion-mnist-folder",
                        help="Where the image folder is written once and then reused.")  # fmt: skip
    parser.add_argument("script_args", nargs="*", help="more flags for both scripts, after --")
    return parser.parse_args()


def labelled_subset(train: Path, per_class: int, seed: int, folder: Path) -> Path:
    """`folder/<class>/`: links to `per_class` training images of every class, drawn with `seed`."""
    rng = np.random.default_rng(seed)
    for name in CLASSES:
        images = sorted((train / name).iterdir())
        (folder / name).mkdir(parents=True)
        for index in rng.choice(len(images), size=min(per_class, len(images)), replace=False):
            (folder / name / images[index].name).symlink_to(images[index])
    return folder


def epoch_of(figure: Path) -> int:
    return int(figure.stem.removeprefix("reconstructions-epoch-"))


def run_script(script: str, *argv, output_dir: Path) -> tuple[dict, float]:
    """Run `python <script> argv --output_dir output_dir` in a fresh process; its all_results.json and minutes."""
    command = [sys.executable, REPO_ROOT / script, *argv, "--output_dir", output_dir]
    start = time.perf_counter()
    result = subprocess.run(list(map(str, command)), cwd=REPO_ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{script} failed:\n{result.stderr[-3000:]}")
    return json.loads((output_dir / "all_results.json").read_text()), (time.perf_counter() - start) / 60


def summary(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


if __name__ == "__main__":
    main()
