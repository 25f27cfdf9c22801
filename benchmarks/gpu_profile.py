"""One forward of fast.chunk_kda and one decode step, for Nsight Compute.

    ncu --section SpeedOfLight --section Occupancy --section LaunchStats \
        -k regex:_kernel --launch-skip 6 --launch-count 6 python benchmarks/gpu_profile.py

The first call compiles and warms up; ``--launch-skip`` skips its launches.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kda_explained import fast  # noqa: E402
from gpu_bench import make_inputs  # noqa: E402

if __name__ == "__main__":
    q, k, v, g, beta = make_inputs(8, 4096, 16, 128)
    qd, kd, vd, gd, bd = make_inputs(256, 1, 32, 128, seed=1)
    pool = torch.randn(256, 32, 128, 128, device="cuda") * 0.1
    with torch.inference_mode():
        for _ in range(2):
            fast.chunk_kda(q, k, v, g, beta)  # 4 launches
            fast.fused_recurrent_kda(qd, kd, vd, gd, bd, initial_state=pool, inplace_final_state=True)  # 1 launch
            fast.fused_recurrent_kda(qd, kd, vd, gd, bd, initial_state=pool, output_final_state=True)  # 1 launch
    torch.cuda.synchronize()
