"""How long run_finetune.py takes to reach its first training step on image folders of 10k, 100k and 300k files.

Writes folders of small PNGs (`<root>/<n>/train/<class>/<i>.png`, 10 classes, 12x12 grey images drawn from a few
hundred distinct ones) once, then runs `run_finetune.py --train_dir <folder> --max_train_steps 1` in a fresh
process for each, with the default settings (the images are decoded once into memory) and with
`--images_in_memory off` (decoded by loader workers as the loop asks), and prints the seconds from the process's
start to the end of its first optimizer step (`seconds_to_first_step` in all_results.json): listing the files,
splitting off a validation set, decoding, building the model and the first step, imports included.

    python benchmarks/benchmark_startup.py                       # 10k, 100k, 300k: about 10 minutes on 2 cores
    python benchmarks/benchmark_startup.py --sizes 10000 60000
"""

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 300_000], help="Images per folder.")
    parser.add_argument("--root", type=Path, default=Path(tempfile.gettempdir()) / "vit-custom-startup",
                        help="Where the folders are written once and then reused.")  # fmt: skip
    args = parser.parse_args()

    print("| images | written in (s) | to first step, in memory (s) | to first step, loader workers (s) |")
    print("|---|---|---|---|")
    for size in args.sizes:
        folder, written = write_folder(args.root / str(size), size)
        times = [first_step_seconds(folder, loading) for loading in ("auto", "off")]
        print(f"| {size:,} | {written} | {times[0]:.1f} | {times[1]:.1f} |", flush=True)


def write_folder(folder: Path, count: int) -> tuple[Path, str]:
    """`count` PNGs in 10 class folders (once: a complete folder is reused); returns it and how long writing took."""
    done = folder / ".complete"
    if done.exists():
        return folder / "train", "reused"
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    encoded = []
    for _ in range(256):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (12, 12), dtype=np.uint8)).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    for label in range(10):
        (folder / "train" / f"class{label}").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        path = folder / "train" / f"class{index % 10}" / f"{index:07d}.png"
        path.write_bytes(encoded[index % len(encoded)])
    done.touch()
    return folder / "train", f"{time.perf_counter() - start:.0f}"


def first_step_seconds(train_dir: Path, images_in_memory: str) -> float:
    with tempfile.TemporaryDirectory() as output_dir:
        command = [
            sys.executable, str(REPO_ROOT / "run_finetune.py"), "--train_dir", str(train_dir), "--image_size", "12",
            "--patch_size", "4", "--num_channels", "1", "--max_train_steps", "1", "--max_eval_samples", "256",
            "--images_in_memory", images_in_memory, "--output_dir", output_dir,
        ]  # fmt: skip
        run = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
        if run.returncode != 0:
            sys.exit(f"run_finetune.py failed on {train_dir}:\n{run.stderr[-3000:]}")
        return json.loads((Path(output_dir) / "all_results.json").read_text())["seconds_to_first_step"]


if __name__ == "__main__":
    main()
