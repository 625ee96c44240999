#!/usr/bin/env bash
# Fill .whl/ with the wheels benchmarks/gpu_check.sh installs on a GPU machine that has no network
# (CPython 3.12, x86-64; that machine already has CUDA torch, numpy, safetensors, tokenizers,
# huggingface-hub, pyarrow, ...). DeepSpeed is sdist-only: built here as a pure-Python wheel (no
# prebuilt ops). Usage: bash benchmarks/gpu_wheels.sh [DIR]   (default .whl; needs the set-up .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-.whl}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$dir"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  typing-extensions==4.16.0 hjson==3.1.0 transformers==5.24.0 datasets==5.2.0 dill==0.4.1 \
  multiprocess==0.70.19 fsspec==2026.9.0
"$py" -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w "$dir"
ls -la "$dir"
