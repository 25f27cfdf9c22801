"""Decoding time per token against context length: the 3:1 KDA hybrid vs the same model all-attention.

Usage::

    python benchmarks/gpu_decode.py                 # on an H100: contexts 1K .. 1M tokens (until OOM)
    python benchmarks/gpu_decode.py --quick         # a few contexts, a smaller model: < 2 minutes
    python benchmarks/gpu_decode.py --cpu-smoke     # tiny sizes on the CPU, to check the script runs

Both models are :class:`kda_explained.layers.HybridLM` with the same sizes; the
baseline has full attention (NoPE, SDPA) in every layer. For each context length
``L`` the caches are *filled with random values* instead of prefilling ``L``
tokens (a decoding step costs the same whatever the values; this keeps the sweep
to minutes), then ``--steps`` greedy decoding steps are timed with CUDA events
after a warm-up. Eager PyTorch, no CUDA graphs: per-token times include Python
and kernel-launch overhead, which is what dominates at short contexts. Beside the
time, each row records the cache bytes from
:func:`kda_explained.layers.cache_memory` and the peak GPU memory. A context the
GPU cannot hold is recorded as ``"oom": true`` and ends that model's sweep.
Writes ``gpu_decode.json`` and ``gpu_decode.png`` (``*_quick`` / ``*_cpu_smoke`` for those modes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kda_explained.layers import HybridConfig, HybridLM, KDACache, cache_memory  # noqa: E402
from kda_explained.layers.hybrid import KVCache  # noqa: E402

FULL = dict(config=HybridConfig(vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=16, head_dim=128,
                                intermediate_size=5632),
            contexts=[2 ** p for p in range(10, 21)], steps=32, batch=1, dtype=torch.bfloat16)
QUICK = dict(config=HybridConfig(vocab_size=32000, hidden_size=2048, num_layers=8, num_heads=16, head_dim=128,
                                 intermediate_size=5632),
             contexts=[2 ** p for p in (10, 13, 16, 18)], steps=16, batch=1, dtype=torch.bfloat16)
SMOKE = dict(config=HybridConfig(vocab_size=64, hidden_size=64, num_layers=4, num_heads=2, head_dim=16,
                                 intermediate_size=128, kda_backend="chunked"),
             contexts=[16, 64], steps=2, batch=2, dtype=torch.float32)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


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


@torch.no_grad()
def sweep(name: str, config: HybridConfig, setup: dict, device: torch.device) -> list:
    torch.manual_seed(0)
    model = HybridLM(config).to(device=device, dtype=setup["dtype"]).eval()
    B, steps, warmup = setup["batch"], setup["steps"], 3
    rows = []
    for L in setup["contexts"]:
        mem = cache_memory(config, batch=B, context_len=L, dtype=setup["dtype"])["hybrid"]
        row = {"model": name, "context": L, "batch": B, "cache_bytes": mem}
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            cache = filled_cache(model, B, L, warmup + steps)
            token = torch.randint(0, config.vocab_size, (B, 1), device=device)
            for _ in range(warmup):
                token = model(token, cache=cache)[:, -1].argmax(-1, keepdim=True)
            with Timer(device) as t:
                for _ in range(steps):
                    token = model(token, cache=cache)[:, -1].argmax(-1, keepdim=True)
            row["ms_per_token"] = t.ms / steps
            if device.type == "cuda":
                row["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
            log(f"{name:14s} L={L:>8d}  {row['ms_per_token']:8.3f} ms/token  cache "
                f"{mem['total'] / 2 ** 30:7.3f} GiB")
        except torch.cuda.OutOfMemoryError:
            row["oom"] = True
            log(f"{name:14s} L={L:>8d}  out of memory: sweep ends")
            rows.append(row)
            break
        finally:
            cache = None
        rows.append(row)
    del model
    return rows


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, style in (("hybrid", "o-"), ("all_attention", "s--")):
        rows = [r for r in results["rows"] if r["model"] == name and "ms_per_token" in r]
        xs = [r["context"] for r in rows]
        ax_t.plot(xs, [r["ms_per_token"] for r in rows], style, label=name.replace("_", " "))
        ax_m.plot(xs, [r["cache_bytes"]["total"] / 2 ** 30 for r in rows], style, label=name.replace("_", " "))
        ooms = [r["context"] for r in results["rows"] if r["model"] == name and r.get("oom")]
        for x in ooms:
            ax_t.axvline(x, color="gray", lw=0.8, ls=":")
    cfg = results["config"]
    for ax in (ax_t, ax_m):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
        ax.legend()
    ax_t.set_ylabel("decoding time per token (ms)")
    ax_m.set_ylabel("cache (GiB)")
    ax_m.set_yscale("log")
    fig.suptitle(f"{results['device']}: {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, "
                 f"{cfg['num_heads']}x{cfg['head_dim']} heads, batch {results['batch']}, {results['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="4 contexts, 8 layers: < 2 minutes on an H100")
    mode.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on the CPU (checks the script runs)")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results; a temp dir for --cpu-smoke)")
    ap.add_argument("--batch", type=int, default=None, help="batch rows (default 1; 2 for --cpu-smoke)")
    args = ap.parse_args()

    setup = dict(SMOKE if args.cpu_smoke else QUICK if args.quick else FULL)
    if torch.cuda.is_available():
        # cuDNN's SDPA builds an execution plan for every new key length, and decoding makes a new
        # length at every step: ~20 ms of host time per attention call, seen on the H100 (torch
        # profiler). The plans are cached by shape, so whichever model ran first paid for both.
        # Flash / memory-efficient attention have no such cost, and serving engines decode with them.
        torch.backends.cuda.enable_cudnn_sdp(False)
    if args.batch:
        setup["batch"] = args.batch
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_decode.py: no CUDA GPU; run with --cpu-smoke to check the script on the CPU")
    out = args.out or (tempfile.mkdtemp(prefix="gpu_decode_") if args.cpu_smoke
                       else os.path.join(os.path.dirname(__file__), "results"))
    os.makedirs(out, exist_ok=True)
    stem = "gpu_decode" + ("_cpu_smoke" if args.cpu_smoke else "_quick" if args.quick else "")

    config: HybridConfig = setup["config"]
    log(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'cpu'}, "
        f"layers {config.layer_types()}")
    rows = sweep("hybrid", config, setup, device) + sweep("all_attention", config.all_attention(), setup, device)
    results = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "mode": stem,
        "config": asdict(config),
        "batch": setup["batch"],
        "dtype": str(setup["dtype"]).replace("torch.", ""),
        "steps": setup["steps"],
        "method": "caches filled with random values for each context (no prefill); greedy decoding steps timed "
                  "after 3 warm-up steps; eager mode, no CUDA graphs",
        "rows": rows,
    }
    path = os.path.join(out, stem + ".json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    log(f"wrote {path}")
    try:
        plot(results, os.path.join(out, stem + ".png"))
        log(f"wrote {os.path.join(out, stem + '.png')}")
    except Exception as exc:  # the JSON is the record; a missing matplotlib must not lose it
        log(f"plot skipped: {exc!r}")


if __name__ == "__main__":
    main()
