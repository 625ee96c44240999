#!/usr/bin/env bash
# GPU check for the device machine: one NVIDIA GPU, no network, under 5 minutes. Run from the repo
# root with the ignored folder .whl/ present (offline wheels: deepspeed, pydantic, hjson,
# transformers, datasets and their missing dependencies; they go to /tmp/site, ptv2 is used from
# the source tree via PYTHONPATH). Writes its small result files to $OUT (default /tmp/gpu_check_out):
#   versions.json          torch/CUDA/GPU and package versions, unmet wheel requirements
#   gpu_check.json         (a) 1.1B random-init Llama, bf16 prefix training, the same model and batch
#                          under plain PyTorch, DeepSpeed stage 0, ZeRO-3 before/after layer-sized
#                          fetches, and with activation checkpointing: step time, tokens/s, MFU, peak
#                          memory, losses, frozen weights unchanged, prefix moved; what `auto` picks
#   gpu_check_profile.txt  where one plain and one ZeRO-3 step spend their time
#   e2e.json, e2e_*        (b) the real loop `torchrun -m ptv2.train job.yaml` on a ~25M Llama under
#                          ZeRO-3 with activation checkpointing: losses, eval, prompt artifact
#                          verified and reloaded, checkpoint written
#   gpu_check_compile.json (c) with what time is left: torch.compile of each decoder layer (plain,
#                          ZeRO-3), DeepSpeed's DeepCompile, int8 frozen weights (optional: a
#                          failure there is recorded, not fatal)
#   summary.json           exit status of each part
# Usage: bash benchmarks/gpu_wheels.sh  (once, here), then on the GPU machine: bash benchmarks/gpu_check.sh
#        (device tool: carry [".whl"])
#        GPU_CHECK_CPU=1 PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh   (CPU dry run of the glue)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${GPU_CHECK_CPU:-}" ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD \
    || { echo "offline install of .whl/*.whl failed (is .whl/ carried?)" >&2; exit 1; }
  PY=python3
  timeout 15 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
else  # CPU dry run: the current environment (PYTHONPATH kept in front), DeepSpeed's CPU accelerator
  PY=${PYTHON:-python3}
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD DS_ACCELERATOR=cpu
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
DEADLINE=${GPU_CHECK_DEADLINE_S:-285}  # every step's timeout is cut to what is left of this
cap() { local left=$((DEADLINE - SECONDS)); ((left < $1)) && echo $((left > 10 ? left : 10)) || echo "$1"; }

echo "== versions ($((SECONDS))s)"
timeout -k 5 "$(cap 45)" "$PY" - "$OUT/versions.json" <<'EOF'
import json, os, sys
from importlib import metadata

import torch
from packaging.requirements import Requirement

info = {
    "python": sys.version.split()[0],
    "torch": torch.__version__,
    "cuda": torch.version.cuda,
    "cuda_available": torch.cuda.is_available(),
    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None,
}
for pkg in ["deepspeed", "transformers", "datasets", "pydantic", "pydantic-core", "huggingface-hub", "tokenizers",
            "safetensors", "accelerate", "numpy", "pyarrow", "pandas", "fsspec", "typing-extensions", "regex", "typer"]:
    try:
        info[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
        info[pkg] = None
import deepspeed, transformers  # noqa: E401  (where they come from: /tmp/site on the device)
info["deepspeed_file"], info["transformers_file"] = deepspeed.__file__, transformers.__file__
# the offline wheels: is each one what gets imported, and is every requirement of theirs met?
import glob
from packaging.utils import canonicalize_name

wheels = {canonicalize_name(os.path.basename(w).split("-")[0]): os.path.basename(w).split("-")[1]
          for w in glob.glob(".whl/*.whl")}
unmet, shadowed = [], []
for name, version in sorted(wheels.items()):
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        unmet.append(f"{name} {version} not installed")
        continue
    if dist.version != version:
        shadowed.append(f"{name}: wheel {version}, imported {dist.version}")
    for r in dist.requires or []:
        req = Requirement(r)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            have = None
        if have is None or (req.specifier and not req.specifier.contains(have, prereleases=True)):
            unmet.append(f"{name} needs {r}, found {have}")
info["wheels_not_imported"] = shadowed
info["unmet_requirements"] = sorted(set(unmet))
print(json.dumps(info, indent=2))
json.dump(info, open(sys.argv[1], "w"), indent=2)
if not info["cuda_available"] and not os.environ.get("GPU_CHECK_CPU"):
    sys.exit("no CUDA device visible to torch")
EOF

rc_a=0 rc_b=0 rc_c=0
if [[ -z "${GPU_CHECK_CPU:-}" ]]; then
  A_ARGS=()
else  # tiny geometry: only the code path is checked on a CPU
  A_ARGS=(--allow-cpu --layers 2 --hidden 256 --intermediate 512 --heads 4 --kv-heads 2 --seq 64 --batch 2 --steps 4
          --compile-backend eager)
fi
echo "== (a) 1.1B Llama bf16 prefix training: plain, stage 0, ZeRO-3 before/after, checkpointing ($((SECONDS))s)"
timeout -k 5 "$(cap 140)" "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/gpu_check.py \
  --variants plain,replicated,zero3_before,zero3,plain_ckpt,zero3_ckpt \
  --json "$OUT/gpu_check.json" --profile "$OUT/gpu_check_profile.txt" "${A_ARGS[@]}" || rc_a=$?

echo "== (b) end-to-end ptv2.train on a small Llama, ZeRO-3 + activation checkpointing ($((SECONDS))s)"
T_B=$(cap 90)
if [[ -z "${GPU_CHECK_CPU:-}" ]]; then B_DEV=cuda; else B_DEV=cpu; fi
timeout -k 5 "$T_B" "$PY" benchmarks/gpu_e2e.py --out "$OUT" --device "$B_DEV" --timeout $((T_B - 25)) \
  --gradient-checkpointing || rc_b=$?

echo "== (c) optional, with the time left: compiled layers, DeepCompile, int8 frozen weights ($((SECONDS))s)"
C_VARIANTS=plain_compiled,zero3_compiled,zero3_deepcompile,zero3_quantized
timeout -k 5 "$(cap 200)" "$PY" -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/gpu_check.py \
  --variants "plain,$C_VARIANTS" --optional "$C_VARIANTS" --steps 10 \
  --json "$OUT/gpu_check_compile.json" "${A_ARGS[@]}" || rc_c=$?

echo "{\"a_gpu_check_rc\": $rc_a, \"b_e2e_rc\": $rc_b, \"c_optional_rc\": $rc_c, \"wall_s\": $SECONDS}" | tee "$OUT/summary.json"
ls -la "$OUT"
if ((rc_a || rc_b)); then
  echo "GPU CHECK FAILED (a rc=$rc_a, b rc=$rc_b; 124 = timed out; c rc=$rc_c is optional)"
  exit 1
fi
echo "GPU CHECK OK"
