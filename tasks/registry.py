"""The task name registry: a leaf both tasks.library (the built-in tasks, ``get_task``) and
tasks.sources (references, entry points) build on, so that neither imports the other's insides.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tasks.base import Mixture, Task

_REGISTRY: dict[str, Task | Mixture] = {}
_SOURCES: dict[str, str] = {}  # name -> where the task came from (``probe tasks`` shows it)
_LOADING: list[str] = []  # the reference or entry point being imported (tasks.sources)


class UnknownTaskError(KeyError):
    """Raised by `get_task` for an unregistered name (a KeyError with a readable message)."""

    def __str__(self) -> str:
        return str(self.args[0])


def register(
    task: Task | Mixture, replace: bool = False, source: str | None = None
) -> Task | Mixture:
    """Add `task` to the registry under `task.name` and return it.

    Registering the very same object again is a no-op; a different task under a taken name
    raises ValueError unless `replace=True`. `source` says where it came from (default: the
    module or file being loaded by a task reference, else the calling module).
    """
    if not isinstance(task, Task | Mixture):
        raise TypeError(f"register takes a Task or Mixture, got {task!r}")
    old = _REGISTRY.get(task.name)
    if old is not None and old is not task and not replace:
        raise ValueError(
            f"a task named {task.name!r} is already registered; choose another name or pass "
            "replace=True"
        )
    if old is not task:
        caller = sys._getframe(1).f_globals.get("__name__", "?")
        _SOURCES[task.name] = source or (_LOADING[-1] if _LOADING else f"module {caller}")
    _REGISTRY[task.name] = task
    return task


def registered(name: str) -> Task | Mixture | None:
    """The task registered under `name`, or None."""
    return _REGISTRY.get(name)


def names() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def task_source(name: str) -> str:
    """Where the registered task `name` came from: built-in, a module, a file, an entry point."""
    return _SOURCES.get(name, "unknown")


def names_from(source: str) -> list[str]:
    """The registered names whose source is `source`, sorted."""
    return sorted(n for n, s in _SOURCES.items() if s == source)


@contextmanager
def loading(source: str) -> Iterator[None]:
    """Attribute the tasks registered in the body to ``source`` (see ``probe tasks``)."""
    _LOADING.append(source)
    try:
        yield
    finally:
        _LOADING.pop()
