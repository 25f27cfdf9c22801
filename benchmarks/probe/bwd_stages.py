"""Time each stage of the Triton backward (``fast.backward.kda_backward``) on the GPU.

    python benchmarks/probe/bwd_stages.py [B T H D]      (default 8 4096 16 128, bf16)

Prints the median time of every forward-recompute and backward stage (``triton.testing.do_bench``),
so the kernel page can say where the backward's time goes: the output, state per-chunk and WY
backward both apart (the plan's ``state_wy_fused`` off) and as the one kernel ``kda_backward`` runs.
"""

import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from kda_explained import chunked  # noqa: E402
from kda_explained.fast import backward as fb  # noqa: E402
from kda_explained.fast._meta import seq_meta  # noqa: E402
from kda_explained.fast.local import chunk_local_factors, chunk_wy_factors  # noqa: E402
from kda_explained.fast.prepare import chunk_local_cumsum  # noqa: E402
from kda_explained.fast.state import state_passing  # noqa: E402


def make_inputs(B: int, T: int, H: int, D: int, dev: str):
    """``q, k, v, g, beta, S0, do, dS_final`` of a backward problem: bf16 ``q, k, v, beta, do``,
    unit-norm keys, a lower-bound gate (-5), float32 states."""
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, T, H, D, device=dev, generator=gen).bfloat16()
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, device=dev, generator=gen), dim=-1).bfloat16()
    v = torch.randn(B, T, H, D, device=dev, generator=gen).bfloat16()
    g = chunked.lowerbound_gate(torch.randn(B, T, H, D, device=dev, generator=gen), lower_bound=-5.0)
    beta = torch.rand(B, T, H, device=dev, generator=gen).bfloat16()
    S0 = 0.1 * torch.randn(B, H, D, D, device=dev, generator=gen)
    do = torch.randn(B, T, H, D, device=dev, generator=gen).bfloat16()
    dSf = torch.randn(B, H, D, D, device=dev, generator=gen)
    return q, k, v, g, beta, S0, do, dSf


def main() -> None:
    B, T, H, D = (int(x) for x in sys.argv[1:5]) if len(sys.argv) > 4 else (8, 4096, 16, 128)
    dev, C, scale = "cuda", 64, D ** -0.5
    q, k, v, g, beta, S0, do, dSf = make_inputs(B, T, H, D, dev)
    meta = seq_meta(B, T, C, None, q.device)
    times = {}

    def timed(name, fn):
        out = fn()
        times[name] = triton.testing.do_bench(fn, warmup=5, rep=100, return_mode="median")
        return out

    G, beta32 = timed("fwd cumsum", lambda: chunk_local_cumsum(g, C, None, beta=beta, meta=meta))
    f = timed("fwd local (store M)", lambda: chunk_local_factors(q, k, v, G, beta32, scale, C, None,
                                                                  store_m=True, meta=meta))
    M = f.M
    timed("bwd recompute: W, U, qg, kg from M", lambda: chunk_wy_factors(q, k, v, G, beta32, M, scale, C, None,
                                                                        meta=meta))
    h, v_new, _ = timed("fwd state (h bf16)", lambda: state_passing(f.kg, f.W, f.U, G, S0, C, None,
                                                                     h_dtype=f.W.dtype, meta=meta))
    dq, _, _, dG, dA_qk = timed("bwd output", lambda: fb.chunk_output_bwd(q, h, v_new, G, f.A_qk, scale, do, C, None,
                                                                          state_grads=False, meta=meta))
    dS_out, dv_tot, dS0 = timed("bwd state recurrence (+ dh, dv_new)", lambda: fb.state_passing_bwd_recurrence(
        f.kg, f.W, G, h, None, None, dSf, C, None, output=(f.qg, f.A_qk, do), grad_dtype=f.W.dtype, meta=meta))
    dk, dW, dG5 = timed("bwd state per-chunk part", lambda: fb.state_passing_bwd_chunks(
        f.kg, G, h, v_new, dS_out, dv_tot, C, None, H=H, dW_dtype=f.W.dtype, meta=meta))
    dU = dv_tot
    dk4, dv, dG4, dbeta, dM = timed("bwd WY", lambda: fb.wy_representation_bwd(k, v, G, beta32, M, dW, dU, C, None,
                                                                                meta=meta))
    timed("bwd output + state per-chunk + WY, one kernel (the default)", lambda: fb.state_wy_bwd(
        k, v, G, beta32, M, h, v_new, dS_out, dv_tot, C, None, output=(q, do, scale), meta=meta))
    dA_kk = timed("bwd UT", lambda: fb.ut_transform_bwd(M, dM, C, None, meta=meta))
    timed("bwd intra", lambda: fb.intra_chunk_matrices_bwd(q, k, G, beta32, scale, dA_kk, dA_qk, C, None, meta=meta))
    timed("bwd cumsum", lambda: fb.chunk_local_cumsum_bwd(dG + dG5 + dG4, C, None, meta=meta))
    timed("kda_backward (all, recomputing 2-4)", lambda: fb.kda_backward(q, k, v, g, beta, do, dSf, initial_state=S0))
    timed("kda_backward (all, A_qk and M kept)", lambda: fb.kda_backward(q, k, v, g, beta, do, dSf, initial_state=S0,
                                                                         factors=(f.A_qk, M)))
    print(f"B={B} T={T} H={H} D={D} bf16 on {torch.cuda.get_device_name()}")
    for name, ms in times.items():
        print(f"  {name:60s} {ms:8.3f} ms")


if __name__ == "__main__":
    main()
