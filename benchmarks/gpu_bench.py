"""GPU benchmark: kda_explained.fast against flash-linear-attention, SDPA and the hardware floors, in one run.

Usage (on a CUDA machine with fla-core importable)::

    python benchmarks/gpu_bench.py --out benchmarks/results

Times are medians of ``triton.testing.do_bench`` (CUDA events, warm-up first).
Each prefill row also reports the floors of METHOD.md: the bytes every input
and output must move once over the *measured* copy bandwidth, and the matmul
FLOPs of the chunked algorithm (``kda_explained.chunked.flops``) over the
*measured* bf16 matmul rate. Writes ``gpu_bench.json`` and ``gpu_bench.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kda_explained import chunked, fast  # noqa: E402
from kda_explained.testing import rel_rms_error  # noqa: E402

PREFILL = [
    {"name": "B8_T4096_H16", "B": 8, "T": 4096, "H": 16, "D": 128},
    {"name": "B1_T8192_H96", "B": 1, "T": 8192, "H": 96, "D": 128},
    {"name": "B1_T65536_H16", "B": 1, "T": 65536, "H": 16, "D": 128},
    {"name": "varlen_H64", "B": 1, "lengths": [1300, 547, 2048, 963, 271, 3063], "H": 64, "D": 128},
    # many short sequences packed in one row, as a serving engine prefills them: 256 of 32-512 tokens
    {"name": "packed256_H32", "B": 1, "lengths": torch.randint(32, 513, (256,),
                                                                generator=torch.Generator().manual_seed(0)).tolist(),
     "H": 32, "D": 128},
]
DECODE = {"N": (256, 8, 1), "H": 32, "D": 128}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def bench(fn, rep_ms: int = 200) -> float:
    return float(triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median"))


def measure_ceilings() -> dict:
    a = torch.randn(1 << 28, device="cuda", dtype=torch.bfloat16)  # 512 MiB read and 512 MiB written
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    copy_GBps = 2 * a.numel() * 2 / (ms * 1e-3) / 1e9  # bytes read + bytes written
    m = 8192
    x = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ms = bench(lambda: x @ y)
    tflops = 2 * m**3 / (ms * 1e-3) / 1e12
    return {"copy_GBps": copy_GBps, "bf16_mm_TFLOPs": tflops}


def make_inputs(B, T, H, D, seed=0, lower_bound=-5.0):
    g_ = torch.Generator(device="cuda").manual_seed(seed)
    dev, bf = "cuda", torch.bfloat16
    q = torch.randn(B, T, H, D, device=dev, generator=g_).to(bf)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, D, device=dev, generator=g_), dim=-1).to(bf)
    v = torch.randn(B, T, H, D, device=dev, generator=g_).to(bf)
    g = chunked.lowerbound_gate(torch.randn(B, T, H, D, device=dev, generator=g_), lower_bound=lower_bound)  # fp32
    beta = torch.rand(B, T, H, device=dev, generator=g_).to(bf)
    return q, k, v, g, beta


def floors(B, T, H, D, ceil) -> dict:
    tokens = B * T * H
    bytes_moved = tokens * (4 * D * 2 + D * 4 + 2)  # q, k, v, o in bf16; g in fp32; beta in bf16
    from kda_explained.chunked.flops import chunk_costs

    per_chunk = chunk_costs("kda", chunk_size=64, K=D, V=D)
    total = per_chunk["total"] if isinstance(per_chunk, dict) else per_chunk.total
    flops = total * tokens / 64
    return {
        "bytes_GB": bytes_moved / 1e9,
        "bytes_floor_ms": bytes_moved / (ceil["copy_GBps"] * 1e9) * 1e3,
        "flops_G": flops / 1e9,
        "flops_floor_ms": flops / (ceil["bf16_mm_TFLOPs"] * 1e12) * 1e3,
    }


def decode_row(N: int, H: int, D: int, ceil: dict, fla_recurrent_kda) -> dict:
    """One decode step of ``N`` sequences: fast and fla in the same form, then each in its serving form."""
    log(f"decode N={N} H={H} D={D}")
    q, k, v, g, beta = make_inputs(N, 1, H, D, seed=1)
    pool = torch.randn(N, H, D, D, device="cuda", dtype=torch.float32) * 0.1
    slots = torch.randperm(N, device="cuda").to(torch.int32)
    row = {"N": N, "H": H, "D": D}
    state_bytes = 2 * N * H * D * D * 4
    with torch.inference_mode():
        # the same form for both (out of place: read the state, write a fresh final state) ...
        row["fast_decode_ms"] = bench(lambda: fast.fused_recurrent_kda(
            q, k, v, g, beta, initial_state=pool, output_final_state=True))
        row["fast_state_GBps"] = state_bytes / (row["fast_decode_ms"] * 1e-3) / 1e9
        row["fast_frac_of_copy"] = row["fast_state_GBps"] / ceil["copy_GBps"]
        log(f"  fast decode {row['fast_decode_ms']:.4f} ms = {row['fast_state_GBps']:.0f} GB/s "
            f"({100 * row['fast_frac_of_copy']:.0f}% of copy)")
        # ... and the serving form: a shuffled state pool updated in place through slot indices
        row["fast_pool_inplace_ms"] = bench(lambda: fast.fused_recurrent_kda(
            q, k, v, g, beta, initial_state=pool, ssm_state_indices=slots))
        log(f"  fast decode, pool in place: {row['fast_pool_inplace_ms']:.4f} ms")
        if fla_recurrent_kda is not None:
            o_fast, _ = fast.fused_recurrent_kda(q, k, v, g, beta, initial_state=pool.clone(), output_final_state=True)
            o_fla, _ = fla_recurrent_kda(q, k, v, g, beta, initial_state=pool.clone(), output_final_state=True)
            row["fast_vs_fla_rel_err"] = rel_rms_error(o_fast, o_fla)
            row["fla_decode_ms"] = bench(lambda: fla_recurrent_kda(
                q, k, v, g, beta, initial_state=pool, output_final_state=True))
            row["fla_state_GBps"] = state_bytes / (row["fla_decode_ms"] * 1e-3) / 1e9
            log(f"  fla  decode {row['fla_decode_ms']:.4f} ms = {row['fla_state_GBps']:.0f} GB/s, "
                f"rel err fast vs fla {row['fast_vs_fla_rel_err']:.2e}")
            try:  # fla's serving form lives in its lower-level function
                from fla.ops.kda.fused_recurrent import fused_recurrent_kda_fwd as fla_fwd
                row["fla_pool_inplace_ms"] = bench(lambda: fla_fwd(
                    q=q, k=k, v=v, g=g, beta=beta, scale=D ** -0.5, initial_state=pool, inplace_final_state=True,
                    output_final_state=True, ssm_state_indices=slots.long()))
                log(f"  fla  decode, pool in place: {row['fla_pool_inplace_ms']:.4f} ms")
            except Exception as e:  # noqa: BLE001
                log(f"  fla pool in place: not timed ({type(e).__name__}: {e})")
        # the device time alone, as a model's captured decoder runs it: at a few sequences a call's host
        # work is longer than its kernel, so the eager rows above time Python and launches, not memory.
        # Against it, a copy of the same bytes (the state read once, written once) captured the same way.
        src = torch.empty(N * H * D * D, device="cuda", dtype=torch.float32)
        dst = torch.empty_like(src)
        row["copy_same_bytes_graph_ms"] = graph_ms(lambda: dst.copy_(src))
        row["fast_pool_inplace_graph_ms"] = graph_ms(lambda: fast.fused_recurrent_kda(
            q, k, v, g, beta, initial_state=pool, ssm_state_indices=slots))
        row["fast_graph_frac_of_copy"] = row["copy_same_bytes_graph_ms"] / row["fast_pool_inplace_graph_ms"]
        log(f"  captured: fast pool in place {row['fast_pool_inplace_graph_ms'] * 1e3:.2f} us, copy of the same "
            f"bytes {row['copy_same_bytes_graph_ms'] * 1e3:.2f} us ({100 * row['fast_graph_frac_of_copy']:.0f}%)")
        if fla_recurrent_kda is not None:
            try:
                row["fla_graph_ms"] = graph_ms(lambda: fla_recurrent_kda(
                    q, k, v, g, beta, initial_state=pool, output_final_state=True))
                row["fast_graph_ms"] = graph_ms(lambda: fast.fused_recurrent_kda(
                    q, k, v, g, beta, initial_state=pool, output_final_state=True))
                log(f"  captured, out of place: fast {row['fast_graph_ms'] * 1e3:.2f} us, "
                    f"fla {row['fla_graph_ms'] * 1e3:.2f} us")
            except Exception as e:  # noqa: BLE001
                log(f"  fla captured: not timed ({type(e).__name__}: {e})")
    return row


def graph_ms(fn, calls: int = 20) -> float:
    """Device time of one ``fn()``: ``calls`` of them captured in one CUDA graph, its replay timed."""
    with torch.inference_mode():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile and allocate before the capture
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    ms = bench(graph.replay) / calls
    del graph
    return ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--quick", action="store_true", help="first prefill shape and decode only")
    ap.add_argument("--shapes", nargs="*", default=None, help="prefill shapes by name (default: all)")
    ap.add_argument("--json", default="gpu_bench.json", help="file name of the results in --out")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    try:
        from fla.ops.kda import chunk_kda as fla_chunk_kda, fused_recurrent_kda as fla_recurrent_kda
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_gdn
        import fla

        fla_version = getattr(fla, "__version__", "?")
    except Exception as exc:  # pragma: no cover - depends on the machine
        log(f"flash-linear-attention not importable ({exc!r}): fla columns will be empty")
        fla_chunk_kda = fla_recurrent_kda = fla_gdn = None
        fla_version = None

    log(f"device {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} fla {fla_version}")
    ceil = measure_ceilings()
    log(f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s, bf16 matmul {ceil['bf16_mm_TFLOPs']:.0f} TFLOP/s")
    results = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "fla": fla_version, "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M"),
        **ceil, "prefill": [], "decode": [],
    }

    shapes = PREFILL[:1] if args.quick else PREFILL
    if args.shapes is not None:
        shapes = [shp for shp in PREFILL if shp["name"] in args.shapes]
    for shp in shapes:
        H, D = shp["H"], shp["D"]
        if "lengths" in shp:
            T = sum(shp["lengths"])
            B = 1
            cu = torch.tensor([0] + list(torch.tensor(shp["lengths"]).cumsum(0).tolist()), device="cuda")
        else:
            B, T, cu = shp["B"], shp["T"], None
        log(f"prefill {shp['name']}: B={B} T={T} H={H} D={D}")
        q, k, v, g, beta = make_inputs(B, T, H, D)
        row = {"name": shp["name"], "B": B, "T": T, "H": H, "D": D, **floors(B, T, H, D, ceil)}
        with torch.inference_mode():
            o_fast, _ = fast.chunk_kda(q, k, v, g, beta, cu_seqlens=cu)
            row["fast_fwd_ms"] = bench(lambda: fast.chunk_kda(q, k, v, g, beta, cu_seqlens=cu))
            log(f"  fast  fwd {row['fast_fwd_ms']:.3f} ms")
            if fla_chunk_kda is not None:
                o_fla, _ = fla_chunk_kda(q, k, v, g, beta, cu_seqlens=cu)
                row["fla_kda_fwd_ms"] = bench(lambda: fla_chunk_kda(q, k, v, g, beta, cu_seqlens=cu))
                row["fast_vs_fla_rel_err"] = rel_rms_error(o_fast, o_fla)
                row["ratio_fast_over_fla"] = row["fast_fwd_ms"] / row["fla_kda_fwd_ms"]
                log(f"  fla   fwd {row['fla_kda_fwd_ms']:.3f} ms  ratio {row['ratio_fast_over_fla']:.2f}  "
                    f"rel err fast vs fla {row['fast_vs_fla_rel_err']:.2e}")
                # fla's safe_gate path: tensor-core diagonal blocks for gates bounded below (ours are, at -5)
                row["fla_kda_safe_fwd_ms"] = bench(lambda: fla_chunk_kda(
                    q, k, v, g, beta, cu_seqlens=cu, safe_gate=True, lower_bound=-5.0))
                row["ratio_fast_over_fla_safe"] = row["fast_fwd_ms"] / row["fla_kda_safe_fwd_ms"]
                log(f"  fla   fwd safe_gate {row['fla_kda_safe_fwd_ms']:.3f} ms  "
                    f"ratio {row['ratio_fast_over_fla_safe']:.2f}")
                g_scalar = g[..., 0].contiguous()
                row["fla_gdn_fwd_ms"] = bench(lambda: fla_gdn(q, k, v, g_scalar, beta, cu_seqlens=cu))
                log(f"  fla gated-delta fwd {row['fla_gdn_fwd_ms']:.3f} ms")
            if cu is not None:
                # the offsets also given on the host (as a serving engine has them): no read-back per call
                cu_cpu = cu.cpu()
                row["fast_fwd_host_offsets_ms"] = bench(
                    lambda: fast.chunk_kda(q, k, v, g, beta, cu_seqlens=cu, cu_seqlens_cpu=cu_cpu))
                log(f"  fast  fwd, cu_seqlens_cpu given {row['fast_fwd_host_offsets_ms']:.3f} ms")
                if fla_chunk_kda is not None:
                    row["fla_kda_fwd_host_offsets_ms"] = bench(
                        lambda: fla_chunk_kda(q, k, v, g, beta, cu_seqlens=cu, cu_seqlens_cpu=cu_cpu))
                    log(f"  fla   fwd, cu_seqlens_cpu given {row['fla_kda_fwd_host_offsets_ms']:.3f} ms")
            if cu is None:
                qs, ks, vs = (x.transpose(1, 2) for x in (q, k, v))
                row["sdpa_causal_fwd_ms"] = bench(
                    lambda: torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True))
                log(f"  sdpa causal fwd {row['sdpa_causal_fwd_ms']:.3f} ms")
            if T * B * H <= 8 * 4096 * 16:
                row["chunked_fwd_ms"] = bench(lambda: chunked.kda(q, k, v, g, beta, cu_seqlens=cu), rep_ms=500)
                log(f"  chunked (PyTorch) fwd {row['chunked_fwd_ms']:.3f} ms")
            if fla_chunk_kda is not None and shp is shapes[0]:
                # accuracy of both against one float64 reference, on a slice small enough for it
                sl = (x[:2, :1024, :4] for x in (q, k, v, g, beta))
                qs, ks, vs, gs, bs = sl
                ref, _ = chunked.kda(*(x.double() for x in (qs, ks, vs, gs, bs)))
                row["fast_rel_err_vs_f64"] = rel_rms_error(fast.chunk_kda(qs, ks, vs, gs, bs)[0], ref)
                row["fla_rel_err_vs_f64"] = rel_rms_error(fla_chunk_kda(qs, ks, vs, gs, bs)[0], ref)
                row["fla_safe_rel_err_vs_f64"] = rel_rms_error(
                    fla_chunk_kda(qs, ks, vs, gs, bs, safe_gate=True, lower_bound=-5.0)[0], ref)
                log(f"  rel err vs float64 (slice B=2, T=1024, H=4): fast {row['fast_rel_err_vs_f64']:.2e}, "
                    f"fla {row['fla_rel_err_vs_f64']:.2e}, fla safe_gate {row['fla_safe_rel_err_vs_f64']:.2e}")
        row["bytes_floor_frac"] = row["bytes_floor_ms"] / row["fast_fwd_ms"]
        results["prefill"].append(row)
        del q, k, v, g, beta
        torch.cuda.empty_cache()

    # ---- decode: N sequences, one token each, fp32 state pool updated in place; the serving batch
    # first, then a few rows (where a launch's latency, not the state's bytes, sets the time)
    for N in DECODE["N"]:
        results["decode"].append(decode_row(N, DECODE["H"], DECODE["D"], ceil, fla_recurrent_kda))

    path = os.path.join(args.out, args.json)
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    log(f"wrote {path}")
    try:
        plot(results, os.path.join(args.out, args.json.replace(".json", ".png")))
    except Exception as exc:  # the JSON is the record; a missing matplotlib must not lose it
        log(f"plot skipped: {exc!r}")

    print("\nshape            fast ms   fla ms  ratio  bytes-floor ms  flops-floor ms")
    for r in results["prefill"]:
        print(f"{r['name']:<16} {r['fast_fwd_ms']:8.3f} {r.get('fla_kda_fwd_ms', float('nan')):8.3f} "
              f"{r.get('ratio_fast_over_fla', float('nan')):6.2f} {r['bytes_floor_ms']:15.3f} {r['flops_floor_ms']:15.3f}")
    for d in results["decode"]:
        print(f"decode N={d['N']}: fast {d['fast_decode_ms']:.4f} ms ({100 * d['fast_frac_of_copy']:.0f}% of copy), "
              f"fla {d.get('fla_decode_ms', float('nan')):.4f} ms; captured {100 * d['fast_graph_frac_of_copy']:.0f}% "
              f"of a captured copy of the same bytes")


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["prefill"]
    names = [r["name"] for r in rows]
    series = [("fast_fwd_ms", "kda_explained.fast"), ("fla_kda_fwd_ms", "fla chunk_kda"),
              ("fla_kda_safe_fwd_ms", "fla chunk_kda safe_gate"),
              ("fla_gdn_fwd_ms", "fla gated delta"), ("sdpa_causal_fwd_ms", "SDPA causal"),
              ("bytes_floor_ms", "bytes floor"), ("flops_floor_ms", "FLOPs floor")]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(series)
    for i, (key, label) in enumerate(series):
        xs = [j + i * width for j in range(len(rows))]
        ax.bar(xs, [r.get(key, 0.0) for r in rows], width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels(names)
    ax.set_ylabel("forward time (ms), lower is better")
    ax.set_title(f"KDA prefill forward, bf16, {results['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
