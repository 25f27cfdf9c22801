#!/usr/bin/env bash
# Nsight Compute on the forward's kernels (one call of fast.chunk_kda at the default chunk size):
# speed of light, occupancy, launch statistics, warp stall reasons and the top stall lines.
#
#   bash benchmarks/probe/ncu_forward.sh [B T H D]        (default 8 4096 16 128)
#
# NCU_KERNELS (a regex, default one_pass|state|output|cumsum) and NCU_COUNT (launches profiled,
# default 3) widen it, e.g. NCU_KERNELS='local|state|output|cumsum' NCU_COUNT=7 for the 64-token
# path (cumsum, keys' pass, its exact-diagonal launch, queries' pass and its, state, output).
#
# Needs the H100 machine (ncu with --clock-control none: METHOD.md leaves the clocks alone).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
shape=${*:-8 4096 16 128}
cat > /tmp/ncu_fwd.py <<PY
import sys, torch
sys.path.insert(0, "benchmarks")
from gpu_bench import make_inputs
from kda_explained import fast
q, k, v, g, beta = make_inputs($(echo $shape | tr ' ' ','))
with torch.inference_mode():
    for _ in range(2):
        fast.chunk_kda(q, k, v, g, beta)
    torch.cuda.synchronize()
PY
ncu --clock-control none --kernel-name regex:"${NCU_KERNELS:-one_pass|state|output|cumsum}" --launch-skip 0 \
    --launch-count "${NCU_COUNT:-3}" \
    --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --section SchedulerStats --section MemoryWorkloadAnalysis --section SourceCounters \
    python3 /tmp/ncu_fwd.py
