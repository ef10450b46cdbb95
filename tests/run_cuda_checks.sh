#!/usr/bin/env bash
# The CUDA half of tests/test_composability.py, for a machine with an NVIDIA GPU, with a short
# summary at the end. From the repository root:
#
#     bash tests/run_cuda_checks.sh
#
# Runs every test parametrized with the cuda device (-k cuda): gradcheck / gradgradcheck with
# forward mode in float64, torch.func transforms of the MLP loss, torch.compile (aot_eager and
# inductor, fullgraph=True), autocast float16 / bfloat16, GradScaler, and parity with torch.nn in
# float64 / float32 / bfloat16 / float16. Budget: under 4 minutes (pytest is stopped at 210 s).
#
# It uses the checkout's .venv where there is one, else the machine's python3 with its own torch
# and pytest (the GPU machines here have both, and no package registry); only where those are
# missing does it pip install the package with its dev extra. PYTHON overrides the choice. The log is also written to $OUT/cuda_checks.log when OUT
# is set (else /tmp). Exit status: pytest's (0 = all passed), 3 when no CUDA device is visible.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
LOG="${OUT:-/tmp}/cuda_checks.log"
export PYTHONUNBUFFERED=1
t0=$(date +%s)

if ! "$PY" -c "import torch, pytest" 2>/dev/null; then
  echo "torch or pytest missing: pip install -e '.[dev]'"
  "$PY" -m pip install -q -e '.[dev]' || exit 2
fi
# The checkout itself on the path: no install step, so nothing is fetched or replaced.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - <<'EOF' || exit 3
import sys

import torch

import torch_mlp

print(f"torch {torch.__version__} | torch_mlp {torch_mlp.__version__} from {torch_mlp.__path__[0]}")
if not torch.cuda.is_available():
    print("no CUDA device visible: nothing to run")
    sys.exit(1)
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
EOF

# pytest-xdist, where present, spreads the tests over 4 processes (each compiles on its own).
XDIST=()
"$PY" -c "import xdist" 2>/dev/null && XDIST=(-n 4)

timeout 210 "$PY" -m pytest tests/test_composability.py -k cuda -m "slow or not slow" \
  -q -rfE -p no:cacheprovider "${XDIST[@]}" 2>&1 | tee "$LOG"
rc=${PIPESTATUS[0]}

echo
echo "==== CUDA checks: summary ===="
grep -E "^(FAILED|ERROR)" "$LOG" | sed 's/^/  /' | head -40
grep -E "[0-9]+ (passed|failed|error)" "$LOG" | tail -1
[ "$rc" -eq 124 ] && echo "  stopped: over the 210 s budget"
echo "  exit status $rc, $(($(date +%s) - t0)) s in all; log: $LOG"
exit "$rc"
