"""Where the time goes: each stage kernel of fast.chunk_kda timed alone, and decode launch shapes swept.

    python benchmarks/gpu_stages.py [--out DIR]

Feeds the docs' kernel page: measure before changing anything. Every variant is a launch plan
(:mod:`kda_explained.fast.config`) passed to the call it times.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kda_explained import fast  # noqa: E402
from kda_explained.fast.config import DecodeConfig, KernelLaunch, plan_for  # noqa: E402
from gpu_bench import bench, make_inputs  # noqa: E402

PLAN = plan_for("cuda") if torch.cuda.is_available() else None


def stage_times(B, T, H, D, C=64):
    q, k, v, g, beta = make_inputs(B, T, H, D)
    scale = D ** -0.5
    out = {}
    with torch.inference_mode():
        G, b32 = fast.chunk_local_cumsum(g, C, beta=beta)
        out["1_cumsum"] = bench(lambda: fast.chunk_local_cumsum(g, C, beta=beta))
        f = fast.chunk_local_factors(q, k, v, G, b32, scale, C)
        out["2-4_local"] = bench(lambda: fast.chunk_local_factors(q, k, v, G, b32, scale, C))
        h, vn, S = fast.state_passing(f.kg, f.W, f.U, G, None, C, h_dtype=f.W.dtype)
        out["5_state"] = bench(lambda: fast.state_passing(f.kg, f.W, f.U, G, None, C, h_dtype=f.W.dtype))
        out["6_output"] = bench(lambda: fast.chunk_output(f.qg, h, vn, f.A_qk, C, out_dtype=v.dtype))
        out["total"] = bench(lambda: fast.chunk_kda(q, k, v, g, beta))
        # launch-shape sweeps of the stages that have them (each a config passed to the call)
        for pass_, shapes in (("keys", ((16, 1), (32, 1))), ("queries", ((16, 1), (32, 2)))):
            for bk, w in shapes:
                config = replace(PLAN.local, **{pass_: KernelLaunch(warps=w, stages=PLAN.local.keys.stages, BK=bk)})
                out[f"2-4_local_{pass_}_bk{bk}_w{w}"] = bench(
                    lambda: fast.chunk_local_factors(q, k, v, G, b32, scale, C, config=config))
        for bv in (64, 128):
            for w in (4, 8):
                config = replace(PLAN.output, launch=replace(PLAN.output.launch, BV=bv, warps=w))
                out[f"6_output_bv{bv}_w{w}"] = bench(
                    lambda: fast.chunk_output(f.qg, h, vn, f.A_qk, C, out_dtype=v.dtype, config=config))
        # the exact diagonal fix-up: gates too strong for the tensor-core diagonal (span > SAFE_SPAN)
        G_strong = fast.chunk_local_cumsum(g * 4, C)
        out["2-4_local_strong_gates"] = bench(lambda: fast.chunk_local_factors(q, k, v, G_strong, b32, scale, C))
    return out


def lowp_sweep():
    """Time and accuracy of chunk_kda with the state/output products in bf16 instead of tf32."""
    from kda_explained import chunked
    from kda_explained.testing import rel_rms_error

    q, k, v, g, beta = make_inputs(8, 4096, 16, 128)
    qs, ks, vs, gs, bs = (x[:2, :1024, :4] for x in (q, k, v, g, beta))
    with torch.inference_mode():
        ref, _ = chunked.kda(*(x.double() for x in (qs, ks, vs, gs, bs)))
    res = {}
    for st in (False, True):
        for out in (False, True):
            plan = replace(PLAN, state=replace(PLAN.state, lowp=st), output=replace(PLAN.output, lowp=out))
            with torch.inference_mode():
                err = rel_rms_error(fast.chunk_kda(qs, ks, vs, gs, bs, plan=plan)[0], ref)
                ms = bench(lambda: fast.chunk_kda(q, k, v, g, beta, plan=plan))
            res[f"state{int(st)}_output{int(out)}"] = {"ms": ms, "rel_err": err}
            print(f"low-precision dots: state {st} output {out}: {ms:.3f} ms, rel err {err:.2e}", flush=True)
    for prec in ("ieee", "tf32x3", "tf32"):
        plan = replace(PLAN, local=replace(PLAN.local, ut_precision=prec),
                       one_pass=replace(PLAN.one_pass, ut_precision=prec))
        with torch.inference_mode():
            err = rel_rms_error(fast.chunk_kda(qs, ks, vs, gs, bs, plan=plan)[0], ref)
            ms = bench(lambda: fast.chunk_kda(q, k, v, g, beta, plan=plan))
        res[f"ut_{prec}"] = {"ms": ms, "rel_err": err}
        print(f"UT transform products in {prec}: {ms:.3f} ms, rel err {err:.2e}", flush=True)
    return res


def long_sequence_state_sweep(T=65536, H=16, D=128, C=64):
    """The state kernel on one long sequence: few programs, so value columns per program matter."""
    q, k, v, g, beta = make_inputs(1, T, H, D)
    res = {}
    with torch.inference_mode():
        G, b32 = fast.chunk_local_cumsum(g, C, beta=beta)
        f = fast.chunk_local_factors(q, k, v, G, b32, D ** -0.5, C)
        for bv in (16, 32, 64):
            for w in (2, 4):
                config = replace(PLAN.state, BV=bv, warps=w)
                ms = bench(lambda: fast.state_passing(f.kg, f.W, f.U, G, None, C, h_dtype=f.W.dtype, config=config))
                res[f"state_bv{bv}_w{w}"] = ms
                print(f"T={T} state BV={bv} warps={w}: {ms:.3f} ms", flush=True)
        res["total_default"] = bench(lambda: fast.chunk_kda(q, k, v, g, beta))
        print(f"T={T} chunk_kda: {res['total_default']:.3f} ms", flush=True)
    return res


def decode_sweep(N=256, H=32, D=128):
    q, k, v, g, beta = make_inputs(N, 1, H, D, seed=1)
    pool = torch.randn(N, H, D, D, device="cuda") * 0.1
    slots = torch.randperm(N, device="cuda").to(torch.int32)
    res = {}
    with torch.inference_mode():
        for name, kw in (("plain_out", dict(output_final_state=True)), ("plain_inplace", dict(inplace_final_state=True)),
                         ("slots", dict(ssm_state_indices=slots))):
            ms = bench(lambda: fast.fused_recurrent_kda(q, k, v, g, beta, initial_state=pool, **kw))
            res[name] = {"ms": ms, "GBps": 2 * N * H * D * D * 4 / (ms * 1e-3) / 1e9}
            print(f"decode {name}: {ms:.4f} ms {res[name]['GBps']:.0f} GB/s", flush=True)
        # the kernel alone: one decode step captured in a CUDA graph (no host work in the timing)
        step = lambda: fast.fused_recurrent_kda(q, k, v, g, beta, initial_state=pool,  # noqa: E731
                                                ssm_state_indices=slots)
        step()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        ms = bench(graph.replay)
        res["slots_cuda_graph"] = {"ms": ms, "GBps": 2 * N * H * D * D * 4 / (ms * 1e-3) / 1e9}
        print(f"decode slots, CUDA graph: {ms:.4f} ms {res['slots_cuda_graph']['GBps']:.0f} GB/s", flush=True)
        for bv in (16, 32, 64):
            for w in (2, 4):
                plan = replace(PLAN, decode=DecodeConfig(KernelLaunch(warps=w, BV=bv), min_programs_per_sm=0))
                ms = bench(lambda: fast.fused_recurrent_kda(q, k, v, g, beta, initial_state=pool,
                                                            ssm_state_indices=slots, plan=plan))
                res[f"BV{bv}_w{w}"] = {"ms": ms, "GBps": 2 * N * H * D * D * 4 / (ms * 1e-3) / 1e9}
                print(f"decode BV={bv} warps={w}: {ms:.4f} ms {res[f'BV{bv}_w{w}']['GBps']:.0f} GB/s", flush=True)
    return res


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    res = {"stages_B8_T4096_H16": stage_times(8, 4096, 16, 128), "low_precision_dots": lowp_sweep()}
    print("stages_B8_T4096_H16", {k: round(v, 3) for k, v in res["stages_B8_T4096_H16"].items()}, flush=True)
    res["long_sequence"] = long_sequence_state_sweep()
    res["decode"] = decode_sweep()
    with open(os.path.join(args.out, "gpu_stages.json"), "w") as f:
        json.dump(res, f, indent=1)
