"""GPU checks of vit-custom (ViT-B/16, bf16): attention backends, peak memory, and bf16 against fp32 logits.

The throughput of vit-custom, transformers' ViT and timm side by side comes from benchmark_speed.py; gpu_check.sh runs
both. This script adds what only a GPU has:

- img/s of vit-custom under each SDPA backend (flash, memory-efficient, cuDNN, math) and, where the flash-attn package
  is installed, transformers' `flash_attention_2`, for bf16 inference and training;
- peak GPU memory of a bf16 training step for vit-custom, transformers' ViT and timm;
- parity: vit-custom's bf16 (autocast) logits against its fp32 logits, and every backend's against the default one.

    python benchmarks/gpu_check.py
"""

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_speed import IMPLEMENTATIONS, SIZES, clock_of, make_step, run_rounds, seeded  # noqa: E402


BACKENDS = {
    "sdpa: flash": SDPBackend.FLASH_ATTENTION,
    "sdpa: memory-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa: cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa: math": SDPBackend.MATH,
}


def main():
    args = parse_args()
    size = SIZES[args.size]
    run_args = argparse.Namespace(device="cuda", dtype="bfloat16", clock="wall")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, ViT {args.size}, bf16 autocast")
    backend_table(size, args, run_args)
    memory_table(size, args, run_args)
    parity_table(size, args)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="b16", choices=list(SIZES), help="model size")
    parser.add_argument("--infer-batch", type=int, default=256, help="inference batch")
    parser.add_argument("--train-batch", type=int, default=64, help="training batch")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds")
    parser.add_argument("--seconds", type=float, default=1.0, help="least duration of one measurement")
    return parser.parse_args()


def backend_table(size, args: argparse.Namespace, run_args: argparse.Namespace):
    """img/s of vit-custom-cls with each attention backend, alternating rounds as in benchmark_speed.py."""
    model = seeded(IMPLEMENTATIONS["vit-custom-cls"], size).cuda()
    for kind, batch in (("infer", args.infer_batch), ("train", args.train_batch)):
        steps = {}
        for name, backend in BACKENDS.items():
            steps[name] = with_backend(make_step(model, kind, size, batch, run_args), backend)
        if importlib.util.find_spec("flash_attn") is not None:
            flash_model = seeded(IMPLEMENTATIONS["vit-custom-cls"], size).cuda()
            flash_model.set_attn_implementation("flash_attention_2")
            steps["flash_attention_2"] = make_step(flash_model, kind, size, batch, run_args)
        working = {name: step for name, step in steps.items() if runs(name, step)}
        samples, _ = run_rounds(working, args.rounds, args.seconds, 3, clock_of(run_args))
        print(f"\n### vit-custom-cls {kind}, batch {batch}: attention backends ({args.rounds} rounds)")
        print("| backend | img/s |\n|---|---|")
        for name, rates in samples.items():
            print(f"| {name} | {statistics.median(rates) * batch:.0f} |")


def with_backend(step, backend: SDPBackend):
    def step_with_backend():
        with sdpa_kernel(backend):
            step()

    return step_with_backend


def runs(name: str, step) -> bool:
    """Whether the step runs: a backend may not support this GPU, dtype or head size."""
    try:
        step()
        return True
    except RuntimeError as error:
        print(f"  {name}: not available ({str(error).splitlines()[0][:120]})")
        return False


def memory_table(size, args: argparse.Namespace, run_args: argparse.Namespace):
    print(f"\n### peak GPU memory of a bf16 training step, batch {args.train_batch}")
    print("| implementation | peak allocated (GiB) | step time (ms) |\n|---|---|---|")
    for name in ("vit-custom-cls", "vit-custom-mean", "hf-sdpa", "timm"):
        model = seeded(IMPLEMENTATIONS[name], size).cuda()
        step = make_step(model, "train", size, args.train_batch, run_args)
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        print(f"| {name} | {torch.cuda.max_memory_allocated() / 2**30:.2f} | {elapsed * 1000:.0f} |")
        del model, step
        torch.cuda.empty_cache()


@torch.no_grad()
def parity_table(size, args: argparse.Namespace):
    """bf16 autocast logits against fp32 ones (TF32 off), and each attention backend's against the first one's.

    The weights are random, so the logits are close together and top-1 agreement is a harsh test; the relative
    error is the number to watch (bf16 keeps 8 bits of mantissa: errors around 1e-2 are expected).
    """
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    model = seeded(IMPLEMENTATIONS["vit-custom-cls"], size).cuda().eval()
    pixel_values = torch.randn(32, 3, size.image_size, size.image_size, generator=torch.Generator().manual_seed(0))
    pixel_values = pixel_values.cuda()
    reference = model(pixel_values).logits.float()
    print("\n### parity of logits (batch 32): bf16 autocast against fp32, TF32 off")
    print("| run | max abs diff | relative L2 error | top-1 agreement |\n|---|---|---|---|")
    first = None
    for name, backend in BACKENDS.items():
        try:
            with sdpa_kernel(backend), torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(pixel_values).logits.float()
        except RuntimeError:
            continue
        print(parity_row(f"bf16, {name}", logits, reference))
        if first is not None:
            print(parity_row(f"bf16, {name}, against bf16 {first[0]}", logits, first[1]))
        first = first or (name, logits)


def parity_row(name: str, logits: torch.Tensor, reference: torch.Tensor) -> str:
    max_diff = (logits - reference).abs().max().item()
    relative = ((logits - reference).norm() / reference.norm()).item()
    agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return f"| {name} | {max_diff:.2e} | {relative:.2e} | {agreement:.0%} |"


if __name__ == "__main__":
    main()
