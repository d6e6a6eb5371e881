"""The paper's tasks and lookup by name (`get_task`; the registry itself is tasks.registry).

Every built-in task maps 10 input digits in 0..7 to 10 output tokens. The fns are module-level
functions (not lambdas), so built-in tasks pickle.
"""

from __future__ import annotations

import functools

from torch import Tensor

from tasks import registry, sources
from tasks.base import Mixture, Task, compose
from tasks.registry import UnknownTaskError, register, registered, task_source

__all__ = ["UnknownTaskError", "get_task", "list_tasks", "register", "task_source"]

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


# ---------------------------------------------------------------------------- lookup


def get_task(name: str) -> Task | Mixture:
    """The registered task called `name`, or a reference `module:NAME` / `path/file.py:NAME`
    (see tasks.sources); tasks declared by installed packages' entry points load on a miss."""
    task = registered(name)
    if task is not None:
        return task
    if ":" in name:
        return sources.task_from_reference(name)
    sources.load_env_modules()
    sources.load_entry_points()
    task = registered(name)
    if task is None:
        raise UnknownTaskError(
            f"unknown task {name!r}; known tasks: {', '.join(registry.names())}. To add one: "
            "tasks.register(tasks.Task('my_task', fn, vocab_size=...)), or pass "
            "module:NAME / path/to/file.py:NAME"
        )
    return task


def list_tasks() -> list[Task | Mixture]:
    """All registered tasks (entry points' included), sorted by name."""
    sources.load_entry_points()
    return [registered(name) for name in registry.names()]


# ---------------------------------------------------------------------------- built-in tasks


def _builtin(task: Task | Mixture) -> Task | Mixture:
    return register(task, source="built-in")


COPY = _builtin(Task("copy", copy, vocab_size=8, description="copy the input"))
REVERSE = _builtin(Task("reverse", reverse, vocab_size=8, description="reverse the input"))
SORT_ASC = _builtin(Task("sort_asc", sort_asc, vocab_size=8, description="sort ascending"))
SORT_DESC = _builtin(Task("sort_desc", sort_desc, vocab_size=8, description="sort descending"))
ADD1 = _builtin(
    Task("add1", functools.partial(add, k=1), vocab_size=9, description="add 1 to each digit")
)
ADD2 = _builtin(
    Task("add2", functools.partial(add, k=2), vocab_size=10, description="add 2 to each digit")
)
HIST = _builtin(
    Task(
        "hist",
        hist,
        vocab_size=11,
        description="double histogram: count of each position's digit in the input (1..10)",
    )
)
SORT_ASC_ADD1 = _builtin(
    compose(SORT_ASC, ADD1, name="sort_asc_add1", description="sort ascending, then add 1")
)
MIX4 = _builtin(
    Mixture(
        "mix4",
        (SORT_ASC, SORT_DESC, ADD1, ADD2),
        description="uniform mixture of sort_asc, sort_desc, add1, add2 with no task token",
    )
)
