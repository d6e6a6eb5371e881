"""Synthetic sequence tasks from Petrov, Torr & Bibi, "When Do Prompting and Prefix-Tuning Work?"
(ICLR 2024): seeded generators of (input, target) digit batches, a registry, compositions,
mixtures, a stable train/test split and exact-match scoring. Knows nothing of models.

    import tasks
    batch = tasks.get_task("sort_asc").batch(64, generator=torch.Generator().manual_seed(0))
    batch.tokens, batch.loss_mask          # long / bool [64, 20]
    tasks.register(tasks.Task("rotate1", lambda x: x.roll(1, dims=1), vocab_size=8))
"""

from tasks.base import (
    SPLITS,
    Batch,
    Mixture,
    Task,
    compose,
    exact_match,
    is_test,
    max_distinct,
    sample_inputs,
    split_hash,
    test_set,
)
from tasks.library import UnknownTaskError, get_task, list_tasks, register, task_source
from tasks.sources import TaskReferenceError, task_from_reference

__all__ = [
    "SPLITS",
    "Batch",
    "Mixture",
    "Task",
    "TaskReferenceError",
    "UnknownTaskError",
    "compose",
    "exact_match",
    "get_task",
    "is_test",
    "list_tasks",
    "max_distinct",
    "register",
    "sample_inputs",
    "split_hash",
    "task_from_reference",
    "task_source",
    "test_set",
]
