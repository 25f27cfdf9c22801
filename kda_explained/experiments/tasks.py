"""The three synthetic tasks of the report's §5.1: Palindrome, MQAR and Stack, as seeded generators.

Every task draws a batch of token sequences ``inputs [B, T]`` and, at the same
positions, ``targets [B, T]``: the token the model must output there, or
:data:`IGNORE` where nothing is asked. A model reads the whole sequence causally
(the output at position ``t`` sees ``inputs[:, :t + 1]``), so every answer must be
recoverable from the tokens before and at its position; ``tests/test_experiments.py``
checks that by recomputing each answer from ``inputs`` alone.

**Scoring.** A query is one position with a target. It counts as right when the
arg-max of the model's logits over the *whole* vocabulary is the target
(:func:`count_correct`); a task's accuracy is right answers over all queries of an
evaluation set, pooled over its sequences. Chance is ``1 / answers``: 1/16 for
Palindrome, 1/64 for MQAR and Stack with the defaults.

The formats (the report names the tasks and their lengths; the token layouts
below are this library's):

=============  ===============================================================================
Palindrome     ``x_1 .. x_n SEP x_n .. x_2`` with ``n = T / 2`` random tokens: after ``SEP``
               the model writes the sequence backwards, fed its own previous answers
               (teacher forcing): the target at ``SEP`` is ``x_n``, then ``x_{n-1}``, ... ``x_1``.
               Queries: the last ``n`` positions. Vocabulary: ``vocab`` tokens + ``SEP``.
MQAR           ``k_1 v_1 .. k_P v_P q_1 .. q_M``: ``P`` key-value pairs (distinct keys), then
               ``M = T - 2P`` queries, each a key of the pairs; the target at a query is its
               value. ``P = T / 8`` unless given. Vocabulary: ``n_keys`` keys, ``n_values`` values.
Stack          ``T / 2`` operations of two tokens on ``n_stacks`` LIFO stacks:
               ``s v`` pushes value ``v`` on stack ``s``, ``s POP`` pops it. The target at ``POP``
               is the value popped (the top of stack ``s``); a pop never hits an empty stack.
               Each operation picks its stack uniformly, then pushes with probability
               ``p_push`` (always on an empty stack). Vocabulary: ``n_values`` values,
               ``n_stacks`` stack names, ``POP``.
=============  ===============================================================================

Glossary
--------
==============  ================================================================
``B``           sequences in a batch
``T``           ``seq_len``, tokens per sequence (the model's input length)
``IGNORE``      ``-100``: no target (``torch.nn.functional.cross_entropy``'s default)
``rng``         a ``numpy.random.Generator``, or an int seed for one
==============  ================================================================

>>> task = MQAR(n_keys=8, n_values=8, n_pairs=2)
>>> batch = task.sample(1, 8, rng=0)
>>> batch.inputs.shape, batch.targets.shape
((1, 8), (1, 8))
>>> int((batch.targets != IGNORE).sum())          # M = T - 2P = 4 queries
4
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional, Union

import numpy as np

__all__ = ["IGNORE", "Batch", "Task", "Palindrome", "MQAR", "Stack", "TASKS", "make_task", "count_correct"]

#: The target of a position that asks nothing.
IGNORE = -100

Rng = Union[np.random.Generator, int]


@dataclass(frozen=True)
class Batch:
    """``inputs [B, T]`` and ``targets [B, T]``, int64; ``targets`` is :data:`IGNORE` where nothing is asked."""

    inputs: np.ndarray
    targets: np.ndarray

    @property
    def queries(self) -> int:
        """How many positions ask for an answer."""
        return int((self.targets != IGNORE).sum())


def _as_rng(rng: Rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, bool) or not isinstance(rng, (int, np.integer)):
        raise TypeError(f"rng: expected a numpy.random.Generator or an int seed, got {type(rng).__name__}")
    return np.random.default_rng(int(rng))


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value}")
    return int(value)


def _check_batch_args(batch_size, seq_len, even: bool, minimum: int):
    B = _check_int("batch_size", batch_size, 1)
    T = _check_int("seq_len", seq_len, minimum)
    if even and T % 2:
        raise ValueError(f"seq_len: expected an even number of tokens, got {T}")
    return B, T


class Task:
    """What the three tasks share: a name, a fixed vocabulary, ``sample`` and ``params``."""

    name = ""

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    @property
    def answers(self) -> int:
        """How many distinct targets there are (chance accuracy is one over this)."""
        raise NotImplementedError

    def params(self) -> Dict[str, object]:
        """The task's settings, for the JSON records."""
        return {"task": self.name, **asdict(self), "vocab_size": self.vocab_size}

    def sample(self, batch_size: int, seq_len: int, rng: Rng) -> Batch:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# Palindrome: write the sequence backwards
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Palindrome(Task):
    """``x_1 .. x_n SEP x_n .. x_2`` -> targets ``x_n .. x_1`` from ``SEP`` on (``n = T / 2``).

    Token ids: ``0 .. vocab - 1`` the random tokens, ``vocab`` the separator.

    >>> b = Palindrome(vocab=10).sample(1, 8, rng=1)
    >>> b.inputs[0].tolist()          # 4 5 7 9, SEP, then the answers so far
    [4, 5, 7, 9, 10, 9, 7, 5]
    >>> b.targets[0].tolist()
    [-100, -100, -100, -100, 9, 7, 5, 4]
    """

    vocab: int = 16
    name = "palindrome"

    def __post_init__(self):
        _check_int("vocab", self.vocab, 2)

    @property
    def sep(self) -> int:
        return self.vocab

    @property
    def vocab_size(self) -> int:
        return self.vocab + 1

    @property
    def answers(self) -> int:
        return self.vocab

    def sample(self, batch_size: int, seq_len: int, rng: Rng) -> Batch:
        B, T = _check_batch_args(batch_size, seq_len, even=True, minimum=2)
        n = T // 2
        x = _as_rng(rng).integers(0, self.vocab, size=(B, n))  # [B, n]
        rev = x[:, ::-1]  # [B, n]: x_n .. x_1
        sep = np.full((B, 1), self.sep)
        inputs = np.concatenate([x, sep, rev[:, :-1]], axis=1)  # [B, T]: x_1..x_n SEP x_n..x_2
        targets = np.concatenate([np.full((B, n), IGNORE), rev], axis=1)  # [B, T]
        return Batch(inputs.astype(np.int64), targets.astype(np.int64))


# ----------------------------------------------------------------------------------------------
# MQAR: multi-query associative recall
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MQAR(Task):
    """``k_1 v_1 .. k_P v_P`` then ``T - 2P`` query keys, each answered by its value.

    Token ids: ``0 .. n_keys - 1`` keys, ``n_keys .. n_keys + n_values - 1`` values.
    ``n_pairs = None`` takes ``P = T // 8`` (a quarter of the sequence holds the pairs).

    >>> b = MQAR(n_keys=4, n_values=4, n_pairs=2).sample(1, 8, rng=6)
    >>> b.inputs[0].tolist()          # pairs (1 -> 5) and (2 -> 7), then four queries
    [1, 5, 2, 7, 1, 2, 1, 2]
    >>> b.targets[0].tolist()
    [-100, -100, -100, -100, 5, 7, 5, 7]
    """

    n_keys: int = 64
    n_values: int = 64
    n_pairs: Optional[int] = None
    name = "mqar"

    def __post_init__(self):
        _check_int("n_keys", self.n_keys, 1)
        _check_int("n_values", self.n_values, 1)
        if self.n_pairs is not None:
            _check_int("n_pairs", self.n_pairs, 1)

    @property
    def vocab_size(self) -> int:
        return self.n_keys + self.n_values

    @property
    def answers(self) -> int:
        return self.n_values

    def pairs(self, seq_len: int) -> int:
        """``P`` at this length."""
        return self.n_pairs if self.n_pairs is not None else max(1, seq_len // 8)

    def sample(self, batch_size: int, seq_len: int, rng: Rng) -> Batch:
        B, T = _check_batch_args(batch_size, seq_len, even=False, minimum=3)
        P = self.pairs(T)
        if P > self.n_keys:
            raise ValueError(f"n_pairs: expected at most n_keys = {self.n_keys} (keys are distinct), got P = {P} "
                             f"at seq_len = {T}")
        if 2 * P >= T:
            raise ValueError(f"seq_len: expected more than 2 * n_pairs = {2 * P} tokens (room for a query), got {T}")
        rng = _as_rng(rng)
        keys = np.argsort(rng.random((B, self.n_keys)), axis=1)[:, :P]  # [B, P], distinct per row
        values = self.n_keys + rng.integers(0, self.n_values, size=(B, P))  # [B, P]
        which = rng.integers(0, P, size=(B, T - 2 * P))  # [B, M]: the pair each query asks for
        rows = np.arange(B)[:, None]
        context = np.stack([keys, values], axis=2).reshape(B, 2 * P)  # [B, 2P]: k_1 v_1 k_2 v_2 ..
        inputs = np.concatenate([context, keys[rows, which]], axis=1)  # [B, T]
        targets = np.concatenate([np.full((B, 2 * P), IGNORE), values[rows, which]], axis=1)  # [B, T]
        return Batch(inputs.astype(np.int64), targets.astype(np.int64))


# ----------------------------------------------------------------------------------------------
# Stack: many LIFO stacks at once
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stack(Task):
    """``T / 2`` push (``s v``) and pop (``s POP``) operations on ``n_stacks`` stacks; a pop asks for its value.

    Token ids: ``0 .. n_values - 1`` values, then ``n_stacks`` stack names, then ``POP``.

    >>> task = Stack(n_stacks=2, n_values=4)
    >>> b = task.sample(1, 12, rng=2)    # stack names: 4 (s0), 5 (s1); POP = 6
    >>> b.inputs[0].tolist()   # push 1 on s1, push 3 on s0, pop s0, push 0 on s1, pop s1, push 2 on s0
    [5, 1, 4, 3, 4, 6, 5, 0, 5, 6, 4, 2]
    >>> b.targets[0].tolist()  # s0 pops 3; s1 holds 1 then 0, and pops the 0 (last in, first out)
    [-100, -100, -100, -100, -100, 3, -100, -100, -100, 0, -100, -100]
    """

    n_stacks: int = 64
    n_values: int = 64
    p_push: float = 0.5
    name = "stack"

    def __post_init__(self):
        _check_int("n_stacks", self.n_stacks, 1)
        _check_int("n_values", self.n_values, 1)
        if not 0.0 < self.p_push < 1.0:
            raise ValueError(f"p_push: expected a probability in (0, 1), got {self.p_push}")

    @property
    def pop(self) -> int:
        return self.n_values + self.n_stacks

    @property
    def vocab_size(self) -> int:
        return self.n_values + self.n_stacks + 1

    @property
    def answers(self) -> int:
        return self.n_values

    def sample(self, batch_size: int, seq_len: int, rng: Rng) -> Batch:
        B, T = _check_batch_args(batch_size, seq_len, even=True, minimum=2)
        rng = _as_rng(rng)
        ops = T // 2
        rows = np.arange(B)
        stacks = np.zeros((B, self.n_stacks, ops), dtype=np.int64)  # [B, S, depth]: the contents
        depth = np.zeros((B, self.n_stacks), dtype=np.int64)  # [B, S]
        inputs = np.empty((B, T), dtype=np.int64)
        targets = np.full((B, T), IGNORE, dtype=np.int64)
        for i in range(ops):  # one operation for every row at once
            s = rng.integers(0, self.n_stacks, size=B)  # [B]
            d = depth[rows, s]  # [B]
            push = (d == 0) | (rng.random(B) < self.p_push)  # [B]: an empty stack is always pushed
            v = rng.integers(0, self.n_values, size=B)  # [B]
            top = stacks[rows, s, np.maximum(d - 1, 0)]  # [B]: what a pop returns
            stacks[rows[push], s[push], d[push]] = v[push]
            depth[rows, s] = np.where(push, d + 1, d - 1)
            inputs[:, 2 * i] = self.n_values + s
            inputs[:, 2 * i + 1] = np.where(push, v, self.pop)
            targets[:, 2 * i + 1] = np.where(push, IGNORE, top)
        return Batch(inputs, targets)


#: The task classes by name.
TASKS = {"palindrome": Palindrome, "mqar": MQAR, "stack": Stack}


def make_task(name: str, **params) -> Task:
    """The task called ``name`` (a key of :data:`TASKS`) with its settings.

    >>> make_task("stack", n_stacks=8).vocab_size        # 64 values + 8 stack names + POP
    73
    """
    if name not in TASKS:
        raise ValueError(f"name: expected one of {list(TASKS)}, got {name!r}")
    return TASKS[name](**params)


def count_correct(logits, targets) -> tuple:
    """``(right, asked)``: arg-max hits at the positions with a target, and how many there are.

    ``logits [B, T, vocab]`` and ``targets [B, T]`` (torch tensors or NumPy arrays).

    >>> import numpy as np
    >>> logits = np.eye(3)[[[0, 2, 1]]]                  # predicts 0, 2, 1
    >>> count_correct(logits, np.array([[IGNORE, 2, 0]]))
    (1, 2)
    """
    asked = targets != IGNORE
    hit = (logits.argmax(-1) == targets) & asked
    return int(hit.sum()), int(asked.sum())
