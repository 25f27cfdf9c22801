"""Kernel variants side by side with flash-linear-attention, in one run: the forward and a training step.

    python benchmarks/probe/variants.py [--fwd NAME ...] [--train NAME ...] [--out DIR]

A variant is a set of module settings of :mod:`kda_explained.fast` (launch shapes, precisions,
fusions), applied for its measurement and restored after. For each variant this times

- the inference forward (``chunk_kda`` under ``torch.inference_mode``) at the four prefill shapes of
  ``benchmarks/gpu_bench.py``, with its output's relative RMS error against a float64 reference on
  a slice of the first shape (B=2, T=1024, H=4);
- a training step (``chunk_kda`` forward + backward, ``benchmarks/gpu_train_bench.py``'s step) at
  its two shapes;

and flash-linear-attention's ``chunk_kda`` once per shape beside them (with ``--fla-safe-gate`` also
its ``safe_gate=True`` path, for gates bounded in ``[-5, 0)`` as the benchmark's are). Writes ``variants.json`` (``--json``: another name).
What each variant changed and measured goes to the kernel page (docs/kernels.md).
"""

import argparse
import contextlib
import json
import os
import sys
import time

import torch
import triton

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from gpu_bench import PREFILL, make_inputs  # noqa: E402
from gpu_train_bench import SHAPES as TRAIN_SHAPES, leaves, step_fn  # noqa: E402
from kda_explained import chunked, fast  # noqa: E402
from kda_explained.fast import backward as fb, backward_intra as fbi, chunk as fc, local as fl, state as fs  # noqa: E402
from kda_explained.testing import rel_rms_error  # noqa: E402



def _chunk_size(C: int):
    """``chunk_kda_fwd`` with its chunk size forced to ``C`` (the forward is exact at 16, 32 and 64)."""
    inner = fc.chunk_kda_fwd

    def fwd(*args, **kwargs):
        kwargs["chunk_size"] = C
        return inner(*args, **kwargs)

    return fwd


#: name -> [(module, attribute, value)]
VARIANTS = {
    "chunk64": [(fc, "SHORT_CHUNK", None)],
    "short32": [(fc, "SHORT_CHUNK", 32)],
    "one_pass_bk16": [(fl, "ONE_PASS_LAUNCH", (16, 1))],
    "one_pass_w2": [(fl, "ONE_PASS_LAUNCH", (32, 2))],
    "one_pass_bk64": [(fl, "ONE_PASS_LAUNCH", (64, 1))],
    "one_pass_bk64_w2": [(fl, "ONE_PASS_LAUNCH", (64, 2))],
    "one_pass_bk128_w4": [(fl, "ONE_PASS_LAUNCH", (128, 4))],
    "state_bv32": [(fs, "STATE_BV", 32)],
    "state_bv128_w8": [(fs, "STATE_BV", 128), (fs, "STATE_WARPS", 8)],
    "state_stages2": [(fs, "STATE_STAGES_LOWP", 2)],
    "one_pass_stages1": [(fl, "LOCAL_STAGES", 1)],
    "chunk16": [(fc, "chunk_kda_fwd", _chunk_size(16))],
    "chunk32": [(fc, "chunk_kda_fwd", _chunk_size(32))],
    "chunk16_two_kernels": [(fc, "chunk_kda_fwd", _chunk_size(16)), (fc, "FUSED_STATE_OUTPUT", False)],
    "chunk32_two_kernels": [(fc, "chunk_kda_fwd", _chunk_size(32)), (fc, "FUSED_STATE_OUTPUT", False)],
    "chunk16_fused_all": [(fc, "chunk_kda_fwd", _chunk_size(16)), (fc, "output_fused", lambda *a: True)],
    "default": [],
    "chunks_first": [(fl, "HEADS_FIRST", False)],
    "one_pass_maxnreg168": [(fl, "ONE_PASS_MAXNREG", 168)],
    "one_pass_maxnreg128": [(fl, "ONE_PASS_MAXNREG", 128)],
    "one_pass_maxnreg152": [(fl, "ONE_PASS_MAXNREG", 152)],
    "fold0": [(fc, "ONE_PASS_FOLD", 0)],
    "fold1": [(fc, "ONE_PASS_FOLD", 1)],
    "fold2": [(fc, "ONE_PASS_FOLD", 2)],
    "two_kernels": [(fc, "FUSED_STATE_OUTPUT", False)],
    "local_ieee": [(fl, "LOCAL_PRECISION", {"ieee": "ieee", "tf32": "ieee"})],
    "state_warps8": [(fs, "STATE_WARPS", 8)],
    "state_bv32_w8": [(fs, "STATE_BV", 32), (fs, "STATE_WARPS", 8)],
    "state_stages4": [(fs, "STATE_STAGES_LOWP", 4)],
    "state_warps2": [(fs, "STATE_WARPS", 2)],
    "local_bk16": [(fl, "LOCAL_LAUNCH", {"keys": (16, 1), "queries": (16, 1)})],
    "local_stages1": [(fl, "LOCAL_STAGES", 1)],
    "local_bk16_stages1": [(fl, "LOCAL_LAUNCH", {"keys": (16, 1), "queries": (16, 1)}), (fl, "LOCAL_STAGES", 1)],
    "keys_bk16": [(fl, "LOCAL_LAUNCH", {"keys": (16, 1), "queries": (32, 1)})],
    "queries_bk16": [(fl, "LOCAL_LAUNCH", {"keys": (32, 1), "queries": (16, 1)})],
    "no_segments": [(fs, "STATE_SEGMENTS", False)],
    "segments_pps1": [(fs, "SEGMENT_PROGRAMS_PER_SM", 1)],
    "segments_pps4": [(fs, "SEGMENT_PROGRAMS_PER_SM", 4)],
    "segments_pps8": [(fs, "SEGMENT_PROGRAMS_PER_SM", 8)],
    "fused_all": [(fc, "output_fused", lambda *a: True)],
    "fused_all_bv32": [(fc, "output_fused", lambda *a: True), (fs, "STATE_BV", 32)],
    "state_no_prefetch": [(fs, "STATE_PREFETCH", False), (fb, "RECURRENCE_PREFETCH", False)],
    "rec_stages2": [(fb, "BWD_LAUNCH", {**fb.BWD_LAUNCH, "recurrence": dict(BV=64, warps=4, stages=2)})],
    "rec_stages3": [(fb, "BWD_LAUNCH", {**fb.BWD_LAUNCH, "recurrence": dict(BV=64, warps=4, stages=3)})],
    "swy_stages2": [(fb, "BWD_LAUNCH", {**fb.BWD_LAUNCH, "state_wy": {**fb.BWD_LAUNCH["state_wy"], "stages": 2}})],
    "swy_stages3": [(fb, "BWD_LAUNCH", {**fb.BWD_LAUNCH, "state_wy": {**fb.BWD_LAUNCH["state_wy"], "stages": 3}})],
    "intra_stages2": [(fbi, "INTRA_BWD_LAUNCH", (64, 4, 2))],
    "intra_stages3": [(fbi, "INTRA_BWD_LAUNCH", (64, 4, 3))],
    "state_bv64": [(fs, "STATE_BV", 64)],
    "state_pps1": [(fs, "STATE_PROGRAMS_PER_SM", 1.0)],
    "ut_bwd_ieee": [(fb, "UT_BWD_PRECISION", "ieee")],
    "intra_128_4": [(fbi, "INTRA_BWD_LAUNCH", (128, 4, 1))],
    "intra_128_8": [(fbi, "INTRA_BWD_LAUNCH", (128, 8, 1))],
    "intra_64_2": [(fbi, "INTRA_BWD_LAUNCH", (64, 2, 1))],
    "intra_32_2": [(fbi, "INTRA_BWD_LAUNCH", (32, 2, 1))],
    "intra_tf32x3": [(fbi, "INTRA_BWD_PRECISION", {"tf32": "tf32x3", "ieee": "ieee"})],
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@contextlib.contextmanager
def variant(name: str):
    saved = [(m, a, getattr(m, a)) for m, a, _ in VARIANTS[name]]
    for m, a, v in VARIANTS[name]:
        setattr(m, a, v)
    try:
        yield
    finally:
        for m, a, v in saved:
            setattr(m, a, v)


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

    # accuracy slice: float64 reference once
    q, k, v, g, beta = make_inputs(8, 4096, 16, 128)
    sl = [x[:2, :1024, :4].contiguous() for x in (q, k, v, g, beta)]
    ref, _ = chunked.kda(*(x.double() for x in sl))
    del q, k, v, g, beta
    for shp in PREFILL:
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
            for name in args.fwd:
                with variant(name):
                    o = fast.chunk_kda(q, k, v, g, beta, cu_seqlens=cu)[0]
                    torch.cuda.synchronize()
                    row[f"{name}_ms"] = bench(lambda: fast.chunk_kda(q, k, v, g, beta, cu_seqlens=cu))
                    if shp is PREFILL[0]:
                        row[f"{name}_err"] = rel_rms_error(fast.chunk_kda(*sl)[0], ref)
                del o
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
            with variant(name):
                st = step_fn(fast.chunk_kda, xs, do, dS)
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
