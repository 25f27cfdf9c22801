"""flash-linear-attention's chunk_kda forward, kernel by kernel (torch.profiler), beside ours.

    python benchmarks/probe/fla_profile.py [B T H D] [--chunk-sizes 64 32 16]

Ours is profiled at each chunk size given (the forward is exact at 16, 32 and 64).
"""
import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from kda_explained import fast  # noqa: E402
from gpu_bench import make_inputs  # noqa: E402


def kernel_table(fn, label, reps=10):
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = {}
    for e in prof.key_averages():
        if e.device_type.name == "CUDA" or getattr(e, "device_time_total", 0) > 0:
            t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
            if t > 0:
                rows[e.key] = (t / reps / 1000.0, e.count // reps)
    total = sum(v[0] for v in rows.values())
    print(f"--- {label}: {total:.3f} ms per call (sum of kernels)")
    for key, (ms, n) in sorted(rows.items(), key=lambda kv: -kv[1][0]):
        print(f"  {ms:8.3f} ms  x{n}  {key[:90]}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", nargs="*", type=int, default=[8, 4096, 16, 128])
    ap.add_argument("--chunk-sizes", nargs="*", type=int, default=[64])
    args = ap.parse_args()
    q, k, v, g, beta = make_inputs(*args.shape)
    with torch.inference_mode():
        try:
            from fla.ops.kda import chunk_kda as fla_chunk_kda
            kernel_table(lambda: fla_chunk_kda(q, k, v, g, beta), "fla chunk_kda")
        except Exception as e:  # noqa: BLE001
            print("fla unavailable:", e)
        for C in args.chunk_sizes:
            kernel_table(lambda: fast.chunk_kda(q, k, v, g, beta, chunk_size=C), f"fast chunk_kda, chunk_size={C}")
