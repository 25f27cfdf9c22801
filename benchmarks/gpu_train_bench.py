"""Forward + backward of chunk_kda: time and peak memory, fast against fla.

Usage::

    python benchmarks/gpu_train_bench.py --out benchmarks/results   # on an H100 with fla-core
    python benchmarks/gpu_train_bench.py --cpu-smoke                # tiny sizes under the Triton interpreter

For each shape ((B, T, H, D) = (8, 4096, 16, 128) and (1, 8192, 96, 128), bf16),
one step is ``o, S = chunk_kda(...)`` then ``backward`` of ``(o * do).sum() + (S * dS).sum()``
with every input requiring grad. Times are medians of ``triton.testing.do_bench`` (CUDA events);
peak memory is ``torch.cuda.max_memory_allocated`` over one step minus what was allocated
before it. The fast layer is measured with its Triton backward. Writes ``gpu_train_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

SHAPES = [{"name": "B8_T4096_H16", "B": 8, "T": 4096, "H": 16, "D": 128},
          {"name": "B1_T8192_H96", "B": 1, "T": 8192, "H": 96, "D": 128}]
SMOKE = [{"name": "smoke", "B": 1, "T": 40, "H": 2, "D": 16}]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def leaves(B, T, H, D, device, dtype, seed=0):
    from kda_explained import chunked

    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=gen)

    q, k, v = randn(B, T, H, D), torch.nn.functional.normalize(randn(B, T, H, D), dim=-1), randn(B, T, H, D)
    g = chunked.lowerbound_gate(randn(B, T, H, D), lower_bound=-5.0)
    beta = torch.rand(B, T, H, device=device, generator=gen)
    S0 = 0.1 * randn(B, H, D, D)
    xs = [x.to(dtype) for x in (q, k, v, beta)]
    return [x.detach().requires_grad_(True) for x in (xs[0], xs[1], xs[2], g, xs[3], S0)]


def step_fn(fn, xs, do, dS):
    def step():
        for x in xs:
            x.grad = None
        o, S = fn(*xs[:5], initial_state=xs[5], output_final_state=True)
        ((o.float() * do).sum() + (S * dS).sum()).backward()
    return step


def measure(step, device, bench) -> dict:
    step()  # compile, autotune
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        return {"ms": bench(step), "peak_GB": peak / 1e9}
    t0 = time.perf_counter()
    step()
    return {"ms": (time.perf_counter() - t0) * 1e3, "peak_GB": None}


def grad_accuracy(fns: dict, device, dtype) -> dict:
    """Relative RMS error of ``o``, the final state and every gradient against float64, per path.

    On a slice small enough for the float64 chunked layer (B=1, T=1024, H=2, D=128): the same
    leaves in ``dtype`` go through each path, and in float64 through ``chunked.kda`` with autograd.
    The ``g`` gradient is held against ``max(||dg||, ||q*dq|| + ||k*dk||)`` (testing.g_grad_floor).
    """
    from kda_explained import chunked
    from kda_explained.testing import g_grad_floor, rel_rms_error

    D = 16 if device == "cpu" else 128
    T = 40 if device == "cpu" else 1024
    xs = leaves(1, T, 2, D, device, dtype, seed=2)
    gen = torch.Generator(device=device).manual_seed(3)
    do = torch.randn(1, T, 2, D, device=device, generator=gen)
    dS = torch.randn(1, 2, D, D, device=device, generator=gen)
    ref = [x.detach().double().requires_grad_(True) for x in xs]
    o_ref, S_ref = chunked.kda(*ref[:5], initial_state=ref[5], output_final_state=True)
    ((o_ref * do.double()).sum() + (S_ref * dS.double()).sum()).backward()
    floor = g_grad_floor(ref[0], ref[0].grad, ref[1], ref[1].grad)
    out = {}
    for name, fn in fns.items():
        for x in xs:
            x.grad = None
        o, S = fn(*xs[:5], initial_state=xs[5], output_final_state=True)
        ((o.float() * do).sum() + (S * dS).sum()).backward()
        errs = {"o": rel_rms_error(o, o_ref), "S": rel_rms_error(S, S_ref)}
        for label, x, r in zip(("dq", "dk", "dv", "dg", "dbeta", "dS0"), xs, ref):
            errs[label] = rel_rms_error(x.grad, r.grad, floor=floor if label == "dg" else 0.0)
        out[name] = errs
        log(f"accuracy vs float64 (B=1, T={T}, H=2, D={D}) {name}: "
            + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (checks the script runs)")
    ap.add_argument("--paths", default="triton,fla,fla_safe",
                    help="what to measure, in order: triton (fast, Triton backward), fla, fla_safe (safe_gate=True)")
    ap.add_argument("--shapes", default=",".join(s["name"] for s in SHAPES),
                    help="which shapes, by name (default all: " + ", ".join(s["name"] for s in SHAPES) + ")")
    args = ap.parse_args()
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    from kda_explained import fast

    device = "cpu" if args.cpu_smoke else "cuda"
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    if args.cpu_smoke:
        bench = None
    else:
        import triton

        def bench(fn):
            return float(triton.testing.do_bench(fn, warmup=5, rep=200, return_mode="median"))
    try:
        from fla.ops.kda import chunk_kda as fla_chunk_kda
    except Exception as exc:  # noqa: BLE001 - depends on the machine
        log(f"flash-linear-attention not importable ({exc!r}): its rows stay empty")
        fla_chunk_kda = None
    fla_paths = {}
    if fla_chunk_kda is not None:
        fla_paths["fla"] = fla_chunk_kda
        # fla's tensor-core path for gates bounded below; the benchmark's gates are, at -5
        fla_paths["fla_safe"] = lambda *a, **kw: fla_chunk_kda(*a, **kw, safe_gate=True, lower_bound=-5.0)
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "rows": []}
    fns = {"fast_triton_backward": fast.chunk_kda}
    if not args.cpu_smoke:
        fns.update(fla_paths)
    results["accuracy_vs_f64"] = grad_accuracy(fns, device, dtype)
    for shp in SMOKE if args.cpu_smoke else [s for s in SHAPES if s["name"] in args.shapes.split(",")]:
        B, T, H, D = shp["B"], shp["T"], shp["H"], shp["D"]
        xs = leaves(B, T, H, D, device, dtype)
        gen = torch.Generator(device=device).manual_seed(1)
        do = torch.randn(B, T, H, D, device=device, generator=gen)
        dS = torch.randn(B, H, D, D, device=device, generator=gen)
        row = {"name": shp["name"], "B": B, "T": T, "H": H, "D": D}
        for path in args.paths.split(","):
            if path in ("fla", "fla_safe"):
                if fla_chunk_kda is not None and not args.cpu_smoke:
                    row[path] = measure(step_fn(fla_paths[path], xs, do, dS), device, bench)
                    log(f"{shp['name']} {path}: {row[path]}")
                continue
            name = "fast_triton_backward"
            try:
                row[name] = measure(step_fn(fast.chunk_kda, xs, do, dS), device, bench)
                log(f"{shp['name']} {name}: {row[name]}")
            except Exception as exc:  # noqa: BLE001 - one path failing must not hide the others
                row[name] = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"{shp['name']} {name}: FAILED {row[name]['error']}")
        results["rows"].append(row)
        del xs
        if device == "cuda":
            torch.cuda.empty_cache()
    out = args.out if not args.cpu_smoke else os.environ.get("TMPDIR", "/tmp")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "gpu_train_bench.json" if not args.cpu_smoke else "gpu_train_bench_cpu_smoke.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    log(f"wrote {path}")
    if not args.cpu_smoke:
        try:
            plot(results, os.path.join(out, "gpu_train_bench.png"))
        except Exception as exc:  # noqa: BLE001 - the JSON is the record; a missing matplotlib must not lose it
            log(f"plot failed: {exc!r}")


def plot(results: dict, path: str) -> None:
    """Two panels per shape: forward + backward time and peak memory, each path side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [("fast_triton_backward", "kda_explained.fast"), ("fla", "fla chunk_kda"),
             ("fla_safe", "fla chunk_kda safe_gate")]
    rows = results["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.8 / len(paths)
    for ax, key, label in ((axes[0], "ms", "forward + backward (ms)"), (axes[1], "peak_GB", "peak memory (GB)")):
        for i, (name, legend) in enumerate(paths):
            vals = [r.get(name, {}).get(key) for r in rows]
            if all(v is None for v in vals):
                continue
            xs = [j + i * width for j, v in enumerate(vals) if v is not None]
            ax.bar(xs, [v for v in vals if v is not None], width, label=legend)
        ax.set_xticks([j + width / 2 for j in range(len(rows))], [r["name"] for r in rows])
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"chunk_kda training step, bf16, {results['device']} ({results['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
