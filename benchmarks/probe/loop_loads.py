"""Which loads inside each kernel's loops the compiler leaves synchronous, without a GPU.

    python benchmarks/probe/loop_loads.py [--backward] [--shapes NAME ...]

Triton software-pipelines a loop's loads (``num_stages``) by turning them into asynchronous
copies to shared memory issued iterations ahead, but only the loads it judges worth it: in
Triton 3.6 those that feed a product (``tl.dot``) and are at least 4 bytes per thread and copy.
A load it leaves alone stays a plain load in the loop body, and each iteration waits for it:
in the state pass that one load (``G``'s chunk-end row) cost a third of every step on the
H100 (docs: the kernel page, "The sequential loop's loads").

This probe runs ``fast.chunk_kda`` (and with ``--backward`` a training step) on CPU tensors with
every kernel launch captured instead of run, so each kernel gets exactly the compile-time
constants and launch options its launcher picks on an H100 (132 SMs assumed for the launch
rules). It then compiles each for ``sm_90a`` on this machine (no GPU needed; pointer arguments
marked 16-byte aligned, as the JIT marks them) and prints, per kernel, the loads in its loops:
``async`` (pipelined) or ``SYNC`` (waited for inside the loop), with their source lines.
Run it with the Triton the GPU has (3.6 on the lent H100) for results that hold there.
"""

import argparse
import collections
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
if not any(os.path.isfile(os.path.join(p or ".", "kda_explained", "__init__.py")) for p in sys.path):
    sys.path.insert(0, ROOT)  # this checkout, unless the caller put another first (ptx_snapshot.py --root)

from kda_explained import fast  # noqa: E402

#: (B, T, H) with the launch rules of the benchmark shapes: T does not change any compile-time
#: constant, so it is short here (the batch and head counts pick the chunk size and value tile).
SHAPES = {"B8_H16": (8, 128, 16), "B1_H96": (1, 128, 96), "B1_H16_long": (1, 256, 16)}
SMS = 132

_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
           torch.int8: "i8", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}
_OPTIONS = ("num_warps", "num_stages", "maxnreg", "num_ctas")

captured = []


def _capture(self, *args, grid, warmup, **kwargs):
    """Stands in for ``JITFunction.run``: records the launch, runs nothing."""
    captured.append((self, args, kwargs))


def launch_on_this_cpu(sms: int = SMS, run=_capture) -> None:
    """Make the fast layer launch its kernels from CPU tensors as on a GPU of ``sms`` SMs (the launch
    rules read the count), each launch handed to ``run`` (default: recorded in :data:`captured`)
    instead of a GPU. The interpreter flag is set only where the CUDA-tensor check reads it: the
    kernels' own choices still see the compiler, not the interpreter."""
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("kda_explained.fast") and hasattr(mod, "sm_count"):
            mod.sm_count = lambda device: sms
    sys.modules["kda_explained.fast.inputs"].interpreting = lambda: True
    JITFunction.run = run


def compile_launch(fn: JITFunction, args, kwargs, arch: int = 90):
    """Compile one captured launch for ``sm_<arch>`` (default ``sm_90a``); returns the compiled kernel
    (``.asm["ttgir"]``, ``.metadata.shared``: its shared memory in bytes)."""
    bound = dict(zip([p.name for p in fn.params], args))
    bound.update({k: v for k, v in kwargs.items() if k not in _OPTIONS})
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        x = bound.get(p.name, p.default)
        if p.is_constexpr:
            constexprs[p.name] = x
            signature[p.name] = "constexpr"
        elif isinstance(x, torch.Tensor):
            signature[p.name] = "*" + _DTYPES[x.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(x, bool):
            signature[p.name] = "i1"
        elif isinstance(x, int):
            signature[p.name] = "i32" if abs(x) < 2**31 else "i64"
        elif isinstance(x, float):
            signature[p.name] = "fp32"
        elif x is None:
            signature[p.name] = "constexpr"
            constexprs[p.name] = None
        else:
            raise TypeError(f"{fn.fn.__name__}: argument {p.name} of type {type(x).__name__}")
    options = {k: kwargs[k] for k in _OPTIONS if k in kwargs}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _source_lines(ttgir: str) -> dict:
    """``loc`` id -> ``file:line`` of the load, followed through named locations
    (``loc("b_W"(#loc5))``) and call sites (``callsite(#callee at #caller)``: ``callee line <- caller line``)."""
    defs = dict(re.findall(r"^#(loc\d*) = loc\((.*)\)\s*$", ttgir, re.M))

    def resolve(loc, depth=0):
        text = defs.get(loc, "")
        if depth > 50 or not text:
            return "?"
        m = re.match(r'"([^"]*)":(\d+):\d+$', text)
        if m:
            return f"{os.path.basename(m.group(1))}:{m.group(2)}"
        m = re.match(r"callsite\(#(loc\d*) at #(loc\d*)\)$", text)
        if m:
            return f"{resolve(m.group(1), depth + 1)} <- {resolve(m.group(2), depth + 1).split(':')[-1]}"
        m = re.match(r'"[^"]*"\(#(loc\d*)\)$', text)
        return resolve(m.group(1), depth + 1) if m else "?"

    return {loc: resolve(loc) for loc in defs}


def loop_loads(ttgir: str):
    """``[(kind, line)]`` for each load inside an ``scf.for`` body: ``async`` or ``SYNC``."""
    lines = _source_lines(ttgir)
    out, depth = [], 0
    for text in ttgir.splitlines():
        if depth > 0 and ("ttg.async_copy_global_to_local" in text or re.search(r"= tt\.load ", text)):
            m = re.search(r"loc\(#(loc\d+)\)\s*$", text)
            out.append(("async" if "async_copy" in text else "SYNC", lines.get(m.group(1), "?") if m else "?"))
        if depth > 0 or "scf.for" in text:
            depth += text.count("{") - text.count("}")
    return out


def _constants(kwargs) -> str:
    """The launch's distinguishing compile-time constants, short."""
    keys = ("BT", "BV", "QK", "EXACT_DIAG", "OUTPUT", "FOLD", "FUSED", "num_stages")
    return " ".join(f"{k}={kwargs[k]}" for k in keys if k in kwargs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--backward", action="store_true", help="also a training step (forward at 64 tokens + backward)")
    a = ap.parse_args()
    launch_on_this_cpu()  # the H100's launch rules
    print(f"triton {triton.__version__}, sm_90a; loads inside loops: async (pipelined) / SYNC (waited for)")
    seen = set()
    for name in a.shapes:
        B, T, H = SHAPES[name]
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, T, H, 128, generator=g).bfloat16() for _ in range(3))
        gate = -torch.rand(B, T, H, 128, generator=g)
        beta = torch.rand(B, T, H, generator=g).bfloat16()
        captured.clear()
        with torch.inference_mode():
            fast.chunk_kda(q, k, v, gate, beta)
        runs = [("forward", list(captured))]
        if a.backward:
            captured.clear()
            xs = [x.clone().requires_grad_(True) for x in (q, k, v, gate, beta)]
            o, _ = fast.chunk_kda(*xs, output_final_state=True)
            o.float().sum().backward()
            runs.append(("training step", list(captured)))
        for what, launches in runs:
            print(f"\n== {name} (B={B}, H={H}), {what}: {len(launches)} launches")
            for fn, args, kwargs in launches:
                key = (fn.fn.__name__, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
                if key in seen:
                    continue
                seen.add(key)
                kernel = compile_launch(fn, args, kwargs)
                loads = loop_loads(kernel.asm["ttgir"])
                count = collections.Counter(kind for kind, _ in loads)
                sync = sorted({line for kind, line in loads if kind == "SYNC"})
                print(f"  {fn.fn.__name__:28s} {_constants(kwargs):34s} smem {kernel.metadata.shared // 1024:3d} KB"
                      f"  async {count['async']:2d}  SYNC {count['SYNC']:2d}"
                      + "".join(f"\n      SYNC at {line}" for line in sync))


if __name__ == "__main__":
    main()
