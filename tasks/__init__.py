"""Task registry: ``get_task("addition")`` returns the module-level task object."""
from __future__ import annotations

from tasks.base import METHODS, Task

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
    # Imported lazily so that each task module can import tasks.base without a cycle.
    import importlib
    for module in ("addition", "dp", "parity"):
        try:
            importlib.import_module(f"tasks.{module}")
        except ModuleNotFoundError as error:
            if error.name != f"tasks.{module}":
                raise


__all__ = ["METHODS", "Task", "get_task", "register", "task_names"]
