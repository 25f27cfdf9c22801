"""Kernel variants side by side with flash-linear-attention, in one run: the forward and a training step.

    python benchmarks/probe/variants.py [--fwd NAME ...] [--train NAME ...] [--out DIR]

A variant is a launch plan of :mod:`kda_explained.fast.config` (launch shapes, precisions, fusions)
and optionally a chunk size, passed to the calls it times. For each variant this times

- the inference forward (``chunk_kda`` under ``torch.inference_mode``) at the four prefill shapes of
  ``benchmarks/gpu_bench.py``, with its output's relative RMS error against a float64 reference on
  a slice of the first shape (B=2, T=1024, H=4);
- a training step (``chunk_kda`` forward + backward, ``benchmarks/gpu_train_bench.py``'s step) at
  its two shapes, with the variant's chunk size where it names one (else 64 tokens, as training takes);

and flash-linear-attention's ``chunk_kda`` once per shape beside them (with ``--fla-safe-gate`` also
its ``safe_gate=True`` path, for gates bounded in ``[-5, 0)`` as the benchmark's are). Writes ``variants.json`` (``--json``: another name).
What each variant changed and measured is written up in the docs: on the kernel page (docs/kernels.md)
where it supports the current code, and on its appendix (docs/kernels_history.md) in every case.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import replace

import torch
import triton

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from gpu_bench import PREFILL, make_inputs  # noqa: E402
from gpu_train_bench import SHAPES as TRAIN_SHAPES, leaves, step_fn  # noqa: E402
from kda_explained import chunked, fast  # noqa: E402
from kda_explained.fast.config import KernelLaunch, plan_for  # noqa: E402
from kda_explained.testing import rel_rms_error  # noqa: E402

R = replace


def _fwd(base, **changes):
    return R(base, forward=R(base.forward, **changes))


def _bwd_launch(base, name, **changes):
    launches = {**base.backward.launches, name: R(base.backward[name], **changes)}
    return R(base, backward=R(base.backward, launches=launches))


#: name -> (plan -> plan, chunk_size): a variant is a launch plan (and a chunk size) passed to the calls it times
VARIANTS = {
    "default": (lambda p: p, None),
    "chunk64": (lambda p: _fwd(p, short_chunk=None), None),
    "short32": (lambda p: _fwd(p, short_chunk=32), None),
    "chunk16": (lambda p: p, 16),
    "chunk32": (lambda p: p, 32),
    "chunk16_two_kernels": (lambda p: _fwd(p, fused_state_output=False), 16),
    "chunk32_two_kernels": (lambda p: _fwd(p, fused_state_output=False), 32),
    "chunk16_fused_all": (lambda p: _fwd(p, fused_min_programs_per_sm=0.0), 16),
    "two_kernels": (lambda p: _fwd(p, fused_state_output=False), None),
    "fused_all": (lambda p: _fwd(p, fused_min_programs_per_sm=0.0), None),
    "fused_all_bv32": (lambda p: R(_fwd(p, fused_min_programs_per_sm=0.0), state=R(p.state, BV=32)), None),
    "fold0": (lambda p: _fwd(p, one_pass_fold=0), None),
    "one_pass_bk16": (lambda p: R(p, one_pass=R(p.one_pass, launch=R(p.one_pass.launch, BK=16))), None),
    "one_pass_w2": (lambda p: R(p, one_pass=R(p.one_pass, launch=R(p.one_pass.launch, warps=2))), None),
    "one_pass_bk64": (lambda p: R(p, one_pass=R(p.one_pass, launch=R(p.one_pass.launch, BK=64))), None),
    "one_pass_maxnreg_none": (lambda p: R(p, one_pass=R(p.one_pass, launch=R(p.one_pass.launch, maxnreg=None))), None),
    "one_pass_maxnreg128": (lambda p: R(p, one_pass=R(p.one_pass, launch=R(p.one_pass.launch, maxnreg=128))), None),
    "one_pass_stages1": (lambda p: R(p, one_pass=R(p.one_pass, launch=R(p.one_pass.launch, stages=1))), None),
    "local_bk16": (lambda p: R(p, local=R(p.local, keys=KernelLaunch(1, 2, 16), queries=KernelLaunch(1, 2, 16))),
                   None),
    "local_stages1": (lambda p: R(p, local=R(p.local, keys=R(p.local.keys, stages=1),
                                             queries=R(p.local.queries, stages=1))), None),
    "local_ut_ieee": (lambda p: R(p, local=R(p.local, ut_precision="ieee"),
                                  one_pass=R(p.one_pass, ut_precision="ieee")), None),
    "state_bv32": (lambda p: R(p, state=R(p.state, BV=32)), None),
    "state_bv64": (lambda p: R(p, state=R(p.state, BV=64)), None),
    "state_bv128_w8": (lambda p: R(p, state=R(p.state, BV=128, warps=8)), None),
    "state_warps2": (lambda p: R(p, state=R(p.state, warps=2)), None),
    "state_warps8": (lambda p: R(p, state=R(p.state, warps=8)), None),
    "state_stages2": (lambda p: R(p, state=R(p.state, stages_lowp=2)), None),
    "state_stages4": (lambda p: R(p, state=R(p.state, stages_lowp=4)), None),
    "state_pps1": (lambda p: R(p, state=R(p.state, fused_programs_per_sm=1.0)), None),
    "state_no_prefetch": (lambda p: R(p, state=R(p.state, prefetch=False),
                                      backward=R(p.backward, recurrence_prefetch=False)), None),
    "rec_stages2": (lambda p: _bwd_launch(p, "recurrence", stages=2), None),
    "rec_stages3": (lambda p: _bwd_launch(p, "recurrence", stages=3), None),
    "swy_stages2": (lambda p: _bwd_launch(p, "state_wy", stages=2), None),
    "swy_stages3": (lambda p: _bwd_launch(p, "state_wy", stages=3), None),
    "intra_stages2": (lambda p: _bwd_launch(p, "intra", stages=2), None),
    "intra_128_4": (lambda p: _bwd_launch(p, "intra", BK=128), None),
    "intra_64_2": (lambda p: _bwd_launch(p, "intra", warps=2), None),
    "intra_tf32x3": (lambda p: R(p, backward=R(p.backward, intra_precision="tf32x3")), None),
    "ut_bwd_ieee": (lambda p: R(p, backward=R(p.backward, ut_precision="ieee")), None),
    "state_wy_unfused": (lambda p: R(p, backward=R(p.backward, state_wy_fused=False)), None),
    # one long sequence in pieces that run at once (kda_explained.chunked.pieces): the piece length,
    # and the pieces' chunk size (their own grid's choice, or 64 tokens)
    "pieces2048": (lambda p: _fwd(p, piece_tokens=2048), None),
    "pieces4096": (lambda p: _fwd(p, piece_tokens=4096), None),
    "pieces8192": (lambda p: _fwd(p, piece_tokens=8192), None),
    "pieces16384": (lambda p: _fwd(p, piece_tokens=16384), None),
    "pieces4096_chunk64": (lambda p: _fwd(p, piece_tokens=4096, short_chunk=None), None),
    "pieces8192_chunk64": (lambda p: _fwd(p, piece_tokens=8192, short_chunk=None), None),
}


def variant(name: str):
    """``(plan, chunk_size)`` of a variant, on the plan of the GPU at hand."""
    make_plan, chunk_size = VARIANTS[name]
    return make_plan(plan_for("cuda")), chunk_size


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def bench(fn, rep_ms: int = 200) -> float:
    return float(triton.testing.do_bench(fn, warmup=30, rep=rep_ms, return_mode="median"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fwd", nargs="*", default=["default", "two_kernels"])
    ap.add_argument("--train", nargs="*", default=["default"])
    ap.add_argument("--train-shapes", nargs="*", default=None, help="training shapes by name (default: both)")
    ap.add_argument("--fwd-shapes", nargs="*", default=None, help="prefill shapes by name (default: all four)")
    ap.add_argument("--fla-safe-gate", action="store_true",
                    help="also time fla with safe_gate=True (its faster path for gates bounded in [-5, 0), "
                         "which the benchmark's lower-bound gates are)")
    ap.add_argument("--json", default="variants.json", help="file name of the results in --out")
    ap.add_argument("--out", default=os.environ.get("OUT", os.path.join(ROOT, "benchmarks", "results")))
    args = ap.parse_args()
    try:
        from fla.ops.kda import chunk_kda as fla_kda
    except Exception as exc:  # noqa: BLE001 - fla is optional: the fast columns still mean something
        log(f"fla not importable ({exc!r})")
        fla_kda = None
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M"), "forward": [], "train": []}

    if args.fwd:  # accuracy slice: float64 reference once
        q, k, v, g, beta = make_inputs(8, 4096, 16, 128)
        sl = [x[:2, :1024, :4].contiguous() for x in (q, k, v, g, beta)]
        ref, _ = chunked.kda(*(x.double() for x in sl))
        del q, k, v, g, beta
    for shp in PREFILL if args.fwd else []:
        if args.fwd_shapes is not None and shp["name"] not in args.fwd_shapes:
            continue
        H, D = shp["H"], shp["D"]
        if "lengths" in shp:
            B, T = 1, sum(shp["lengths"])
            cu = torch.tensor([0] + torch.tensor(shp["lengths"]).cumsum(0).tolist(), device="cuda")
        else:
            B, T, cu = shp["B"], shp["T"], None
        q, k, v, g, beta = make_inputs(B, T, H, D)
        row = {"name": shp["name"]}
        with torch.inference_mode():
            if fla_kda is not None:
                fla_kda(q, k, v, g, beta, cu_seqlens=cu)
                row["fla_ms"] = bench(lambda: fla_kda(q, k, v, g, beta, cu_seqlens=cu))
                if shp is PREFILL[0]:
                    row["fla_err"] = rel_rms_error(fla_kda(*sl)[0], ref)
                if args.fla_safe_gate:
                    fla_kda(q, k, v, g, beta, cu_seqlens=cu, safe_gate=True)
                    row["fla_safe_gate_ms"] = bench(lambda: fla_kda(q, k, v, g, beta, cu_seqlens=cu, safe_gate=True))
                    if shp is PREFILL[0]:
                        row["fla_safe_gate_err"] = rel_rms_error(fla_kda(*sl, safe_gate=True)[0], ref)
            o_default = None
            for name in args.fwd:
                plan, C = variant(name)
                o = fast.chunk_kda(q, k, v, g, beta, cu_seqlens=cu, plan=plan, chunk_size=C)[0]
                torch.cuda.synchronize()
                if o_default is None:  # the first variant's output: what the others are compared with at every shape
                    o_default = o
                else:
                    row[f"{name}_vs_{args.fwd[0]}"] = rel_rms_error(o, o_default)
                row[f"{name}_ms"] = bench(lambda: fast.chunk_kda(q, k, v, g, beta, cu_seqlens=cu, plan=plan,
                                                                 chunk_size=C))
                if shp is PREFILL[0]:
                    row[f"{name}_err"] = rel_rms_error(fast.chunk_kda(*sl, plan=plan, chunk_size=C)[0], ref)
                del o
            del o_default
        log(f"fwd {shp['name']:14s} " + "  ".join(
            f"{kk[:-3]} {vv:.3f}" + (f" ({vv / row['fla_ms']:.2f})" if "fla_ms" in row else "")
            for kk, vv in row.items() if kk.endswith("_ms")))
        if shp is PREFILL[0]:
            log("    err vs f64: " + "  ".join(f"{kk[:-4]} {vv:.2e}" for kk, vv in row.items() if kk.endswith("_err")))
        res["forward"].append(row)
        del q, k, v, g, beta
        torch.cuda.empty_cache()

    for shp in TRAIN_SHAPES if args.train else []:
        if args.train_shapes is not None and shp["name"] not in args.train_shapes:
            continue
        xs = leaves(shp["B"], shp["T"], shp["H"], shp["D"], "cuda", torch.bfloat16)
        gen = torch.Generator(device="cuda").manual_seed(1)
        do = torch.randn(xs[2].shape, device="cuda", generator=gen)
        dS = torch.randn(xs[5].shape, device="cuda", generator=gen)
        row = {"name": shp["name"]}
        if fla_kda is not None:
            st = step_fn(fla_kda, xs, do, dS)
            st()
            row["fla_ms"] = bench(st, 400)
            if args.fla_safe_gate:
                st = step_fn(lambda *a, **kw: fla_kda(*a, **kw, safe_gate=True), xs, do, dS)
                st()
                row["fla_safe_gate_ms"] = bench(st, 400)
        for name in args.train:
            plan, C = variant(name)  # training takes 64-token chunks unless the variant names its own
            st = step_fn(lambda *a, **kw: fast.chunk_kda(*a, **kw, plan=plan, chunk_size=C or 64), xs, do, dS)
            st()
            torch.cuda.synchronize()
            row[f"{name}_ms"] = bench(st, 400)
        log(f"train {shp['name']:14s} " + "  ".join(
            f"{kk[:-3]} {vv:.3f}" + (f" ({vv / row['fla_ms']:.2f})" if "fla_ms" in row else "")
            for kk, vv in row.items() if kk.endswith("_ms")))
        res["train"].append(row)
        del xs
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, args.json), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
