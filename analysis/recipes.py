"""``probe recipes``: the time-to-accuracy search behind the experiments' training recipes.

The paper's recipes (constant lr 5e-4, batch 64, dropout 0.1, 20k-500k iterations) are far from
what converges fastest on a CPU. This search trains a few recipes side by side on seed 0 and
records each run's learning curve, so that a default can be chosen by how fast it reaches its
accuracy, in optimiser steps, sequences seen and wall-clock seconds:

- the mix4 base at the quick profile's 03 shape (learning rate, dropout, batch size), scored by
  exact match once the first output token is given (the skills the base holds; without a task
  token its plain exact match is capped near 25-30%);
- adapters on that base: a key/value prefix and the paper's virtual-token prefix on the new
  composition sort_asc_add1 (learning rate, weight decay), LoRA on the paper's targets on the
  new task hist (rank, learning rate, weight decay);
- LoRA on the study's sort_asc base tuned to reverse (learning rate, rank, targets, weight
  decay);
- on every seed, how long the 03 bases pretrain (the composition prefix on each), and 04's
  methods on hist from 04's own bases (LoRA at more steps or rank, full fine-tuning's budget).

The first four searches ran on the 4,000-step 03 bases the quick profile had then, which the full
profile still pretrains; the last three groups on the quick profile's own. Runs live in the
profile's store, so the trials on its own bases that are marked chosen are the very runs the
experiments use (trained once). Results go to ``figures/recipes.md`` and ``figures/recipes.png``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.ticker import EngFormatter

from analysis.experiments import paper03, paper04, study
from analysis.plots import plt
from analysis.report import CURVE_SEQUENCES, PROFILES, Profile, markdown_table
from analysis.runs import LEGACY_WEIGHT_DECAY, Run, RunsFailed, Store, run_all, variant
from probe.config import PRETRAIN_LR

QUICK = PROFILES["quick"]
PAPER_TARGETS = ("W_O", "W_in", "W_out")  # the paper's LoRATrainer: c_proj and c_fc


def lora_label(run: Run) -> str:
    return f"rank {dict(run.options)['rank']}, lr {run.effective_lr:g}, {wd_label(run)}"


def wd_label(run: Run) -> str:
    wd = run.effective_weight_decay
    return f"weight decay {wd:g}" if wd else "no weight decay"


@dataclass(frozen=True)
class Trial:
    group: str  # one panel of the figure
    label: str  # what differs from the group's other trials
    run: Run
    chosen: bool = False  # the recipe the experiments use


def base_label(run: Run) -> str:
    dropout = dict(run.model).get("dropout", 0.1)  # the presets' default
    return f"lr {run.effective_lr:g}, batch {run.batch_size}, dropout {dropout:g}"


def searched_bases(p: Profile) -> list[Run]:
    """The 03 bases the recipe search ran on: for the quick profile the 4,000-step bases it had
    then (the full profile's still), since its own were cut to 3,000 steps after the search (the
    group "03 bases' length" shows why); profile ``p``'s own otherwise."""
    return paper03.base_runs(PROFILES["full"] if p.name == "quick" else p)


def trials(p: Profile = QUICK) -> list[Trial]:
    """The search, on the runs of profile ``p`` it ran on."""
    bases = searched_bases(p)
    # The first chosen base trained at batch 128; the adapter trials before weight decay was
    # dropped ran on it (their keys stay those runs').
    old_base = variant(bases[0], batch_size=128)
    return [
        *_base_trials(bases[0], old_base),
        *_composition_trials(p, bases, old_base),
        *_lora_trials(p, bases, old_base),
        *_slow_base_trials(p, bases),
        *_reverse_trials(p),
        *_base_length_trials(p),
        *_hist_trials(p),
    ]


def _base_trials(base: Run, old_base: Run) -> list[Trial]:
    group = "mix4 base (03 shape)"
    out = [Trial(group, base_label(base), base, chosen=True)]
    out.append(Trial(group, base_label(old_base), old_base))
    for lr, dropout in ((PRETRAIN_LR, 0.1), (2.5 * base.effective_lr, 0.0)):
        run = variant(old_base, lr=lr, model={**dict(base.model), "dropout": dropout})
        out.append(Trial(group, base_label(run), run))
    # The paper's settings (lr 5e-4, batch 64, dropout 0.1) under our warm-up and cosine decay.
    paper = variant(base, lr=5e-4, batch_size=64, model={**dict(base.model), "dropout": 0.1})
    out.append(Trial(group, base_label(paper) + " (the paper's)", paper))
    return out


def _composition_trials(p: Profile, bases: list[Run], old_base: Run) -> list[Trial]:
    # Searched at half the experiment's budget (paper03.NEW_TASK_STEPS). The learning rate was
    # searched with weight decay 0.1 (then every run's); dropping it was the larger win, on two
    # seeds (DEFAULT_WEIGHT_DECAY).
    group = "prefix P=10 -> sort_asc_add1"
    base, out = bases[0], []

    def composition(on: Run, **changes) -> Run:
        run = paper03.tuned(p, on, "sort_asc_add1")
        return variant(run, steps=run.steps // 2, **changes)

    for lr in (1e-2, 1e-1, 3e-1):
        run = composition(old_base, lr=lr, weight_decay=LEGACY_WEIGHT_DECAY)
        out.append(Trial(group, f"batch-128 base: K/V prefix, lr {lr:g}, {wd_label(run)}", run))
    run = composition(old_base)
    out.append(Trial(group, f"batch-128 base: K/V prefix, lr 0.1, {wd_label(run)}", run))
    if len(bases) > 2:  # seed 2, the slowest composition of the first quick run
        seed2 = variant(bases[2], batch_size=128)
        for wd in (LEGACY_WEIGHT_DECAY, None):
            run = composition(seed2, weight_decay=wd)
            label = f"seed 2, batch-128 base: K/V prefix, lr 0.1, {wd_label(run)}"
            out.append(Trial(group, label, run))
    run = composition(base)
    out.append(Trial(group, f"K/V prefix, lr 0.1, {wd_label(run)}", run, chosen=True))
    run = composition(old_base, method="vt-prefix", weight_decay=LEGACY_WEIGHT_DECAY)
    out.append(Trial(group, f"batch-128 base: virtual-token prefix, lr 0.1, {wd_label(run)}", run))
    run = composition(base, method="vt-prefix")
    out.append(Trial(group, f"virtual-token prefix, lr 0.1, {wd_label(run)}", run))
    return out


def _lora_trials(p: Profile, bases: list[Run], old_base: Run) -> list[Trial]:
    group = "LoRA (W_O, W_in, W_out) -> hist"
    base, out = bases[0], []
    lora = paper04.tuned(p, base, "lora")
    old_lora = paper04.tuned(p, old_base, "lora")
    for rank, lr, steps, wd in (
        (1, 3e-2, lora.steps // 2, LEGACY_WEIGHT_DECAY),
        (4, 1e-2, lora.steps, LEGACY_WEIGHT_DECAY),
        (4, 1e-2, lora.steps, None),
        (4, 3e-2, lora.steps, LEGACY_WEIGHT_DECAY),
    ):
        options = {"rank": rank, "targets": paper04.LORA_TARGETS}
        run = variant(old_lora, lr=lr, steps=steps, options=options, weight_decay=wd)
        out.append(Trial(group, f"batch-128 base: {lora_label(run)}", run))
    every = {"rank": 1, "targets": ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_out")}
    run = variant(
        old_lora, lr=3e-2, steps=lora.steps // 2, options=every, weight_decay=LEGACY_WEIGHT_DECAY
    )
    out.append(Trial(group, f"batch-128 base: {lora_label(run)} on all six matrices", run))
    out.append(Trial(group, lora_label(lora), lora, chosen=True))
    if len(bases) > 1:  # seed 1, the slowest LoRA of the first quick run, on both bases
        run = variant(
            paper04.tuned(p, variant(bases[1], batch_size=128), "lora"),
            weight_decay=LEGACY_WEIGHT_DECAY,
        )
        out.append(Trial(group, f"seed 1, batch-128 base: {lora_label(run)}", run))
        run = paper04.tuned(p, bases[1], "lora")
        out.append(Trial(group, f"seed 1: {lora_label(run)}", run, chosen=True))
    return out


def _slow_base_trials(p: Profile, bases: list[Run]) -> list[Trial]:
    """LoRA on hist from seed 2's base, where every method leaves the 1% floor late: the
    settings that could shorten a plateau, at half the experiment's budget or at all of it,
    beside the chosen recipe from seed 2's base and seed 1's, and seed 0's at half."""
    if len(bases) < 3:
        return []
    group = "LoRA -> hist, seed 2's base"
    chosen = paper04.tuned(p, bases[2], "lora")
    half = variant(chosen, steps=chosen.steps // 2)
    seed1 = paper04.tuned(p, bases[1], "lora")
    paper = dict(chosen.options)
    QK = ("W_Q", "W_K", *paper["targets"])

    def lora(**options) -> dict:
        return {"options": {**paper, **options}}

    def label(note: str, run: Run) -> str:
        options = dict(run.options)
        settings = f"rank {options['rank']}, lr {run.effective_lr:g}, batch {run.batch_size}"
        return f"{note}{settings}, {run.steps} steps"

    grid = [
        ("seed 0's base: ", variant(half, base=bases[0], seed=0)),
        ("", half),
        ("PiSSA init, ", variant(half, **lora(init="pissa"))),
        ("rsLoRA scale (alpha 8), ", variant(half, **lora(alpha=8.0))),
        ("Adam beta2 0.999, ", variant(half, betas=(0.9, 0.999))),
        ("", variant(half, lr=4e-2)),
        ("", variant(half, batch_size=512, lr=3e-2, steps=half.steps // 2)),
        ("W_Q, W_K and the paper's (same count), ", variant(half, **lora(rank=3, targets=QK))),
        ("constant lr after warm-up, ", variant(chosen, schedule="constant")),
        ("Adam beta2 0.999, ", variant(chosen, betas=(0.9, 0.999))),
        ("Adam beta2 0.999, ", variant(chosen, betas=(0.9, 0.999), lr=3e-2)),
        ("seed 1's base: ", seed1),
        ("seed 1's base: Adam beta2 0.999, ", variant(seed1, betas=(0.9, 0.999))),
    ]
    out = [Trial(group, label(note, run), run) for note, run in grid]
    return [*out, Trial(group, label("", chosen), chosen, chosen=True)]


def _reverse_trials(p: Profile) -> list[Trial]:
    group = "LoRA, sort_asc base -> reverse"
    out = []
    for seed in (0, 2):
        reverse = study.tuned(p, study.base_run(p, "sort_asc", seed), "reverse", "lora")
        grid = [("rank 4 on W_Q/K/V/O, lr 3e-2", None, 3e-2)]
        if seed == 0:
            grid = [
                ("rank 4 on W_Q/K/V/O, lr 3e-3", None, 3e-3),
                ("rank 4 on W_Q/K/V/O, lr 1e-2", None, 1e-2),
                *grid,
                ("rank 1 on W_Q/K, lr 3e-2", {"rank": 1, "targets": ("W_Q", "W_K")}, 3e-2),
            ]
        for label, options, lr in grid:
            changes = {"options": options} if options else {}
            run = variant(reverse, lr=lr, warmup=50, weight_decay=LEGACY_WEIGHT_DECAY, **changes)
            out.append(Trial(group, f"seed {seed}: {label}, warm-up 50, {wd_label(run)}", run))
        old = variant(reverse, weight_decay=LEGACY_WEIGHT_DECAY)
        label = f"seed {seed}: rank 4 on W_Q/K/V/O, lr 3e-2, warm-up 100"
        out.append(Trial(group, f"{label}, {wd_label(old)}", old))
        out.append(Trial(group, f"{label}, {wd_label(reverse)}", reverse, chosen=True))
    return out


def _base_length_trials(p: Profile) -> list[Trial]:
    """The composition prefix on 03 bases pretrained for different lengths, every seed: how
    long a base pretrains decides what a prefix composes on it, long after its own curve is
    flat. The 4-layer bases have the paper's depth at the quick profile's width."""
    if p.name != "quick":
        return []
    group = "03 bases' length -> sort_asc_add1 prefix"
    four_layers = {**dict(paper03.model_overrides(p)), "n_layers": 4}
    out = []
    for base in paper03.base_runs(p):
        shapes = [
            ("2,000-step bases", variant(base, steps=2000)),
            (f"{base.steps:,}-step bases", base),
            ("4,000-step bases", variant(base, steps=4000)),
            ("4-layer, 2,000-step bases", variant(base, steps=2000, model=four_layers)),
        ]
        for label, on in shapes:
            run = paper03.tuned(p, on, "sort_asc_add1")
            out.append(Trial(group, f"seed {base.seed}, {label}", run, chosen=on == base))
    return out


def _hist_trials(p: Profile) -> list[Trial]:
    """04's methods on hist from 04's own bases, every seed: its LoRA, and the same at three
    times the steps or four times the rank (not the experiment's equal count); full fine-tuning
    at its old budget and its chosen one (a longer decay, stopped at its target)."""
    if p.name != "quick":
        return []
    lora_group, full_group = "LoRA -> hist on 04's bases", "full fine-tuning -> hist on 04's bases"
    loras, fulls = [], []
    for base in paper03.base_runs(p):
        lora, full = paper04.tuned(p, base, "lora"), paper04.tuned(p, base, "full")
        seed = f"seed {base.seed}: "
        loras.append(Trial(lora_group, f"{seed}rank 4, {lora.steps} steps", lora, chosen=True))
        if base.seed > 0:  # the seeds short of the bar
            longer = variant(lora, steps=3 * lora.steps, target_accuracy=0.95)
            loras.append(Trial(lora_group, f"{seed}rank 4, {longer.steps} steps", longer))
        if base.seed == 2:
            wider = variant(lora, options={**dict(lora.options), "rank": 16})
            loras.append(Trial(lora_group, f"{seed}rank 16, {wider.steps} steps", wider))
        old = variant(full, steps=1500, target_accuracy=None)
        fulls.append(Trial(full_group, f"{seed}1500 steps", old))
        label = f"{seed}up to {full.steps} steps, stop at 95%"
        fulls.append(Trial(full_group, label, full, chosen=True))
    return loras + fulls


def milestone(history: list[dict], level: float, key: str) -> str:
    """The first point's ``key`` (step, sequences, seconds) at which accuracy >= level."""
    for h in history:
        if h["accuracy"] >= level:
            return f"{h[key]:,.0f}"
    return "not reached"


def report(store: Store, figures_dir: Path, p: Profile = QUICK) -> Path:
    done = [t for t in trials(p) if store.done(t.run)]
    rows = []
    for t in done:
        r = store.result(t.run)
        h = r["history"]
        rows.append(
            [
                t.group,
                t.label + (" **(chosen)**" if t.chosen else ""),
                t.run.steps,
                t.run.batch_size,
                f"{100 * h[-1]['accuracy']:.1f}%",
                milestone(h, 0.5, "step"),
                milestone(h, 0.9, "step"),
                milestone(h, 0.9, "sequences"),
                milestone(h, 0.9, "seconds"),
                f"{h[-1]['seconds']:.0f}",
            ]
        )
    table = markdown_table(
        [
            "search",
            "recipe",
            "steps",
            "batch",
            f"final ({CURVE_SEQUENCES} held-out)",
            "step to 50%",
            "step to 90%",
            "sequences to 90%",
            "seconds to 90%",
            "seconds",
        ],
        rows,
    )
    searched, own = searched_bases(p)[0].steps, paper03.base_runs(p)[0].steps
    figure = figures_dir / "recipes.png"
    plot(store, done, figure)
    text = "\n".join(
        [
            "# Time to accuracy: the recipe search",
            "",
            f"Generated by `probe recipes --profile {p.name}`; do not edit by hand. Each group "
            "trains a few recipes side by side from the same seed and records each run's "
            "learning curve, so that a default is chosen by how fast it reaches its accuracy in "
            "optimiser steps, sequences seen and training seconds.",
            "",
            "Seed 0 unless a label names another; one thread per run. Accuracy is held-out "
            f"exact match on {CURVE_SEQUENCES} test sequences at each curve point (the mix4 "
            "base: with the first output token given). The trials were trained on a 2-core "
            "machine, some beside other work (load 2-4), so the seconds, training time "
            "without the evaluations, are inflated and noisy and compare only trials trained "
            "side by side; "
            "steps and sequences compare across all. The mix4 base, prefix and first two LoRA "
            f"searches ran on the {searched:,}-step 03 bases the quick profile had then (the "
            "full profile's); their chosen adapter rows are at half the experiment's budget or "
            "on those bases. The study's chosen rows and those of the last three groups, on the "
            f"quick profile's own {own:,}-step bases, are the experiments' own runs.",
            "",
            table,
            "",
            "![recipes.png](recipes.png)",
            "",
            "*recipes.png*: learning curves of every trial, against sequences seen (top) and "
            "training seconds (bottom); the chosen recipe is drawn thick.",
            "",
        ]
    )
    path = figures_dir / "recipes.md"
    path.write_text(text)
    return path


PANELS_PER_ROW = 4


def plot(store: Store, done: list[Trial], path: Path) -> None:
    """One column per group, at most PANELS_PER_ROW to a row: accuracy against sequences seen
    above accuracy against training seconds, the group's legend below them."""
    groups = list(dict.fromkeys(t.group for t in done))
    ncols = min(PANELS_PER_ROW, len(groups))
    bands = [groups[i : i + ncols] for i in range(0, len(groups), ncols)]
    # Each band: two rows of curves, then a row as tall as its longest legend (7-point lines).
    legend_heights = [0.5 + 0.15 * max(sum(t.group == g for t in done) for g in b) for b in bands]
    heights = [h for legend in legend_heights for h in (3.4, 3.4, legend)]
    fig = plt.figure(figsize=(4.8 * ncols, sum(heights) + 0.8), layout="constrained")
    grid = fig.add_gridspec(len(heights), ncols, height_ratios=heights)
    first = None
    for index, group in enumerate(groups):
        band, col = divmod(index, ncols)
        rows = [fig.add_subplot(grid[3 * band + r, col], sharey=first) for r in (0, 1)]
        first = first or rows[0]
        members = [t for t in done if t.group == group]
        # Beyond ten curves the default cycle repeats its colours; tab20 keeps each distinct,
        # its ten dark shades first so that no two neighbours differ only in lightness.
        tab20 = plt.cm.tab20.colors
        colors = plt.cm.tab10.colors if len(members) <= 10 else tab20[::2] + tab20[1::2]
        for i, t in enumerate(members):
            h = store.result(t.run)["history"]
            acc = [100 * p["accuracy"] for p in h]
            style = {
                "lw": 2.6 if t.chosen else 1.2,
                "marker": ".",
                "ms": 3,
                "color": colors[i % len(colors)],
            }
            for ax, key in zip(rows, ("sequences", "seconds"), strict=True):
                ax.plot(np.array([p[key] for p in h]), acc, label=t.label, **style)
        rows[0].set_title(group)
        rows[0].set_xlabel("sequences seen")
        rows[1].set_xlabel("training seconds (1 thread)")
        rows[0].xaxis.set_major_formatter(EngFormatter(sep=""))  # 100k, not 100000
        for ax in rows:
            ax.grid(alpha=0.3)
            ax.set_ylabel("held-out exact match (%)")
        legend = fig.add_subplot(grid[3 * band + 2, col])
        legend.axis("off")
        legend.legend(
            *rows[0].get_legend_handles_labels(), fontsize=7, loc="upper left", frameon=False
        )
    fig.suptitle("Time to accuracy of each recipe (seed 0 unless the label names another)")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def recipes(
    jobs: int, device: str, runs_dir: Path, figures_dir: Path, profile: str = "quick"
) -> Path:
    p = PROFILES[profile]
    store = Store(Path(runs_dir) / p.name)
    start = time.perf_counter()
    n = run_all([t.run for t in trials(p)], store, jobs, device)
    figures_dir.mkdir(parents=True, exist_ok=True)
    path = report(store, figures_dir, p)
    print(f"{n} runs trained in {time.perf_counter() - start:.0f} s; table in {path}")
    return path


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("recipes", help="the time-to-accuracy search behind the recipes")
    p.add_argument("--jobs", type=int, default=1, help="parallel training processes")
    p.add_argument("--device", default="cpu")
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="result store")
    p.add_argument("--figures-dir", type=Path, default=Path("figures"))
    p.add_argument(
        "--profile", default="quick", choices=["smoke", "quick"], help="smoke: a seconds-long test"
    )
    p.set_defaults(run=cmd_recipes)


def cmd_recipes(a: argparse.Namespace) -> int:
    """0 when every trial finished; 1 when some failed (the table shows the rest)."""
    try:
        recipes(a.jobs, a.device, a.runs_dir, a.figures_dir, a.profile)
    except RunsFailed as e:
        report(Store(Path(a.runs_dir) / a.profile), a.figures_dir, PROFILES[a.profile])
        print(f"probe recipes: {e}", file=sys.stderr)
        return 1
    return 0
