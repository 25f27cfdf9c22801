"""The PTX of every kernel launch the fast layer makes, compiled for sm_90a without a GPU.

    python benchmarks/probe/ptx_snapshot.py OUT_DIR [--root CHECKOUT]
    python benchmarks/probe/ptx_snapshot.py --compare BEFORE_DIR AFTER_DIR

The first form runs, on CPU tensors with every kernel launch captured instead of run (as
``loop_loads.py`` does), ``fast.chunk_kda`` at the benchmark shapes (inference forward), a
training step through it (forward and backward, without and with the in-kernel gate options),
and ``fast.fused_recurrent_kda`` (decode, plain and on a state pool). Each distinct launch
(kernel and compile-time constants) is compiled for ``sm_90a`` with the Triton installed and
its PTX written to ``OUT_DIR``, without debug information (``.loc`` / ``.file`` lines and the
``.debug_*`` sections: they name source lines, which any edit above a kernel moves).

``--root`` imports ``kda_explained`` from another checkout (e.g. a ``git worktree`` of the
commit before a change), so one script snapshots both sides. ``--compare`` then lists the
launches whose PTX differs and those present on one side only; it exits 1 if any differ.
A restructuring that must not change generated code shows no difference. Run it with the
Triton of the GPU machines (3.6) for results that hold there.
"""

import argparse
import difflib
import hashlib
import os
import re
import sys


def _strip_debug(ptx: str) -> str:
    """PTX without debug information: ``.loc`` / ``.file`` directives, ``.section .debug_*`` blocks
    and the ``// begin inline asm`` style comments that carry line numbers."""
    out, skip = [], 0
    for line in ptx.splitlines():
        s = line.strip()
        if s.startswith(".section") and ".debug" in s:
            skip = 1
            continue
        if skip:
            skip += s.count("{") - s.count("}")
            if skip <= 1 and s == "}":
                skip = 0
            continue
        if s.startswith((".loc", ".file")) or s.startswith("$L__") and "debug" in s:
            continue
        out.append(re.sub(r"\s*//.*$", "", line))
    return "\n".join(out) + "\n"


def snapshot(out_dir: str, root: str) -> None:
    os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter
    sys.path.insert(0, os.path.abspath(root))
    sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))
    import torch
    import triton

    import loop_loads
    from kda_explained import fast

    loop_loads.launch_on_this_cpu()  # the H100/H200 launch rules (132 SMs)
    os.makedirs(out_dir, exist_ok=True)
    print(f"triton {triton.__version__}, sm_90a, kda_explained from {os.path.dirname(os.path.dirname(os.path.abspath(fast.__file__)))}")

    def inputs(B, T, H, dtype=torch.bfloat16, seed=0):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(B, T, H, 128, generator=g).to(dtype) for _ in range(3))
        gate = -torch.rand(B, T, H, 128, generator=g)
        beta = torch.rand(B, T, H, generator=g).to(dtype)
        return q, k, v, gate, beta

    runs = []
    for name, (B, T, H) in loop_loads.SHAPES.items():
        q, k, v, gate, beta = inputs(B, T, H)
        loop_loads.captured.clear()
        with torch.inference_mode():
            fast.chunk_kda(q, k, v, gate, beta)
            fast.chunk_kda(q, k, v, gate, beta, use_gate_in_kernel=True, A_log=torch.zeros(H),
                           dt_bias=torch.zeros(H * 128), use_qk_l2norm_in_kernel=True,
                           use_beta_sigmoid_in_kernel=True)
        runs.append((f"{name} forward", list(loop_loads.captured)))
        for options in (False, True):
            loop_loads.captured.clear()
            xs = [x.clone().requires_grad_(True) for x in (q, k, v, gate, beta)]
            extra = dict(use_gate_in_kernel=True, A_log=torch.zeros(H, requires_grad=True),
                         dt_bias=torch.zeros(H * 128, requires_grad=True), use_qk_l2norm_in_kernel=True,
                         use_beta_sigmoid_in_kernel=True) if options else {}
            o, _ = fast.chunk_kda(*xs, output_final_state=True, **extra)
            o.float().sum().backward()
            runs.append((f"{name} training{' with options' if options else ''}", list(loop_loads.captured)))
    # decode: one token per sequence, plain and on a state pool
    q, k, v, gate, beta = inputs(256, 1, 32)
    loop_loads.captured.clear()
    with torch.inference_mode():
        fast.fused_recurrent_kda(q, k, v, gate, beta, initial_state=torch.zeros(256, 32, 128, 128),
                                 output_final_state=True)
        fast.fused_recurrent_kda(q, k, v, gate, beta, initial_state=torch.zeros(300, 32, 128, 128),
                                 ssm_state_indices=torch.arange(256))
    runs.append(("decode", list(loop_loads.captured)))

    seen = {}
    for what, launches in runs:
        for fn, args, kwargs in launches:
            key = (fn.fn.__name__, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
            if key in seen:
                continue
            tag = hashlib.sha1(repr(key).encode()).hexdigest()[:10]
            path = os.path.join(out_dir, f"{fn.fn.__name__}__{tag}.ptx")
            seen[key] = path
            kernel = loop_loads.compile_launch(fn, args, kwargs)
            with open(path, "w") as f:
                f.write(f"// {what}: {fn.fn.__name__} {dict(key[1])}\n")
                f.write(_strip_debug(kernel.asm["ptx"]))
    print(f"{len(seen)} distinct launches written to {out_dir}")


def _read(folder: str) -> dict:
    """``{file: (kernel, header, PTX without its header line)}``."""
    out = {}
    for name in os.listdir(folder):
        with open(os.path.join(folder, name)) as f:
            header, _, body = f.read().partition("\n")
        out[name] = (name.split("__")[0], header, body)
    return out


def compare(before: str, after: str) -> int:
    """Pair each launch after with one before: by file name (kernel and compile-time constants), or,
    for a launch whose constants changed name only (a constant removed or renamed), by identical
    PTX of the same kernel. Lists what has no identical partner; exit code 1 if anything has none."""
    a, b = _read(before), _read(after)
    by_body = {}
    for name, (kernel, _, body) in a.items():
        by_body.setdefault((kernel, body), []).append(name)
    differ, same, renamed = [], 0, 0
    for name, (kernel, header, body) in sorted(b.items()):
        if name in a and a[name][2] == body:
            same += 1
        elif (kernel, body) in by_body:
            renamed += 1
        else:
            differ.append(name)
            print(f"differs: {name}\n  {header}")
            if name in a:
                x, y = a[name][2].splitlines(), body.splitlines()
                changed = [d for d in difflib.unified_diff(x, y, lineterm="", n=0) if d[:1] in "+-"][2:]
                print(f"  {len(changed)} lines changed")
                for d in changed[:8]:
                    print(f"    {d}")
    matched = {n for (k, body) in ((v[0], v[2]) for v in b.values()) for n in by_body.get((k, body), [])}
    lost = [n for n in sorted(a) if n not in b and n not in matched]
    for name in lost:
        print(f"only before: {name}\n  {a[name][1]}")
    print(f"{same} launches identical, {renamed} identical under renamed constants, {len(differ)} differ, "
          f"{len(lost)} only before")
    return 1 if differ or lost else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", nargs="?")
    ap.add_argument("--root", default=os.path.join(os.path.dirname(__file__), "..", ".."))
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    a = ap.parse_args()
    if a.compare:
        sys.exit(compare(*a.compare))
    if not a.out_dir:
        ap.error("OUT_DIR is required (or --compare BEFORE AFTER)")
    snapshot(a.out_dir, a.root)


if __name__ == "__main__":
    main()
