#!/usr/bin/env bash
# The whole GPU measurement in one device call (issue 15, item 8), about 8 minutes on one H100/H200:
#   1. the bf16 GPU tests (tests/test_gpu.py: the test-sized kernels, forward, backward, decode),
#   2. `mlagen bench --suite gpu` within what is left of the time: every real-size kernel checked
#      against the fp64 golden, then prefill, training and MLA decode timed beside the peers, and
#      DeepSeek Sparse Attention and DeepSeek-V4's compressed layers beside their dense / eager paths
#      (`mlagen bench --suite gpu --plan-for "NVIDIA H200" --budget-s 375` prints what fits, anywhere),
#   3. `mlagen bench --report`: the GPU-suite section of BENCHMARKS.md from the suite's JSON file.
#
# It runs on the lent machine's own python3 (torch, triton; matplotlib if there), from the repository
# root with PYTHONPATH=., and installs nothing. With $OUT set (the device tool copies $OUT back) every
# output lands there, 5 files: gpu_suite.log, gpu_tests.log, gpu_suite_<gpu>.json,
# gpu_suite_<gpu>_roofline.png and BENCHMARKS.md (a copy of the repository's, its GPU-suite section
# rewritten). Without $OUT: the same files in benchmarks/, and BENCHMARKS.md itself.
#
#   bash scripts/gpu_suite.sh                               # device tool: timeout_s 560
#   TOTAL_S=300 GPU_TESTS_S=0 bash scripts/gpu_suite.sh     # less time: no pytest, a trimmed grid
#   GPU_TESTS_S=0 SUITE_FLAGS=--smoke PYTHON=.venv/bin/python OUT=/tmp/s bash scripts/gpu_suite.sh
#                                                           # the script itself, on CPU (smoke shapes)
#
# Back on a machine without a GPU: copy gpu_suite_<gpu>.json and its PNG into benchmarks/, then
# `mlagen bench --report` rewrites the section of the repository's BENCHMARKS.md.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-465}        # the whole script; the suite gets what the tests and the report leave
GPU_TESTS_S=${GPU_TESTS_S:-60} # 0 skips the pytest step
SUITE_FLAGS=${SUITE_FLAGS:-}   # more flags for the suite (--smoke to try this script on CPU)
REPORT_MARGIN_S=25             # python start-up of the last two steps, the plot and the report
DEST=${OUT:-benchmarks}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
start=$(date +%s)

stamp() { printf '[%4ds %s] %s\n' "$(($(date +%s) - start))" "$(date +%H:%M:%S)" "$*"; }

main() {
    local report=BENCHMARKS.md code budget
    if [ -n "${OUT:-}" ]; then
        report="$DEST/BENCHMARKS.md"
        cp BENCHMARKS.md "$report"
    fi

    stamp "machine"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader || true
    "$PY" - <<'EOF' || return 1
import sys, torch, triton
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none visible to torch"
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}, "
      f"CUDA {torch.version.cuda}, GPU {gpu}")
EOF

    if [ "$GPU_TESTS_S" -gt 0 ]; then
        stamp "bf16 GPU tests (tests/test_gpu.py), at most ${GPU_TESTS_S}s"
        TRITON_INTERPRET=0 timeout "$GPU_TESTS_S" "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py \
            >"$DEST/gpu_tests.log" 2>&1
        code=$?
        tail -n 15 "$DEST/gpu_tests.log"
        case $code in
            0) stamp "GPU tests passed" ;;
            124) stamp "GPU tests stopped at ${GPU_TESTS_S}s (gpu_tests.log); going on" ;;
            *) stamp "GPU tests FAILED (exit $code, gpu_tests.log); going on: the suite checks the kernels too" ;;
        esac
    fi

    budget=$((TOTAL_S - ($(date +%s) - start) - REPORT_MARGIN_S))
    [ "$budget" -ge 60 ] || budget=60
    stamp "GPU suite, budget ${budget}s"
    # The suite stops itself at its budget; the hard limit is for a point that hangs. Its JSON file is
    # rewritten after every point, so what was measured survives either way.
    # shellcheck disable=SC2086  # SUITE_FLAGS is a list of words
    timeout $((budget + 60)) "$PY" -m mlagen bench --suite gpu --budget-s "$budget" --out "$DEST" \
        --report-file "$report" $SUITE_FLAGS
    code=$?
    [ "$code" -eq 0 ] || stamp "the suite ended with exit $code; reporting what its JSON file holds"

    stamp "report"
    "$PY" -m mlagen bench --report --out "$DEST" --report-file "$report"
    code=$?
    stamp "done"
    ls -la "$DEST"
    return "$code"
}

mkdir -p "$DEST"
# A pipe rather than `exec > >(tee ...)`: the script ends only after tee has written the whole log.
main 2>&1 | tee -a "$DEST/gpu_suite.log"
exit "${PIPESTATUS[0]}"
