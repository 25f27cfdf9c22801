"""``python -m kda_explained.experiments.synthetic``: the report's synthetic tasks (§5.1, Fig. 4) on the ladder.

Trains a :class:`~kda_explained.experiments.model.TinyLM` per task, mixer, length and
seed, and writes ``OUT/NAME.json`` (every run's record, the set-up, the machine, the
command; ``NAME`` is ``synthetic`` unless ``--name`` says otherwise) and ``OUT/NAME.png``
(per task: peak accuracy against length for each mixer; accuracy against training
step at one length)::

    python -m kda_explained.experiments.synthetic --quick --out /tmp/synthetic     # small MQAR, CPU, minutes
    python -m kda_explained.experiments.synthetic --preset cpu --threads 1 --out benchmarks/results
    python -m kda_explained.experiments.synthetic --preset report --jobs 8 --name report --out DIR     # GPU, days
    python -m kda_explained.experiments.synthetic --preset gpu --jobs 6 --name synthetic_gpu --out DIR  # GPU, minutes
    python -m kda_explained.experiments.synthetic --task palindrome --models gdn kda --seq-lens 64 128 --out DIR
    python -m kda_explained.experiments.synthetic --replot --out benchmarks/results        # redraw from the JSON

A preset (:data:`PRESETS`) fixes every setting; flags override single ones.
``report`` is the report's own setting (:data:`REPORT`: 2 layers, 2 heads of width 128,
at most 20k steps, learning rates {5e-5, 1e-4, 5e-4, 1e-3}, lengths 256 to 2048): a
GPU job of days. ``cpu`` is the scaled-down run whose results are committed in
``benchmarks/results/synthetic.json``; the JSON lists how it differs from ``report``
(:func:`report_differences`). ``--jobs N`` runs the independent (task, mixer) groups
in ``N`` processes at once, which suits a GPU (these models are far too small to fill
one); a group's records are written when the whole group has finished.

**Learning rate.** With several ``lrs`` each mixer is first trained at every one of
them on one length (``sweep_len``) with the first seed, per task; the rate with the
best peak accuracy (ties: the lower final loss) is then used at every length and
seed. Those sweep runs are kept in the JSON (``"phase": "sweep"``).

The delta-rule mixers run on the Triton kernels when the device is a GPU
(``--backend auto``), on :func:`kda_explained.chunked.kda` otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .mixers import BACKENDS, MIXERS
from .model import ModelConfig
from .progress import Progress
from .tasks import TASKS, make_task
from .train import TrainConfig, resolve_backend, train

__all__ = ["Setup", "REPORT", "PRESETS", "report_differences", "run", "run_group", "summarize", "plot", "main"]


@dataclass(frozen=True)
class Setup:
    """Every setting of one invocation: which runs, at which sizes, for how long.

    ``task_params`` maps a task name to its generator's settings
    (:mod:`kda_explained.experiments.tasks`). ``sweep_len = None`` sweeps at the middle
    length; ``convergence_len = None`` plots convergence at the middle length too.
    """

    tasks: Tuple[str, ...] = ("palindrome", "mqar", "stack")
    models: Tuple[str, ...] = MIXERS
    seq_lens: Tuple[int, ...] = (32, 64, 128)
    seeds: Tuple[int, ...] = (0, 1)
    lrs: Tuple[float, ...] = (1e-3,)
    sweep_len: Optional[int] = None
    convergence_len: Optional[int] = None
    num_layers: int = 2
    num_heads: int = 2
    head_dim: int = 16
    hidden_size: Optional[int] = None
    steps: int = 400
    batch_size: int = 32
    eval_every: int = 25
    eval_size: int = 256
    chunk_size: int = 16
    task_params: Dict[str, Dict[str, object]] = field(default_factory=dict)

    def __post_init__(self):
        for name, allowed in (("tasks", TASKS), ("models", MIXERS)):
            bad = [x for x in getattr(self, name) if x not in allowed]
            if bad or not getattr(self, name):
                raise ValueError(f"{name}: expected one or more of {list(allowed)}, got {list(getattr(self, name))}")
        if not self.seq_lens or any(not isinstance(t, int) or t < 4 for t in self.seq_lens):
            raise ValueError(f"seq_lens: expected one or more ints >= 4, got {list(self.seq_lens)}")
        if not self.lrs or any(lr <= 0 for lr in self.lrs):
            raise ValueError(f"lrs: expected one or more positive learning rates, got {list(self.lrs)}")
        if not self.seeds:
            raise ValueError("seeds: expected at least one seed, got none")

    @property
    def sweep_at(self) -> int:
        lens = sorted(self.seq_lens)
        return self.sweep_len if self.sweep_len is not None else lens[(len(lens) - 1) // 2]

    def task(self, name: str):
        return make_task(name, **self.task_params.get(name, {}))


#: The report's setting (§5.1) as far as it states it (model, steps, learning rates, lengths, 64 stacks);
#: batch size, vocabularies and evaluation are this library's choices.
REPORT = Setup(
    seq_lens=(256, 512, 1024, 2048),
    seeds=(0,),
    lrs=(5e-5, 1e-4, 5e-4, 1e-3),
    num_layers=2,
    num_heads=2,
    head_dim=128,
    steps=20000,
    batch_size=64,
    eval_every=500,
    eval_size=1024,
    chunk_size=64,
    task_params={"palindrome": {"vocab": 64}, "mqar": {"n_keys": 512, "n_values": 512},
                 "stack": {"n_stacks": 64, "n_values": 64}},
)

#: Named settings; flags override single fields.
PRESETS: Dict[str, Setup] = {
    "report": REPORT,
    # the committed CPU run (benchmarks/results/synthetic.json): sized for ~40 min on two shared cores
    "cpu": Setup(
        seq_lens=(32, 64, 128),
        seeds=(0, 1),
        lrs=(3e-3, 1e-2),
        sweep_len=32,
        head_dim=16,
        hidden_size=64,
        steps=200,
        batch_size=16,
        eval_every=20,
        eval_size=128,
        task_params={"palindrome": {"vocab": 16}, "mqar": {"n_keys": 16, "n_values": 16},
                     "stack": {"n_stacks": 8, "n_values": 32}},
    ),
    # the report's model, lengths and learning-rate grid for KDA and the gated delta rule, cut to 600
    # steps: sized (from the kernels' training times) for about six minutes of one H100 or H200 with
    # --jobs 6, one process per (task, mixer) group
    "gpu": replace(REPORT, models=("gdn", "kda"), steps=600, eval_every=100, eval_size=256),
    # --quick: a small MQAR on the CPU in a few minutes
    "quick": Setup(
        tasks=("mqar",),
        seq_lens=(32, 64),
        seeds=(0,),
        lrs=(1e-2,),
        head_dim=16,
        hidden_size=64,
        steps=200,
        batch_size=16,
        eval_every=20,
        eval_size=128,
        task_params={"mqar": {"n_keys": 16, "n_values": 16}},
    ),
}


def report_differences(setup: Setup) -> List[str]:
    """What ``setup`` changes from the report's setting, one sentence each.

    >>> report_differences(REPORT)[-1]
    'Mamba2 (in the report) is not a rung of this ladder and is not run; softmax attention is added as a reference'
    >>> report_differences(replace(REPORT, head_dim=16))[0]
    'head dimension 16 (report: 128)'
    """
    out = []
    for name, what in (("num_layers", "layers"), ("num_heads", "heads"), ("head_dim", "head dimension")):
        if getattr(setup, name) != getattr(REPORT, name):
            out.append(f"{what} {getattr(setup, name)} (report: {getattr(REPORT, name)})")
    if setup.steps != REPORT.steps:
        out.append(f"at most {setup.steps} training steps (report: {REPORT.steps})")
    if tuple(setup.seq_lens) != tuple(REPORT.seq_lens):
        out.append(f"lengths {list(setup.seq_lens)} (report: {list(REPORT.seq_lens)})")
    if tuple(setup.lrs) != tuple(REPORT.lrs):
        out.append(f"learning rates {list(setup.lrs)} (report: {list(REPORT.lrs)})")
    if len(setup.lrs) > 1:
        out.append(f"the learning rate is chosen per task and mixer at one length ({setup.sweep_at}) with one seed, "
                   f"then kept for every length and seed")
    stacks = setup.task_params.get("stack", {}).get("n_stacks", 64)
    if "stack" in setup.tasks and stacks != 64:
        out.append(f"{stacks} stacks (report: 64)")
    out.append("token formats, vocabularies, batch size, evaluation set and optimiser are this library's choices, "
               "not taken from the report")
    out.append("Mamba2 (in the report) is not a rung of this ladder and is not run; softmax attention is added as "
               "a reference")
    return out


# ----------------------------------------------------------------------------------------------
# running
# ----------------------------------------------------------------------------------------------


def _model_config(setup: Setup, task, mixer: str, backend: str) -> ModelConfig:
    return ModelConfig(task.vocab_size, mixer=mixer, num_layers=setup.num_layers, num_heads=setup.num_heads,
                       head_dim=setup.head_dim, hidden_size=setup.hidden_size, backend=backend,
                       chunk_size=setup.chunk_size)


def _train_config(setup: Setup, lr: float, seed: int, device: str) -> TrainConfig:
    return TrainConfig(steps=setup.steps, batch_size=setup.batch_size, lr=lr, eval_every=setup.eval_every,
                       eval_size=setup.eval_size, seed=seed, device=device)


def _final_loss(record: dict) -> float:
    losses = record["loss_curve"]["loss"]
    return losses[-1] if losses else float("inf")


def machine_info(device: str) -> Dict[str, object]:
    """Date (UTC), device, versions and threads: what the JSON needs to be read later."""
    dev = torch.device(device)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": f"cuda ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "cpu",
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }


def run_group(setup: Setup, task_name: str, mixer: str, *, device: str = "cpu", backend: str = "auto",
              progress: Optional[Progress] = None, on_record=None) -> List[dict]:
    """Every run of one task and one mixer: the learning-rate sweep (with several ``lrs``), then each length and seed.

    Groups share nothing, so they can run side by side (``--jobs``). ``on_record`` (optional)
    is called with each record as it is made.
    """
    task = setup.task(task_name)
    records: List[dict] = []

    def one(T, lr, seed, phase):
        if progress is not None:
            progress.set_description(f"{task.name} {mixer} T={T} lr={lr:g} seed={seed}")
        rec = train(task, _model_config(setup, task, mixer, backend), T, _train_config(setup, lr, seed, device),
                    progress=progress)
        rec["phase"] = phase
        rec["task_params"] = task.params()
        records.append(rec)
        if on_record is not None:
            on_record(rec)
        return rec

    lr, best = setup.lrs[0], None
    if len(setup.lrs) > 1:  # 1. the learning rate, at one length with the first seed
        sweep = [one(setup.sweep_at, rate, setup.seeds[0], "sweep") for rate in setup.lrs]
        best = max(sweep, key=lambda r: (r["accuracy"], -_final_loss(r)))
        lr = best["lr"]
    for T in setup.seq_lens:  # 2. every length and seed at that rate
        for seed in setup.seeds:
            if best is not None and T == best["seq_len"] and seed == best["seed"]:
                rec = dict(best, phase="main", reused_from_sweep=True)  # the same run: not trained twice
                records.append(rec)
                if on_record is not None:
                    on_record(rec)
                continue
            one(T, lr, seed, "main")
    return records


def _run_group_quietly(args) -> List[dict]:
    setup, task_name, mixer, device, backend, threads = args
    torch.set_num_threads(threads)
    return run_group(setup, task_name, mixer, device=device, backend=backend)


def _group_steps(setup: Setup) -> int:
    sweep = len(setup.lrs) if len(setup.lrs) > 1 else 0
    reused = 1 if sweep else 0
    return (sweep + len(setup.seq_lens) * len(setup.seeds) - reused) * setup.steps


def run(setup: Setup, *, device: str = "cpu", backend: str = "auto", out: Optional[str] = None,
        command: str = "", jobs: int = 1, name: str = "synthetic", stream=None) -> dict:
    """Every run of ``setup``; returns the results dict and, with ``out``, rewrites ``out/NAME.json`` as runs end.

    Writing as runs end keeps a long job's finished runs if it is stopped. With ``jobs > 1``
    the (task, mixer) groups (:func:`run_group`) run in that many processes at once;
    the progress bar then advances a group at a time.
    """
    results = {
        "benchmark": "synthetic",
        "command": command,
        "machine": machine_info(device),
        "setup": asdict(setup),
        "report_setup": {"num_layers": REPORT.num_layers, "num_heads": REPORT.num_heads,
                         "head_dim": REPORT.head_dim, "max_steps": REPORT.steps, "lrs": list(REPORT.lrs),
                         "seq_lens": list(REPORT.seq_lens), "n_stacks": 64,
                         "models": ["Mamba2", "Gated DeltaNet", "KDA"]},
        "differs_from_report": report_differences(setup),
        "backend": resolve_backend(ModelConfig(1, backend=backend), device),
        "jobs": jobs,
        "records": [],
        "summary": {},
        "complete": False,
    }
    groups = [(task, mixer) for task in setup.tasks for mixer in setup.models]
    bar = Progress(len(groups) * _group_steps(setup), stream=stream)

    def save():
        if out is not None:
            os.makedirs(out, exist_ok=True)
            results["records"].sort(key=_record_order(setup))
            results["summary"] = summarize(results["records"])
            with open(os.path.join(out, name + ".json"), "w") as f:
                json.dump(results, f, indent=1)

    def keep(rec):
        results["records"].append(rec)
        save()

    if jobs <= 1:
        for task, mixer in groups:
            run_group(setup, task, mixer, device=device, backend=backend, progress=bar, on_record=keep)
    else:
        import concurrent.futures
        import multiprocessing

        threads = max(1, torch.get_num_threads() // jobs)
        work = [(setup, task, mixer, device, backend, threads) for task, mixer in groups]
        # spawn: a forked child of a process that touched CUDA cannot use it
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(_run_group_quietly, w): w for w in work}
            for fut in concurrent.futures.as_completed(futures):
                _, task, mixer, *_ = futures[fut]
                bar.set_description(f"{task} {mixer} done")
                results["records"].extend(fut.result())
                save()
                bar.update(_group_steps(setup))
    bar.close()
    results["complete"] = True
    save()
    return results


def _record_order(setup: Setup):
    tasks, models = list(setup.tasks), list(setup.models)
    return lambda r: (tasks.index(r["task"]), r["phase"] != "sweep", r["seq_len"], r["seed"], models.index(r["model"]),
                      r["lr"])


def summarize(records: Sequence[dict]) -> Dict[str, Dict[str, Dict[str, dict]]]:
    """``summary[task][model][seq_len]``: mean, min, max of the peak accuracy over seeds, and the seeds' count.

    >>> s = summarize([{"phase": "main", "task": "mqar", "model": "kda", "seq_len": 64, "accuracy": a, "lr": 1e-3}
    ...                for a in (0.5, 1.0)])
    >>> s["mqar"]["kda"]["64"]
    {'mean': 0.75, 'min': 0.5, 'max': 1.0, 'runs': 2, 'lr': 0.001}
    """
    groups: Dict[Tuple[str, str, int], List[dict]] = {}
    for r in records:
        if r.get("phase", "main") == "main":
            groups.setdefault((r["task"], r["model"], r["seq_len"]), []).append(r)
    out: Dict[str, Dict[str, Dict[str, dict]]] = {}
    for (task, model, T), rs in sorted(groups.items()):
        acc = [r["accuracy"] for r in rs]
        out.setdefault(task, {}).setdefault(model, {})[str(T)] = {
            "mean": float(np.mean(acc)), "min": float(min(acc)), "max": float(max(acc)), "runs": len(acc),
            "lr": rs[0]["lr"]}
    return out


# ----------------------------------------------------------------------------------------------
# the figure
# ----------------------------------------------------------------------------------------------

#: One colour per mixer, in every figure of the docs.
COLORS = {"linear": "tab:gray", "deltanet": "tab:green", "gdn": "tab:blue", "kda": "tab:red", "softmax": "black"}
LABELS = {"linear": "linear attention", "deltanet": "DeltaNet", "gdn": "Gated DeltaNet", "kda": "KDA",
          "softmax": "softmax attention"}


def plot(results: dict, path: str) -> None:
    """Per task, two panels: peak accuracy against length (mean over seeds, bars to min and max), and
    evaluation accuracy against step at ``convergence_len`` (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setup = results["setup"]
    tasks = [t for t in setup["tasks"] if any(r["task"] == t for r in results["records"])]
    lens = sorted(setup["seq_lens"])
    conv_len = setup["convergence_len"] or lens[(len(lens) - 1) // 2]
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.4 * len(tasks)), squeeze=False)
    main = [r for r in results["records"] if r.get("phase", "main") == "main"]
    for row, task in enumerate(tasks):
        ax, ax2 = axes[row]
        for model in setup["models"]:
            rs = [r for r in main if r["task"] == task and r["model"] == model]
            if not rs:
                continue
            lens = sorted({r["seq_len"] for r in rs})
            acc = [[r["accuracy"] for r in rs if r["seq_len"] == T] for T in lens]
            mean = np.array([np.mean(a) for a in acc])
            err = np.array([[m - min(a) for m, a in zip(mean, acc)], [max(a) - m for m, a in zip(mean, acc)]])
            ax.errorbar(lens, mean, yerr=err, marker="o", capsize=3, color=COLORS[model], label=LABELS[model])
            curves = [r["accuracy_curve"] for r in rs if r["seq_len"] == conv_len]
            if curves:
                longest = max(curves, key=lambda c: len(c["step"]))
                steps = longest["step"]
                # a run stopped early at 100% stays there: pad its curve with its last value
                vals = np.array([c["accuracy"] + [c["accuracy"][-1]] * (len(steps) - len(c["accuracy"]))
                                 for c in curves])
                ax2.plot(steps, vals.mean(0), color=COLORS[model], label=LABELS[model])
        chance = 1.0 / _answers(results, task)
        for a in (ax, ax2):
            a.axhline(chance, color="gray", ls=":", lw=1)
            a.set_ylim(-0.02, 1.02)
            a.grid(alpha=0.3)
        ax.set_xscale("log", base=2)
        ax.set_xticks(setup["seq_lens"], [str(t) for t in setup["seq_lens"]])
        ax.set_xlabel("sequence length")
        ax.set_ylabel("peak accuracy")
        ax.set_title(f"{task}: accuracy against length (mean, min-max over seeds)", fontsize=10)
        ax2.set_xlabel("training step")
        ax2.set_ylabel("eval accuracy")
        ax2.set_title(f"{task}: convergence at length {conv_len} (mean over seeds)", fontsize=10)
    axes[0, 0].legend(fontsize=8, loc="lower left")
    m = results["machine"]
    fig.suptitle(f"Synthetic tasks, {setup['num_layers']} layers x {setup['num_heads']} heads x {setup['head_dim']}, "
                 f"at most {setup['steps']} steps ({m['device']}, {m['date'][:10]}); dotted: chance", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _answers(results: dict, task: str) -> int:
    for r in results["records"]:
        if r["task"] == task:
            return make_task(task, **{k: v for k, v in r["task_params"].items()
                                      if k not in ("task", "vocab_size")}).answers
    return 1


# ----------------------------------------------------------------------------------------------
# the command line
# ----------------------------------------------------------------------------------------------


def parse_setup(argv: Optional[Sequence[str]] = None) -> Tuple[Setup, argparse.Namespace]:
    """The :class:`Setup` the command line asks for, and the remaining options."""
    ap = argparse.ArgumentParser(prog="python -m kda_explained.experiments.synthetic",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="the settings to start from (cpu)")
    ap.add_argument("--quick", action="store_true", help="the 'quick' preset: a small MQAR on the CPU in minutes")
    ap.add_argument("--task", nargs="+", choices=sorted(TASKS), help="tasks (default: the preset's)")
    ap.add_argument("--models", nargs="+", choices=MIXERS, help="mixers (default: the preset's)")
    ap.add_argument("--seq-lens", nargs="+", type=int, help="sequence lengths")
    ap.add_argument("--seeds", nargs="+", type=int, help="seeds")
    ap.add_argument("--lrs", nargs="+", type=float, help="learning rates (several: a sweep at --sweep-len)")
    ap.add_argument("--sweep-len", type=int, help="length of the learning-rate sweep (default: the middle one)")
    ap.add_argument("--steps", type=int, help="most training steps per run")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--head-dim", type=int)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--backend", choices=BACKENDS, default="auto", help="core of the delta-rule mixers")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: these models are too small to gain from more, and on a busy "
                         "machine threads that wait for each other cost more than they compute)")
    ap.add_argument("--jobs", type=int, default=1, help="(task, mixer) groups run at once, each in its own process")
    ap.add_argument("--replot", action="store_true", help="only redraw OUT/NAME.png from OUT/NAME.json")
    ap.add_argument("--out", required=True, help="directory for the results")
    ap.add_argument("--name", default="synthetic", help="file name of the results: OUT/NAME.json, OUT/NAME.png")
    args = ap.parse_args(argv)
    setup = PRESETS["quick" if args.quick else args.preset]
    overrides = {"tasks": args.task, "models": args.models, "seq_lens": args.seq_lens, "seeds": args.seeds,
                 "lrs": args.lrs, "sweep_len": args.sweep_len, "steps": args.steps, "batch_size": args.batch_size,
                 "head_dim": args.head_dim}
    setup = replace(setup, **{k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items()
                              if v is not None})
    return setup, args


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """The command line (module docstring); returns the results dict it wrote."""
    setup, args = parse_setup(argv)
    if args.replot:
        with open(os.path.join(args.out, args.name + ".json")) as f:
            results = json.load(f)
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        words = list(sys.argv[1:] if argv is None else argv)
        command = "python -m kda_explained.experiments.synthetic " + " ".join(shlex.quote(w) for w in words)
        results = run(setup, device=args.device, backend=args.backend, out=args.out, command=command, jobs=args.jobs,
                      name=args.name)
    try:
        plot(results, os.path.join(args.out, args.name + ".png"))
    except ImportError as e:  # matplotlib is optional (the docs and bench extras)
        print(f"no plot: {e}", file=sys.stderr)
    _print_summary(results)
    return results


def _print_summary(results: dict) -> None:
    lens = results["setup"]["seq_lens"]
    for task, models in results["summary"].items():
        print(f"\n{task}: peak accuracy, mean over seeds (min-max)")
        print(f"{'model':<10}" + "".join(f"{'T=' + str(T):>20}" for T in lens))
        for model, by_len in models.items():
            cells = [by_len.get(str(T)) for T in lens]
            print(f"{model:<10}" + "".join(f"{c['mean']:>8.3f} ({c['min']:.2f}-{c['max']:.2f})" if c else f"{'':>20}"
                                           for c in cells))


if __name__ == "__main__":
    main()
