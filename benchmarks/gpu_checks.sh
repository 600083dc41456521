#!/bin/bash
# The checks only a CUDA GPU can make, as one prepared run on a lent GPU machine.
#
#   benchmarks/gpu_checks.sh prepare   here: wheels for the GPU machine's Python 3.12 (what
#                                      its image lacks) and SmolLM2's tokenizer, in .device/
#   benchmarks/gpu_checks.sh run       there, in the repo root with .device carried: the CUDA
#                                      tests, benchmarks/gpu.py (engine vs transformers, HBM
#                                      floor) and a fitted `distserve profile` of the 1b model;
#                                      logs and JSON in $OUT (or ./gpu-results)
set -u
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
    grep -qx "/.device/" .git/info/exclude || echo "/.device/" >> .git/info/exclude
    mkdir -p .device/whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        -d .device/whl msgspec pyzmq fastapi starlette pydantic pydantic-core annotated-types \
        typing-inspection typing-extensions opentelemetry-api uvicorn gguf || exit 1
    python3 - <<'PY' || exit 1
import sys
sys.path.insert(0, "tests")
from helpers.tiny_models import smollm2_tokenizer
smollm2_tokenizer().save_pretrained(".device/tokenizer")
PY
    du -sh .device ;;
run)
    OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
    export PYTHONUNBUFFERED=1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .device/whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD DISTSERVE_TEST_TOKENIZER=$PWD/.device/tokenizer
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/env.txt"
    python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, \
torch.cuda.device_count(), 'GPUs')" 2>&1 | tee -a "$OUT/env.txt"
    python3 -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1 | tee -a "$OUT/env.txt"
    t0=$(date +%s)
    (cd tests && timeout 230 python3 -m pytest -q -p no:cacheprovider -rs cuda \
        engine/test_correctness.py models/test_triton_attention.py engine/test_cuda_graphs.py 2>&1 | tail -40) | tee "$OUT/tests.log"
    echo "tests done at $(( $(date +%s) - t0 )) s"
    timeout 190 python3 benchmarks/gpu.py --tokenizer .device/tokenizer --keep /tmp/llama1b \
        --out "$OUT/gpu.json" 2>&1 | grep -v "Writing model shards" | tee "$OUT/gpu.log"
    echo "benchmark done at $(( $(date +%s) - t0 )) s"
    timeout 100 python3 -m distserve.cli profile /tmp/llama1b --device cuda --dtype bfloat16 \
        -o "$OUT/profile_h200.json" --hardware-name h200 --repeats 2 2>&1 | tail -12 \
        | tee "$OUT/profile.log"
    echo "all done at $(( $(date +%s) - t0 )) s" ;;
*)
    echo "usage: $0 prepare|run" >&2; exit 2 ;;
esac
