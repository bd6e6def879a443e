"""Speed of vit-custom against transformers' ViT and timm's VisionTransformer, measured side by side in one process.

Every implementation is built at the same size (the parameter counts must agree within 1%) and timed on the same
inputs: inference under `torch.inference_mode`, and training steps (forward, cross-entropy, backward, fused AdamW as
`transformers.Trainer` uses it). After a warm-up the implementations run in alternating rounds, in an order that
rotates from round to round, because the machine is shared and its speed drifts; every round also times a 2048^3
`torch.mm`, the machine's attainable matmul rate at that moment. The tables give the median img/s, the median over
rounds of each implementation's ratio to transformers' ViT (sdpa) and to timm in the same round, and the achieved
GFLOP/s as a fraction of the same round's `torch.mm` rate.

FLOPs are counted analytically, 2·m·n·k for every matmul (patch embedding, qkv, Q·K^T, attention·V, projection, MLP,
classifier), and cross-checked once per size with `torch.utils.flop_counter.FlopCounterMode`; a training step counts
as three forward passes.

    python benchmarks/benchmark_speed.py                           # every size and mode on the CPU, 1 thread
    python benchmarks/benchmark_speed.py --sizes digits --compile  # adds torch.compile'd vit-custom
    python benchmarks/benchmark_speed.py --memory                  # peak RSS of a training step, fresh processes
    python benchmarks/benchmark_speed.py --device cuda --dtype bfloat16 --sizes b16 --modes infer:256 train:64
"""

import argparse
import ctypes
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil
import timm
import torch
import transformers
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import ViTConfig, ViTForImageClassification


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from configuration_vit_custom import ViTCustomConfig  # noqa: E402
from modeling_vit_custom import ViTCustomForImageClassification  # noqa: E402


@dataclass(frozen=True)
class Size:
    """A ViT size, in the terms every implementation understands."""

    image_size: int
    patch_size: int
    dim: int
    depth: int
    heads: int
    mlp_dim: int
    num_labels: int

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


SIZES = {
    # The model run_finetune.py trains on scikit-learn's digits, where per-layer overhead dominates.
    "digits": Size(image_size=16, patch_size=4, dim=64, depth=4, heads=4, mlp_dim=128, num_labels=10),
    "ti16": Size(image_size=224, patch_size=16, dim=192, depth=12, heads=3, mlp_dim=768, num_labels=1000),
    "s16": Size(image_size=224, patch_size=16, dim=384, depth=12, heads=6, mlp_dim=1536, num_labels=1000),
    "b16": Size(image_size=224, patch_size=16, dim=768, depth=12, heads=12, mlp_dim=3072, num_labels=1000),
}
REFERENCE = "hf-sdpa"
TIMM = "timm"
MM_SIZE = 2048


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.malloc == "keep":
        keep_freed_memory()
    if args.memory_child:
        print(json.dumps(training_step_memory(args.memory_child, SIZES[args.sizes[0]], args.batch)))
        return
    print_machine(args)
    if args.memory:
        memory_table(args)
        return
    builders = implementation_builders(args.impls, args.compare_with)
    for size_name in args.sizes:
        size = SIZES[size_name]
        models = {name: seeded(build, size).to(args.device) for name, build in builders.items()}
        print_size(size_name, size, models)
        for mode in args.modes:
            kind, batch = mode.split(":")
            steps = {name: make_step(model, kind, size, int(batch), args) for name, model in models.items()}
            for name in args.compile or []:
                steps[f"{name}+compile"] = compiled_step(builders[name], kind, size, int(batch), args)
            steps["torch.mm"] = mm_step(args)
            samples, wall_samples = run_rounds(steps, args.rounds, args.seconds, args.warmup, clock_of(args))
            print_table(f"{size_name} {kind} batch {batch}", samples, wall_samples, size, kind, int(batch), args)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["digits", "ti16", "s16"], choices=list(SIZES),
                        help="digits: 16 px, patch 4, dim 64, depth 4; ti16, s16, b16: ViT-Ti/S/B/16 at 224 px")
    parser.add_argument("--modes", nargs="+", default=["infer:8", "infer:32", "train:8"],
                        help="KIND:BATCH, KIND 'infer' (inference_mode) or 'train' (forward, CE, backward, AdamW)")
    parser.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS), choices=list(IMPLEMENTATIONS),
                        help="implementations to compare; hf-sdpa is the reference of the ratios")
    parser.add_argument("--compare-with", type=Path, default=None,
                        help="another modeling_vit_custom.py (e.g. `git show HEAD:modeling_vit_custom.py > old.py`), "
                        "timed as 'old-cls' beside the others: an A/B test of a change")
    parser.add_argument("--compile", nargs="*", default=None, choices=list(IMPLEMENTATIONS),
                        help="also time these under torch.compile(fullgraph=True), which fails on any graph break "
                        "(no names: vit-custom-cls)")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds after the warm-up")
    parser.add_argument("--seconds", type=float, default=0.5, help="least duration of one measurement in a round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of every implementation first")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (on a busy 2-core machine 2 threads mostly wait for each other)")
    parser.add_argument("--clock", choices=["cpu", "wall"], default=None,
                        help="'cpu': this process's CPU time, which leaves out the time other jobs hold the core "
                        "(default with 1 thread on the CPU); 'wall': elapsed time (default otherwise)")
    parser.add_argument("--malloc", choices=["keep", "default"], default="keep",
                        help="'keep': glibc malloc keeps freed memory for reuse (see keep_freed_memory); "
                        "'default': glibc's own heuristics")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="bfloat16 runs under torch.autocast, with float32 weights and optimizer")
    parser.add_argument("--memory", action="store_true",
                        help="measure the peak RSS of training steps at --batch instead, each in a fresh process")
    parser.add_argument("--batch", type=int, default=8, help="batch of the --memory measurement")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile == []:
        args.compile = ["vit-custom-cls"]
    if args.clock is None:
        args.clock = "cpu" if args.device == "cpu" and args.threads == 1 else "wall"
    return args


# ----------------------------------------------------------------------------------------------------------------------
# The implementations, at equal sizes


def build_vit_custom(size: Size, pooling: str, modeling=None) -> nn.Module:
    model_class = modeling.ViTCustomForImageClassification if modeling else ViTCustomForImageClassification
    config = ViTCustomConfig(
        image_size=size.image_size, patch_size=size.patch_size, hidden_size=size.dim, num_hidden_layers=size.depth,
        num_attention_heads=size.heads, intermediate_size=size.mlp_dim, num_labels=size.num_labels, pooling=pooling,
    )  # fmt: skip
    return model_class(config)


def build_transformers_vit(size: Size, attn_implementation: str) -> nn.Module:
    config = ViTConfig(
        image_size=size.image_size, patch_size=size.patch_size, hidden_size=size.dim, num_hidden_layers=size.depth,
        num_attention_heads=size.heads, intermediate_size=size.mlp_dim, num_labels=size.num_labels,
        layer_norm_eps=1e-6, attn_implementation=attn_implementation,
    )  # fmt: skip
    return ViTForImageClassification(config)


def build_timm_vit(size: Size) -> nn.Module:
    return VisionTransformer(
        img_size=size.image_size, patch_size=size.patch_size, embed_dim=size.dim, depth=size.depth,
        num_heads=size.heads, mlp_ratio=size.mlp_dim / size.dim, qkv_bias=True, num_classes=size.num_labels,
        global_pool="token",
    )  # fmt: skip


IMPLEMENTATIONS: dict[str, Callable[[Size], nn.Module]] = {
    "vit-custom-cls": lambda size: build_vit_custom(size, "cls"),
    "vit-custom-mean": lambda size: build_vit_custom(size, "mean"),
    "hf-sdpa": lambda size: build_transformers_vit(size, "sdpa"),
    "hf-eager": lambda size: build_transformers_vit(size, "eager"),
    TIMM: build_timm_vit,
}


def implementation_builders(names: list[str], compare_with: Path | None) -> dict[str, Callable[[Size], nn.Module]]:
    """The builders of the chosen implementations, plus one for the compared modeling file."""
    builders = {name: IMPLEMENTATIONS[name] for name in names}
    if compare_with is not None:
        spec = importlib.util.spec_from_file_location("compared_modeling_vit_custom", compare_with)
        modeling = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modeling)
        builders["old-cls"] = lambda size: build_vit_custom(size, "cls", modeling)
    return builders


def seeded(build: Callable[[Size], nn.Module], size: Size) -> nn.Module:
    torch.manual_seed(0)
    return build(size)


# ----------------------------------------------------------------------------------------------------------------------
# What is timed


def make_step(model: nn.Module, kind: str, size: Size, batch: int, args: argparse.Namespace) -> Callable[[], None]:
    """A function that runs one inference batch or one training step of `model` on fixed random data."""
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(batch, 3, size.image_size, size.image_size, generator=generator).to(args.device)
    labels = torch.randint(0, size.num_labels, (batch,), generator=generator).to(args.device)

    def autocast():
        return torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    if kind == "infer":
        model.eval()

        def infer():
            with torch.inference_mode(), autocast():
                model(pixel_values)

        return infer

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def train():
        with autocast():
            output = model(pixel_values)
        # timm returns the logits, transformers models an output that holds them.
        logits = output if torch.is_tensor(output) else output.logits
        nn.functional.cross_entropy(logits.float(), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train


def compiled_step(build: Callable, kind: str, size: Size, batch: int, args: argparse.Namespace) -> Callable[[], None]:
    """The step of a fresh copy under torch.compile(fullgraph=True): a graph break would raise, so none happened."""
    model = torch.compile(seeded(build, size).to(args.device), fullgraph=True)
    step = make_step(model, kind, size, batch, args)
    start = time.perf_counter()
    step()
    print(f"  compiled ({kind}, batch {batch}) in {time.perf_counter() - start:.0f} s with fullgraph=True", flush=True)
    return step


def mm_step(args: argparse.Namespace) -> Callable[[], None]:
    """A square matmul in the benchmark's precision: the attainable GEMM rate of the round it runs in."""
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    a, b = (torch.randn(MM_SIZE, MM_SIZE, device=args.device, dtype=dtype) for _ in range(2))
    return lambda: torch.mm(a, b)


def keep_freed_memory():
    """Make glibc malloc serve every block from its heap and never give freed memory back to the system.

    By default glibc maps large blocks with mmap and trims the top of its heap once enough of it is free, so that a
    freed activation goes back to the system and the next one is page-faulted in afresh, zeroed page by page. Whether
    that happens depends on where earlier, unrelated blocks landed, not on the model: the same ViT-Ti/16 spends from 2%
    to 15% of its inference time in page faults from one process to the next. Keeping the memory makes the
    comparison one of the implementations.
    """
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4
    if not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1)):
        raise SystemExit("mallopt failed; run with --malloc default")


def clock_of(args: argparse.Namespace) -> Callable[[], float]:
    """Seconds on the chosen clock, read after the GPU has finished the work queued so far."""
    if args.device.startswith("cuda"):
        return lambda: torch.cuda.synchronize() or time.perf_counter()
    return time.process_time if args.clock == "cpu" else time.perf_counter


def run_rounds(steps: dict, rounds: int, seconds: float, warmup: int, clock: Callable[[], float]):
    """Steps per second of every step in every round, on `clock` and on the wall clock, in a rotating order."""
    repeats = {}
    for name, step in steps.items():
        for _ in range(warmup):
            step()
        start = clock()
        step()
        repeats[name] = max(1, round(seconds / (clock() - start)))
    names = list(steps)
    samples = {name: [] for name in names}
    wall_samples = {name: [] for name in names}
    for index in range(rounds):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            start, wall_start = clock(), time.perf_counter()
            for _ in range(repeats[name]):
                steps[name]()
            samples[name].append(repeats[name] / (clock() - start))
            wall_samples[name].append(repeats[name] / (time.perf_counter() - wall_start))
    return samples, wall_samples


# ----------------------------------------------------------------------------------------------------------------------
# FLOPs and reports


def forward_flops(size: Size) -> int:
    """Matmul FLOPs (2·m·n·k) of one image's forward pass."""
    tokens, patches, dim = size.tokens, size.tokens - 1, size.dim
    patch_embedding = 2 * patches * (3 * size.patch_size**2) * dim
    attention = 2 * tokens * dim * 3 * dim + 2 * 2 * tokens * tokens * dim + 2 * tokens * dim * dim
    mlp = 2 * 2 * tokens * dim * size.mlp_dim
    return patch_embedding + size.depth * (attention + mlp) + 2 * dim * size.num_labels


def counted_flops(model: nn.Module, size: Size) -> int:
    """FLOPs of one image's forward pass by FlopCounterMode, with SDPA's math backend, whose matmuls it counts."""
    pixel_values = torch.randn(1, 3, size.image_size, size.image_size, device=next(model.parameters()).device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model.eval()(pixel_values)
    return counter.get_total_flops()


def print_machine(args: argparse.Namespace):
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    print(f"# {cpu}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    if args.device.startswith("cuda"):
        print(f"# {torch.cuda.get_device_name()}")
    print(f"# torch {torch.__version__}, transformers {transformers.__version__}, timm {timm.__version__}, "
          f"python {platform.python_version()}; {torch.get_num_threads()} threads, {args.dtype}, "
          f"{args.clock} clock, malloc {args.malloc}")  # fmt: skip


def print_size(size_name: str, size: Size, models: dict[str, nn.Module]):
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    reference = counts.get(REFERENCE, next(iter(counts.values())))
    for name, count in counts.items():
        if abs(count - reference) > 0.01 * reference:
            raise SystemExit(f"{name} has {count:,} parameters, more than 1% off {reference:,}")
    print(f"\n## {size_name}: {size}")
    print("parameters: " + ", ".join(f"{name} {count:,}" for name, count in counts.items()))
    print(f"forward GFLOP per image: analytic {forward_flops(size) / 1e9:.4f}, "
          f"FlopCounterMode {counted_flops(next(iter(models.values())), size) / 1e9:.4f}")  # fmt: skip


def print_table(title: str, samples: dict, wall_samples: dict, size: Size, kind: str, batch: int, args):
    """Medians over rounds; ratios and the torch.mm fraction are taken within each round, then their median."""
    mm_rates = [rate * 2 * MM_SIZE**3 / 1e9 for rate in samples.pop("torch.mm")]
    wall_samples.pop("torch.mm")
    flops = forward_flops(size) * (3 if kind == "train" else 1) * batch
    mm_median = statistics.median(mm_rates)
    print(f"\n### {title}: {len(mm_rates)} rounds, {args.clock} clock, torch.mm {mm_median:.1f} GFLOP/s")
    print(f"| implementation | img/s | img/s (wall) | vs {REFERENCE} | vs {TIMM} | GFLOP/s | of torch.mm |")
    print("|---|---|---|---|---|---|---|")
    for name, rates in samples.items():
        gflops = [rate * flops / 1e9 for rate in rates]
        fraction = statistics.median(achieved / mm for achieved, mm in zip(gflops, mm_rates))
        img_per_second, wall_img_per_second = (statistics.median(r) * batch for r in (rates, wall_samples[name]))
        print(f"| {name} | {img_per_second:.1f} | {wall_img_per_second:.1f} "
              f"| {ratio_text(rates, samples.get(REFERENCE))} | {ratio_text(rates, samples.get(TIMM))} "
              f"| {statistics.median(gflops):.1f} | {fraction:.0%} |")  # fmt: skip
    if REFERENCE in samples:
        print(f"\nratios to {REFERENCE}, round by round:")
        for name, rates in samples.items():
            print(f"    {name}: " + " ".join(f"{rate / ref:.2f}" for rate, ref in zip(rates, samples[REFERENCE])))
    sys.stdout.flush()


def ratio_text(rates: list[float], reference_rates: list[float] | None) -> str:
    """Median (min-max) over rounds of the ratio to the reference in the same round."""
    if reference_rates is None:
        return "-"
    per_round = [rate / reference for rate, reference in zip(rates, reference_rates)]
    return f"{statistics.median(per_round):.3f} ({min(per_round):.2f}-{max(per_round):.2f})"


# ----------------------------------------------------------------------------------------------------------------------
# Memory


def memory_table(args: argparse.Namespace):
    """Peak RSS of training steps; every implementation runs in a fresh process that imports all of them."""
    for size_name in args.sizes:
        print(f"\n### peak RSS of training steps: {size_name}, batch {args.batch}, {args.threads} threads, "
              f"malloc {args.malloc}")  # fmt: skip
        print("| implementation | RSS before the steps (MiB) | peak RSS (MiB) | peak - before (MiB) |")
        print("|---|---|---|---|")
        for name in args.impls:
            command = [sys.executable, __file__, "--memory-child", name, "--sizes", size_name, "--batch",
                       str(args.batch), "--threads", str(args.threads), "--malloc", args.malloc]  # fmt: skip
            result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
            before, peak = result["before"] / 2**20, result["peak"] / 2**20
            print(f"| {name} | {before:.0f} | {peak:.0f} | {peak - before:.0f} |", flush=True)


def training_step_memory(name: str, size: Size, batch: int) -> dict[str, int]:
    """RSS before two training steps (the first one creates AdamW's state) and the process's peak RSS after them."""
    args = argparse.Namespace(device="cpu", dtype="float32")
    step = make_step(seeded(IMPLEMENTATIONS[name], size), "train", size, batch, args)
    before = psutil.Process().memory_info().rss
    for _ in range(2):
        step()
    return {"before": before, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


if __name__ == "__main__":
    main()
