"""Tasks: seeded, deterministic data with a kind, a metric and a trivial baseline.

``get(name, **options)`` builds a registered task and ``names()`` lists them. To add a task, write
``rnnjax/tasks/<name>.py`` with a :class:`Task` subclass decorated with :func:`register`; it is found
automatically.
"""

from rnnjax.tasks.adding import Adding
from rnnjax.tasks.base import KINDS, SPLIT_IDS, TRAIN_STREAM, Batch, Task, get, names, register, rng_for

__all__ = ["KINDS", "SPLIT_IDS", "TRAIN_STREAM", "Adding", "Batch", "Task", "get", "names", "register", "rng_for"]
