"""Plot helpers shared by the experiments: every axis labelled, every colour scale with a bar."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from analysis.runs import Run, Store  # noqa: E402
from probe.adapters import Tuned  # noqa: E402

plt.rcParams.update({"figure.dpi": 110, "font.size": 9, "axes.titlesize": 10})


def patterns(store: Store, run: Run, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the attention pattern [head, T, P + T] of a finished run on one sequence."""
    base = store.model(run).eval()
    tuned = Tuned(base)
    if run.method is not None:
        tuned.add("a", store.adapter(run, base))
    with torch.no_grad():
        _, cache = tuned.run_with_cache(tokens[None], names_filter=lambda n: "hook_pattern" in n)
    return [cache["pattern", layer][0] for layer in range(base.cfg.n_layers)]


def attention_view(store: Store, models: dict[str, tuple[Run, torch.Tensor]], title: str) -> dict:
    """The payload of a ``probe.view`` page (``probe.view.View(payload).save(path)``): each
    finished run (name -> (run, tokens [n, T])) recorded and checked in float64 on its tokens,
    the first input drawn. Every run must share one base shape."""
    from probe import view

    pages = []
    for name, (run, tokens) in models.items():
        base = store.model(run).eval()
        tuned = store.adapter(run, base) if run.method is not None else None  # before the cast
        base = base.double()
        if tuned is None:
            raise ValueError(f"{name}: run {run.label} has no adapter to view")
        pages.append(view.model_view(name, base, tuned, tokens, what=run.label))
    return view.View.of(pages, title).data


def heatmap_grid(
    panels: list[tuple[str, torch.Tensor, int]],
    tokens: list[int],
    path: Path,
    title: str,
    input_len: int,
):
    """One heatmap per panel (title, pattern [T, P + T], P), shared colour bar.

    Rows are query positions, columns key positions (prefix columns first, labelled 'p');
    tick labels are the tokens; lines separate prefix | input | output.
    """
    n = len(panels)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols, 4.3 * rows), squeeze=False, gridspec_kw={"hspace": 0.4}
    )
    image = None
    for ax, (name, pattern, P) in zip(axes.flat, panels, strict=False):
        T = pattern.shape[0]
        image = ax.imshow(pattern.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_title(name)
        ax.set_xticks(range(P + T), ["p"] * P + [str(t) for t in tokens[:T]], fontsize=6)
        ax.set_yticks(range(T), [str(t) for t in tokens[:T]], fontsize=6)
        ax.set_xlabel("key position (token)")
        ax.set_ylabel("query position (token)")
        for x in (P - 0.5, P + input_len - 0.5):
            if x > 0:
                ax.axvline(x, color="white", lw=0.8)
        ax.axhline(input_len - 0.5, color="white", lw=0.8)
    for ax in axes.flat[n:]:
        ax.axis("off")
    height = fig.get_figheight()  # keep the title ~0.3 inch above the top row, at any size
    fig.subplots_adjust(top=1 - 0.8 / height)
    fig.suptitle(title, y=1 - 0.25 / height)
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def bar_chart(
    groups: list[str],
    series: dict[str, list[list[float]]],
    path: Path,
    title: str,
    ylabel: str = "held-out exact match (%)",
):
    """Grouped bars: for each series, per group, the mean over seeds with a min-max error bar.

    ``series[name][g]`` holds the per-seed values (fractions) for group g; dots show each seed.
    """
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(groups) * len(series) ** 0.5 + 2), 3.6))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        x = np.arange(len(groups)) + (i - (len(series) - 1) / 2) * width
        means = [100 * np.mean(v) for v in values]
        lo = [m - 100 * min(v) for m, v in zip(means, values, strict=True)]
        hi = [100 * max(v) - m for m, v in zip(means, values, strict=True)]
        ax.bar(x, means, width, yerr=[lo, hi], capsize=2, label=name)
        for xi, v in zip(x, values, strict=True):
            ax.scatter([xi] * len(v), [100 * a for a in v], s=6, color="black", zorder=3)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 105)
    ax.set_title(title)
    if len(series) > 1:
        # Outside the axes: inside, "best" still lands on a bar once every spot holds one.
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def matrix_heatmap(
    matrix: list[list[float]],
    row_labels: list[str],
    col_labels: list[str],
    path: Path,
    title: str,
    xlabel: str,
    ylabel: str,
    cbar_label: str = "held-out exact match (%)",
):
    """A labelled heatmap of a matrix of fractions, shown in percent with each cell annotated."""
    values = 100 * np.asarray(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(1.1 * len(col_labels) + 3, 0.42 * len(row_labels) + 1.6))
    image = ax.imshow(values, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    for (i, j), v in np.ndenumerate(values):
        ax.text(
            j,
            i,
            f"{v:.1f}",
            ha="center",
            va="center",
            fontsize=8,
            color="black" if v > 60 else "white",
        )
    ax.set_xticks(range(len(col_labels)), col_labels)
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=cbar_label)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def learning_curves(
    panels: dict[str, dict[str, list[list[dict]]]],
    path: Path,
    title: str,
    cols: int = 3,
):
    """Held-out accuracy against training step, one panel per group of runs.

    ``panels[panel][series]`` holds one history per seed (``TrainResult.history``: dicts with
    "step" and "accuracy"); a series keeps one colour, each seed is a line, so a reader sees at
    a glance whether a number was still rising when its run stopped.
    """
    n = len(panels)
    cols = min(n, cols)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.7 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    labels: dict[str, str] = {}  # series -> colour, shared by all panels for one legend
    for ax, (name, series) in zip(axes.flat, panels.items(), strict=False):
        for label, histories in series.items():
            colour = labels.setdefault(label, colours[len(labels) % len(colours)])
            for history in histories:
                steps = [0] + [h["step"] for h in history]
                acc = [np.nan] + [100 * h["accuracy"] for h in history]
                ax.plot(steps, acc, color=colour, lw=1.1, alpha=0.85, marker=".", ms=2.5)
        ax.set_title(name)
        ax.set_xlabel("training step")
        ax.set_ylabel("held-out exact match (%)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
    for ax in axes.flat[n:]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=c, lw=2) for c in labels.values()]
    fig.legend(handles, list(labels), loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=8)
    fig.suptitle(title + " (one line per seed)")
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
