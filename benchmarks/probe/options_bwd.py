"""A training step of chunk_kda with its in-kernel options: their backward in Triton against PyTorch autograd.

    python benchmarks/probe/options_bwd.py [B T H D]      (default 8 4096 16 128, bf16)

The step is ``benchmarks/gpu_train_bench.py``'s with ``use_qk_l2norm_in_kernel``,
``use_gate_in_kernel`` (``A_log``, ``dt_bias``, ``lower_bound=-5``) and
``use_beta_sigmoid_in_kernel``; every input, ``A_log`` and ``dt_bias`` included, requires grad. It is
timed with ``fast.chunk.TRITON_OPTIONS_BACKWARD`` on (the options' backward in
:mod:`kda_explained.fast.backward_options`) and off (PyTorch autograd around the Triton core), and
flash-linear-attention's ``chunk_kda`` with the same options beside them (``safe_gate`` off and on).
"""

import os
import sys

import torch
import triton

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from gpu_train_bench import leaves  # noqa: E402
from kda_explained import fast  # noqa: E402
from kda_explained.fast import chunk as fast_chunk  # noqa: E402


def main() -> None:
    B, T, H, D = (int(x) for x in sys.argv[1:5]) if len(sys.argv) > 4 else (8, 4096, 16, 128)
    q, k, v, g, beta, S0 = leaves(B, T, H, D, "cuda", torch.bfloat16)
    gen = torch.Generator(device="cuda").manual_seed(2)
    A_log = (0.5 * torch.randn(H, device="cuda", generator=gen)).requires_grad_(True)
    dt_bias = torch.randn(H * D, device="cuda", generator=gen).requires_grad_(True)
    xs = (q, k, v, g, beta, S0, A_log, dt_bias)
    do = torch.randn(B, T, H, D, device="cuda", generator=gen)
    dS = torch.randn(B, H, D, D, device="cuda", generator=gen)

    def step():
        for x in xs:
            x.grad = None
        o, S = fast.chunk_kda(q, k, v, g, beta, initial_state=S0, output_final_state=True,
                              use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
                              lower_bound=-5.0, use_beta_sigmoid_in_kernel=True)
        ((o.float() * do).sum() + (S * dS).sum()).backward()

    default = fast_chunk.TRITON_OPTIONS_BACKWARD
    for on in (True, False):
        fast_chunk.TRITON_OPTIONS_BACKWARD = on
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 1e9
        ms = triton.testing.do_bench(step, warmup=5, rep=200, return_mode="median")
        print(f"B={B} T={T} H={H} D={D} options' backward in {'Triton ' if on else 'PyTorch'}: {ms:.3f} ms, "
              f"peak {peak:.3f} GB", flush=True)
    fast_chunk.TRITON_OPTIONS_BACKWARD = default
    try:
        from fla.ops.kda import chunk_kda as fla_kda
    except ImportError as exc:
        print(f"fla not importable ({exc!r})")
        return
    for safe_gate in (False, True):  # fla's bounded-gate path needs safe_gate=True for lower_bound's sigmoid gate

        def fla_step():
            for x in xs:
                x.grad = None
            o, S = fla_kda(q, k, v, g, beta, initial_state=S0, output_final_state=True,
                           use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias,
                           lower_bound=-5.0, use_beta_sigmoid_in_kernel=True, safe_gate=safe_gate)
            ((o.float() * do).sum() + (S * dS).sum()).backward()

        fla_step()
        torch.cuda.synchronize()
        ms = triton.testing.do_bench(fla_step, warmup=5, rep=200, return_mode="median")
        print(f"B={B} T={T} H={H} D={D} fla chunk_kda, same options, safe_gate={safe_gate}: {ms:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
