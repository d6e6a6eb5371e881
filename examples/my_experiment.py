"""An experiment of one's own, run by ``probe reproduce`` without touching analysis/.

A task of our own (rotate1: shift the input right by one) is learnt from a sort-ascending base by
full fine-tuning and by a P=4 prefix. The experiment declares its runs, then reports a figure, a
table and a claims-ledger row, into a figures folder of our choosing:

    probe reproduce --experiments-module examples/my_experiment.py --profile smoke \\
        --runs-dir runs/mine --figures-dir figures_mine
    probe results --runs-dir runs/mine          # the runs as a table

``--experiments-module`` takes a .py file or a module on the Python path; the module defines
``EXPERIMENT`` (or ``EXPERIMENTS``, a list). With no experiment names, only its experiments run.
Tasks it registers resolve in ``--jobs N`` workers too (they import the module again).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from analysis.report import (
    Claim,
    Experiment,
    Figure,
    Profile,
    Section,
    accuracy,
    markdown_table,
    mean_spread,
)
from analysis.runs import Run, Store
from tasks import Task, register


def rotate(x):
    """long [batch, 10] -> long [batch, 10]: the last digit first, the rest shifted right."""
    return x.roll(1, dims=1)


ROTATE = register(Task("rotate1", rotate, vocab_size=8, description="shift right by one"))
METHODS = ("full", "prefix")
# Budgets per profile (smoke: seconds, for the tests); a profile not listed gets quick's.
BUDGET = {"smoke": ("tiny", 60, 30), "quick": ("01", 1500, 600), "paper": ("01", 20000, 10000)}


def base(p: Profile, seed: int) -> Run:
    preset, steps, _ = BUDGET.get(p.name, BUDGET["quick"])
    return Run("sort_asc", preset=preset, steps=steps, seed=seed)


def tuned(p: Profile, method: str, seed: int) -> Run:
    options = {"length": 4} if method == "prefix" else {}
    _, _, steps = BUDGET.get(p.name, BUDGET["quick"])
    return Run(
        "rotate1",
        method=method,
        base=base(p, seed),
        steps=steps,
        seed=seed,
        options=options,
        eval_tasks=("sort_asc",),  # does the tuned model still sort?
    )


def runs(p: Profile) -> list[Run]:
    return [tuned(p, m, s) for m in METHODS for s in p.seeds]


def report(store: Store, p: Profile, figures_dir: Path) -> Section:
    acc = {m: [accuracy(store, tuned(p, m, s)) for s in p.seeds] for m in METHODS}
    kept = {m: [accuracy(store, tuned(p, m, s), "sort_asc") for s in p.seeds] for m in METHODS}

    fig, ax = plt.subplots(figsize=(4, 3))
    means = [100 * sum(acc[m]) / len(acc[m]) for m in METHODS]
    ax.bar(METHODS, means, color=["tab:blue", "tab:orange"])
    ax.set_ylabel("rotate1 held-out exact match (%)")
    ax.set_ylim(0, 100)
    fig.tight_layout()
    fig.savefig(figures_dir / "mine_rotate1.png", dpi=100)
    plt.close(fig)

    table = markdown_table(
        ["method", "rotate1", "sort_asc after tuning"],
        [[m, mean_spread(acc[m]), mean_spread(kept[m])] for m in METHODS],
    )
    better = min(acc["full"]) > max(acc["prefix"])
    claim = Claim(
        "full fine-tuning learns rotate1 better than a P=4 prefix",
        "mine",
        f"full {mean_spread(acc['full'])} vs prefix {mean_spread(acc['prefix'])}",
        "supported" if better else "refuted",
    )
    return Section(
        "Mine: rotate1 from a sort-ascending base",
        text=f"Base: preset {base(p, 0).preset}, {base(p, 0).steps} steps on sort_asc.",
        tables=[table],
        figures=[Figure("mine_rotate1.png", "rotate1 accuracy by method (mean over seeds).")],
        claims=[claim],
    )


EXPERIMENT = Experiment("mine", "rotate1 from a sort-ascending base", runs, report)
