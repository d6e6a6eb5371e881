"""Sweeps behind the field's claims about prefix-tuning (the claims ledger's rows, ``ledger.py``).

The paper-03 mix4 bases (pretrained on the uniform mixture of sort-ascending, sort-descending,
+1 and +2 with no task token, so they hold skills a prefix can elicit but cannot tell which one
is wanted; the very runs paper03 uses) are tuned to sort-descending by each method while one
knob moves at a time: prefix length, learning rate, soft-prompt initialisation, training-set
size (a fixed set of n samples, against fresh samples every step), and the prefix + LoRA hybrid
against prefix and LoRA alone. sort-descending at P=1 and a short budget is a target where the
knobs matter: the untuned base gets about a quarter of it, and an easy target such as +1 sits at
99-100% for every knob, which can tell no claim apart. Every point has the same seeds; shared
settings are the same Run, trained once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from analysis.experiments import paper03
from analysis.report import Experiment, Figure, Profile, Section, accuracy, markdown_table
from analysis.report import mean_spread as ms
from analysis.runs import Run, Store
from probe.train import DEFAULT_LR

TARGET = "sort_desc"
LORA = {"rank": 1, "targets": ("W_Q", "W_V")}  # PEFT's default targets, the smallest rank
OPTIONS = {
    "full": {},
    "lora": LORA,
    "prefix": {"length": 1},
    "prompt": {"length": 1, "init": "random"},
    "prefix+lora": {"length": 1, **LORA},
}
# Both grids span 100x around the method's default; prefix's default is already the top of the
# range where its training is stable (DEFAULT_LR's comment), so its grid extends downwards.
LR_FACTORS = {"prefix": (0.01, 0.1, 1.0), "full": (0.1, 1.0, 10.0)}


def base_runs(p: Profile) -> list[Run]:
    return paper03.base_runs(p)


def tuned(
    p: Profile,
    base: Run,
    method: str,
    lr: float | None = None,
    train_size: int | None = None,
    **options,
) -> Run:
    return Run(
        TARGET,
        preset=base.preset,
        model=base.model,
        method=method,
        base=base,
        seed=base.seed,
        steps=p.pick(30, 200, 5000, 400),
        lr=lr or DEFAULT_LR[method],
        train_size=train_size,
        options={**OPTIONS[method], **options},
    )


def lengths(p: Profile) -> tuple[int, ...]:
    return p.pick((1, 2), (1, 16, 64), (1, 2, 4, 8, 16, 32, 64))


def train_sizes(p: Profile) -> tuple[int | None, ...]:
    return p.pick((16, None), (8, 64, 512, None), (8, 32, 128, 512, None))


# Each sweep: name -> {point label: runs over seeds}.
def sweeps(p: Profile) -> dict[str, dict[str, list[Run]]]:
    bases = base_runs(p)

    def each(method, **kw):
        return [tuned(p, b, method, **kw) for b in bases]

    return {
        "length": {f"P={n}": each("prefix", length=n) for n in lengths(p)},
        "lr prefix": {
            f"{f:g}x": each("prefix", lr=f * DEFAULT_LR["prefix"]) for f in LR_FACTORS["prefix"]
        },
        "lr full": {f"{f:g}x": each("full", lr=f * DEFAULT_LR["full"]) for f in LR_FACTORS["full"]},
        "init": {i: each("prompt", init=i) for i in ("random", "vocab")},
        "methods": {m: each(m) for m in ("prefix", "prompt", "lora", "prefix+lora", "full")},
        "data prefix": {str(n or "fresh"): each("prefix", train_size=n) for n in train_sizes(p)},
        "data full": {str(n or "fresh"): each("full", train_size=n) for n in train_sizes(p)},
    }


def runs(p: Profile) -> list[Run]:
    return [r for sweep in sweeps(p).values() for rs in sweep.values() for r in rs]


@dataclass
class Measured:
    """The sweeps' numbers. points: sweep name -> point label -> held-out accuracy on TARGET
    per seed, in ``sweeps`` order; base: the untuned mix4 bases' accuracy per seed on each of
    their eval tasks."""

    points: dict[str, dict[str, list[float]]]
    base: dict[str, list[float]]


def measure(store: Store, p: Profile) -> Measured:
    """Every sweep point's accuracies and the untuned bases', read from the store."""
    bases = base_runs(p)
    return Measured(
        points={
            name: {k: [accuracy(store, r) for r in rs] for k, rs in sweep.items()}
            for name, sweep in sweeps(p).items()
        },
        base={t: [accuracy(store, b, t) for b in bases] for t in bases[0].eval_tasks},
    )


def _line(ax, xs, per_point, label, **kw):
    means = [100 * np.mean(v) for v in per_point]
    sds = [100 * np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in per_point]
    ax.errorbar(xs, means, yerr=sds, marker="o", capsize=3, label=label, **kw)
    for x, v in zip(xs, per_point, strict=True):
        ax.scatter([x] * len(v), [100 * a for a in v], s=8, color="black", zorder=3)


def plot(m: Measured, p: Profile, path: Path) -> None:
    """sweeps.png: one panel per knob, and the untuned base on each skill."""
    s = m.points
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    ylabel = f"held-out exact match on {TARGET} (%)"

    ax = axes[0, 0]
    ns = lengths(p)
    _line(ax, ns, list(s["length"].values()), "prefix")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("prefix length P")
    ax.set_title("prefix length")

    ax = axes[0, 1]
    for method in ("prefix", "full"):
        lrs = [f * DEFAULT_LR[method] for f in LR_FACTORS[method]]
        _line(ax, lrs, list(s[f"lr {method}"].values()), method)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_title("learning rate")

    ax = axes[0, 2]
    groups = list(s["init"])
    data = list(s["init"].values())
    ax.bar(range(len(groups)), [100 * np.mean(v) for v in data], color=["tab:blue", "tab:orange"])
    for i, v in enumerate(data):
        ax.scatter([i] * len(v), [100 * a for a in v], s=8, color="black", zorder=3)
    ax.set_xticks(range(len(groups)), [f"prompt, {g} init" for g in groups])
    ax.set_xlabel("soft-prompt initialisation")
    ax.set_title("prompt initialisation (P=1)")

    ax = axes[1, 0]
    sizes = train_sizes(p)
    xs = [n or 4 * max(n for n in sizes if n) for n in sizes]
    for method in ("prefix", "full"):
        _line(ax, xs, list(s[f"data {method}"].values()), method)
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks(xs, [str(n or "fresh") for n in sizes])
    ax.set_xlabel("training-set size (fixed samples; 'fresh': new samples every step)")
    ax.set_title("low data")

    ax = axes[1, 1]
    groups = list(s["methods"])
    data = list(s["methods"].values())
    ax.bar(range(len(groups)), [100 * np.mean(v) for v in data], color="tab:green")
    for i, v in enumerate(data):
        ax.scatter([i] * len(v), [100 * a for a in v], s=8, color="black", zorder=3)
    ax.set_xticks(range(len(groups)), groups, rotation=20)
    ax.set_xlabel("tuning method (P=1, LoRA rank 1 on W_Q/W_V)")
    ax.set_title("methods and the prefix + LoRA hybrid")

    ax = axes[1, 2]
    tasks = ("sort_asc", "sort_desc", "add1", "add2")
    data = [m.base[t] for t in tasks]
    ax.bar(range(len(tasks)), [100 * np.mean(v) for v in data], color="tab:grey")
    for i, v in enumerate(data):
        ax.scatter([i] * len(v), [100 * a for a in v], s=8, color="black", zorder=3)
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_xlabel("task")
    ax.set_title("the mix4 base, untuned")

    for ax in axes.flat:
        ax.set_ylim(-3, 103)
        ax.set_ylabel(ylabel if ax is not axes[1, 2] else "held-out exact match (%)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(
        f"Sweeps on a mix4 base tuned to {TARGET}: mean ± sd over {len(p.seeds)} seed(s), "
        "dots single seeds"
    )
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def render(m: Measured, p: Profile, out: Path) -> Section:
    """sweeps.png into ``out``, and the Section: the untuned bases' table, then one table per
    sweep."""
    plot(m, p, out / "sweeps.png")
    tables = [
        markdown_table(["mix4 base, untuned", "accuracy"], [[t, ms(v)] for t, v in m.base.items()])
    ]
    tables += [
        markdown_table([name, f"{TARGET} accuracy"], [[k, ms(v)] for k, v in points.items()])
        for name, points in m.points.items()
    ]
    return Section(
        title="Sweeps behind the field's claims",
        text=__doc__.split("\n\n", 1)[1].strip(),
        tables=tables,
        figures=[
            Figure(
                "sweeps.png",
                f"A mix4 base tuned to {TARGET}, one knob at a time: prefix length, learning "
                "rate (prefix and full fine-tuning around their defaults), soft-prompt "
                "initialisation, training-set size, and every method side by side; the last "
                "panel is the untuned base on each skill. Points are means over seeds with sd "
                "error bars; dots single seeds.",
            )
        ],
    )


def report(store: Store, p: Profile, out: Path) -> Section:
    return render(measure(store, p), p, out)


EXPERIMENT = Experiment("sweeps", "Sweeps", runs, report)
