#!/usr/bin/env bash
# The first 9 minutes on a GPU: everything CI cannot prove, in one command that ends by itself.
#
#   OUT=/path/to/results bash bench/gpu_check.sh        # on a GPU machine (16 cores, no internet is fine)
#   bash bench/gpu_check.sh --dry-run --out /tmp/check  # the same plan on a CPU: tiny shapes (CI runs this)
#
# Steps (each time-capped; see bench/gpu_check.py): env -> build the extension for this GPU's arch in the
# background while the Triton GPU tests run in parallel pytest processes -> the extension's GPU tests ->
# benchmarks beside PyTorch's own -> compute-sanitizer racecheck if time is left -> the summary.
# Writes three files into $OUT (or --out): gpu_check_<date>_<GPU>_<commit>.md, .json and _logs.tar.gz;
# commit them under bench/results/.  For longer measurements, bench/gpu_session.sh runs in phases.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "gpu_check: $PY not found (set PYTHON)" >&2
  exit 2
fi
exec "$PY" -u bench/gpu_check.py "$@"
