"""Shared test helpers: the repository on sys.path, offline Hub, and tiny configurations that keep the suite fast."""

import os
import sys
from pathlib import Path

import pytest
import torch


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from configuration_vit_custom import ViTCustomConfig  # noqa: E402


def tiny_config(**overrides) -> ViTCustomConfig:
    """A 2-block ViT on 16 px images with 4 px patches: 16 patches of width 32."""
    values = dict(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=5,
    )
    values.update(overrides)
    return ViTCustomConfig(**values)


# fp32 outputs of the same weights, computed in another process or from weights at another memory address, may differ
# in the last bits: CPU matmul kernels choose their summation order by alignment and CPU model (a model reloaded from
# a memory-mapped safetensors file sees unaligned weights). For the tiny models' logits, of order 0.1-1, such
# differences are below 1e-7; a wrong weight moves them by orders of magnitude more.
FP32_ROUNDING = {"rtol": 1e-5, "atol": 1e-6}


def assert_same_outputs(actual: torch.Tensor, expected: torch.Tensor, msg: str | None = None):
    """Outputs of the same weights computed apart (another process, a reload): equal within fp32 rounding."""
    torch.testing.assert_close(actual, expected, **FP32_ROUNDING, msg=msg)


@pytest.fixture
def pixel_values() -> torch.Tensor:
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
