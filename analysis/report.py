"""What an experiment reports: profiles, figures with captions, tables and claims-ledger rows."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from analysis.runs import Run, Store
from analysis.store import CURVE_SEQUENCES


@dataclass(frozen=True)
class Profile:
    """How big to run: ``smoke`` (seconds, for tests), ``quick`` (the README's main job, about
    half an hour on a 2-core laptop CPU), ``full`` (the quick profile's runs plus longer budgets
    where its curves still rise, sharing every other run with it; docs/benchmarks.md gives its
    measured cost), ``paper`` (the paper's model sizes and budgets, meant for a GPU)."""

    name: str

    def __post_init__(self):
        if self.name not in PROFILE_NAMES:
            raise ValueError(f"unknown profile {self.name!r}; choose from {PROFILE_NAMES}")

    def pick(self, smoke, quick, paper, full=None):
        """The value for this profile; ``full`` defaults to the quick profile's."""
        full = quick if full is None else full
        return {"smoke": smoke, "quick": quick, "full": full, "paper": paper}[self.name]

    @property
    def seeds(self) -> tuple[int, ...]:
        return self.pick((0,), (0, 1, 2), (0, 1, 2))


PROFILE_NAMES = ("smoke", "quick", "full", "paper")
PROFILES = {name: Profile(name) for name in PROFILE_NAMES}


@dataclass
class Figure:
    file: str  # relative to the figures directory
    caption: str


@dataclass
class Page:
    """An interactive page (one self-contained HTML file, ``probe.view``) beside the figures."""

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
    pages: list[Page] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)


@dataclass(frozen=True)
class Experiment:
    """What ``probe reproduce`` runs: the runs a profile needs, and the report made from them.

    ``default=False`` makes it opt-in: ``probe reproduce`` with no names leaves it out, naming
    it runs it (``probe reproduce atlas``), and a reproduce of opt-in experiments alone writes
    its index to ``<names>.md`` instead of the default set's ``README.md``.
    """

    name: str
    title: str
    runs: Callable[[Profile], list[Run]]
    report: Callable[[Store, Profile, Path], Section]
    default: bool = True


def accuracy(store: Store, run: Run, task: str | None = None) -> float:
    """Held-out exact match (a fraction) of a finished run on ``task`` (default: its own)."""
    return store.result(run)["accuracy"][task or run.task]


def mean_spread(values: list[float]) -> str:
    """'mean ± sd (n=k, min m)' in percent, the form every seeded number is reported in: the
    worst seed beside the mean, since a mean that clears a bar can hide a seed that does not."""
    values = [100 * v for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}% (n=1)"
    return (
        f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}% "
        f"(n={len(values)}, min {min(values):.1f})"
    )


def rise(history: list[dict], tail: float = 0.25) -> float:
    """How much held-out accuracy (a fraction) rose over the last ``tail`` of a run's curve.

    Compares the final point with the last point at or before (1 - tail) of the steps; a run
    whose curve still rises was cut off, and its final number is not a conclusion.
    """
    end = history[-1]
    cut = (1 - tail) * end["step"]
    earlier = [h for h in history if h["step"] <= cut] or history[:1]
    return end["accuracy"] - earlier[-1]["accuracy"]


FLAT = 0.02  # a curve that rose less than 2 points over its last quarter has flattened


def curve_note(store: Store, runs: list[Run]) -> str:
    """'flat' or 'still rising (+x pp over the last quarter)' for a group of seeds. Runs that
    stopped at their own ``target_accuracy`` are named with the step they stopped at: their
    curves end on a rise by design, which says nothing about a cut-off. No end point is
    extrapolated: these curves plateau and rise late, so a straight line says nothing."""
    results = [store.result(r) for r in runs]
    stopped = [
        (r, res["steps"])
        for r, res in zip(runs, results, strict=True)
        if r.target_accuracy is not None and res["steps"] < r.steps
    ]
    if not stopped:
        return _cut_off_note(store, runs)
    target_pct = 100 * stopped[0][0].target_accuracy
    steps = " / ".join(f"{s:,}" for _, s in stopped)
    note = f"{len(stopped)} of {len(runs)} stopped at the {target_pct:.0f}% target (steps {steps})"
    if len(stopped) == len(runs):
        return note
    cut_off = [r for r, res in zip(runs, results, strict=True) if res["steps"] == r.steps]
    return f"{_cut_off_note(store, cut_off)}; {note}"


def _cut_off_note(store: Store, runs: list[Run]) -> str:
    worst = max(rise(store.result(r)["history"]) for r in runs)
    if worst < FLAT:
        return "flat"
    return f"still rising (+{100 * worst:.1f} pp over the last quarter)"


def curve_caption(subject: str, lines: str = "one line per seed", note: str = "") -> str:
    """The caption of a learning-curve figure: whose curves, how they were scored, and how to
    read a flat or rising end. ``note`` adds what is particular to the figure."""
    return (
        f"Learning curves of {subject} (held-out exact match on {CURVE_SEQUENCES} test "
        f"sequences while training, {lines}).{' ' + note if note else ''} A flat end means the "
        "final number is converged at this budget, a rising one that the run was cut off."
    )


def histories(store: Store, runs: list[Run]) -> list[list[dict]]:
    """The learning curves (one per run) that ``plots.learning_curves`` draws."""
    return [store.result(r)["history"] for r in runs]


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
