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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (checks the script runs)")
    ap.add_argument("--paths", default="triton,fla",
                    help="what to measure, in order: triton (fast, Triton backward), fla")
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
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)",
               "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"), "rows": []}
    for shp in SMOKE if args.cpu_smoke else [s for s in SHAPES if s["name"] in args.shapes.split(",")]:
        B, T, H, D = shp["B"], shp["T"], shp["H"], shp["D"]
        xs = leaves(B, T, H, D, device, dtype)
        gen = torch.Generator(device=device).manual_seed(1)
        do = torch.randn(B, T, H, D, device=device, generator=gen)
        dS = torch.randn(B, H, D, D, device=device, generator=gen)
        row = {"name": shp["name"], "B": B, "T": T, "H": H, "D": D}
        for path in args.paths.split(","):
            if path == "fla":
                if fla_chunk_kda is not None and not args.cpu_smoke:
                    row["fla"] = measure(step_fn(fla_chunk_kda, xs, do, dS), device, bench)
                    log(f"{shp['name']} fla: {row['fla']}")
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

    paths = [("fast_triton_backward", "kda_explained.fast"), ("fla", "fla chunk_kda")]
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
