"""Decoding time per output token against context length: the 3:1 KDA hybrid vs the same model all-attention.

Usage::

    python benchmarks/gpu_decode.py                 # contexts from 1K, doubling until the GPU runs out of memory
    python benchmarks/gpu_decode.py --quick         # fewer contexts, a smaller model: a few minutes
    python benchmarks/gpu_decode.py --cpu-smoke     # tiny sizes on the CPU, seconds: checks the script runs
    python benchmarks/gpu_decode.py --modes eager,compiled --batches single --out /tmp/decode

Both models are :class:`kda_explained.layers.HybridLM` with the same sizes; the
baseline has full attention (NoPE, SDPA) in every layer. For each context length
``L`` the caches are *filled with random values* instead of prefilling ``L`` tokens
(a decoding step costs the same whatever the values; this keeps the sweep to
minutes), then ``steps`` greedy decoding steps are timed (CUDA events on a GPU)
after a warm-up.

The sweep crosses three things:

- **batch**: ``single`` (one row) and ``fill`` (for each model and context, as many rows
  as the GPU's free memory holds caches for, up to ``max_batch``; the all-attention
  model's rows hold bigger caches, so it gets fewer). Time per output token is the time
  of a step divided by the rows.
- **mode**: ``eager`` (PyTorch as written); ``compiled`` (the step through
  ``torch.compile(dynamic=True)``; graph breaks are counted and recorded, since each one
  is a return to Python); ``graph`` (a decoding step captured once and replayed, which
  needs static cache buffers: :meth:`HybridLM.decoder`, a
  :class:`~kda_explained.layers.StaticDecoder` on the cache; on the CPU the mode is skipped).
- **model**: the hybrid and its all-attention twin.

Each row records the cache bytes from :func:`kda_explained.layers.cache_memory` and the
peak GPU memory. A context the GPU cannot hold is recorded as ``"oom": true`` and ends
that sweep (for ``fill``, the batch is halved first, down to one row). Writes
``<stem>.json`` (device, date, torch and triton versions inside) and ``<stem>.png`` into
``--out``: ``gpu_decode`` by default, ``gpu_decode_quick`` / ``gpu_decode_cpu_smoke`` for
those modes. A CPU run never writes into ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench_report, beside this script
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kda_explained.layers import HybridConfig, HybridLM, KDACache, cache_memory  # noqa: E402
from kda_explained.layers.hybrid import KVCache  # noqa: E402
import bench_report  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODES = ("eager", "compiled", "graph")
BATCHES = ("single", "fill")

FULL = dict(config=HybridConfig(vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=16, head_dim=128,
                                intermediate_size=5632),
            contexts=[2 ** p for p in range(10, 23)], steps=32, warmup=3, compile_warmup=8, max_batch=256,
            dtype=torch.bfloat16, compile_backend="inductor")
QUICK = dict(FULL, config=HybridConfig(vocab_size=32000, hidden_size=2048, num_layers=8, num_heads=16, head_dim=128,
                                       intermediate_size=5632),
             contexts=[2 ** p for p in (10, 13, 16, 18)], steps=16, max_batch=64)
# dynamo without code generation on the CPU: the smoke checks that the compiled path runs, in seconds
SMOKE = dict(config=HybridConfig(vocab_size=64, hidden_size=64, num_layers=4, num_heads=2, head_dim=16,
                                 intermediate_size=128, kda_backend="chunked"),
             contexts=[16, 64], steps=2, warmup=1, compile_warmup=2, max_batch=4, dtype=torch.float32,
             compile_backend="eager", cpu_fill_bytes=2 ** 20)
#: Of the free GPU memory after the model is loaded, the share the ``fill`` batch's caches may take;
#: the rest is for the step's activations (logits are ``B x vocab``) and the allocator's slack.
FILL_SHARE = 0.85


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# caches, batches, timers
# ----------------------------------------------------------------------------------------------


def filled_cache(model: HybridLM, batch: int, context: int, extra: int):
    """A cache as if ``context`` tokens had been prefilled: random keys, values and states."""
    cache = model.init_cache(batch, capacity=context + extra)
    for c in cache.layers:
        if isinstance(c, KVCache):
            c.k[:, :, :context].normal_()
            c.v[:, :, :context].normal_()
            c.length = context
        else:
            assert isinstance(c, KDACache)
            c.state.normal_(std=0.1)
            for conv in (c.conv_q, c.conv_k, c.conv_v):
                conv.normal_()
            c.seen = context
    cache.length = context
    return cache


def fill_batch(config: HybridConfig, context: int, extra: int, setup: dict, device: torch.device) -> int:
    """Rows whose caches (``context + extra`` tokens) and logits fit in the free memory, in ``[1, max_batch]``."""
    which = "all_attention" if config.kda_per_attention == 0 else "hybrid"
    row = cache_memory(config, batch=1, context_len=context + extra, dtype=setup["dtype"])[which]["total"]
    row += 2 * config.vocab_size * 4  # the step's logits and their argmax, per row (float32 upper bound)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        budget = FILL_SHARE * torch.cuda.mem_get_info(device)[0]
    else:
        budget = setup["cpu_fill_bytes"]
    return int(max(1, min(setup["max_batch"], budget // row)))


class Timer:
    """Wall time of a block: CUDA events on a GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


# ----------------------------------------------------------------------------------------------
# one decoding step, three ways
# ----------------------------------------------------------------------------------------------

Step = Callable[[torch.Tensor, object], torch.Tensor]  # (token [B, 1], cache) -> next token [B, 1]


class Skipped(Exception):
    """A mode this model or device cannot run; the message says why, and goes into the JSON."""


def graph_capture_support(model: HybridLM, device: torch.device) -> Optional[str]:
    """``None`` where a graph-captured decoding step can run, else the reason it cannot."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    return None


def make_step(model: HybridLM, mode: str, setup: dict, device: torch.device) -> Tuple[Step, Callable[[], dict]]:
    """The decoding step of ``mode`` and a function returning what to record about it (graph breaks, ...)."""
    if mode == "eager":
        def step(token, cache):
            return model(token, cache=cache)[:, -1].argmax(-1, keepdim=True)

        return step, dict

    if mode == "compiled":
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        # dynamic: the attention layers' key length grows by one every step; without it each step recompiles
        compiled = torch.compile(model, dynamic=True, backend=setup["compile_backend"])

        def step(token, cache):
            return compiled(token, cache=cache)[:, -1].argmax(-1, keepdim=True)

        def notes():
            counters = torch._dynamo.utils.counters
            return {"compile_backend": setup["compile_backend"],
                    "graph_breaks": int(sum(counters["graph_break"].values())),
                    "unique_graphs": int(counters["stats"].get("unique_graphs", 0))}

        return step, notes

    if mode == "graph":
        reason = graph_capture_support(model, device)
        if reason:
            raise Skipped(reason)
        decoders: Dict[int, Callable] = {}  # one capture per cache: its buffers are the graph's inputs

        def step(token, cache):
            if id(cache) not in decoders:
                for old in decoders.values():
                    old.close()  # its graph and memory pool, freed now
                decoders.clear()
                decoders[id(cache)] = model.decoder(cache)  # captured here, once per cache
            return decoders[id(cache)](token).argmax(-1, keepdim=True)

        return step, dict
    raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")


def time_steps(step: Step, model: HybridLM, config: HybridConfig, B: int, L: int, warmup: int, setup: dict,
               device: torch.device) -> dict:
    """Fill a cache of ``B`` rows at context ``L``, warm up, time ``steps`` decoding steps."""
    steps = setup["steps"]
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    cache = filled_cache(model, B, L, warmup + steps)
    token = torch.randint(0, config.vocab_size, (B, 1), device=device)
    for _ in range(warmup):
        token = step(token, cache)
    with Timer(device) as t:
        for _ in range(steps):
            token = step(token, cache)
    row = {"ms_per_step": t.ms / steps, "ms_per_token": t.ms / steps / B, "tokens_per_s": B * steps / t.ms * 1e3}
    if device.type == "cuda":
        row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device)
    return row


# ----------------------------------------------------------------------------------------------
# the sweep
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def sweep(name: str, config: HybridConfig, setup: dict, device: torch.device, modes: List[str],
          batches: List[str]) -> Tuple[list, dict]:
    """Rows for one model: every mode x batch x context; and the notes of skipped modes."""
    torch.manual_seed(0)
    model = HybridLM(config).to(device=device, dtype=setup["dtype"]).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rows, skipped = [], {}
    for mode in modes:
        try:
            step, notes = make_step(model, mode, setup, device)
        except Skipped as exc:
            skipped[mode] = str(exc)
            log(f"{name:14s} {mode}: skipped: {exc}")
            continue
        warmup = setup["compile_warmup"] if mode == "compiled" else setup["warmup"]
        for kind in batches:
            for L in setup["contexts"]:
                B = 1 if kind == "single" else fill_batch(config, L, warmup + setup["steps"], setup, device)
                row = {"model": name, "mode": mode, "batch_kind": kind, "context": L}
                while True:
                    row.update(batch=B, cache_bytes=cache_memory(config, batch=B, context_len=L,
                                                                 dtype=setup["dtype"])["hybrid"])
                    try:
                        row.update(time_steps(step, model, config, B, L, warmup, setup, device))
                        break
                    except torch.cuda.OutOfMemoryError:
                        if B == 1:
                            row["oom"] = True
                            break
                        B //= 2  # the estimate of what fits was optimistic: fewer rows
                row.update(notes(), weight_bytes=weights)
                rows.append(row)
                if row.get("oom"):
                    log(f"{name:14s} {mode:8s} {kind:6s} L={L:>8d}  out of memory: this sweep ends")
                    break
                log(f"{name:14s} {mode:8s} {kind:6s} L={L:>8d} B={B:>4d}  {row['ms_per_step']:8.3f} ms/step  "
                    f"{row['ms_per_token']:8.4f} ms/token  cache {row['cache_bytes']['total'] / 2 ** 30:7.3f} GiB")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, skipped


def plot(results: dict, path: str) -> None:
    """Per-token time against context for each batch kind (one panel each), and the cache sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in BATCHES if any(r["batch_kind"] == k for r in results["rows"])]
    fig, axes = plt.subplots(1, len(kinds) + 1, figsize=(5.5 * (len(kinds) + 1), 4.5), squeeze=False)
    styles = {"hybrid": "-", "all_attention": "--"}
    markers = {"eager": "o", "compiled": "s", "graph": "^"}
    for ax, kind in zip(axes[0], kinds):
        for model in ("hybrid", "all_attention"):
            for mode in MODES:
                rows = [r for r in results["rows"] if (r["model"], r["mode"], r["batch_kind"]) == (model, mode, kind)
                        and "ms_per_token" in r]
                if rows:
                    ax.plot([r["context"] for r in rows], [r["ms_per_token"] for r in rows],
                            styles[model] + markers[mode], label=f"{model.replace('_', ' ')}, {mode}")
        ax.set_title("batch 1" if kind == "single" else "batch filling the memory (time / rows)")
        ax.set_ylabel("ms per output token")
        ax.set_yscale("log")
    ax_m = axes[0][-1]
    for model in ("hybrid", "all_attention"):
        rows = [r for r in results["rows"] if (r["model"], r["batch_kind"]) == (model, "single") and "ms_per_token" in r]
        seen = {r["context"]: r["cache_bytes"]["total"] for r in rows}
        ax_m.plot(sorted(seen), [seen[L] / 2 ** 30 for L in sorted(seen)], styles[model] + "o",
                  label=f"{model.replace('_', ' ')} cache, batch 1")
    ax_m.set_ylabel("cache (GiB)")
    ax_m.set_yscale("log")
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    cfg = results["config"]
    fig.suptitle(f"{results['device']}: {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, "
                 f"{cfg['num_heads']}x{cfg['head_dim']} heads, {results['dtype']}, torch {results['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_list(text: str, allowed, name: str) -> List[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        raise SystemExit(f"--{name}: expected a comma-separated subset of {list(allowed)}, got {text!r}")
    return items


def main(argv: Optional[List[str]] = None) -> str:
    """Run the sweep; returns the path of the JSON written."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="4 contexts, 8 layers: a few minutes on an H100")
    size.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (checks the script runs)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results; a temp dir for --cpu-smoke)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    ap.add_argument("--batches", default=",".join(BATCHES), help=f"comma-separated subset of {','.join(BATCHES)}")
    ap.add_argument("--max-context", type=int, default=None, help="stop the context sweep after this length")
    args = ap.parse_args(argv)
    modes, batches = parse_list(args.modes, MODES, "modes"), parse_list(args.batches, BATCHES, "batches")

    setup = dict(SMOKE if args.cpu_smoke else QUICK if args.quick else FULL)
    if args.max_context:
        setup["contexts"] = [L for L in setup["contexts"] if L <= args.max_context]
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_decode.py: no CUDA GPU; run with --cpu-smoke to check the script on the CPU")
    if device.type == "cuda":
        # cuDNN's SDPA builds an execution plan for every new key length, and decoding makes a new
        # length at every step: ~20 ms of host time per attention call, seen on the H100 (torch
        # profiler). The plans are cached by shape, so whichever model ran first paid for both.
        # Flash / memory-efficient attention have no such cost, and serving engines decode with them.
        torch.backends.cuda.enable_cudnn_sdp(False)
    out = args.out or (tempfile.mkdtemp(prefix="gpu_decode_") if args.cpu_smoke else RESULTS)
    if device.type != "cuda" and os.path.abspath(out) == RESULTS:
        sys.exit("gpu_decode.py: a CPU run does not write into benchmarks/results/; pass another --out")
    os.makedirs(out, exist_ok=True)
    stem = "gpu_decode" + ("_cpu_smoke" if args.cpu_smoke else "_quick" if args.quick else "")

    config: HybridConfig = setup["config"]
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else (platform.processor() or "cpu")
    log(f"device {device_name}, layers {config.layer_types()}, modes {modes}, batches {batches}")
    rows_h, skipped_h = sweep("hybrid", config, setup, device, modes, batches)
    rows_a, skipped_a = sweep("all_attention", config.all_attention(), setup, device, modes, batches)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    results = {
        "device": device_name,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "mode": stem,
        "config": asdict(config),
        "dtype": str(setup["dtype"]).replace("torch.", ""),
        "steps": setup["steps"],
        "warmup": {"eager": setup["warmup"], "compiled": setup["compile_warmup"], "graph": setup["warmup"]},
        "modes": modes,
        "batches": batches,
        "max_batch": setup["max_batch"],
        "skipped": {**{f"hybrid/{m}": s for m, s in skipped_h.items()},
                    **{f"all_attention/{m}": s for m, s in skipped_a.items()}},
        "method": "caches filled with random values for each context (no prefill); greedy decoding steps timed "
                  "after a warm-up; batch 'fill' = as many rows as the free memory holds caches for; "
                  "ms_per_token = ms_per_step / batch",
        "rows": rows_h + rows_a,
    }
    return bench_report.write(results, out, stem, plot, log)


if __name__ == "__main__":
    main()
