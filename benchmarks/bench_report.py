"""The stored benchmark results: written once by each script (:func:`write`), read into Markdown tables.

Usage::

    python benchmarks/bench_report.py [--results DIR]   # print every table

``docs/benchmarks.md`` and ``notebooks/04_performance.ipynb`` build their tables
with these functions from the JSON in ``benchmarks/results/`` (written by
``gpu_bench.py``, ``gpu_stages.py`` and ``cpu_chunked.py``), so the docs always
show the last run and no number is copied by hand. Every function takes the
parsed JSON and tolerates a field a run did not record (shown as ``-``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Optional

RESULTS = Path(__file__).resolve().parent / "results"

#: Prefill implementations of ``gpu_bench.json``: key of the time per row -> label.
PREFILL_TIMES = {
    "fast_fwd_ms": "fast `chunk_kda`",
    "fla_kda_fwd_ms": "fla `chunk_kda`",
    "fla_gdn_fwd_ms": "fla gated delta rule",
    "sdpa_causal_fwd_ms": "SDPA causal",
}
#: The two floors of a prefill row (the measured copy bandwidth and bf16 matmul rate of the run).
PREFILL_FLOORS = {"bytes_floor_ms": "bytes floor", "flops_floor_ms": "FLOPs floor"}


def write(results: dict, out: str, stem: str, plot, log) -> str:
    """Write ``<out>/<stem>.json`` and, with ``plot(results, path)``, ``<stem>.png``; return the JSON's path.

    The JSON is the record: a plot that cannot be drawn (no matplotlib) is logged and skipped.
    """
    path = os.path.join(out, stem + ".json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    log(f"wrote {path}")
    try:
        plot(results, os.path.join(out, stem + ".png"))
        log(f"wrote {os.path.join(out, stem + '.png')}")
    except ImportError as exc:
        log(f"plot skipped: {exc!r}")
    return path


def load(name: str, results: Path = RESULTS) -> Optional[dict]:
    """``results/<name>.json`` parsed, or ``None`` when that benchmark has not been run."""
    path = Path(results) / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def markdown_table(header: list[str], rows: list[list]) -> str:
    """A GitHub-flavoured Markdown table; ``None`` cells show as ``-``."""
    cell = lambda x: "-" if x is None else str(x)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(x: Optional[float]) -> Optional[str]:
    """A time in milliseconds as text; below 0.1 ms in microseconds (a decoding step at a few sequences).

    >>> ms(0.8308), ms(0.0041), ms(None)
    ('0.831 ms', '4.1 us', None)
    """
    if x is None:
        return None
    return f"{x:.3f} ms" if x >= 0.1 else f"{x * 1e3:.1f} us"


def shape_label(row: dict) -> str:
    """``B=8, T=4096, H=16`` (``K = V = D``); a packed batch says so."""
    label = f"B={row['B']}, T={row['T']}, H={row['H']}"
    return label + " (varlen)" if "varlen" in row.get("name", "") or "packed" in row.get("name", "") else label


def fast_over_fla(row: dict) -> Optional[float]:
    """Time of fast / time of fla for a prefill or decode row (above 1: fast is slower)."""
    fast = row.get("fast_fwd_ms", row.get("fast_decode_ms"))
    fla = row.get("fla_kda_fwd_ms", row.get("fla_decode_ms"))
    return fast / fla if fast and fla else None


def decode_state_bytes(row: dict) -> int:
    """Bytes a decode step must move: every float32 state ``[N, H, D, D]`` read once and written once."""
    return 2 * row["N"] * row["H"] * row["D"] ** 2 * 4


def run_line(bench: dict) -> str:
    """Device, date and versions of a ``gpu_bench.json`` run, in one line."""
    parts = [f"{bench.get('device', '?')}, {bench.get('date', '?')}"]
    parts += [f"{k} {bench[k]}" for k in ("torch", "triton", "fla") if k in bench]
    ceil = []
    if "copy_GBps" in bench:
        ceil.append(f"copy {bench['copy_GBps']:.0f} GB/s")
    if "bf16_mm_TFLOPs" in bench:
        ceil.append(f"bf16 matmul {bench['bf16_mm_TFLOPs']:.0f} TFLOP/s")
    return "; ".join(parts) + ("; measured ceilings: " + ", ".join(ceil) if ceil else "")


#: Columns a prefill row may have (newer runs): shown where some row of the run has them.
PREFILL_OPTIONAL = {
    "fla_kda_safe_fwd_ms": "fla `safe_gate`",
    "fast_fwd_host_offsets_ms": "fast, offsets on the host",
    "fla_kda_fwd_host_offsets_ms": "fla, offsets on the host",
}
#: Columns of a decode row captured in a CUDA graph (device time alone), where the run has them.
DECODE_CAPTURED = {
    "fast_pool_inplace_graph_ms": "captured: fast, pool in place",
    "copy_same_bytes_graph_ms": "captured: copy of the same bytes",
}


def _present(rows: list, columns: dict) -> dict:
    return {k: name for k, name in columns.items() if any(k in row for row in rows)}


def prefill_table(bench: dict) -> str:
    """Forward time per shape: the floors, fast, fla ``chunk_kda``, fla gated delta, SDPA, the columns of
    :data:`PREFILL_OPTIONAL` the run has, and fast / fla."""
    rows_in = bench.get("prefill", [])
    optional = _present(rows_in, PREFILL_OPTIONAL)
    header = ["shape (K = V = 128)", *PREFILL_FLOORS.values(), *PREFILL_TIMES.values(), *optional.values(),
              "fast / fla"]
    rows = []
    for row in rows_in:
        ratio = fast_over_fla(row)
        rows.append([shape_label(row), *(ms(row.get(k)) for k in PREFILL_FLOORS),
                     *(ms(row.get(k)) for k in PREFILL_TIMES), *(ms(row.get(k)) for k in optional),
                     None if ratio is None else f"{ratio:.2f}"])
    return markdown_table(header, rows)


def decode_table(bench: dict) -> str:
    """One decode step: time, state bandwidth and its share of the copy bandwidth, fast and fla."""
    copy = bench.get("copy_GBps")

    def share(gbps):
        return None if gbps is None else f"{gbps:.0f}" + (f" ({gbps / copy:.0%} of copy)" if copy else "")

    rows_in = bench.get("decode", [])
    captured = _present(rows_in, DECODE_CAPTURED)
    header = ["N, H (float32 state)", "bytes floor", "fast", "fast GB/s", "fla", "fla GB/s", "fast / fla",
              "pool in place: fast", "pool in place: fla", *captured.values()]
    if captured:
        header.append("captured: fast against the copy")
    rows = []
    for row in rows_in:
        floor = decode_state_bytes(row) / (copy * 1e9) * 1e3 if copy else None
        ratio = fast_over_fla(row)
        cells = [f"N={row['N']}, H={row['H']}", ms(floor), ms(row.get("fast_decode_ms")),
                 share(row.get("fast_state_GBps")), ms(row.get("fla_decode_ms")), share(row.get("fla_state_GBps")),
                 None if ratio is None else f"{ratio:.2f}", ms(row.get("fast_pool_inplace_ms")),
                 ms(row.get("fla_pool_inplace_ms")), *(ms(row.get(k)) for k in captured)]
        if captured:
            frac = row.get("fast_graph_frac_of_copy")
            cells.append(None if frac is None else f"{frac:.0%}")
        rows.append(cells)
    return markdown_table(header, rows)


def name_label(name: str) -> str:
    """A shape name of the JSON as a label: ``B8_T4096_H16`` -> ``B=8, T=4096, H=16`` (else unchanged)."""
    m = re.fullmatch(r"B(\d+)_T(\d+)_H(\d+)", name)
    return f"B={m[1]}, T={m[2]}, H={m[3]}" if m else name


def stage_shapes(stages: dict) -> dict[str, dict[str, float]]:
    """``{shape name: {stage: ms}}`` from ``gpu_stages.json`` (keys ``stages_<shape>``).

    Only the stage kernels (``1_cumsum``, ``2-4_local``, ``5_state``, ``6_output``) are
    kept: ``total`` and the launch-shape sweeps (``5_state_w4_bv64_st2``, ...) are dropped.
    """
    stage = re.compile(r"^[1-6](-[1-6])?_[a-z]+$")
    return {key[len("stages_"):]: {s: t for s, t in val.items() if stage.match(s)}
            for key, val in stages.items() if key.startswith("stages_")}


def stage_label(key: str) -> str:
    """``5_state`` -> ``5. state``, ``2-4_local`` -> ``2.-4. local``."""
    num, _, name = key.partition("_")
    if all(part.isdigit() for part in num.split("-")):
        return ".-".join(num.split("-")) + f". {name}"
    return key


def stages_table(stages: dict) -> str:
    """Time of each stage kernel of the fast forward, per shape, with its share of the sum."""
    shapes = stage_shapes(stages)
    names = list(dict.fromkeys(s for per in shapes.values() for s in per))
    header = ["stage", *(name_label(s) for s in shapes)]
    rows = [[stage_label(s), *(None if s not in per else f"{per[s]:.2f} ms ({per[s] / sum(per.values()):.0%})"
                               for per in shapes.values())] for s in names]
    rows.append(["sum", *(f"{sum(per.values()):.2f} ms" for per in shapes.values())])
    return markdown_table(header, rows)


def decode_sweep_table(stages: dict) -> str:
    """The decode kernel's launch shapes (value columns per program, warps) as ``gpu_stages.py`` swept them."""
    sweep = stages.get("decode", {})
    return markdown_table(["launch", "time", "state GB/s"],
                          [[name, ms(r.get("ms")), None if "GBps" not in r else f"{r['GBps']:.0f}"]
                           for name, r in sweep.items()])


def cpu_table(cpu: dict) -> str:
    """``cpu_chunked.json``: each implementation's median and minimum time, tokens/s and error vs naive."""
    rows = []
    for r in cpu.get("implementations", []):
        note = " (extrapolated)" if r.get("extrapolated") else ""
        err = r.get("rel_rms_error_vs_naive")
        rows.append([f"`{r['name']}`", f"{r['median_s_full_T']:.3f} s{note}", f"{r['min_s_full_T']:.3f} s",
                     f"{r['tokens_per_s']:,.0f}", None if err is None else f"{err:.1e}"])
    return markdown_table(["implementation", "median", "min", "tokens/s", "rel. RMS error vs naive"], rows)


def cpu_stages_table(cpu: dict) -> str:
    """``cpu_chunked.json``: each stage of the chunked layer timed alone (median) and its share."""
    st = cpu.get("stages", {})
    med, share = st.get("median_s", {}), st.get("share_of_median_sum", {})
    rows = [[f"`{name}`", f"{t * 1e3:.1f} ms", None if name not in share else f"{share[name]:.0%}"]
            for name, t in med.items()]
    return markdown_table(["stage (chunk 64)", "median", "share"], rows)


def cpu_line(cpu: dict) -> str:
    """The CPU run's problem and machine in one line."""
    c, m = cpu.get("config", {}), cpu.get("machine", {})
    prob = ", ".join(f"{k}={c[k]}" for k in ("B", "T", "H", "K", "V") if k in c)
    return (f"{prob}, {c.get('dtype', '?')}, gate {c.get('gate', '?')}; {m.get('cpu_count', '?')} CPU cores, "
            f"torch {m.get('torch', '?')} ({m.get('torch_threads', '?')} threads), {m.get('date', '?')}")


def train_table(train: dict) -> str:
    """``gpu_train_bench.json``: forward + backward time and peak memory, fast (Triton backward) and fla."""
    rows = []
    for r in train.get("rows", []):
        fast, fla = r.get("fast_triton_backward", {}), r.get("fla", {})
        ratio = fast["ms"] / fla["ms"] if "ms" in fast and "ms" in fla else None
        gb = lambda x: None if x.get("peak_GB") is None else f"{x['peak_GB']:.3f} GB"  # noqa: E731
        rows.append([shape_label(r), ms(fla.get("ms")), ms(fast.get("ms")), None if ratio is None else f"{ratio:.2f}",
                     gb(fla), gb(fast)])
    return markdown_table(["shape", "fla fwd+bwd", "fast fwd+bwd", "fast / fla", "fla peak", "fast peak"], rows)


def sweep_table(sweep: dict) -> str:
    """``bwd_sweep.json``: each backward kernel's launch shape before and after the sweep, with times."""
    rows = []
    for stage, tried in sweep.get("stages", {}).items():
        timed = {json.dumps(t["launch"]): t.get("ms") for t in tried}
        before, after = sweep["current"][stage], sweep["best"][stage]
        rows.append([stage, f"`{before}` {ms(timed.get(json.dumps(before)))}",
                     f"`{after}` {ms(timed.get(json.dumps(after)))}", len(tried)])
    rows.append(["training step", ms(sweep.get("step_ms_current")), ms(sweep.get("step_ms_best")), None])
    return markdown_table(["kernel", "before", "after (fastest)", "shapes tried"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    bench, stages, cpu = (load(n, args.results) for n in ("gpu_bench", "gpu_stages", "cpu_chunked"))
    if bench:
        print(run_line(bench), prefill_table(bench), decode_table(bench), sep="\n\n", end="\n\n")
    if stages:
        print(stages_table(stages), decode_sweep_table(stages), sep="\n\n", end="\n\n")
    if cpu:
        print(cpu_line(cpu), cpu_table(cpu), cpu_stages_table(cpu), sep="\n\n", end="\n\n")
    train, sweep = load("gpu_train_bench", args.results), load("bwd_sweep", args.results)
    if train:
        print(train_table(train), end="\n\n")
    if sweep:
        print(sweep_table(sweep))


if __name__ == "__main__":
    main()
