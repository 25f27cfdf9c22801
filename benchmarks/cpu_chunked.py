"""CPU benchmark: the chunked layer against the naive layer and flash-linear-attention's PyTorch reference.

Usage::

    python benchmarks/cpu_chunked.py                  # B=2, T=4096, H=4, K=V=64, float32
    python benchmarks/cpu_chunked.py --T 1024 --repeats 3

Compares, on one problem (float32 inputs, lower-bound gate with ``lower_bound = -5``):

- ``chunked.kda`` at each ``--chunk-sizes`` (default 32, 64, 128);
- ``naive.kda`` (NumPy float64 token loop, the definition);
- ``fla.ops.kda.naive.naive_chunk_kda`` (flash-linear-attention's own PyTorch
  chunked reference, chunk 64), when ``fla`` is importable; skipped with a note
  otherwise.

Times are medians (and minima) of ``--repeats`` runs after ``--warmup`` runs, with
torch's default thread count; the implementations run round-robin, one call each
per round, so that load from other processes hits them alike. The JSON records
the load average at the start and the end. The two references are O(T) token/chunk loops: when a
quick probe estimates that one full call would exceed ``--ref-budget`` seconds,
that reference runs on a prefix of the sequence (``--ref-tokens`` tokens, all
batch rows) and its time is **extrapolated linearly** to ``T``; the output and
the JSON say so (``extrapolated: true``, ``measured_T``).

Accuracy: the relative RMS error of each output against the naive layer in float64
on the same float32 inputs, over the first ``--check-tokens`` tokens (causality
makes a prefix of the output depend on the prefix of the input only).

For the chunked layer at chunk 64 it also times each stage of
:mod:`kda_explained.chunked.stages` on its own (``stages`` in the JSON).

Writes ``benchmarks/results/cpu_chunked.json`` and ``cpu_chunked.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kda_explained import chunked, naive  # noqa: E402
from kda_explained.chunked import stages  # noqa: E402
from kda_explained.testing import rel_rms_error  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_inputs(B: int, T: int, H: int, K: int, V: int, seed: int = 0, lower_bound: float = -5.0):
    """float32 ``q, k, v, g, beta`` in the valid domain: unit-norm keys, lower-bound gate, beta in (0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen)
    k = chunked.l2norm(torch.randn(B, T, H, K, generator=gen))
    v = torch.randn(B, T, H, V, generator=gen)
    A_log = torch.empty(H).uniform_(-1.0, 1.0, generator=gen)
    dt_bias = torch.randn(H, K, generator=gen)
    g = chunked.lowerbound_gate(2.0 * torch.randn(B, T, H, K, generator=gen), A_log, dt_bias, lower_bound=lower_bound)
    beta = chunked.beta_sigmoid(torch.randn(B, T, H, generator=gen))
    return q, k, v, g.float(), beta


def naive_call(q, k, v, g, beta):
    return naive.kda(*(x.numpy() for x in (q, k, v, g, beta)))[0]


def load_fla():
    """``naive_chunk_kda`` from flash-linear-attention, or ``(None, reason)``."""
    try:
        from fla.ops.kda.naive import naive_chunk_kda
        import fla
    except Exception as e:  # not installed, or its import fails on this machine
        return None, f"{type(e).__name__}: {e}"
    return naive_chunk_kda, getattr(fla, "__version__", "unknown")


def reference_plan(name: str, call, inputs, T: int, ref_tokens: int, budget: float, probe_tokens: int, multiple: int):
    """Decide whether a slow O(T) reference runs on all ``T`` tokens or on a prefix (then extrapolated)."""
    probe = min(T, probe_tokens)
    t0 = time.perf_counter()
    call(*(x[:, :probe] for x in inputs))
    est = (time.perf_counter() - t0) * T / probe
    if est <= budget:
        log(f"{name}: probe on {probe} tokens estimates {est:.1f} s for T = {T}: running it in full")
        return T
    measured = max(multiple, min(T, ref_tokens) // multiple * multiple)
    log(f"{name}: probe on {probe} tokens estimates {est:.1f} s for T = {T} (> {budget:.0f} s budget): "
        f"running it on the first {measured} tokens and EXTRAPOLATING linearly x{T / measured:g}")
    return measured


def profile_stages(inputs, C: int, warmup: int, repeats: int) -> Dict[str, Dict[str, float]]:
    """Seconds (median and min) of each stage of ``chunked.kda`` on its own (report Eq. 2-9), chunk ``C``.

    Each stage gets the real output of the stage before it; the stages run round-robin like the
    implementations.
    """
    q, k, v, g, beta = inputs
    scale = q.shape[-1] ** -0.5
    G = stages.chunk_local_cumsum(g, C)
    A_kk, A_qk = stages.intra_chunk_matrices(q, k, G, beta, scale, C)
    M = stages.ut_transform(A_kk, C)
    W, U = stages.wy_representation(k, v, G, beta, M, C)
    qg, kg = stages.decayed_operands(q, k, G, scale, C)
    h, v_new, _ = stages.state_passing(kg, W, U, G, None, C)
    calls = {
        "1 chunk_local_cumsum": lambda: stages.chunk_local_cumsum(g, C),
        "2 intra_chunk_matrices": lambda: stages.intra_chunk_matrices(q, k, G, beta, scale, C),
        "3 ut_transform": lambda: stages.ut_transform(A_kk, C),
        "4 wy_representation": lambda: stages.wy_representation(k, v, G, beta, M, C),
        "5 state_passing (with decayed_operands)": lambda: stages.state_passing(
            stages.decayed_operands(q, k, G, scale, C)[1], W, U, G, None, C),
        "6 chunk_output": lambda: stages.chunk_output(qg, h, v_new, A_qk, C),
    }
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    runs: Dict[str, List[float]] = {name: [] for name in calls}
    for r in range(repeats):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t0)
        log(f"  stages round {r + 1}/{repeats}: " + ", ".join(f"{n.split()[0]}: {t[-1]:.3f}" for n, t in runs.items()))
    return {name: {"median_s": statistics.median(t), "min_s": min(t), "runs_s": t} for name, t in runs.items()}


def machine_info(fla_version: Optional[str]) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "fla": fla_version,
    }


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    impls = result["implementations"]
    names = [r["name"] for r in impls]
    secs = [r["median_s_full_T"] for r in impls]
    fig, axes = plt.subplots(1, 2 if result.get("stages") else 1, figsize=(11, 4), squeeze=False)
    ax = axes[0, 0]
    bars = ax.barh(names, secs, color=["tab:blue" if r["name"].startswith("chunked") else "tab:gray" for r in impls])
    for bar, r in zip(bars, impls):
        if r["extrapolated"]:
            bar.set_hatch("//")
        note = f"{r['median_s_full_T']:.2f} s" + (f"  (extrapolated from T={r['measured_T']})" if r["extrapolated"] else "")
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + note, va="center", fontsize=8)
    ax.plot([r["min_s_full_T"] for r in impls], range(len(impls)), "k|", markersize=12, label="min of runs")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("seconds per call (bar: median; tick: min; log scale)")
    c = result["config"]
    ax.set_title(f"KDA forward on CPU, float32: B={c['B']}, T={c['T']}, H={c['H']}, K=V={c['K']}", fontsize=10)
    ax.invert_yaxis()
    ax.set_xlim(right=max(secs) * 30)
    if result.get("stages"):
        ax2 = axes[0, 1]
        st = result["stages"]["median_s"]
        ax2.barh(list(st), list(st.values()), color="tab:blue")
        ax2.invert_yaxis()
        ax2.set_xlabel("seconds (median)")
        ax2.set_title(f"chunked.kda stages, chunk {result['stages']['chunk_size']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--B", type=int, default=2)
    ap.add_argument("--T", type=int, default=4096)
    ap.add_argument("--H", type=int, default=4)
    ap.add_argument("--K", type=int, default=64)
    ap.add_argument("--V", type=int, default=64)
    ap.add_argument("--chunk-sizes", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ref-repeats", type=int, default=5, help="timed runs of the references")
    ap.add_argument("--ref-budget", type=float, default=60.0, help="seconds a reference may take in full")
    ap.add_argument("--ref-tokens", type=int, default=512, help="prefix length when a reference is extrapolated")
    ap.add_argument("--check-tokens", type=int, default=512, help="prefix over which errors vs naive are measured")
    ap.add_argument("--no-stages", action="store_true", help="skip the per-stage timing of chunked.kda")
    ap.add_argument("--no-fla", action="store_true", help="skip flash-linear-attention even if importable")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)

    B, T, H, K, V = args.B, args.T, args.H, args.K, args.V
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    log(f"KDA CPU benchmark: B={B} T={T} H={H} K={K} V={V} float32, lower-bound gate (-5); "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    load_at_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    inputs = make_inputs(B, T, H, K, V)
    fla_fn, fla_info = (None, "skipped (--no-fla)") if args.no_fla else load_fla()
    if fla_fn is None:
        log(f"fla: not available, skipped ({fla_info})")

    check = min(T, args.check_tokens)
    log(f"reference for the errors: naive.kda in float64 on the first {check} tokens")
    o_ref = naive.kda(*(x[:, :check].double().numpy() for x in inputs))[0]  # [B, check, H, V]

    impls = []

    def record(name, runs, measured_T, out, note=""):
        med = statistics.median(runs)
        full = med * T / measured_T
        n_err = min(check, measured_T)  # tokens compared (a prefix, so a shorter run still compares)
        err = rel_rms_error(out[:, :n_err], o_ref[:, :n_err])
        impls.append({
            "name": name,
            "median_s_full_T": full,
            "min_s_full_T": min(runs) * T / measured_T,
            "median_s_measured": med,
            "runs_s": runs,
            "measured_T": measured_T,
            "extrapolated": measured_T != T,
            "tokens_per_s": B * T / full,
            "rel_rms_error_vs_naive": err,
            "error_tokens": n_err,
            "note": note,
        })
        extra = f" (measured on T={measured_T}, extrapolated linearly)" if measured_T != T else ""
        log(f"{name}: median {full:.3f} s, min {min(runs) * T / measured_T:.3f} s{extra}; "
            f"rel RMS error vs naive {err:.2e} over {n_err} tokens")

    # Every implementation as (name, call, measured_T, repeats, note); calls return o.
    todo = []
    for C in args.chunk_sizes:
        todo.append((f"chunked.kda C={C}", lambda xs, C=C: chunked.kda(*xs, chunk_size=C)[0], T, args.repeats,
                     "kda_explained.chunked.kda (PyTorch, float32)"))
    name = "naive.kda (NumPy f64 loop)"
    n_T = reference_plan(name, naive_call, inputs, T, args.ref_tokens, args.ref_budget, 64, 1)
    todo.append((name, lambda xs: naive_call(*xs), n_T, args.ref_repeats,
                 "token-by-token recurrence in NumPy float64 (the definition)"))
    if fla_fn is not None:
        name = "fla naive_chunk_kda C=64"
        f_T = reference_plan(name, lambda *xs: fla_fn(*xs, chunk_size=64), inputs, T, args.ref_tokens,
                             args.ref_budget, 128, 64)
        todo.append((name, lambda xs: fla_fn(*xs, chunk_size=64)[0], f_T, args.ref_repeats,
                     "fla.ops.kda.naive.naive_chunk_kda: flash-linear-attention's PyTorch chunked reference"))

    # Warm-up, then round-robin: each round runs every implementation once, so that load from other
    # processes on a shared machine falls on all of them alike rather than on whichever ran at the time.
    outs, runs = {}, {name: [] for name, *_ in todo}
    for name, call, m_T, _, _ in todo:
        sub = tuple(x[:, :m_T] for x in inputs)
        for i in range(args.warmup):
            t0 = time.perf_counter()
            outs[name] = call(sub)
            log(f"  {name}: warm-up {i + 1}/{args.warmup} {time.perf_counter() - t0:.3f} s (T={m_T})")
    for r in range(max(rep for *_, rep, _ in todo)):
        for name, call, m_T, rep, _ in todo:
            if r >= rep:
                continue
            sub = tuple(x[:, :m_T] for x in inputs)
            t0 = time.perf_counter()
            outs[name] = call(sub)
            runs[name].append(time.perf_counter() - t0)
            log(f"  round {r + 1}: {name} {runs[name][-1]:.3f} s (T={m_T})")
    for name, _, m_T, _, note in todo:
        out = outs[name]
        record(name, runs[name], m_T, out.detach() if hasattr(out, "detach") else out, note)

    result = {
        "benchmark": "cpu_chunked",
        "config": {"B": B, "T": T, "H": H, "HV": H, "K": K, "V": V, "dtype": "float32",
                   "gate": "lowerbound_gate(lower_bound=-5)", "warmup": args.warmup, "repeats": args.repeats,
                   "ref_repeats": args.ref_repeats, "ref_budget_s": args.ref_budget,
                   "timing": "median (and min) of the timed runs after warm-up, implementations run round-robin"},
        "machine": machine_info(fla_info if fla_fn is not None else None),
        "fla_note": None if fla_fn is not None else f"flash-linear-attention not importable: {fla_info}",
        "extrapolation_note": "rows with extrapolated=true ran on the first measured_T tokens (all batch rows); "
        "median_s_full_T = median_s_measured * T / measured_T (the references are O(T) loops)",
        "implementations": impls,
    }
    if not args.no_stages:
        C = 64
        log(f"per-stage timing of chunked.kda at chunk {C} ...")
        per_stage = profile_stages(inputs, C, args.warmup, args.repeats)
        total = sum(t["median_s"] for t in per_stage.values())
        result["stages"] = {"chunk_size": C, "per_stage": per_stage,
                            "median_s": {n: t["median_s"] for n, t in per_stage.items()},
                            "share_of_median_sum": {n: t["median_s"] / total for n, t in per_stage.items()}}
        for n, t in per_stage.items():
            log(f"  {n:24s} median {t['median_s']:7.3f} s  min {t['min_s']:7.3f} s  {100 * t['median_s'] / total:5.1f} %")

    result["machine"]["load_average_at_start"] = load_at_start
    result["machine"]["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "cpu_chunked.json")
    with open(json_path, "w") as f:
        json.dump(result, f, indent=2)
    png_path = os.path.join(args.out, "cpu_chunked.png")
    plot(result, png_path)
    log(f"wrote {json_path} and {png_path}")
    log("summary (seconds per call for the full problem; * = extrapolated):")
    for r in sorted(impls, key=lambda r: r["median_s_full_T"]):
        star = "*" if r["extrapolated"] else " "
        log(f"  {r['name']:30s} median {r['median_s_full_T']:8.3f} s{star}  min {r['min_s_full_T']:8.3f} s{star}  "
            f"err {r['rel_rms_error_vs_naive']:.2e}")
    return result


if __name__ == "__main__":
    main()
