"""Train a :class:`~kda_explained.experiments.model.TinyLM` on one synthetic task at one length; record the run.

One run (:func:`train`):

1. seed everything from ``seed``: the model's initialisation (``torch.manual_seed``), the
   training stream and a fixed evaluation set (two NumPy generators from
   ``SeedSequence([seed, 0])`` and ``[seed, 1]``): the same seed gives every mixer the
   same data;
2. AdamW on the cross-entropy of the positions with a target, a fresh batch every step,
   linear warm-up over ``warmup`` of the steps then cosine decay to a tenth of ``lr``,
   gradients clipped to norm ``grad_clip``;
3. every ``eval_every`` steps, accuracy on the evaluation set
   (:func:`kda_explained.experiments.tasks.count_correct`: arg-max over the whole
   vocabulary at every query, pooled); the run stops early once it reaches ``stop_at``.

The record keeps the *peak* evaluation accuracy (``accuracy``, what the report plots),
the last one, the loss curve (mean training loss over each ``log_every`` steps), the
accuracy curve, the steps trained and the wall time.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .model import ModelConfig, TinyLM
from .progress import Progress
from .tasks import IGNORE, Batch, count_correct

__all__ = ["TrainConfig", "train", "evaluate", "resolve_backend"]


@dataclass(frozen=True)
class TrainConfig:
    """How one run trains. ``steps`` is the most it may take (``stop_at`` ends it earlier)."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 25
    eval_size: int = 256
    log_every: int = 10
    stop_at: Optional[float] = 1.0
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every", "eval_size", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr: expected a positive number, got {self.lr!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup: expected a fraction of the steps in [0, 1), got {self.warmup!r}")


def resolve_backend(model_config: ModelConfig, device: str) -> str:
    """The core the delta-rule mixers run on: ``"fast"`` (Triton) or ``"chunked"``."""
    if model_config.backend == "auto":
        return "fast" if torch.device(device).type == "cuda" else "chunked"
    return model_config.backend


def _to_device(batch: Batch, device) -> tuple:
    return (torch.from_numpy(batch.inputs).to(device), torch.from_numpy(batch.targets).to(device))


@torch.no_grad()
def evaluate(model: TinyLM, batch: Batch, batch_size: int = 64) -> float:
    """Accuracy of ``model`` on ``batch``: right answers over queries, pooled over its sequences."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    right = asked = 0
    for s in range(0, batch.inputs.shape[0], batch_size):
        x, y = _to_device(Batch(batch.inputs[s:s + batch_size], batch.targets[s:s + batch_size]), device)
        r, a = count_correct(model(x), y)
        right, asked = right + r, asked + a
    model.train(was_training)
    return right / max(asked, 1)


def _lr_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warm-up over ``warmup * steps`` steps, then cosine from 1 down to 0.1."""
    w = max(1, int(warmup * steps))
    if step < w:
        return (step + 1) / w
    t = (step - w) / max(1, steps - w)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def train(task, model_config: ModelConfig, seq_len: int, config: TrainConfig = TrainConfig(),
          progress: Optional[Progress] = None) -> Dict[str, object]:
    """Train a fresh model with ``model_config`` on ``task`` at ``seq_len`` tokens; return the run's record.

    ``model_config.vocab_size`` must be the task's. ``progress`` (optional) advances by
    one per step (and by the steps left when the run stops early).

    >>> from kda_explained.experiments.tasks import MQAR
    >>> task = MQAR(n_keys=8, n_values=8, n_pairs=2)
    >>> rec = train(task, ModelConfig(task.vocab_size, mixer="kda", num_heads=1, head_dim=8), 16,
    ...             TrainConfig(steps=4, batch_size=4, eval_every=2, eval_size=8, log_every=2))
    >>> rec["model"], rec["seq_len"], rec["steps"], len(rec["loss_curve"]["loss"])
    ('kda', 16, 4, 2)
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
    if model_config.vocab_size != task.vocab_size:
        raise ValueError(f"model_config: expected vocab_size = {task.vocab_size} (the task's), got "
                         f"{model_config.vocab_size}")
    device = torch.device(config.device)
    backend = resolve_backend(model_config, config.device)
    model_config = replace(model_config, backend=backend)
    train_rng = np.random.default_rng(np.random.SeedSequence([config.seed, 0]))
    eval_set = task.sample(config.eval_size, seq_len, np.random.default_rng(np.random.SeedSequence([config.seed, 1])))

    torch.manual_seed(config.seed)
    model = TinyLM(model_config).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # weight decay on matrices only
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, config.steps, config.warmup))

    losses, loss_steps, loss_values = [], [], []
    acc_steps, acc_values = [], []
    start = time.perf_counter()
    step = 0
    model.train()
    while step < config.steps:
        x, y = _to_device(task.sample(config.batch_size, seq_len, train_rng), device)
        logits = model(x)  # [B, T, vocab]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        sched.step()
        step += 1
        losses.append(loss.item())
        if step % config.log_every == 0 or step == config.steps:
            loss_steps.append(step)
            loss_values.append(float(np.mean(losses)))
            losses = []
        info = {"loss": loss_values[-1] if loss_values else losses[-1]}
        if step % config.eval_every == 0 or step == config.steps:
            acc_steps.append(step)
            acc_values.append(evaluate(model, eval_set, batch_size=max(config.batch_size, 64)))
        if acc_values:
            info["acc"] = acc_values[-1]
        if progress is not None:
            progress.update(1, **info)
        if config.stop_at is not None and acc_values and acc_steps[-1] == step and acc_values[-1] >= config.stop_at:
            break
    if progress is not None and step < config.steps:
        progress.update(config.steps - step)  # the steps an early stop saved
    if losses:  # a partial window when the run stopped early
        loss_steps.append(step)
        loss_values.append(float(np.mean(losses)))

    return {
        "task": task.name,
        "model": model_config.mixer,
        "seq_len": int(seq_len),
        "accuracy": max(acc_values),
        "final_accuracy": acc_values[-1],
        "steps": step,
        "max_steps": config.steps,
        "lr": config.lr,
        "seed": config.seed,
        "loss_curve": {"step": loss_steps, "loss": loss_values},
        "accuracy_curve": {"step": acc_steps, "accuracy": acc_values},
        "wall_time_s": time.perf_counter() - start,
        "device": _device_name(device),
        "backend": backend if model_config.mixer in ("deltanet", "gdn", "kda") else "pytorch",
        "parameters": model.num_parameters(),
        "eval_queries": eval_set.queries,
        "train_config": asdict(config),
    }


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type
