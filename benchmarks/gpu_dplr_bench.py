"""KDA against general DPLR, chunkwise forward on one GPU: how much the constrained transition saves.

Usage::

    python benchmarks/gpu_dplr_bench.py                  # on a CUDA GPU: writes benchmarks/results/gpu_dplr_bench.*
    python benchmarks/gpu_dplr_bench.py --cpu-smoke      # tiny sizes under the Triton interpreter, into a temp dir

The Kimi Linear report (Fig. 2) finds KDA's chunkwise kernel nearly twice as fast as general
DPLR's. Here, at batch 1, 16 heads, ``K = V = 128``, bf16 inputs and sequence lengths from 2K to
64K tokens, three forwards (inference, ``torch.inference_mode``) are timed, each the median of
``triton.testing.do_bench``:

- ``kda``: :func:`kda_explained.fast.chunk_kda` as a model calls it (fused kernels, its own chunk size);
- ``kda_staged``: KDA's stage kernels one launch each at 64-token chunks
  (:func:`kda_explained.fast.chunk_local_cumsum`, :func:`kda_explained.fast.chunk_local_factors`,
  :func:`kda_explained.fast.state_passing`, :func:`kda_explained.fast.chunk_output`): the same
  pipeline shape as the DPLR forward, so the two differ by the algorithm, not the fusion;
- ``dplr``: :func:`kda_explained.fast.dplr.dplr` at 64-token chunks (six stage kernels).

DPLR runs with KDA's factors (``a = beta k``, ``b = k exp(g)``, written key ``beta k``), so
both compute the same function: ``dplr_vs_kda_rel_err`` checks that at every length. Each
forward's accuracy is measured against its float64 chunked twin (:func:`kda_explained.chunked.kda`,
:func:`kda_explained.chunked.dplr`) on a slice of 1024 tokens and 4 heads. Writes
``gpu_dplr_bench.json`` (device, date, torch and triton versions inside) and
``gpu_dplr_bench.png`` into ``--out``. A CPU run (``--cpu-smoke``) times with the host clock, never
writes into ``benchmarks/results/``, and says nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, List, Optional

if "--cpu-smoke" in sys.argv[1:]:
    # the Triton interpreter is chosen when triton is first imported: before anything imports it
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_report, beside this script
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kda_explained import chunked, fast  # noqa: E402
from kda_explained.fast import dplr as fast_dplr  # noqa: E402
from kda_explained.fast._meta import interpreting  # noqa: E402
from kda_explained.testing import TOLERANCES, rel_rms_error  # noqa: E402
import bench_report  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
FULL = {"B": 1, "H": 16, "D": 128, "lengths": [2048, 4096, 8192, 16384, 32768, 65536], "dtype": torch.bfloat16,
        "slice": {"T": 1024, "H": 4}}
SMOKE = {"B": 1, "H": 2, "D": 16, "lengths": [32, 80], "dtype": torch.bfloat16, "slice": {"T": 40, "H": 2}}
CHUNK = 64


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_inputs(B: int, T: int, H: int, D: int, dtype, device, seed: int = 0):
    """KDA's inputs (``q, k, v, g, beta``; ``g`` float32 lower-bound gates at -5) and DPLR's with
    KDA's factors (``q, beta k, v, beta k, k exp(g), g``)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, T, H, D, device=device, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, device=device, generator=gen), dim=-1)
    v = torch.randn(B, T, H, D, device=device, generator=gen)
    g = chunked.lowerbound_gate(torch.randn(B, T, H, D, device=device, generator=gen), lower_bound=-5.0)
    beta = torch.rand(B, T, H, device=device, generator=gen)
    q, k, v, beta = (x.to(dtype) for x in (q, k, v, beta))
    beta_k = (beta.float()[..., None] * k.float()).to(dtype)
    b = (k.float() * torch.exp(g)).to(dtype)
    return (q, k, v, g, beta), (q, beta_k, v, beta_k, b, g)


def kda_staged(q, k, v, g, beta):
    """KDA's forward as its stage kernels, one launch each, at 64-token chunks."""
    scale = q.shape[-1] ** -0.5
    G = fast.chunk_local_cumsum(g, CHUNK)
    f = fast.chunk_local_factors(q, k, v, G, beta.float(), scale, CHUNK)
    h, v_new, _ = fast.state_passing(f.kg, f.W, f.U, G, None, CHUNK)
    return fast.chunk_output(f.qg, h, v_new, f.A_qk, CHUNK, out_dtype=v.dtype)


def timer(cpu: bool) -> Callable[[Callable], float]:
    """Median milliseconds of ``fn``: ``triton.testing.do_bench`` on the GPU, the host clock on the CPU."""
    if not cpu:
        return lambda fn: float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))

    def host(fn, repeats: int = 3) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    return host


def accuracy(setup: dict, device) -> dict:
    """Each forward against its float64 chunked twin, on a slice small enough for float64."""
    s = setup["slice"]
    kda_in, dplr_in = make_inputs(1, s["T"], s["H"], setup["D"], setup["dtype"], device, seed=1)
    kda_ref, _ = chunked.kda(*(x.double() for x in kda_in), chunk_size=CHUNK)
    dplr_ref, _ = chunked.dplr(*(x.double() for x in dplr_in), chunk_size=CHUNK)
    with torch.inference_mode():
        out = {
            "kda_rel_err_vs_f64": rel_rms_error(fast.chunk_kda(*kda_in)[0], kda_ref),
            "kda_staged_rel_err_vs_f64": rel_rms_error(kda_staged(*kda_in), kda_ref),
            "dplr_rel_err_vs_f64": rel_rms_error(fast_dplr.dplr(*dplr_in, chunk_size=CHUNK)[0], dplr_ref),
        }
    out["bound"] = TOLERANCES["fast_bf16_output"] if setup["dtype"] == torch.bfloat16 else TOLERANCES["fast_f32_vs_f64"]
    out["slice"] = dict(s)
    return out


def plot(results: dict, path: str) -> None:
    """Forward time against sequence length (log-log), and DPLR's time over KDA's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    T = [r["T"] for r in rows]
    fig, (ax, ax_r) = plt.subplots(1, 2, figsize=(11, 4.5))
    for key, label, style in (("kda_ms", "KDA (fast.chunk_kda)", "o-"),
                              ("kda_staged_ms", "KDA, stage kernels, C = 64", "s--"),
                              ("dplr_ms", "general DPLR (fast.dplr), C = 64", "^-")):
        ax.plot(T, [r[key] for r in rows], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T (tokens)")
    ax.set_ylabel("forward time (ms, median)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax_r.plot(T, [r["dplr_over_kda"] for r in rows], "o-", label="DPLR / KDA (fast.chunk_kda)")
    ax_r.plot(T, [r["dplr_over_kda_staged"] for r in rows], "s--", label="DPLR / KDA stage kernels")
    ax_r.axhline(2.0, color="gray", lw=0.8, ls=":", label="2x (report, Fig. 2)")
    ax_r.set_xscale("log", base=2)
    ax_r.set_xlabel("sequence length T (tokens)")
    ax_r.set_ylabel("time ratio")
    ax_r.legend(fontsize=8)
    ax_r.grid(alpha=0.3)
    cfg = results["config"]
    fig.suptitle(f"{results['device']}: B={cfg['B']}, H={cfg['H']}, K=V={cfg['D']}, {cfg['dtype']}, "
                 f"torch {results['torch']}, triton {results['triton']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> str:
    """Run the sweep; returns the path of the JSON written."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes under the Triton interpreter (checks the "
                                                             "script runs; set before triton is imported)")
    ap.add_argument("--out", default=None,
                    help="output folder (default benchmarks/results; a temp dir for --cpu-smoke)")
    ap.add_argument("--max-length", type=int, default=None, help="stop the sweep after this length")
    args = ap.parse_args(argv)

    setup = dict(SMOKE if args.cpu_smoke else FULL)
    if args.max_length:
        setup["lengths"] = [T for T in setup["lengths"] if T <= args.max_length]
    if args.cpu_smoke:
        if not interpreting():
            sys.exit("gpu_dplr_bench.py: --cpu-smoke needs TRITON_INTERPRET=1 set before triton is imported "
                     "(run the script itself, or set it in the environment)")
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            sys.exit("gpu_dplr_bench.py: no CUDA GPU; run with --cpu-smoke to check the script on the CPU")
        device = torch.device("cuda")
    out = args.out or (tempfile.mkdtemp(prefix="gpu_dplr_bench_") if args.cpu_smoke else RESULTS)
    if device.type != "cuda" and os.path.abspath(out) == RESULTS:
        sys.exit("gpu_dplr_bench.py: a CPU run does not write into benchmarks/results/; pass another --out")
    os.makedirs(out, exist_ok=True)
    stem = "gpu_dplr_bench" + ("_cpu_smoke" if args.cpu_smoke else "")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    bench = timer(device.type != "cuda")
    B, H, D, dtype = setup["B"], setup["H"], setup["D"], setup["dtype"]
    log(f"device {device_name}, torch {torch.__version__}, triton {triton.__version__}, "
        f"B={B} H={H} K=V={D} {str(dtype).replace('torch.', '')}")

    acc = accuracy(setup, device)
    log("rel err vs float64 (slice T={T}, H={H}): ".format(**acc["slice"])
        + ", ".join(f"{k.replace('_rel_err_vs_f64', '')} {v:.2e}" for k, v in acc.items() if k.endswith("f64"))
        + f" (bound {acc['bound']:g})")

    rows = []
    for T in setup["lengths"]:
        kda_in, dplr_in = make_inputs(B, T, H, D, dtype, device)
        with torch.inference_mode():
            o_kda, _ = fast.chunk_kda(*kda_in)
            o_dplr, _ = fast_dplr.dplr(*dplr_in, chunk_size=CHUNK)
            row = {
                "T": T,
                "kda_ms": bench(lambda: fast.chunk_kda(*kda_in)),
                "kda_staged_ms": bench(lambda: kda_staged(*kda_in)),
                "dplr_ms": bench(lambda: fast_dplr.dplr(*dplr_in, chunk_size=CHUNK)),
                "dplr_vs_kda_rel_err": rel_rms_error(o_dplr, o_kda),
            }
        row["dplr_over_kda"] = row["dplr_ms"] / row["kda_ms"]
        row["dplr_over_kda_staged"] = row["dplr_ms"] / row["kda_staged_ms"]
        rows.append(row)
        log(f"T={T:>6d}  kda {row['kda_ms']:9.3f} ms  kda staged {row['kda_staged_ms']:9.3f} ms  "
            f"dplr {row['dplr_ms']:9.3f} ms  dplr/kda {row['dplr_over_kda']:.2f}  "
            f"dplr/kda staged {row['dplr_over_kda_staged']:.2f}  dplr vs kda {row['dplr_vs_kda_rel_err']:.1e}")
        del kda_in, dplr_in, o_kda, o_dplr
        if device.type == "cuda":
            torch.cuda.empty_cache()

    results = {
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "mode": stem,
        "config": {"B": B, "H": H, "D": D, "dtype": str(dtype).replace("torch.", ""), "chunk_size": CHUNK,
                   "gate": "lowerbound_gate, lower_bound -5", "dplr_factors": "a = beta k, b = k exp(g), key beta k"},
        "method": "inference forward (torch.inference_mode); median of triton.testing.do_bench (warmup 25 ms, "
                  "rep 200 ms) on a GPU, of 3 host-clock runs on the CPU; kda = fast.chunk_kda (its own chunk "
                  "size and fusions), kda_staged = KDA's stage kernels at C = 64, dplr = fast.dplr.dplr at C = 64",
        "accuracy": acc,
        "rows": rows,
    }
    return bench_report.write(results, out, stem, plot, log)


if __name__ == "__main__":
    main()
