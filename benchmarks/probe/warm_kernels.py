"""Compile (and autotune once) every kernel a benchmark will time, so that the timed run finds them in the cache.

flash-linear-attention autotunes its kernels cold on each new shape, which costs minutes of compilation a shape.
Run several of these at once, one process per shape, with ``TRITON_CACHE_DIR`` pointing at a folder the timed run
reads too, and without ``TRITON_CACHE_AUTOTUNING``: the compiled kernels are reused, the autotuner's choices are
not (the timed run benchmarks every configuration again, on an otherwise idle GPU). Each process
keeps to ``KDA_WARM_MEMORY_FRACTION`` of the GPU's memory (default 0.08), so that seven of them
leave room for tests running beside them.

    python benchmarks/probe/warm_kernels.py fwd B8_T4096_H16
    python benchmarks/probe/warm_kernels.py train B1_T8192_H96
    python benchmarks/probe/warm_kernels.py decode
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import gpu_bench  # noqa: E402
import gpu_train_bench  # noqa: E402
from kda_explained import fast  # noqa: E402


def main() -> None:
    what, name = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
    from fla.ops.kda import chunk_kda as fla_kda, fused_recurrent_kda as fla_rec
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_gdn

    # several of these run beside the GPU tests: each keeps to a share of the memory
    torch.cuda.set_per_process_memory_fraction(float(os.environ.get("KDA_WARM_MEMORY_FRACTION", "0.08")))
    t0 = time.time()
    if what == "fwd":
        shp = next(s for s in gpu_bench.PREFILL if s["name"] == name)
        H, D = shp["H"], shp["D"]
        if "lengths" in shp:
            B, T = 1, sum(shp["lengths"])
            cu = torch.tensor([0] + list(torch.tensor(shp["lengths"]).cumsum(0).tolist()), device="cuda")
        else:
            B, T, cu = shp["B"], shp["T"], None
        q, k, v, g, beta = gpu_bench.make_inputs(B, T, H, D)
        with torch.inference_mode():
            fast.chunk_kda(q, k, v, g, beta, cu_seqlens=cu)
            fla_kda(q, k, v, g, beta, cu_seqlens=cu)
            fla_kda(q, k, v, g, beta, cu_seqlens=cu, safe_gate=True, lower_bound=-5.0)
            fla_gdn(q, k, v, g[..., 0].contiguous(), beta, cu_seqlens=cu)
            if shp is gpu_bench.PREFILL[0]:
                sl = [x[:2, :1024, :4] for x in (q, k, v, g, beta)]
                fast.chunk_kda(*sl)
                fla_kda(*sl)
                fla_kda(*sl, safe_gate=True, lower_bound=-5.0)
    elif what == "train":
        shp = next(s for s in gpu_train_bench.SHAPES if s["name"] == name)
        xs = gpu_train_bench.leaves(shp["B"], shp["T"], shp["H"], shp["D"], "cuda", torch.bfloat16)
        do = torch.randn(shp["B"], shp["T"], shp["H"], shp["D"], device="cuda")
        dS = torch.randn(shp["B"], shp["H"], shp["D"], shp["D"], device="cuda")
        for fn in (fast.chunk_kda, fla_kda,
                   lambda *a, **kw: fla_kda(*a, **kw, safe_gate=True, lower_bound=-5.0)):
            gpu_train_bench.step_fn(fn, xs, do, dS)()
        if shp is gpu_train_bench.SHAPES[0]:
            gpu_train_bench.grad_accuracy({"fast": fast.chunk_kda, "fla": fla_kda}, "cuda", torch.bfloat16)
    elif what == "decode":
        H, D = gpu_bench.DECODE["H"], gpu_bench.DECODE["D"]
        for N in gpu_bench.DECODE["N"]:
            q, k, v, g, beta = gpu_bench.make_inputs(N, 1, H, D, seed=1)
            pool = torch.randn(N, H, D, D, device="cuda") * 0.1
            with torch.inference_mode():
                fla_rec(q, k, v, g, beta, initial_state=pool, output_final_state=True)
    else:
        raise SystemExit(f"what must be fwd, train or decode, not {what!r}")
    torch.cuda.synchronize()
    print(f"warm {what} {name}: {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
