#!/usr/bin/env bash
# GPU check for the device machine (≤5 minutes): installs ptv2 over the machine's CUDA torch, then
# trains a prefix on a 1.1B random-init Llama under ZeRO-3 in bf16 and prints tokens/s, MFU
# against the frozen-model bound, and peak GPU memory. Usage: bash benchmarks/gpu_check.sh [OUT.json]
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA torch here'"
python3 -m pip install -q --no-build-isolation "deepspeed==0.19.8"
python3 -m pip install -q --no-deps -e .
python3 -m pip install -q "transformers==5.24.0" "safetensors>=0.6" "pydantic>=2.7" pyyaml accelerate
torchrun --standalone --nproc_per_node 1 benchmarks/gpu_check.py --json "${1:-gpu_check.json}"
