"""The synthetic tasks of the report's §5.1 (``kda_explained.experiments``): generators, mixers, trainer, CLI.

Every answer a generator asks for is recomputed here from the input tokens alone,
reading them left to right (so also causally), by a solver written independently
of the generator. The mixers are checked against the ladder of ``naive`` where they
have their own code (linear attention), and for what makes the rungs differ (which
parameters they add, the shape of their decay). Training and the command line run
at toy sizes: the whole file takes seconds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kda_explained.experiments import (
    IGNORE,
    MIXERS,
    MQAR,
    ModelConfig,
    Palindrome,
    Stack,
    TokenMixer,
    TrainConfig,
    count_correct,
    linear_attention,
    make_task,
    train,
)
from kda_explained.experiments import synthetic
from kda_explained.naive import ladder
from kda_explained.testing import TOLERANCES, rel_rms_error


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Toy models on one thread: on a loaded machine two threads spin and wait far longer than they compute."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# ----------------------------------------------------------------------------------------------
# independent solvers: the answer at each position from the tokens up to it
# ----------------------------------------------------------------------------------------------


def solve_palindrome(task: Palindrome, row: np.ndarray) -> list:
    out, seen, after_sep = [], [], None
    for t, tok in enumerate(row):
        if after_sep is None and tok == task.sep:
            after_sep = t
        if after_sep is None:
            seen.append(tok)
            out.append(IGNORE)
        else:
            out.append(seen[len(seen) - 1 - (t - after_sep)])  # the j-th answer is the j-th token from the end
    return out


def solve_mqar(task: MQAR, row: np.ndarray) -> list:
    P = task.pairs(len(row))
    memory, out = {}, []
    for t, tok in enumerate(row):
        if t < 2 * P:
            if t % 2 == 1:
                memory[row[t - 1]] = tok  # a value follows its key
            out.append(IGNORE)
        else:
            out.append(memory[tok])
    return out


def solve_stack(task: Stack, row: np.ndarray) -> list:
    stacks = {s: [] for s in range(task.n_stacks)}
    out = []
    for t, tok in enumerate(row):
        if t % 2 == 0:  # a stack name
            out.append(IGNORE)
            continue
        s = row[t - 1] - task.n_values
        if tok == task.pop:
            out.append(stacks[s].pop())
        else:
            stacks[s].append(tok)
            out.append(IGNORE)
    return out


SOLVERS = {"palindrome": solve_palindrome, "mqar": solve_mqar, "stack": solve_stack}
SMALL = {"palindrome": Palindrome(vocab=5), "mqar": MQAR(n_keys=12, n_values=7), "stack": Stack(n_stacks=3, n_values=5)}


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(sorted(SMALL)), B=st.integers(1, 4), half=st.integers(2, 40), seed=st.integers(0, 2**32 - 1))
@example(name="stack", B=1, half=1, seed=0)
@example(name="palindrome", B=1, half=1, seed=0)
def test_answers_follow_from_the_tokens(name, B, half, seed):
    task = SMALL[name]
    T = 2 * half if name != "mqar" else max(2 * half, 9)  # MQAR needs room for a pair and a query
    batch = task.sample(B, T, rng=seed)
    assert batch.inputs.shape == batch.targets.shape == (B, T)
    assert batch.inputs.dtype == batch.targets.dtype == np.int64
    assert batch.inputs.min() >= 0 and batch.inputs.max() < task.vocab_size
    asked = batch.targets[batch.targets != IGNORE]
    assert asked.size > 0 or name == "stack"  # a short stack sequence may pop nothing
    for row, targets in zip(batch.inputs, batch.targets):
        assert SOLVERS[name](task, row) == targets.tolist()


def test_queries_per_task():
    assert Palindrome().sample(3, 64, rng=0).queries == 3 * 32  # the reversed half
    assert MQAR(n_pairs=5).sample(2, 40, rng=0).queries == 2 * 30  # T - 2P
    b = Stack(n_stacks=4).sample(2, 64, rng=0)
    assert b.queries == int((b.inputs == Stack(n_stacks=4).pop).sum())  # one per POP


@pytest.mark.parametrize("name", sorted(SMALL))
def test_seeding(name):
    task = SMALL[name]
    a, b, c = (task.sample(4, 32, rng=s) for s in (7, 7, 8))
    assert np.array_equal(a.inputs, b.inputs) and np.array_equal(a.targets, b.targets)
    assert not np.array_equal(a.inputs, c.inputs)
    gen = np.random.default_rng(7)  # a Generator advances: two draws differ
    assert not np.array_equal(task.sample(4, 32, gen).inputs, task.sample(4, 32, gen).inputs)


def test_mqar_keys_are_distinct_and_stack_never_pops_empty():
    b = MQAR(n_keys=16, n_values=4, n_pairs=16).sample(8, 40, rng=1)
    for row in b.inputs:
        assert len(set(row[:32:2].tolist())) == 16
    task = Stack(n_stacks=1, n_values=3, p_push=0.05)  # pops whenever it can
    b = task.sample(8, 100, rng=2)
    assert b.queries > 0
    for row in b.inputs:  # pushes so far >= pops so far, at every step
        ops = row[1::2]
        assert np.all(np.cumsum(np.where(ops == task.pop, -1, 1)) >= 0)


@pytest.mark.parametrize("call, match, error", [
    (lambda: Palindrome().sample(2, 31, rng=0), "seq_len", ValueError),
    (lambda: Stack().sample(2, 31, rng=0), "seq_len", ValueError),
    (lambda: MQAR(n_keys=4).sample(2, 64, rng=0), "n_pairs", ValueError),
    (lambda: MQAR(n_pairs=4).sample(2, 8, rng=0), "seq_len", ValueError),
    (lambda: Palindrome().sample(0, 8, rng=0), "batch_size", ValueError),
    (lambda: Palindrome().sample(2, 8, rng="x"), "rng", TypeError),
    (lambda: Stack(p_push=1.0), "p_push", ValueError),
    (lambda: make_task("copy"), "name", ValueError),
])
def test_generator_errors_name_the_argument(call, match, error):
    with pytest.raises(error, match=match):
        call()


def test_count_correct_scores_only_queries():
    logits = torch.zeros(1, 3, 4)
    logits[0, :, 2] = 1.0  # always predicts 2
    assert count_correct(logits, torch.tensor([[2, IGNORE, 3]])) == (1, 2)


# ----------------------------------------------------------------------------------------------
# the mixers
# ----------------------------------------------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(T=st.integers(1, 70), C=st.sampled_from([16, 32, 64]), seed=st.integers(0, 1000))
def test_linear_attention_matches_the_ladder(T, C, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, T, 2, 8, generator=g, dtype=torch.float64), torch.randn(2, T, 2, 8, generator=g,
                                                                                    dtype=torch.float64)
    v = torch.randn(2, T, 2, 5, generator=g, dtype=torch.float64)
    ref, _ = ladder.linear_attention(q.numpy(), k.numpy(), v.numpy())
    assert rel_rms_error(linear_attention(q, k, v, chunk_size=C), ref) < TOLERANCES["chunked_f64_vs_naive"]


def test_linear_attention_rejects_grouped_values():
    q = torch.randn(1, 4, 1, 8)
    with pytest.raises(ValueError, match="v"):
        linear_attention(q, q, torch.randn(1, 4, 2, 8))


def test_rungs_add_only_their_own_parameters():
    names = {m: {n for n, _ in TokenMixer(m, 16, 2, 8).named_parameters()} for m in MIXERS}
    shell = names["linear"]
    assert names["softmax"] == shell  # same projections, convolutions and output gate
    assert names["deltanet"] - shell == {"b_proj.weight"}
    assert names["gdn"] - shell == {"b_proj.weight", "a_proj.weight", "A_log", "dt_bias"}
    assert names["kda"] - shell == {"b_proj.weight", "f_a_proj.weight", "f_b_proj.weight", "A_log", "dt_bias"}


def test_decay_is_per_head_for_gdn_and_per_channel_for_kda():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 16)
    g_gdn = TokenMixer("gdn", 16, 2, 8).log_decay(x)
    g_kda = TokenMixer("kda", 16, 2, 8).log_decay(x)
    assert g_gdn.shape == g_kda.shape == (2, 9, 2, 8)
    assert bool((g_gdn <= 0).all() and (g_kda <= 0).all())
    assert torch.equal(g_gdn, g_gdn[..., :1].expand_as(g_gdn))  # one decay for all channels of a head
    assert not torch.allclose(g_kda, g_kda[..., :1].expand_as(g_kda))
    assert TokenMixer("deltanet", 16, 2, 8).log_decay(x) is None


@pytest.mark.parametrize("mixer", MIXERS)
def test_mixers_are_causal(mixer):
    torch.manual_seed(1)
    layer = TokenMixer(mixer, 16, 2, 8, backend="chunked").double()
    x = torch.randn(2, 20, 16, dtype=torch.float64)
    y = x.clone()
    y[:, 13:] = torch.randn(2, 7, 16, dtype=torch.float64)  # change the future only
    with torch.no_grad():
        assert torch.allclose(layer(x)[:, :13], layer(y)[:, :13], atol=1e-12)


def test_fast_backend_computes_the_chunked_mixer():
    """The Triton path (a GPU's default; the interpreter here) gives the chunked path's output and gradients."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(2)
    x = torch.randn(1, 20, 16, device=device)
    fast, ref = TokenMixer("kda", 16, 2, 8, backend="fast"), TokenMixer("kda", 16, 2, 8, backend="chunked")
    ref.load_state_dict(fast.state_dict())
    fast, ref = fast.to(device), ref.to(device)
    outs = []
    for layer in (fast, ref):
        y = layer(x)
        y.square().sum().backward()
        outs.append((y, torch.cat([p.grad.flatten() for p in layer.parameters()])))
    bound = TOLERANCES["fast_tf32_vs_f64" if device == "cuda" else "fast_f32_vs_f64"]  # a GPU may use tf32 dots
    assert rel_rms_error(outs[0][0], outs[1][0]) < bound and rel_rms_error(outs[0][1], outs[1][1]) < bound


def test_mixer_argument_errors():
    with pytest.raises(ValueError, match="mixer"):
        TokenMixer("mamba2", 16, 2, 8)
    with pytest.raises(ValueError, match="backend"):
        TokenMixer("kda", 16, 2, 8, backend="cuda")
    with pytest.raises(ValueError, match="head_dim"):
        TokenMixer("kda", 16, 2, 0)


# ----------------------------------------------------------------------------------------------
# training and the command line
# ----------------------------------------------------------------------------------------------

TINY = MQAR(n_keys=4, n_values=4, n_pairs=2)


def test_training_reduces_the_loss():
    config = TrainConfig(steps=24, batch_size=16, lr=1e-2, eval_every=24, eval_size=32, log_every=6, stop_at=None)
    rec = train(TINY, ModelConfig(TINY.vocab_size, mixer="kda", num_heads=1, head_dim=8), 12, config)
    losses = rec["loss_curve"]["loss"]
    assert rec["steps"] == 24 and len(losses) == 4
    assert losses[-1] < 0.8 * losses[0], losses  # from ~log(vocab) towards and below log(values)
    assert 0.0 <= rec["accuracy"] <= 1.0 and rec["accuracy"] >= rec["final_accuracy"]


def test_training_is_seeded_and_checks_the_vocabulary():
    config = TrainConfig(steps=3, batch_size=4, eval_every=3, eval_size=8)
    model = ModelConfig(TINY.vocab_size, mixer="gdn", num_heads=1, head_dim=8)
    a, b = train(TINY, model, 12, config), train(TINY, model, 12, config)
    assert a["loss_curve"] == b["loss_curve"] and a["accuracy_curve"] == b["accuracy_curve"]
    with pytest.raises(ValueError, match="model_config"):
        train(TINY, ModelConfig(99, mixer="kda", num_heads=1, head_dim=8), 12, config)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)


RECORD_KEYS = {"task", "model", "seq_len", "accuracy", "steps", "lr", "seed", "loss_curve", "wall_time_s", "device"}


def test_cli_writes_well_formed_records(tmp_path):
    argv = ["--quick", "--models", "linear", "kda", "--seq-lens", "8", "16", "--lrs", "1e-2", "3e-3",
            "--steps", "3", "--batch-size", "4", "--head-dim", "8", "--out", str(tmp_path)]
    synthetic.main(argv)
    data = json.loads((tmp_path / "synthetic.json").read_text())
    assert data["complete"] and data["command"].endswith(" ".join(argv))
    assert {"date", "device", "torch"} <= set(data["machine"])
    assert any("head dimension 8" in d for d in data["differs_from_report"])
    main = [r for r in data["records"] if r["phase"] == "main"]
    sweep = [r for r in data["records"] if r["phase"] == "sweep"]
    assert len(sweep) == 2 * 2 and len(main) == 2 * 2  # 2 mixers x 2 rates; 2 mixers x 2 lengths
    for r in data["records"]:
        assert RECORD_KEYS <= set(r)
        assert r["task"] == "mqar" and 0.0 <= r["accuracy"] <= 1.0 and 1 <= r["steps"] <= 3
        assert len(r["loss_curve"]["step"]) == len(r["loss_curve"]["loss"]) >= 1
    for model in ("linear", "kda"):  # the rate chosen in the sweep is the one every main run used
        best = max((r for r in sweep if r["model"] == model),
                   key=lambda r: (r["accuracy"], -r["loss_curve"]["loss"][-1]))
        assert {r["lr"] for r in main if r["model"] == model} == {best["lr"]}
    assert set(data["summary"]["mqar"]) == {"linear", "kda"}
    if (tmp_path / "synthetic.png").exists():  # matplotlib is optional
        assert (tmp_path / "synthetic.png").stat().st_size > 0


def test_report_setup_differs_only_by_protocol_and_library_choices():
    diffs = synthetic.report_differences(synthetic.REPORT)
    assert len(diffs) == 3 and "chosen per task and mixer" in diffs[0] and "Mamba2" in diffs[-1]
    cpu = synthetic.report_differences(synthetic.PRESETS["cpu"])
    assert any("head dimension 16" in d for d in cpu) and any("8 stacks" in d for d in cpu)
