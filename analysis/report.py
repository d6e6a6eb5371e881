"""What an experiment reports: profiles, figures with captions, tables and claims-ledger rows."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from analysis.runs import Run, Store


@dataclass(frozen=True)
class Profile:
    """How big to run: ``smoke`` (seconds, for tests), ``quick`` (the README's main job, a
    laptop CPU), ``paper`` (the paper's model sizes and budgets, meant for a GPU)."""

    name: str

    def pick(self, smoke, quick, paper):
        return {"smoke": smoke, "quick": quick, "paper": paper}[self.name]

    @property
    def seeds(self) -> tuple[int, ...]:
        return self.pick((0,), (0, 1, 2), (0, 1, 2))


PROFILES = {name: Profile(name) for name in ("smoke", "quick", "paper")}


@dataclass
class Figure:
    file: str  # relative to the figures directory
    caption: str


@dataclass
class Claim:
    """One row of the claims ledger."""

    claim: str
    experiment: str
    measured: str
    verdict: str  # "supported", "refuted" or "depends: <condition>"


@dataclass
class Section:
    """An experiment's contribution to figures/README.md."""

    title: str
    text: str = ""
    tables: list[str] = field(default_factory=list)  # markdown
    figures: list[Figure] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)


@dataclass(frozen=True)
class Experiment:
    name: str
    title: str
    runs: Callable[[Profile], list[Run]]
    report: Callable[[Store, Profile, Path], Section]


def accuracy(store: Store, run: Run, task: str | None = None) -> float:
    """Held-out exact match (a fraction) of a finished run on ``task`` (default: its own)."""
    return store.result(run)["accuracy"][task or run.task]


def mean_spread(values: list[float]) -> str:
    """'mean ± sd (n=k)' in percent, the form every seeded number is reported in."""
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}% (n=1)"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}% (n={len(values)})"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
