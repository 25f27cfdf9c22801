"""The host's share of a call: Python, checks and PyTorch work around the Triton launches, on a CPU.

    python benchmarks/probe/host_overhead.py [--profile]

Where a call's kernels take less device time than the host needs to issue them (decoding at a
few sequences, eager decoding steps of a model), the host's work is the time. This probe
measures it without a GPU: the Triton launches are replaced by a stub that only counts them
(so Triton's own launch cost, and the CUDA driver's, are *not* in the figures), the kernels'
device checks are told the CPU is fine, and the launch rules see 132 SMs, as on an H100 or
H200. What remains is this library's Python and the PyTorch operations around the kernels, on
CPU tensors (where a small PyTorch operation costs about what launching it on a GPU does).

Rows: ``chunk_kda`` on a plain and a packed batch (offsets as a device-style tensor and as
``cu_seqlens_cpu``), ``fused_recurrent_kda`` for one sequence (out of place, and a pool
through slots), and one eager decoding step of an 8-layer hybrid model (6 KDA layers on the
fast backend, 2 attention layers). Each row is the fastest of 7 rounds. ``--profile`` adds the decoding step's cProfile, sorted by
cumulative time, restricted to this library.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # the kernels as a GPU would launch them (stubbed below)

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))

import loop_loads  # noqa: E402
from kda_explained import fast  # noqa: E402
from kda_explained.layers import HybridConfig, HybridLM  # noqa: E402

SMS = 132
launches = [0]


def _count(self, *args, grid, warmup, **kwargs):
    """Stands in for ``JITFunction.run``: counts the launch, runs nothing."""
    launches[0] += 1


def per_call(fn, reps: int = 300, rounds: int = 7):
    """``(microseconds of host time per call, Triton launches per call)``: the fastest of ``rounds``
    rounds of ``reps`` calls (the other processes of a shared machine only ever add time)."""
    fn()
    launches[0] = 0
    fn()
    n = launches[0]
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps * 1e6)
    return best, n


def inputs(B, T, H, D=128, dtype=torch.bfloat16):
    q, k, v = (torch.randn(B, T, H, D).to(dtype) for _ in range(3))
    return q, k, v, -torch.rand(B, T, H, D), torch.rand(B, T, H).to(dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", action="store_true", help="cProfile of the decoding step")
    args = ap.parse_args()
    loop_loads.launch_on_this_cpu(SMS, run=_count)
    torch.set_num_threads(1)
    rows = {}
    with torch.inference_mode():
        q, k, v, g, beta = inputs(8, 64, 16)
        rows["chunk_kda, B=8, H=16"] = per_call(lambda: fast.chunk_kda(q, k, v, g, beta, output_final_state=True))
        q, k, v, g, beta = inputs(1, 512, 16)
        cu = torch.tensor([0, 100, 300, 512])
        rows["chunk_kda, 3 packed sequences"] = per_call(lambda: fast.chunk_kda(q, k, v, g, beta, cu_seqlens=cu))
        rows["chunk_kda, 3 packed, cu_seqlens_cpu"] = per_call(
            lambda: fast.chunk_kda(q, k, v, g, beta, cu_seqlens=cu, cu_seqlens_cpu=cu))
        q, k, v, g, beta = inputs(1, 1, 32)
        S = torch.randn(1, 32, 128, 128)
        slots = torch.zeros(1, dtype=torch.int32)
        rows["fused_recurrent_kda, N=1, H=32"] = per_call(
            lambda: fast.fused_recurrent_kda(q, k, v, g, beta, initial_state=S, output_final_state=True))
        rows["fused_recurrent_kda, N=1, pool in place"] = per_call(
            lambda: fast.fused_recurrent_kda(q, k, v, g, beta, initial_state=S, ssm_state_indices=slots))
        a = torch.randn(1 << 10)
        b = torch.empty_like(a)
        rows["a PyTorch copy of 4 KB (for scale)"] = per_call(lambda: b.copy_(a))

        cfg = HybridConfig(vocab_size=256, hidden_size=128, num_layers=8, num_heads=2, head_dim=64,
                           intermediate_size=256, kda_backend="fast")
        model = HybridLM(cfg).eval()
        cache = model.init_cache(1)
        model(torch.randint(0, 256, (1, 16)), cache=cache)
        token = torch.randint(0, 256, (1, 1))
        rows["eager decoding step, 8-layer hybrid"] = per_call(lambda: model(token, cache=cache), reps=100)
        for name, (us, n) in rows.items():
            print(f"{name:42s} {us:8.1f} us host, {n:3d} Triton launches")
        if args.profile:
            profile = cProfile.Profile()
            profile.enable()
            for _ in range(50):
                model(token, cache=cache)
            profile.disable()
            pstats.Stats(profile).sort_stats("cumulative").print_stats("kda_explained", 30)


if __name__ == "__main__":
    main()
