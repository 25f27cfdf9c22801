"""The benchmark scripts run: ``benchmarks/gpu_decode.py --cpu-smoke`` on a tiny model, in seconds.

Speed is never asserted here (``DESIGN.md``: performance is measured, not asserted); the
test checks that the script runs every mode it can on the CPU, records why it skips the
others, and writes its JSON and plot where it was told to.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def gpu_decode():
    yield load_script("gpu_decode")
    torch._dynamo.reset()  # the compiled mode's caches stay with the script


def test_gpu_decode_cpu_smoke(gpu_decode, tmp_path):
    pytest.importorskip("matplotlib")
    path = Path(gpu_decode.main(["--cpu-smoke", "--modes", "eager,graph", "--out", str(tmp_path)]))
    assert path == tmp_path / "gpu_decode_cpu_smoke.json"
    assert (tmp_path / "gpu_decode_cpu_smoke.png").stat().st_size > 0
    run = json.loads(path.read_text())
    assert run["device"] and run["date"] and run["torch"] == torch.__version__

    measured = {(r["model"], r["mode"], r["batch_kind"], r["context"]) for r in run["rows"] if "ms_per_token" in r}
    assert measured == {(m, "eager", kind, L) for m in ("hybrid", "all_attention") for kind in ("single", "fill")
                        for L in gpu_decode.SMOKE["contexts"]}
    for r in run["rows"]:
        assert r["ms_per_token"] == pytest.approx(r["ms_per_step"] / r["batch"])
        assert r["batch"] == 1 if r["batch_kind"] == "single" else 1 <= r["batch"] <= gpu_decode.SMOKE["max_batch"]
        assert r["cache_bytes"]["total"] > 0
    # no CUDA graphs on the CPU: the mode is skipped, with its reason in the record
    assert set(run["skipped"]) == {"hybrid/graph", "all_attention/graph"}
    assert all("CUDA" in why for why in run["skipped"].values())


def test_gpu_decode_compiled_smoke(gpu_decode, tmp_path):
    """The compiled mode at one context (tracing the model takes most of the seconds here)."""
    path = Path(gpu_decode.main(["--cpu-smoke", "--modes", "compiled", "--batches", "single", "--max-context", "16",
                                 "--out", str(tmp_path)]))
    rows = json.loads(path.read_text())["rows"]
    assert {(r["model"], r["mode"], r["context"]) for r in rows} == {("hybrid", "compiled", 16),
                                                                     ("all_attention", "compiled", 16)}
    assert all(r["ms_per_token"] > 0 and r["graph_breaks"] >= 0 and r["compile_backend"] == "eager" for r in rows)


def test_gpu_decode_cpu_run_never_writes_the_results_folder(gpu_decode):
    with pytest.raises(SystemExit, match="does not write into benchmarks/results"):
        gpu_decode.main(["--cpu-smoke", "--modes", "eager", "--out", gpu_decode.RESULTS])


def test_gpu_decode_rejects_unknown_modes(gpu_decode):
    with pytest.raises(SystemExit, match=r"--modes: expected a comma-separated subset"):
        gpu_decode.main(["--cpu-smoke", "--modes", "eager,turbo"])
