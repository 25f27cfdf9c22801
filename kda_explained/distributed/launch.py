"""Start a few local processes joined in one ``torch.distributed`` group: for tests, notebooks and examples.

:func:`spawn` runs ``fn(*args)`` in ``world_size`` fresh Python processes (the
``spawn`` start method), each a rank of a group on ``127.0.0.1`` with a free port
(gloo by default, so it runs on any CPU), and returns what each rank returned. ``fn``
must be importable by name (a module-level function of an importable module), and
what it returns must pickle; plain numbers, lists and dicts travel best.

A real job starts its ranks with ``torchrun`` instead, one per GPU
(``benchmarks/cp_bench.py``).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_lib
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, List, Sequence

__all__ = ["spawn", "free_port"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_main(fn, rank: int, world_size: int, port: int, backend: str, args, results, timeout: float) -> None:
    import torch
    import torch.distributed as dist

    # processes share the machine's cores: one thread each keeps them from fighting over them
    torch.set_num_threads(1)
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))
        results.put((rank, True, fn(*args)))
    except BaseException:  # noqa: BLE001 - the parent re-raises it with this rank's traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world_size: int, args: Sequence[Any] = (), *, backend: str = "gloo",
          timeout: float = 300.0) -> List[Any]:
    """Run ``fn(*args)`` on ranks ``0 .. world_size - 1`` of a fresh local group; return their results in rank order.

    Inside ``fn``, ``torch.distributed`` is initialised (``get_rank()``, the default
    group). If a rank raises, the others are stopped and :class:`RuntimeError` carries
    that rank's traceback; so it does if the ranks take longer than ``timeout`` seconds.
    For example (the doctest of :func:`~kda_explained.distributed.context_parallel.context_parallel_kda`
    runs one; starting processes takes seconds, so one is enough)::

        from kda_explained.distributed import examples
        spawn(examples.rank_and_size, world_size=2)   # [(0, 2), (1, 2)]
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected a positive int, got {world_size!r}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, rank, world_size, port, backend, tuple(args), results, timeout),
                         daemon=True) for rank in range(world_size)]
    env_before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # read by each child's OpenMP runtime at start
    try:
        for p in procs:
            p.start()
    finally:
        if env_before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_before
    out: List[Any] = [None] * world_size
    pending = set(range(world_size))
    deadline = time.monotonic() + timeout
    try:
        while pending:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue_lib.Empty:
                dead = [i for i in pending if not procs[i].is_alive() and procs[i].exitcode not in (0, None)]
                if dead:
                    raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ranks {sorted(pending)} did not finish within {timeout} s") from None
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} raised:\n{value}")
            out[rank] = value
            pending.discard(rank)
    finally:
        for p in procs:
            if p.is_alive() and pending:
                p.terminate()
            p.join(timeout=10)
    return out
