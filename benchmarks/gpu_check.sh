#!/usr/bin/env bash
# GPU checks for one H100/H200 in about 5 minutes: ViT-B/16 bf16 throughput of vit-custom, transformers' ViT and
# timm side by side (eager, plus vit-custom under torch.compile), attention backends, peak memory, bf16/fp32 parity.
# Usage, from the repository root: bash benchmarks/gpu_check.sh [PYTHON]   (default: .venv/bin/python, else python3)
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export HF_HUB_OFFLINE=1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, transformers, timm; print(torch.__version__, transformers.__version__, timm.__version__)"

# Throughput side by side: about 3 minutes, two compilations of ViT-B/16 included.
timeout 240 "$PY" benchmarks/benchmark_speed.py --device cuda --dtype bfloat16 --sizes b16 \
    --modes infer:256 train:64 --impls vit-custom-cls vit-custom-mean hf-sdpa hf-eager timm \
    --compile --rounds 4 --seconds 0.5 --warmup 2 || echo "benchmark_speed.py stopped (exit $?)"

# Attention backends, peak memory, parity: about 1.5 minutes.
timeout 120 "$PY" benchmarks/gpu_check.py --rounds 4 --seconds 0.5 || echo "gpu_check.py stopped (exit $?)"
