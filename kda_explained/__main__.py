"""``python -m kda_explained``: run every layer on one random problem and check it against the definition.

The reference is :func:`kda_explained.naive.kda` (the recurrence, float64). Every other
layer present in this checkout runs on the same inputs:

- ``naive.kda_parallel``: the closed parallel form, float64;
- ``chunked.kda`` in float64 and float32, once ``kda_explained.chunked`` exposes ``kda``;
- ``fast.kda`` in float32 (and bf16 on a GPU), once ``kda_explained.fast`` exposes ``kda``:
  on CUDA if there is a GPU, else under the Triton interpreter at a small size.

For each it prints the relative RMS error of ``o`` and of the final state
(:func:`kda_explained.testing.rel_rms_error`), the median wall time, and PASS or FAIL
against its bound in :data:`kda_explained.testing.TOLERANCES`. Exit code 1 if any fails.

The times say how long this run took, not which layer is faster: on a CPU the layers run
at sizes far below a GPU's, and the fast layer runs under the Triton interpreter (each
kernel program emulated in NumPy) on a smaller problem. Speed is compared on a GPU by
``benchmarks/`` (the docs' Benchmarks page).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from . import naive
from .testing import TOLERANCES, rel_rms_error

Problem = Dict[str, np.ndarray]  # q, k, v, g, beta, initial_state (NumPy float64)


def make_problem(seed: int, B: int, T: int, H: int, HV: int, K: int, V: int) -> Problem:
    """A seeded random problem inside the valid domain (the design contract (docs/design.md), *Tests*)."""
    rng = np.random.default_rng(seed)
    return {
        "q": naive.l2norm(rng.standard_normal((B, T, H, K))),  # [B, T, H, K]
        "k": naive.l2norm(rng.standard_normal((B, T, H, K))),  # [B, T, H, K], unit keys
        "v": rng.standard_normal((B, T, HV, V)),  # [B, T, HV, V]
        # per-channel biases from -6 to 0 give decays from ~0.99 (long memory) to ~0.08 per token
        "g": naive.lowerbound_gate(  # [B, T, HV, K], log decay in (-5, 0)
            rng.standard_normal((B, T, HV, K)), dt_bias=rng.uniform(-6.0, 0.0, HV * K), lower_bound=-5.0
        ),
        "beta": naive.beta_sigmoid(rng.standard_normal((B, T, HV))),  # [B, T, HV]
        "initial_state": 0.1 * rng.standard_normal((B, HV, K, V)),  # [N, HV, K, V]
    }


def shape_of(p: Problem) -> str:
    B, T, H, K = p["q"].shape
    HV, V = p["v"].shape[2:]
    return f"B={B} T={T} H={H} HV={HV} K={K} V={V}"


#: What each key of TOLERANCES bounds, as the demo's verdict lines name it.
BOUND_NAMES = {
    "chunked_f64_vs_naive": "the float64 bound",
    "chunked_f32_vs_naive": "the float32 bound",
    "fast_f32_vs_f64": "the fast layer's float32 bound",
    "fast_tf32_vs_f64": "the fast layer's bound for tf32 dots",
    "fast_bf16_output": "the fast layer's bf16 bound",
}


@dataclass
class Layer:
    name: str
    run: Callable[[Problem], Tuple[Any, Any]]  # problem -> (o, final_state)
    problem: Problem
    bound_key: Optional[str]  # key of TOLERANCES; None for the reference itself
    device: str
    sync: Callable[[], None] = lambda: None  # waits for the device before the clock is read
    repeats: int = 5
    warmup: int = 1


def median_time(layer: Layer) -> Tuple[Tuple[Any, Any], float]:
    """Run ``layer`` ``warmup`` times, then ``repeats`` timed times; return the last result and the median seconds."""
    for _ in range(layer.warmup):
        layer.run(layer.problem)
    times = []
    for _ in range(max(layer.repeats, 1)):
        layer.sync()
        t0 = time.perf_counter()
        out = layer.run(layer.problem)
        layer.sync()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def runs_of(layer: Layer) -> str:
    """The demo's "timed runs" cell: ``5 (+1 warm-up)`` or ``1 (no warm-up)``."""
    return f"{max(layer.repeats, 1)} " + (f"(+{layer.warmup} warm-up)" if layer.warmup else "(no warm-up)")


def naive_layers(p: Problem, repeats: int) -> List[Layer]:
    def recurrent(p):
        return naive.kda(**p, output_final_state=True)

    def parallel(p):
        return naive.kda_parallel(**p, output_final_state=True)

    return [
        Layer("naive recurrent f64 (reference)", recurrent, p, None, "cpu", repeats=repeats),
        # float64 against float64, the same bound as the chunked float64 layer
        Layer("naive parallel f64", parallel, p, "chunked_f64_vs_naive", "cpu", repeats=repeats),
    ]


def torch_layers(p: Problem, small: Problem, repeats: int) -> Tuple[List[Layer], List[str]]:
    """The chunked and fast layers that exist in this checkout, and notes on those skipped."""
    try:
        import torch
    except ImportError:
        return [], ["chunked, fast: skipped (torch is not installed; pip install -e '.[torch]')"]

    cuda = torch.cuda.is_available()
    if not cuda:
        # must be set before Triton kernels are defined, i.e. before kda_explained.fast is imported
        os.environ["TRITON_INTERPRET"] = "1"
    device = "cuda" if cuda else "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    layers, notes = [], []

    def torch_runner(kda, dtype):
        def run(p):
            t = {name: torch.from_numpy(x).to(device=device, dtype=dtype) for name, x in p.items()}
            t["initial_state"] = t["initial_state"].to(torch.float64 if dtype == torch.float64 else torch.float32)
            return kda(**t, output_final_state=True)

        return run

    from . import chunked

    if hasattr(chunked, "kda"):
        for dtype, key in ((torch.float64, "chunked_f64_vs_naive"), (torch.float32, "chunked_f32_vs_naive")):
            name = f"chunked {str(dtype).replace('torch.float', 'f')}"
            layers.append(Layer(name, torch_runner(chunked.kda, dtype), p, key, device, sync, repeats))
    else:
        notes.append("chunked: not available yet (kda_explained.chunked has no kda)")

    from . import fast

    if not hasattr(fast, "kda"):
        notes.append("fast: not available yet (kda_explained.fast has no kda)")
    elif cuda:
        # Triton dots on float32 inputs use tf32 by default, hence the tf32 bound
        layers.append(Layer("fast f32 (tf32 dots)", torch_runner(fast.kda, torch.float32), p, "fast_tf32_vs_f64",
                            device, sync, repeats))
        # the bf16 bound is the kernels' error, so its reference sees the same bf16-rounded inputs
        p_bf16 = {name: torch.from_numpy(x).to(torch.float32 if name == "initial_state" else torch.bfloat16)
                  .double().numpy() for name, x in p.items()}
        layers.append(Layer("fast bf16", torch_runner(fast.kda, torch.bfloat16), p_bf16, "fast_bf16_output", device,
                            sync, repeats))
    else:
        # the interpreter runs every kernel program in NumPy, which is slow: a small problem, one run, no warm-up
        layers.append(Layer("fast f32 (Triton interpreter)", torch_runner(fast.kda, torch.float32), small,
                            "fast_f32_vs_f64", "cpu, TRITON_INTERPRET=1", sync, repeats=1, warmup=0))
        notes.append("fast: no GPU, so it ran under the Triton interpreter on a small problem (one run, no warm-up)")
    return layers, notes


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kda_explained",
        description="Run every KDA layer present on one random problem and check it against naive.kda.",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random problem (default 0)")
    parser.add_argument("--T", type=int, default=None, help="tokens per sequence (default 100, or 32 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a shorter problem and one timed run per layer")
    args = parser.parse_args(argv)
    T = args.T if args.T is not None else (32 if args.quick else 100)
    if T < 1:
        parser.error(f"--T: expected a positive number of tokens, got {T}")
    repeats = 1 if args.quick else 5

    problem = make_problem(args.seed, B=2, T=T, H=2, HV=4, K=32, V=32)  # GVA: two value heads per q/k head
    small = make_problem(args.seed, B=1, T=min(T, 40), H=1, HV=2, K=16, V=16)  # for the Triton interpreter
    layers = naive_layers(problem, repeats)
    extra, notes = torch_layers(problem, small, repeats)
    layers += extra

    references: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}  # id(problem) -> naive (o, final_state)
    rows, verdicts, failed = [], [], False
    for layer in layers:
        key = id(layer.problem)
        if key not in references:
            references[key] = naive.kda(**layer.problem, output_final_state=True)
        o_ref, s_ref = references[key]
        try:
            (o, s), seconds = median_time(layer)
            err_o, err_s = rel_rms_error(o, o_ref), rel_rms_error(s, s_ref)
        except Exception as e:  # a layer that crashes fails, and the others still run
            rows.append([layer.name, layer.device, shape_of(layer.problem), "error", "error", "-", "-", "-"])
            verdicts.append(f"FAIL  {layer.name}: {type(e).__name__}: {e}")
            failed = True
            continue
        if layer.bound_key is None:
            rows.append([layer.name, layer.device, shape_of(layer.problem), "reference", "reference", "-",
                         f"{seconds * 1e3:.1f}", runs_of(layer)])
            continue
        bound = TOLERANCES[layer.bound_key]
        ok = max(err_o, err_s) <= bound
        failed |= not ok
        rows.append([layer.name, layer.device, shape_of(layer.problem), f"{err_o:.1e}", f"{err_s:.1e}",
                     f"{bound:.0e}", f"{seconds * 1e3:.1f}", runs_of(layer)])
        verdicts.append(f"{'PASS' if ok else 'FAIL'}  {layer.name}: max error {max(err_o, err_s):.1e} "
                        f"{'<=' if ok else '>'} {bound:.0e}, {BOUND_NAMES.get(layer.bound_key, layer.bound_key)} "
                        f"(TOLERANCES['{layer.bound_key}'])")

    header = ["layer", "device", "problem", "err(o)", "err(state)", "bound", "time ms", "timed runs"]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    print(f"KDA demo, seed {args.seed}: relative RMS error against naive.kda (float64) on the row's problem; "
          "time ms is the median of the row's timed runs")
    for r in [header, ["-" * w for w in widths]] + rows:
        cells = (c.ljust(w) if i < 3 or i == 7 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        print("  ".join(cells).rstrip())
    print()
    for line in verdicts + notes:
        print(line)
    print()
    if any("TRITON_INTERPRET" in layer.device for layer in layers):
        print("The times are not a speed comparison: every layer ran on the CPU at a small size, and the fast layer "
              "under the Triton interpreter (its GPU kernels emulated in NumPy) on a smaller problem.")
    else:
        print("The times are not a speed comparison: each layer ran one small problem.")
    print("Speed is compared on a GPU, at real sizes, by the scripts in benchmarks/ (the docs' Benchmarks page).")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
