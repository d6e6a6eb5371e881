"""The paper's tasks and the name registry.

Every built-in task maps 10 input digits in 0..7 to 10 output tokens. The fns are module-level
functions (not lambdas), so built-in tasks pickle.
"""

from __future__ import annotations

import functools
import sys

from torch import Tensor

from tasks.base import Mixture, Task, compose

# ---------------------------------------------------------------------------- task functions
# Each maps long [batch, input_len] -> long [batch, output_len].


def copy(x: Tensor) -> Tensor:
    return x.clone()


def reverse(x: Tensor) -> Tensor:
    return x.flip(dims=[1])


def sort_asc(x: Tensor) -> Tensor:
    return x.sort(dim=1).values


def sort_desc(x: Tensor) -> Tensor:
    return x.sort(dim=1, descending=True).values


def add(x: Tensor, k: int) -> Tensor:
    """x + k elementwise, no wrap-around."""
    return x + k


def hist(x: Tensor) -> Tensor:
    """Double histogram: position i holds how many times x[:, i] occurs in the row."""
    return (x[:, :, None] == x[:, None, :]).sum(dim=2)


# ---------------------------------------------------------------------------- registry

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
        default = "built-in" if caller == __name__ else f"module {caller}"
        _SOURCES[task.name] = source or (_LOADING[-1] if _LOADING else default)
    _REGISTRY[task.name] = task
    return task


def task_source(name: str) -> str:
    """Where the registered task `name` came from: built-in, a module, a file, an entry point."""
    return _SOURCES.get(name, "unknown")


def get_task(name: str) -> Task | Mixture:
    """The registered task called `name`, or a reference `module:NAME` / `path/file.py:NAME`
    (see tasks.sources); tasks declared by installed packages' entry points load on a miss."""
    from tasks import sources  # it imports this module

    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        return sources.task_from_reference(name)
    sources.load_env_modules()
    sources.load_entry_points()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownTaskError(
            f"unknown task {name!r}; known tasks: {known}. To add one: "
            "tasks.register(tasks.Task('my_task', fn, vocab_size=...)), or pass "
            "module:NAME / path/to/file.py:NAME"
        ) from None


def list_tasks() -> list[Task | Mixture]:
    """All registered tasks (entry points' included), sorted by name."""
    from tasks import sources

    sources.load_entry_points()
    return [_REGISTRY[name] for name in sorted(_REGISTRY)]


# ---------------------------------------------------------------------------- built-in tasks

COPY = register(Task("copy", copy, vocab_size=8, description="copy the input"))
REVERSE = register(Task("reverse", reverse, vocab_size=8, description="reverse the input"))
SORT_ASC = register(Task("sort_asc", sort_asc, vocab_size=8, description="sort ascending"))
SORT_DESC = register(Task("sort_desc", sort_desc, vocab_size=8, description="sort descending"))
ADD1 = register(
    Task("add1", functools.partial(add, k=1), vocab_size=9, description="add 1 to each digit")
)
ADD2 = register(
    Task("add2", functools.partial(add, k=2), vocab_size=10, description="add 2 to each digit")
)
HIST = register(
    Task(
        "hist",
        hist,
        vocab_size=11,
        description="double histogram: count of each position's digit in the input (1..10)",
    )
)
SORT_ASC_ADD1 = register(
    compose(SORT_ASC, ADD1, name="sort_asc_add1", description="sort ascending, then add 1")
)
MIX4 = register(
    Mixture(
        "mix4",
        (SORT_ASC, SORT_DESC, ADD1, ADD2),
        description="uniform mixture of sort_asc, sort_desc, add1, add2 with no task token",
    )
)
