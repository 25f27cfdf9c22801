"""The intra-chunk backward's product precision: its time, and what it does to the gradients' accuracy.

    python benchmarks/probe/intra_precision.py      (H100; B=8, T=4096, H=16, K=V=128, bf16)

``fast.backward_intra`` runs its block products in full float32 (``ieee``, the plan's
``backward.intra_precision``) for bf16 inputs too: one tf32 pass left the gate parameters'
gradients at 2.5e-2 against float64. Every candidate is a plan passed to the calls it times.
For each candidate precision (``tf32x3``, ``tf32``, ``bf16x3``, ``bf16x6``, ``ieee``; a candidate this
Triton does not know is reported and skipped) and launch shape this prints:

1. the intra backward alone (``triton.testing.do_bench`` median) and its outputs' distance from
   the current setting's;
2. a whole ``chunk_kda`` training step (forward + backward);
3. the relative RMS error of every gradient against the float64 reference, on the inputs of
   ``tests/test_fast_gpu.py::test_gradients_bf16`` (its ``gradient_problem``: two packed sequences
   of 700 and 1348 tokens), for no gate, the softplus gate and the lower-bound gate; flash-linear-attention's errors on
   the same inputs beside them when ``fla`` imports.
"""

import json
import os
import sys
from dataclasses import replace

import torch
import triton

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.dirname(__file__))

from bwd_stages import make_inputs  # noqa: E402
from kda_explained import fast  # noqa: E402
from kda_explained.fast import backward_intra as fbi  # noqa: E402
from kda_explained.fast._meta import seq_meta  # noqa: E402
from kda_explained.fast.config import KernelLaunch, plan_for  # noqa: E402
from kda_explained.fast.prepare import chunk_local_cumsum  # noqa: E402

PRECISIONS = ["tf32x3", "tf32", "bf16x3", "bf16x6", "ieee"]
LAUNCHES = [KernelLaunch(4, BK=64), KernelLaunch(4, BK=32), KernelLaunch(8, BK=64), KernelLaunch(2, BK=32)]
GATES = ["none", "softplus", "lower_bound"]


def rel_rms(a, b):
    a, b = a.double(), b.double()
    return float(((a - b).pow(2).mean() / b.pow(2).mean().clamp_min(1e-30)).sqrt())


def grads(fn, values, opts, cu, do, dS, dtype=None):
    leaves = {n: (x.detach().to(dtype) if dtype else x.detach().clone()).requires_grad_(True)
              for n, x in values.items()}
    o, S = fn(**leaves, cu_seqlens=cu, **opts)
    torch.autograd.backward((o, S), (do.to(o.dtype), dS.to(S.dtype)))
    return {n: x.grad for n, x in leaves.items()}


def fast_fn(plan):
    return lambda **kw: fast.chunk_kda(**kw, output_final_state=True, plan=plan)


def fla_fn(**kw):
    from fla.ops.kda import chunk_kda

    kw = dict(kw)
    if "dt_bias" in kw:
        kw["dt_bias"] = kw["dt_bias"].reshape(-1)
    return chunk_kda(**kw, output_final_state=True)


def main() -> None:
    from test_fast_gpu import gradient_problem, reference

    dev, C = "cuda", 64
    B, T, H, D = 8, 4096, 16, 128
    q, k, v, g, beta, S0, do, dSf = make_inputs(B, T, H, D, dev)
    meta = seq_meta(B, T, C, None, q.device)
    G, beta32 = chunk_local_cumsum(g, C, None, beta=beta, meta=meta)
    gen = torch.Generator(device=dev).manual_seed(5)
    dA_kk = 0.1 * torch.randn(B, T, H, C, device=dev, generator=gen)
    dA_qk = 0.1 * torch.randn(B, T, H, C, device=dev, generator=gen)
    scale = D ** -0.5
    base = plan_for(q.device)
    ref = fbi.intra_chunk_matrices_bwd(q, k, G, beta32, scale, dA_kk, dA_qk, C, None, meta=meta, config=base.backward)
    results = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "intra": [], "step": [],
               "accuracy": []}

    # the step's inputs
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, g, beta, S0)]

    def step(plan):
        o, S = fast.chunk_kda(*leaves[:5], initial_state=leaves[5], output_final_state=True, plan=plan)
        torch.autograd.backward((o, S), (do, dSf))

    problems = {gate: gradient_problem(gate) for gate in GATES}
    refs = {}
    for gate, (values, opts, cu, do64, dS64) in problems.items():
        refs[gate] = grads(reference, values, opts, cu, do64, dS64, torch.float64)
    try:
        for gate, (values, opts, cu, do64, dS64) in problems.items():
            got = grads(fla_fn, values, opts, cu, do64, dS64)
            errs = {n: rel_rms(got[n], refs[gate][n]) for n in got if got[n] is not None}
            results["accuracy"].append(dict(impl="fla", gate=gate, errors=errs))
            print(f"fla   {gate:12s} " + " ".join(f"d{n} {e:.2e}" for n, e in errs.items()), flush=True)
    except Exception as e:  # noqa: BLE001 - fla is optional here
        print(f"fla accuracy skipped: {type(e).__name__}: {e}")

    for prec in PRECISIONS:
        for launch in LAUNCHES:
            config = replace(base.backward, intra_precision=prec, launches={**base.backward.launches, "intra": launch})
            try:
                out = fbi.intra_chunk_matrices_bwd(q, k, G, beta32, scale, dA_kk, dA_qk, C, None, meta=meta,
                                                   config=config)
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001 - a precision this Triton lacks
                print(f"{prec} {launch}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                break
            diff = {n: rel_rms(a, b) for n, a, b in zip(("dq", "dk", "dG", "dbeta"), out, ref)}
            ms = triton.testing.do_bench(
                lambda: fbi.intra_chunk_matrices_bwd(q, k, G, beta32, scale, dA_kk, dA_qk, C, None, meta=meta,
                                                     config=config),
                warmup=5, rep=100, return_mode="median")
            results["intra"].append(dict(precision=prec, launch=str(launch), ms=ms, diff_from_default=diff))
            print(f"intra {prec:7s} {str(launch):14s} {ms:7.3f} ms   vs default: "
                  + " ".join(f"{n} {d:.1e}" for n, d in diff.items()), flush=True)
        else:
            plan = replace(base, backward=replace(base.backward, intra_precision=prec))
            ms = triton.testing.do_bench(lambda: step(plan), warmup=3, rep=50, return_mode="median")
            results["step"].append(dict(precision=prec, ms=ms))
            print(f"step  {prec:7s} {ms:7.3f} ms", flush=True)
            for gate, (values, opts, cu, do64, dS64) in problems.items():
                got = grads(fast_fn(plan), values, opts, cu, do64, dS64)
                errs = {n: rel_rms(got[n], refs[gate][n]) for n in got}
                results["accuracy"].append(dict(impl=f"fast {prec}", gate=gate, errors=errs))
                print(f"fast {prec:7s} {gate:12s} " + " ".join(f"d{n} {e:.2e}" for n, e in errs.items()), flush=True)
    out_dir = os.environ.get("OUT", os.path.join(ROOT, "benchmarks", "results"))
    with open(os.path.join(out_dir, "intra_precision.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
