#!/usr/bin/env bash
# Triton kernel checks and timings on a lent GPU (issue 3). Run from anywhere:
#   bash benchmarks/gpu/run.sh            # results: stdout, and $OUT/kernels_gpu.md if OUT is set
# Needs only python3 with CUDA torch and triton (medseek itself need not be installed):
# bench_kernels.py imports the repository's kernels/ directory as a standalone package.
# The script stops starting new sections after BENCH_BUDGET_S (default 420 s); the
# timeout below is a hard stop so that the whole run stays under 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
unset TRITON_INTERPRET
export TRITON_PRINT_AUTOTUNING=1   # log the config each kernel's autotuner picks
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)'
exec timeout --signal=INT --kill-after=15 465 "$PY" -u benchmarks/gpu/bench_kernels.py "$@"
