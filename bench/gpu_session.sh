#!/usr/bin/env bash
# One GPU session's measurements, in phases that each fit a 10-minute command on a lent device:
#
#   OUT=/path/to/results bash bench/gpu_session.sh build tests      # then, in later commands:
#   OUT=... bash bench/gpu_session.sh kernels                       # attention, layernorm, cross-entropy
#   OUT=... bash bench/gpu_session.sh train convergence             # bench/train.py, bench/convergence.py
#
# Every phase appends its log to $OUT/<phase>.log and writes its CSV/MD/PNG files into $OUT, which
# are then committed under bench/results/.  Phases run in the order given; a failing phase is
# reported and the next one still runs (the exit status says whether any failed).
# The convergence phase trains on tinyshakespeare: on a machine without internet set LLM_DATA_DIR
# and TIKTOKEN_CACHE_DIR to folders holding the corpus and the GPT-2 BPE files (see README, Offline).
set -u
OUT=${OUT:-bench/results/session}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
status=0
run() {  # run <phase> <command...>: log to $OUT/<phase>.log, keep going on failure
  local phase=$1; shift
  echo "== $phase: $*" | tee -a "$OUT/$phase.log"
  local t0=$SECONDS
  "$@" >>"$OUT/$phase.log" 2>&1
  local rc=$?
  echo "== $phase: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/$phase.log"
  [ $rc -eq 0 ] || status=1
}
for phase in "$@"; do
  case $phase in
    build)
      nvidia-smi >>"$OUT/build.log" 2>&1
      run build env MAX_JOBS=16 "$PY" -m pip install -e . --no-build-isolation --no-deps -v
      run build "$PY" -c "import kernels; print(kernels.available_backends('cuda'))" ;;
    tests)
      run tests "$PY" -m pytest -q -m gpu -rs tests
      run tests "$PY" -m pytest -q -x tests/test_triton_model.py tests/test_pytorch_backend.py ;;
    kernels)
      run kernels "$PY" bench/attention.py --out "$OUT"
      run kernels "$PY" bench/layernorm.py --out "$OUT"
      run kernels "$PY" bench/cross_entropy.py --out "$OUT" ;;
    train)
      run train "$PY" bench/train.py --out "$OUT" ;;
    convergence)
      run convergence "$PY" bench/convergence.py --no-progress --out "$OUT" ;;
    *)
      echo "unknown phase $phase (build, tests, kernels, train, convergence)"; status=2 ;;
  esac
done
exit $status
