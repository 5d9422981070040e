"""Task registry: ``get_task("addition")`` returns the task object its module registered.

A new task is one module that subclasses ``tasks.base.Task`` and calls ``register``; add its
name to ``BUILTIN`` below (or import the module before calling ``get_task``).
"""
from __future__ import annotations

import importlib
import re

from tasks.base import METHODS, Task

BUILTIN = ("addition", "dp", "parity")
_REGISTRY: dict[str, Task] = {}


def register(task: Task) -> Task:
    _REGISTRY[task.name] = task
    return task


def get_task(name: str) -> Task:
    _load_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown task {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def task_names() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def parse_lengths(text: str | int | list) -> list[int]:
    """Problem lengths as the command lines take them (``--lengths``, ``eval_lengths``):
    ``"2-5,8,10-11"`` -> ``[2, 3, 4, 5, 8, 10, 11]``; a list or an int passes through.
    ValueError naming ``--lengths`` for anything else, an empty text included."""
    if isinstance(text, int):
        return [text]
    if isinstance(text, (list, tuple)):
        return [int(n) for n in text]
    lengths = []
    for part in str(text).replace(" ", "").split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(f"--lengths: cannot read {part!r} in {text!r} (want e.g. 2-40 or 2,5,10)")
        low, high = int(match[1]), int(match[2] or match[1])
        if high < low:
            raise ValueError(f"--lengths: empty range {part!r}")
        lengths.extend(range(low, high + 1))
    if not lengths or min(lengths) < 1:
        raise ValueError(f"--lengths: lengths must be >= 1, got {text!r}")
    return sorted(set(lengths))


def _load_builtin() -> None:
    # Imported on first use, not at package import, so that each task module can import
    # tasks.base and tasks.register without a cycle.
    for module in BUILTIN:
        importlib.import_module(f"tasks.{module}")


__all__ = ["METHODS", "Task", "get_task", "parse_lengths", "register", "task_names"]
