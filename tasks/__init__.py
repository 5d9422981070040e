"""Task registry: ``get_task("addition")`` returns the task object its module registered.

A new task is one module that subclasses ``tasks.base.Task`` and calls ``register``; add its
name to ``BUILTIN`` below (or import the module before calling ``get_task``).
"""
from __future__ import annotations

import importlib

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


def _load_builtin() -> None:
    # Imported on first use, not at package import, so that each task module can import
    # tasks.base and tasks.register without a cycle.
    for module in BUILTIN:
        importlib.import_module(f"tasks.{module}")


__all__ = ["METHODS", "Task", "get_task", "register", "task_names"]
