"""Batches, tasks, mixtures, compositions, sampling, the stable train/test split and scoring.

Shapes are written as `long [batch, input_len]`: a tensor of dtype `torch.long` with those dims.
Everything here is pure and vectorised; all randomness comes from a `torch.Generator`.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

SPLITS = ("train", "test")

# Split hash constants (see `split_hash`). Changing any of them changes every test set.
_PRIME = (
    2**31 - 1
)  # Mersenne prime: residues < 2**31, so a residue times a 32-bit number fits int64
_BASE = 1_000_003
_MIX1 = 0x2C1B3C6D
_MIX2 = 0x297A2D39

# Rejection sampling gives up after drawing this many candidate rows for one call.
_MAX_CANDIDATES = 2**26


# ---------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class Batch:
    """Inputs and targets of one batch; the model sees `tokens` and is scored on `loss_mask`.

    inputs:  long [batch, input_len]
    targets: long [batch, output_len]
    """

    inputs: Tensor
    targets: Tensor

    def __post_init__(self) -> None:
        for field, t in (("inputs", self.inputs), ("targets", self.targets)):
            if not isinstance(t, Tensor) or t.dtype != torch.long or t.ndim != 2:
                got = f"{t.dtype} tensor of shape {tuple(t.shape)}" if isinstance(t, Tensor) else t
                raise ValueError(
                    f"Batch.{field} must be a 2-D torch.long tensor [batch, len], got {got}; "
                    "convert with .long() and add a batch dimension if needed"
                )
        if self.inputs.shape[0] != self.targets.shape[0]:
            raise ValueError(
                f"Batch inputs and targets disagree on batch size: {self.inputs.shape[0]} vs "
                f"{self.targets.shape[0]}; build both from the same rows"
            )
        if self.inputs.device != self.targets.device:
            raise ValueError(
                f"Batch inputs are on {self.inputs.device} but targets on {self.targets.device}; "
                "move both with Batch.to(device)"
            )

    @property
    def tokens(self) -> Tensor:
        """long [batch, input_len + output_len]: inputs then targets, no separator."""
        return torch.cat([self.inputs, self.targets], dim=1)

    @property
    def loss_mask(self) -> Tensor:
        """bool [batch, input_len + output_len]: True exactly on the target positions."""
        (b, i), o = self.inputs.shape, self.targets.shape[1]
        mask = torch.zeros(b, i + o, dtype=torch.bool, device=self.inputs.device)
        mask[:, i:] = True
        return mask

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on `device`."""
        return Batch(self.inputs.to(device), self.targets.to(device))


# ---------------------------------------------------------------------------- split


def split_hash(inputs: Tensor) -> Tensor:
    """A stable hash of each row: long [batch, len] -> long [batch], values in [0, 2**31).

    Exact int64 arithmetic, identical across processes and machines (unlike Python's `hash`).
    Polynomial hash of the digits (each as digit + 1, so leading zeros count) modulo the
    Mersenne prime p = 2**31 - 1 with base 1_000_003, then two xor-shift-multiply mixing rounds
    modulo p so that neighbouring sequences land independently. Every intermediate product is
    a residue below 2**31 times a constant below 2**31, so it stays below 2**62.
    """
    if inputs.ndim != 2 or inputs.dtype.is_floating_point or inputs.dtype == torch.bool:
        raise ValueError(
            f"split_hash expects an integer tensor [batch, len], got {inputs.dtype} "
            f"of shape {tuple(inputs.shape)}"
        )
    digits = torch.remainder(inputs.long() + 1, _PRIME)
    # Horner's rule h <- (h * BASE + digit) mod p, unrolled: sum_i digit_i * BASE^(len-1-i) mod p.
    # Each term is a residue below 2**31, so the sum of up to 2**32 terms cannot overflow.
    n = inputs.shape[1]
    powers = [pow(_BASE, n - 1 - i, _PRIME) for i in range(n)]
    powers = torch.tensor(powers, dtype=torch.long, device=inputs.device)
    h = torch.remainder(digits * powers, _PRIME).sum(dim=1) % _PRIME
    for mult in (_MIX1, _MIX2):
        h = h ^ (h >> 15)
        h = torch.remainder(h * mult, _PRIME)
    return h ^ (h >> 13)


def is_test(inputs: Tensor) -> Tensor:
    """bool [batch]: whether each input row belongs to the held-out test split (about 25%).

    The split depends only on the digits of the row (not on the task), via `split_hash % 4 == 0`.
    """
    return split_hash(inputs) % 4 == 0


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits are {SPLITS}")


# ---------------------------------------------------------------------------- sampling


def max_distinct(input_len: int) -> int:
    """The most distinct digits a 'restricted' sample may have: input_len // 2 (at least 1)."""
    return max(1, input_len // 2)


def _n_distinct(x: Tensor) -> Tensor:
    """long [batch, len] -> long [batch]: the number of distinct values in each row."""
    s = x.sort(dim=1).values
    return (s[:, 1:] != s[:, :-1]).sum(dim=1) + 1


def _draw(
    count: int,
    input_len: int,
    n_digits: int,
    split: str,
    restricted: bool,
    generator: torch.Generator,
) -> Tensor:
    """long [count, input_len]: uniform rows conditioned on the split (and on few distinct digits
    if `restricted`), by drawing candidates in bulk and keeping the accepted ones."""
    kept: list[Tensor] = []
    n_kept, n_drawn = 0, 0
    while n_kept < count:
        rate = max(n_kept, 1) / n_drawn if n_drawn else 0.5
        chunk = min(max(1024, math.ceil(1.2 * (count - n_kept) / rate)), 2**20)
        x = torch.randint(0, n_digits, (chunk, input_len), generator=generator)
        ok = is_test(x) == (split == "test")
        if restricted:
            ok &= _n_distinct(x) <= max_distinct(input_len)
        kept.append(x[ok])
        n_kept += kept[-1].shape[0]
        n_drawn += chunk
        if n_kept < count and n_drawn >= _MAX_CANDIDATES:
            kind = f"with <= {max_distinct(input_len)} distinct digits " if restricted else ""
            raise RuntimeError(
                f"found only {n_kept} of {count} {split} inputs {kind}among {n_drawn} candidates "
                f"(input_len={input_len}, n_digits={n_digits}); this input space is too small or "
                "the constraint too rare: use more digits, a longer input, or fewer samples"
            )
    return torch.cat(kept)[:count]


def sample_inputs(
    n: int,
    input_len: int,
    n_digits: int,
    split: str = "train",
    generator: torch.Generator | None = None,
) -> Tensor:
    """long [n, input_len]: the paper's input distribution, restricted to one split.

    Digits are uniform in 0..n_digits-1. Each sample independently, with probability 1/2, is
    instead drawn conditioned on having at most `max_distinct(input_len)` distinct digits
    (rejection sampling). Samples are drawn until n land in `split`. With no generator the
    global torch generator is used (so `torch.manual_seed` applies).
    """
    _check_split(split)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"number of samples must be a positive int, got {n!r}")
    gen = torch.default_generator if generator is None else generator
    restricted = torch.randint(0, 2, (n,), generator=gen).bool()
    out = torch.empty(n, input_len, dtype=torch.long)
    for flag in (False, True):
        rows = restricted == flag
        count = int(rows.sum())
        if count:
            out[rows] = _draw(count, input_len, n_digits, split, flag, gen)
    return out


# ---------------------------------------------------------------------------- tasks


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


@dataclass(frozen=True)
class Task:
    """A deterministic sequence-to-sequence task on digit sequences.

    fn: pure and vectorised, long [batch, input_len] -> long [batch, output_len].
    vocab_size: 1 + the largest token that can appear in inputs or targets.
    Inputs use digits 0..n_digits-1. Hashable (fn by identity), so usable as a cache key.
    """

    name: str
    fn: Callable[[Tensor], Tensor]
    vocab_size: int
    input_len: int = 10
    output_len: int = 10
    n_digits: int = 8
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"task name must be a non-empty string, got {self.name!r}")
        if not callable(self.fn):
            raise TypeError(f"task {self.name!r}: fn must be callable, got {self.fn!r}")
        for field in ("vocab_size", "input_len", "output_len", "n_digits"):
            if not _positive_int(getattr(self, field)):
                raise ValueError(
                    f"task {self.name!r}: {field} must be a positive int, "
                    f"got {getattr(self, field)!r}"
                )
        if self.vocab_size < self.n_digits:
            raise ValueError(
                f"task {self.name!r}: vocab_size={self.vocab_size} cannot hold the input digits "
                f"0..{self.n_digits - 1}; set vocab_size >= n_digits"
            )

    @property
    def seq_len(self) -> int:
        """input_len + output_len: the length of `Batch.tokens`."""
        return self.input_len + self.output_len

    def targets(self, inputs: Tensor) -> Tensor:
        """long [batch, input_len] -> long [batch, output_len], checked against the task's spec."""
        if inputs.ndim != 2 or inputs.shape[1] != self.input_len or inputs.dtype != torch.long:
            raise ValueError(
                f"task {self.name!r} expects long inputs [batch, {self.input_len}], got "
                f"{inputs.dtype} of shape {tuple(inputs.shape)}"
            )
        out = self.fn(inputs)
        expected = (inputs.shape[0], self.output_len)
        if not isinstance(out, Tensor) or out.dtype != torch.long or tuple(out.shape) != expected:
            got = f"{out.dtype} of shape {tuple(out.shape)}" if isinstance(out, Tensor) else out
            raise ValueError(
                f"task {self.name!r}: fn must return a long tensor of shape {expected}, got {got}; "
                "fix fn or the task's output_len"
            )
        if out.numel() and (out.min() < 0 or out.max() >= self.vocab_size):
            raise ValueError(
                f"task {self.name!r}: fn produced tokens in [{int(out.min())}, {int(out.max())}] "
                f"outside the vocabulary 0..{self.vocab_size - 1}; raise vocab_size"
            )
        return out

    def sample_inputs(
        self, n: int, split: str = "train", generator: torch.Generator | None = None
    ) -> Tensor:
        """long [n, input_len]: see `tasks.base.sample_inputs`."""
        return sample_inputs(n, self.input_len, self.n_digits, split, generator)

    def batch(
        self, n: int, split: str = "train", generator: torch.Generator | None = None
    ) -> Batch:
        """n samples from `split`: inputs long [n, input_len], targets long [n, output_len]."""
        inputs = self.sample_inputs(n, split, generator)
        return Batch(inputs, self.targets(inputs))


@dataclass(frozen=True)
class _Composed:
    """fn of a composition: applies the stages' fns left to right (picklable if they are)."""

    fns: tuple[Callable[[Tensor], Tensor], ...]

    def __call__(self, x: Tensor) -> Tensor:
        for fn in self.fns:
            x = fn(x)
        return x


def compose(
    *tasks: Task, name: str | None = None, vocab_size: int | None = None, description: str = ""
) -> Task:
    """The task that applies `tasks` left to right, e.g. compose(sort_asc, add1).

    Inputs (input_len, n_digits) come from the first task and output_len from the last.
    vocab_size is derived soundly when each stage's outputs are valid inputs of the next
    (stage.vocab_size <= next.n_digits): then it is max(first.n_digits, last.vocab_size).
    Otherwise (e.g. add1 then add1) the stages' declared vocabularies say nothing about the
    result, so pass `vocab_size=` explicitly; `Task.targets` still checks it on every call.
    """
    if not tasks:
        raise ValueError("compose needs at least one task")
    for t in tasks:
        if not isinstance(t, Task):
            raise TypeError(f"compose takes Task objects, got {t!r}; mixtures have no single fn")
    for a, b in itertools.pairwise(tasks):
        if a.output_len != b.input_len:
            raise ValueError(
                f"cannot compose {a.name!r} (output_len={a.output_len}) with {b.name!r} "
                f"(input_len={b.input_len}): lengths must chain"
            )
    first, last = tasks[0], tasks[-1]
    if vocab_size is None:
        for a, b in itertools.pairwise(tasks):
            if a.vocab_size > b.n_digits:
                raise ValueError(
                    f"cannot derive the vocabulary of the composition: {a.name!r} emits tokens "
                    f"up to {a.vocab_size - 1} but {b.name!r} is only specified on digits "
                    f"0..{b.n_digits - 1}; pass vocab_size= explicitly"
                )
        vocab_size = max(first.n_digits, last.vocab_size)
    names = [t.name for t in tasks]
    return Task(
        name=name or "_".join(names),
        fn=_Composed(tuple(t.fn for t in tasks)),
        vocab_size=vocab_size,
        input_len=first.input_len,
        output_len=last.output_len,
        n_digits=first.n_digits,
        description=description or ", then ".join(names),
    )


@dataclass(frozen=True)
class Mixture:
    """Several tasks on the same inputs; each sample uses a uniformly chosen task, with no task
    token in the sequence (the paper's pretraining mixture). Same interface as `Task` except
    that `targets(inputs)` is undefined: use `batch` or `labelled_batch`."""

    name: str
    tasks: tuple[Task, ...]
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"mixture name must be a non-empty string, got {self.name!r}")
        if not self.tasks or not all(isinstance(t, Task) for t in self.tasks):
            raise TypeError(f"mixture {self.name!r} needs one or more Task objects")
        shapes = {(t.input_len, t.output_len, t.n_digits) for t in self.tasks}
        if len(shapes) > 1:
            raise ValueError(
                f"mixture {self.name!r}: tasks disagree on (input_len, output_len, n_digits): "
                f"{sorted(shapes)}; mix only tasks with the same input distribution and lengths"
            )

    @property
    def input_len(self) -> int:
        return self.tasks[0].input_len

    @property
    def output_len(self) -> int:
        return self.tasks[0].output_len

    @property
    def n_digits(self) -> int:
        return self.tasks[0].n_digits

    @property
    def vocab_size(self) -> int:
        """The largest of the components' vocabularies."""
        return max(t.vocab_size for t in self.tasks)

    @property
    def seq_len(self) -> int:
        return self.input_len + self.output_len

    def targets(self, inputs: Tensor) -> Tensor:
        raise TypeError(
            f"mixture {self.name!r} has no single target per input; use .batch() or "
            ".labelled_batch(), or the targets of one of its .tasks"
        )

    def sample_inputs(
        self, n: int, split: str = "train", generator: torch.Generator | None = None
    ) -> Tensor:
        """long [n, input_len]: see `tasks.base.sample_inputs`."""
        return sample_inputs(n, self.input_len, self.n_digits, split, generator)

    def labelled_batch(
        self, n: int, split: str = "train", generator: torch.Generator | None = None
    ) -> tuple[Batch, Tensor]:
        """A batch plus long [n]: the index in `self.tasks` of the task each row uses."""
        inputs = self.sample_inputs(n, split, generator)
        gen = torch.default_generator if generator is None else generator
        choice = torch.randint(0, len(self.tasks), (n,), generator=gen)
        every = torch.stack([t.targets(inputs) for t in self.tasks])  # [n_tasks, n, output_len]
        return Batch(inputs, every[choice, torch.arange(n)]), choice

    def batch(
        self, n: int, split: str = "train", generator: torch.Generator | None = None
    ) -> Batch:
        """A batch of n samples from `split`, each row's target from its own random task."""
        return self.labelled_batch(n, split, generator)[0]


# ---------------------------------------------------------------------------- evaluation


@functools.lru_cache(maxsize=64)
def _cached_test_set(task: Task | Mixture, n: int, seed: int) -> Batch:
    return task.batch(n, "test", torch.Generator().manual_seed(seed))


def test_set(task: Task | Mixture, n: int = 3200, seed: int = 0) -> Batch:
    """The fixed held-out evaluation batch: n samples of the test split drawn with `seed`.

    Deterministic across processes; tasks with the same input distribution share the inputs.
    Cached; returns a fresh copy, so callers may modify it.
    """
    b = _cached_test_set(task, n, seed)
    return Batch(b.inputs.clone(), b.targets.clone())


test_set.__test__ = False  # not a pytest test, despite the name


def exact_match(predictions: Tensor, targets: Tensor) -> float:
    """Fraction of rows where every position matches: [batch, output_len] twice -> float."""
    if predictions.shape != targets.shape:
        raise ValueError(
            f"predictions of shape {tuple(predictions.shape)} and targets of shape "
            f"{tuple(targets.shape)} must have the same shape [batch, output_len]"
        )
    if predictions.ndim == 0 or predictions.shape[0] == 0:
        raise ValueError(f"exact_match needs at least one row, got shape {tuple(targets.shape)}")
    rows = (predictions == targets.to(predictions.device)).reshape(predictions.shape[0], -1)
    return rows.all(dim=1).float().mean().item()
