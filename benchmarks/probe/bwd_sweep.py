"""Launch shapes of the backward kernels, timed on the GPU: each stage alone, then a training step.

    python benchmarks/probe/bwd_sweep.py [--out DIR]      (B=8, T=4096, H=16, K=V=128, bf16)

For each stage of ``fast.backward.kda_backward`` and each candidate launch shape (a
:class:`~kda_explained.fast.config.KernelLaunch` of the plan's ``backward.launches``, or its
``wy_factors``), the stage runs on the
same inputs; its outputs must match those of the current launch (relative RMS error below 1e-3,
1e-2 for bf16 outputs: another tiling only reorders sums) before its median time counts. Then a whole ``chunk_kda``
forward + backward step is timed with the current shapes and with the fastest of each stage.
Writes ``bwd_sweep.json``.
"""

import argparse
from dataclasses import asdict, replace
import itertools
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bwd_stages import make_inputs  # noqa: E402
from kda_explained import fast  # noqa: E402
from kda_explained.fast import backward as fb  # noqa: E402
from kda_explained.fast import backward_intra as fbi  # noqa: E402
from kda_explained.fast.config import KernelLaunch as L, plan_for  # noqa: E402
from kda_explained.fast._meta import seq_meta  # noqa: E402
from kda_explained.fast.local import chunk_local_factors  # noqa: E402
from kda_explained.fast.prepare import chunk_local_cumsum  # noqa: E402
from kda_explained.fast.state import state_passing  # noqa: E402

CANDIDATES = {
    "wy_factors": [L(w, BK=bk, BV=bv) for bk, bv, w in ((64, 64, 8), (64, 64, 4), (32, 32, 4), (32, 32, 8),
                                                        (64, 64, 16), (128, 128, 8))],
    "output": [L(w, BV=bv) for bv, w in itertools.product((32, 64), (4, 8))],
    "recurrence": [L(w, BV=bv) for bv, w in itertools.product((16, 32, 64), (4, 8))],
    "state_chunks": [L(w, BK=bk, BV=bv) for bk, bv, w in itertools.product((32, 64), (32, 64), (4, 8))],
    "wy": [L(w, BK=bk, BV=bv) for bk, bv, w in itertools.product((32, 64), (32, 64), (4, 8))],
    "state_wy": [L(4, BK=32, BV=64), L(4, BK=32, BV=64, maxnreg=168), L(8, BK=32, BV=64, maxnreg=128),
                 L(8, BK=64, BV=64), L(8, BK=32, BV=128), L(4, BK=16, BV=64)],
    "ut": [L(w) for w in (4, 8)],
    "intra": [L(4, BK=64), L(4, BK=64, maxnreg=168), L(4, BK=64, maxnreg=128), L(4, BK=32, maxnreg=168),
              L(4, BK=32), L(2, BK=32)],
}


def rel_rms(a, b):
    a, b = a.double(), b.double()
    return float(((a - b).pow(2).mean() / b.pow(2).mean().clamp_min(1e-30)).sqrt())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "results"))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes under the Triton interpreter")
    ap.add_argument("--stages", default=None, help="only these stages, comma-separated (default: all)")
    args = ap.parse_args()
    B, T, H, D = (1, 80, 2, 32) if args.cpu_smoke else (8, 4096, 16, 128)
    dev, C, scale = ("cpu" if args.cpu_smoke else "cuda"), 64, D ** -0.5
    q, k, v, g, beta, S0, do, dSf = make_inputs(B, T, H, D, dev)
    meta = seq_meta(B, T, C, None, q.device)
    G, beta32 = chunk_local_cumsum(g, C, None, beta=beta, meta=meta)
    f = chunk_local_factors(q, k, v, G, beta32, scale, C, None, store_m=True, meta=meta)
    h, v_new, _ = state_passing(f.kg, f.W, f.U, G, S0, C, None, h_dtype=f.W.dtype, meta=meta)
    dq, _, _, dG, dA_qk = fb.chunk_output_bwd(q, h, v_new, G, f.A_qk, scale, do, C, None, state_grads=False,
                                              meta=meta)
    fused = dict(output=(f.qg, f.A_qk, do), grad_dtype=f.W.dtype, meta=meta)
    dS_out, dv_tot, _ = fb.state_passing_bwd_recurrence(f.kg, f.W, G, h, None, None, dSf, C, None, **fused)
    dk, dW, _ = fb.state_passing_bwd_chunks(f.kg, G, h, v_new, dS_out, dv_tot, C, None, dW_dtype=f.W.dtype, meta=meta)
    dM = fb.wy_representation_bwd(k, v, G, beta32, f.M, dW, dv_tot, C, None, meta=meta)[4]
    dA_kk = fb.ut_transform_bwd(f.M, dM, C, None, meta=meta)
    # each stage on the plan it is given (p), so a candidate launch is a plan passed to the call
    stages = {
        "wy_factors": lambda p: fast.chunk_wy_factors(q, k, v, G, beta32, f.M, scale, C, None, meta=meta,
                                                      config=p.wy_factors)[1:5],
        "output": lambda p: fb.chunk_output_bwd(q, h, v_new, G, f.A_qk, scale, do, C, None, state_grads=False,
                                                meta=meta, config=p.backward),
        "state_chunks": lambda p: fb.state_passing_bwd_chunks(f.kg, G, h, v_new, dS_out, dv_tot, C, None,
                                                              dW_dtype=f.W.dtype, meta=meta, config=p.backward),
        "wy": lambda p: fb.wy_representation_bwd(k, v, G, beta32, f.M, dW, dv_tot, C, None, meta=meta,
                                                 config=p.backward),
        "state_wy": lambda p: fb.state_wy_bwd(k, v, G, beta32, f.M, h, v_new, dS_out, dv_tot, C, None,
                                              output=(q, do, scale), meta=meta, config=p.backward),
        "ut": lambda p: fb.ut_transform_bwd(f.M, dM, C, None, meta=meta, config=p.backward),
        "intra": lambda p: fbi.intra_chunk_matrices_bwd(q, k, G, beta32, scale, dA_kk, dA_qk, C, None, meta=meta,
                                                        config=p.backward),
        # last: one of its shapes once lost the CUDA context (docs: kernels_history), which ends the sweep
        "recurrence": lambda p: fb.state_passing_bwd_recurrence(f.kg, f.W, G, h, None, None, dSf, C, None,
                                                                config=p.backward, **fused),
    }
    plan = plan_for(q.device)

    def get(stage, p):
        return p.wy_factors.launch if stage == "wy_factors" else p.backward[stage]

    def put(stage, launch, p):
        """``p`` with ``launch`` for ``stage``."""
        if stage == "wy_factors":
            return replace(p, wy_factors=replace(p.wy_factors, launch=launch))
        return replace(p, backward=replace(p.backward, launches={**p.backward.launches, stage: launch}))

    def bench(fn):
        if args.cpu_smoke:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        return float(triton.testing.do_bench(fn, warmup=5, rep=60, return_mode="median"))

    results = {"device": "cpu (interpreter)" if args.cpu_smoke else torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M"),
               "shape": [B, T, H, D], "current": {s: asdict(get(s, plan)) for s in stages}, "stages": {}}
    if args.stages:
        stages = {name: fn for name, fn in stages.items() if name in args.stages.split(",")}
    best = {}
    for stage, fn in stages.items():
        current = get(stage, plan)
        ref = [x for x in fn(plan) if isinstance(x, torch.Tensor)]
        rows = []
        for launch in CANDIDATES[stage]:
            candidate = put(stage, launch, plan)
            try:
                outs = [x for x in fn(candidate) if isinstance(x, torch.Tensor)]
                err = max(rel_rms(a, b) for a, b in zip(outs, ref))
                # another tiling only reorders float32 sums; a 16-bit output may round a few entries the other way
                tol = 1e-2 if any(x.dtype in (torch.bfloat16, torch.float16) for x in outs) else 1e-3
                ms = bench(lambda: fn(candidate)) if err < tol else None
                rows.append({"launch": asdict(launch), "ms": ms, "err": err})
            except Exception as exc:  # noqa: BLE001 - a shape that does not fit is a row, not a crash
                rows.append({"launch": asdict(launch), "error": f"{type(exc).__name__}: {str(exc)[:120]}"})
            print(f"{stage:13s} {str(launch):60s} {rows[-1]}", flush=True)
        timed = [(r, launch) for r, launch in zip(rows, CANDIDATES[stage]) if r.get("ms") is not None]
        best[stage] = min(timed, key=lambda rl: rl[0]["ms"])[1] if timed else current
        results["stages"][stage] = rows

    xs = [x.detach().requires_grad_(True) for x in (q, k, v, g, beta, S0)]

    def step(p):
        for x in xs:
            x.grad = None
        o, S = fast.chunk_kda(*xs[:5], initial_state=xs[5], output_final_state=True, plan=p)
        ((o.float() * do.float()).sum() + (S * dSf).sum()).backward()

    step(plan)
    results["step_ms_current"] = bench(lambda: step(plan))
    best_plan = plan
    for stage, launch in best.items():
        best_plan = put(stage, launch, best_plan)
    step(best_plan)
    results["step_ms_best"] = bench(lambda: step(best_plan))
    results["best"] = {stage: asdict(launch) for stage, launch in best.items()}
    print(f"training step: current {results['step_ms_current']:.3f} ms, best per stage {results['step_ms_best']:.3f} ms",
          flush=True)
    print(f"best: {best}", flush=True)
    if args.cpu_smoke:
        return
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bwd_sweep.json"), "w") as fh:
        json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
