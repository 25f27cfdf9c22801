"""The report's synthetic tasks (§5.1, Fig. 4) on the ladder from linear attention to KDA.

- :mod:`~kda_explained.experiments.tasks`: the seeded generators of Palindrome, MQAR and
  Stack, and how a query is scored;
- :mod:`~kda_explained.experiments.mixers`: linear attention, DeltaNet, Gated DeltaNet,
  KDA and (as a reference) softmax attention as token mixers that share every piece
  but the recurrence;
- :mod:`~kda_explained.experiments.model`: a tiny model around one mixer kind;
- :mod:`~kda_explained.experiments.train`: one training run and its record;
- :mod:`~kda_explained.experiments.synthetic`: the command line that runs a grid of them
  and writes JSON and a figure (``python -m kda_explained.experiments.synthetic --quick --out DIR``).

Needs torch (the ``torch`` extra); the figure needs matplotlib. The command line module
is not imported here, so that ``python -m`` runs it cleanly.
"""

from .mixers import BACKENDS, MIXERS, TokenMixer, linear_attention
from .model import ModelConfig, TinyLM
from .progress import Progress
from .tasks import IGNORE, MQAR, TASKS, Batch, Palindrome, Stack, Task, count_correct, make_task
from .train import TrainConfig, evaluate, train

__all__ = [
    "TASKS",
    "IGNORE",
    "Batch",
    "Task",
    "Palindrome",
    "MQAR",
    "Stack",
    "make_task",
    "count_correct",
    "MIXERS",
    "BACKENDS",
    "TokenMixer",
    "linear_attention",
    "ModelConfig",
    "TinyLM",
    "TrainConfig",
    "train",
    "evaluate",
    "Progress",
]
