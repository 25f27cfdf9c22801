"""One training step of chunk_kda (forward + backward), kernel by kernel (torch.profiler): fast beside fla.

    python benchmarks/probe/train_profile.py [B T H D] [--paths fast,fla]   (default 8 4096 16 128)

The step is the one ``benchmarks/gpu_train_bench.py`` times (every input requiring grad, bf16);
the table lists each CUDA kernel's time per step, so the kernel page can say where a step's time
goes beyond the stages that ``bwd_stages.py`` times alone (casts, sums, PyTorch glue).
"""

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from gpu_train_bench import leaves, step_fn  # noqa: E402
from fla_profile import kernel_table  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", nargs="*", type=int, default=[8, 4096, 16, 128])
    ap.add_argument("--paths", default="fast,fla")
    args = ap.parse_args()
    B, T, H, D = args.shape
    xs = leaves(B, T, H, D, "cuda", torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(1)
    do = torch.randn(B, T, H, D, device="cuda", generator=gen)
    dS = torch.randn(B, H, D, D, device="cuda", generator=gen)
    for path in args.paths.split(","):
        if path == "fla":
            from fla.ops.kda import chunk_kda as fn
        else:
            from kda_explained.fast import chunk_kda as fn
        kernel_table(step_fn(fn, xs, do, dS), f"{path} training step B={B} T={T} H={H} D={D}", reps=5)


if __name__ == "__main__":
    main()
