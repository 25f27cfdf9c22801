"""Context-parallel KDA on several GPUs: time, peak memory and bytes sent per rank, against one GPU.

Usage (one process per GPU, started by torchrun)::

    torchrun --nproc_per_node 8 benchmarks/cp_bench.py                  # NCCL, the fast backend, bf16
    torchrun --nproc_per_node 8 benchmarks/cp_bench.py --T 65536 1048576 --check
    torchrun --nproc_per_node 2 benchmarks/cp_bench.py --smoke          # the CPU, gloo, tiny sizes

One sequence (``B = 1``) of ``T`` tokens with an initial state, split evenly over the ``R``
ranks (the last takes the remainder); Kimi Linear's heads by default (``H = HV = 32``,
``K = V = 128``), lower-bound gates (-5). For each ``T``:

- ``forward``: :func:`kda_explained.distributed.context_parallel_kda` under ``torch.no_grad()``;
  ``train``: forward and backward of ``(o * do).sum() + (S * dS).sum()`` with every input
  requiring grad. Each rank times ``--reps`` runs between barriers (CUDA-synchronised) and
  keeps its median; the step takes as long as its slowest rank, so the JSON records the
  maximum over ranks, and every rank's median;
- ``one_device``: the same two on rank 0 alone over all ``T`` tokens (``fast.kda``, or
  ``chunked.kda`` with ``--smoke``), unless it runs out of memory;
- peak memory per rank of the training step, bytes each rank sent
  (:func:`kda_explained.distributed.comm.count_bytes`), and the FLOP model
  (:func:`kda_explained.distributed.cost.context_parallel_costs`);
- ``--check``: rank 0 gathers the outputs and the final state and compares them with the
  one-device run (relative RMS error).

Writes ``benchmarks/results/cp_bench.json`` (``--out``); ``--smoke`` writes nothing unless ``--out``
is given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kda_explained import chunked  # noqa: E402
from kda_explained.distributed import context_parallel_kda, count_bytes  # noqa: E402
from kda_explained.distributed.cost import context_parallel_costs  # noqa: E402
from kda_explained.testing import rel_rms_error  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def slice_lengths(T: int, R: int):
    """Even slices, the last rank taking the remainder."""
    base = T // R
    return [base] * (R - 1) + [T - base * (R - 1)]


def make_slice(rank: int, T_r: int, H: int, HV: int, K: int, V: int, device, dtype, seed: int = 0):
    """Rank ``rank``'s slice of the benchmark's sequence: its own seed, so rank 0 can rebuild any slice."""
    gen = torch.Generator(device=device).manual_seed(seed * 1000 + rank)

    def randn(*shape):
        return torch.randn(*shape, device=device, generator=gen)

    q, v = randn(1, T_r, H, K), randn(1, T_r, HV, V)
    k = torch.nn.functional.normalize(randn(1, T_r, H, K), dim=-1)
    g = chunked.lowerbound_gate(randn(1, T_r, HV, K), lower_bound=-5.0)
    beta = torch.rand(1, T_r, HV, device=device, generator=gen)
    x = {"q": q.to(dtype), "k": k.to(dtype), "v": v.to(dtype), "g": g.float(), "beta": beta.to(dtype)}
    x["do"] = randn(1, T_r, HV, V)
    return x


def state_inputs(HV, K, V, device, state_dtype):
    gen = torch.Generator(device=device).manual_seed(12345)
    S0 = 0.1 * torch.randn(1, HV, K, V, device=device, generator=gen)
    dS = torch.randn(1, HV, K, V, device=device, generator=gen)
    return S0.to(state_dtype), dS.to(state_dtype)


def timed(fn, reps: int, warmup: int, device, group=None):
    """Median wall time (ms) of ``fn`` over ``reps`` runs, each started after a barrier."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if group is not False:
            dist.barrier(group=group)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def gather_floats(value: float, device):
    out = [torch.zeros(1, dtype=torch.float64, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(out, torch.tensor([value], dtype=torch.float64, device=device))
    return [float(t) for t in out]


def gather_time(o: torch.Tensor, lengths) -> torch.Tensor:
    """The ranks' outputs ``[1, T_r, ...]`` put together along time (padded to the longest slice to gather)."""
    longest = max(lengths)
    padded = torch.zeros(1, longest, *o.shape[2:], dtype=o.dtype, device=o.device)
    padded[:, : o.shape[1]] = o
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded)
    return torch.cat([p[:, :n] for p, n in zip(parts, lengths)], dim=1)


def run_length(T, args, device, dtype, backend):
    R, rank = dist.get_world_size(), dist.get_rank()
    H, HV, K, V = args.H, args.HV, args.K, args.V
    lengths = slice_lengths(T, R)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = make_slice(rank, lengths[rank], H, HV, K, V, device, dtype)
    S0, dS = state_inputs(HV, K, V, device, state_dtype)
    names = ("q", "k", "v", "g", "beta")

    def forward():
        with torch.no_grad():
            return context_parallel_kda(*(x[n] for n in names), initial_state=S0, output_final_state=True,
                                        backend=backend)

    leaves = {n: x[n].detach().clone().requires_grad_() for n in names}
    S0_leaf = S0.clone().requires_grad_()

    def train():
        for t in (*leaves.values(), S0_leaf):
            t.grad = None
        o, S = context_parallel_kda(*(leaves[n] for n in names), initial_state=S0_leaf, output_final_state=True,
                                    backend=backend)
        ((o.float() * x["do"]).sum() + (S * dS).sum()).backward()

    row = {"T": T, "slices": lengths}
    row["forward_ms_by_rank"] = gather_floats(timed(forward, args.reps, args.warmup, device), device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    row["train_ms_by_rank"] = gather_floats(timed(train, args.reps, args.warmup, device), device)
    if device.type == "cuda":
        row["train_peak_GB_by_rank"] = gather_floats(torch.cuda.max_memory_allocated(device) / 1e9, device)
    with count_bytes() as sent:
        train()
    row["bytes_sent_per_rank_train"] = sent.total
    row["forward_ms"], row["train_ms"] = max(row["forward_ms_by_rank"]), max(row["train_ms_by_rank"])
    model = context_parallel_costs(T, R, HV, K, V, N=1, state_bytes=torch.finfo(state_dtype).bits // 8)
    row["model"] = {"compute_speedup": model.compute_speedup, "bytes_per_rank": model.bytes_per_rank}

    o_mine, S_mine = forward()
    o_all = gather_time(o_mine, lengths) if args.check else None
    # one device: rank 0 alone over all T tokens, the others wait
    if rank == 0:
        row["one_device"] = one_device(lengths, args, device, dtype, S0, dS, o_all, S_mine)
    dist.barrier()
    log(f"T = {T}: forward {row['forward_ms']:.2f} ms, train {row['train_ms']:.2f} ms on {R} ranks; "
        f"one device {row.get('one_device', {})}; {row['bytes_sent_per_rank_train']} bytes sent per rank")
    return row


def one_device(lengths, args, device, dtype, S0, dS, o_all, S_mine):
    from kda_explained import fast

    H, HV, K, V = args.H, args.HV, args.K, args.V
    core = chunked.kda if args.smoke else fast.kda
    try:
        parts = [make_slice(j, n, H, HV, K, V, device, dtype) for j, n in enumerate(lengths)]
        x = {n: torch.cat([p[n] for p in parts], dim=1) for n in ("q", "k", "v", "g", "beta", "do")}
        del parts
        names = ("q", "k", "v", "g", "beta")

        def forward():
            with torch.no_grad():
                return core(*(x[n] for n in names), initial_state=S0, output_final_state=True)

        leaves = {n: x[n].detach().clone().requires_grad_() for n in names}
        S0_leaf = S0.clone().requires_grad_()

        def train():
            for t in (*leaves.values(), S0_leaf):
                t.grad = None
            o, S = core(*(leaves[n] for n in names), initial_state=S0_leaf, output_final_state=True)
            ((o.float() * x["do"]).sum() + (S * dS).sum()).backward()

        out = {"forward_ms": timed(forward, args.reps, args.warmup, device, group=False)}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        out["train_ms"] = timed(train, args.reps, args.warmup, device, group=False)
        if device.type == "cuda":
            out["train_peak_GB"] = torch.cuda.max_memory_allocated(device) / 1e9
        if args.check:
            o, S = forward()
            out["check_o_rel_rms"] = rel_rms_error(o_all.float(), o.float())
            out["check_final_state_rel_rms"] = rel_rms_error(S_mine, S)
        return out
    except torch.cuda.OutOfMemoryError as exc:
        torch.cuda.empty_cache()
        return {"error": f"out of memory: {str(exc).splitlines()[0]}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, nargs="+", default=[65536, 262144, 1048576], help="tokens of the whole sequence")
    ap.add_argument("--H", type=int, default=32)
    ap.add_argument("--HV", type=int, default=32)
    ap.add_argument("--K", type=int, default=128)
    ap.add_argument("--V", type=int, default=128)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--check", action="store_true", help="compare the outputs with the one-device run")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU with gloo (checks the script runs)")
    ap.add_argument("--out", default=None, help=f"folder for cp_bench.json (default {RESULTS}; none with --smoke)")
    args = ap.parse_args()
    if args.smoke:
        args.T, args.H, args.HV, args.K, args.V, args.reps, args.warmup = [96, 160], 2, 2, 16, 16, 3, 1
        args.check = True
    use_cuda = torch.cuda.is_available() and not args.smoke
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=10))
    if not use_cuda:
        torch.set_num_threads(1)
    dtype = torch.bfloat16 if use_cuda else torch.float32
    backend = "fast" if use_cuda else "chunked"
    results = {"device": torch.cuda.get_device_name(device) if use_cuda else "cpu (gloo)",
               "world_size": dist.get_world_size(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M"), "dtype": str(dtype).replace("torch.", ""),
               "backend": backend, "heads": {"H": args.H, "HV": args.HV, "K": args.K, "V": args.V}, "rows": []}
    for T in args.T:
        results["rows"].append(run_length(T, args, device, dtype, backend))
    out = args.out if args.out is not None else (None if args.smoke else RESULTS)
    if dist.get_rank() == 0 and out is not None:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "cp_bench.json")
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
        log(f"wrote {path}")
    if args.smoke and dist.get_rank() == 0:
        for row in results["rows"]:
            one = row["one_device"]
            assert one["check_o_rel_rms"] < 1e-5 and one["check_final_state_rel_rms"] < 1e-5, one
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
