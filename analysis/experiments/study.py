"""Study: copy, reversal and sorting under every tuning method, with attention-drift probes.

Two-layer bases (the 01 model's width, one head, two layers) are pretrained on sort-ascending
and on copy, then tuned to reverse (and, on the paper profile, to the other task) by every
method. Two layers, not
the 01 model's one, because the theorem's two drift notions only separate with depth: a prefix
leaves each layer's relative attention exactly unchanged given that layer's input (local drift
0), but changes the input of the next layer, so layer 1's attention can move relative to the
base model on the same tokens (downstream drift). With one layer both are the same number.
Reversal needs a new attention pattern (an anti-diagonal), which a prefix cannot create; full
fine-tuning and LoRA on W_Q/W_K can. The probes (``probe.probes``) run on float64 copies of the
tuned models.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.colors import LogNorm

from analysis.plots import bar_chart, learning_curves
from analysis.report import (
    Experiment,
    Figure,
    Profile,
    Section,
    accuracy,
    curve_caption,
    histories,
    markdown_table,
)
from analysis.report import mean_spread as ms
from analysis.runs import Run, Store
from probe.check import check_tuned
from probe.config import PRETRAIN_LR
from probe.probes import TheoremCheck
from tasks import get_task, test_set

METHODS = ("full", "lora", "prefix", "vt-prefix", "prompt", "prefix+lora")
PROMPT_LIKE = ("prefix", "vt-prefix", "prompt")  # methods whose heads stay frozen
LORA = {"rank": 4, "targets": ("W_Q", "W_K", "W_V", "W_O")}
OPTIONS = {
    "full": {},
    "lora": LORA,
    "prefix": {"length": 1},
    "vt-prefix": {"length": 1},
    "prompt": {"length": 1},
    "prefix+lora": {"length": 1, **LORA},
}
BASES = ("copy", "sort_asc")
TARGETS = {"copy": ("reverse", "sort_asc"), "sort_asc": ("reverse", "copy")}
PAIRS = [(b, t) for b in BASES for t in TARGETS[b]]
MAIN = ("sort_asc", "reverse")  # the pair with every seed and the prefix-length sweep


def pairs(p: Profile) -> list[tuple[str, str]]:
    """(base task, target task) pairs tuned: the main pair (smoke), reverse from both bases
    (quick, to fit its 30-minute budget), all four (paper)."""
    return p.pick([MAIN], [MAIN, ("copy", "reverse")], PAIRS)


def model(p: Profile) -> tuple[str, dict]:
    return p.pick(("tiny", {}), ("01", {"n_layers": 2}), ("01", {"n_layers": 2}))


def prefix_lengths(p: Profile) -> tuple[int, ...]:
    return p.pick((1, 2), (1, 16), (1, 4, 16, 64))


def base_run(p: Profile, task: str, seed: int) -> Run:
    name, overrides = model(p)
    return Run(
        task,
        preset=name,
        model=overrides,
        steps=p.pick(60, 1500, 5000),
        lr=PRETRAIN_LR,
        batch_size=64,
        seed=seed,
        eval_tasks=tuple(t for t in ("copy", "reverse", "sort_asc") if t != task),
    )


def seeds_for(p: Profile, pair: tuple[str, str]) -> tuple[int, ...]:
    return p.seeds if pair == MAIN else p.seeds[:1]


def tuned(p: Profile, base: Run, target: str, method: str, **options) -> Run:
    return Run(
        target,
        preset=base.preset,
        model=base.model,
        method=method,
        base=base,
        seed=base.seed,
        steps=p.pick(30, 400, 5000),
        # LoRA starts from a confident base (first loss 6-9) at lr 3e-2: with 50 warm-up steps
        # one seed of three collapsed to uniform predictions (0%); 100 fixed it (93.8%, seed 2;
        # figures/recipes.md).
        warmup=100 if "lora" in method else 50,
        options={**OPTIONS[method], **options},
        eval_tasks=(base.task,),
    )


def method_runs(p: Profile, pair: tuple[str, str], method: str) -> list[Run]:
    return [tuned(p, base_run(p, pair[0], s), pair[1], method) for s in seeds_for(p, pair)]


def length_runs(p: Profile, length: int) -> list[Run]:
    """Prefix-tuning on the main pair with a prefix of ``length`` positions, every seed."""
    return [tuned(p, base_run(p, MAIN[0], s), MAIN[1], "prefix", length=length) for s in p.seeds]


def runs(p: Profile) -> list[Run]:
    out = [r for pair in pairs(p) for m in METHODS for r in method_runs(p, pair, m)]
    return out + [r for n in prefix_lengths(p) for r in length_runs(p, n)]


# ---------------------------------------------------------------------------- probing


def probe_tokens(task: str, n: int = 64) -> torch.Tensor:
    """``n`` held-out sequences of ``task`` as model input (the last token is never read)."""
    return test_set(get_task(task), n).tokens[:, :-1]


def probe_run(
    store: Store, run: Run, tokens: torch.Tensor, dtype: torch.dtype = torch.float64
) -> TheoremCheck:
    """The theorem check of a finished tuning run on ``tokens``, in ``dtype`` (float64 copies of
    the base model and adapter): decomposition errors, local and downstream drift per layer."""
    base = store.model(run)
    adapter = store.adapter(run, base)  # checked against the base as saved, before the cast
    return check_tuned(base.to(dtype), adapter, tokens)


@torch.no_grad()
def sharpness(store: Store, base: Run, tokens: torch.Tensor) -> list[tuple[float, float]]:
    """Per layer, (mean largest attention weight, mean entropy in nats) of the base model's
    heads at the queries that predict outputs. A head whose softmax is saturated (largest
    weight ~1, entropy ~0) passes almost no gradient to its scores, since d softmax / d score
    = A (1 - A): no tuning method can re-aim it in a short budget."""
    model = store.model(base)
    task = get_task(base.task)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    out = []
    for layer in range(model.cfg.n_layers):
        pattern = cache["pattern", layer][:, :, task.input_len - 1 :]  # [batch, head, q, k]
        entropy = -(pattern * pattern.clamp_min(1e-30).log()).sum(-1)
        out.append((pattern.max(-1).values.mean().item(), entropy.mean().item()))
    return out


def drift_by_layer(check: TheoremCheck) -> tuple[list[float], list[float]]:
    """(local, downstream) mean total-variation drift per layer, max over heads."""
    local = [d.tv_mean.max().item() for d in check.local]
    down = [d.tv_mean.max().item() for d in check.downstream]
    return local, down


def drift_heatmaps(rows: list[str], local, down, path: Path, title: str) -> None:
    """Two annotated heatmaps (local, downstream drift), rows methods, columns layers, log
    colour scale shared between the panels; exact zeros are drawn at the scale's floor."""
    local, down = np.asarray(local), np.asarray(down)
    floor = 1e-17
    vmax = max(local.max(), down.max(), 1e-3)
    fig, axes = plt.subplots(1, 2, figsize=(8.5, 0.45 * len(rows) + 1.8), sharey=True)
    image = None
    for ax, values, name in zip(
        axes,
        (local, down),
        ("local (vs frozen head, same input)", "downstream (vs base model)"),
        strict=True,
    ):
        image = ax.imshow(
            np.maximum(values, floor),
            norm=LogNorm(vmin=floor, vmax=vmax),
            cmap="magma",
            aspect="auto",
        )
        middle = np.sqrt(floor * vmax)  # geometric middle of the colour scale
        for (i, j), v in np.ndenumerate(values):
            colour = "black" if v > middle else "white"  # dark text on the bright cells
            ax.text(j, i, f"{v:.1e}", ha="center", va="center", fontsize=7, color=colour)
        ax.set_xticks(range(values.shape[1]), [f"layer {j}" for j in range(values.shape[1])])
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("layer")
        ax.set_title(name)
    axes[0].set_ylabel("tuning method")
    fig.suptitle(title)
    fig.colorbar(image, ax=axes, label="mean total-variation drift of relative attention")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


@dataclass
class Measured:
    """The study's numbers, per (base task, target task) pair in ``pairs`` order.

    base: the untuned base's accuracy on the target, per seed; methods: method -> per pair,
    per seed; lengths / by_length: the prefix-length sweep on MAIN, per seed; sharpness: base
    task -> per layer (largest attention weight, entropy); curves: method -> learning curves on
    MAIN; drift: method -> (local, downstream) drift per layer on MAIN, seed 0.
    """

    pairs: list[tuple[str, str]]
    base: list[list[float]]
    methods: dict[str, list[list[float]]]
    lengths: tuple[int, ...]
    by_length: list[list[float]]
    sharpness: dict[str, list[tuple[float, float]]]
    curves: dict[str, list[list[dict]]]
    drift: dict[str, tuple[list[float], list[float]]]


def measure(store: Store, p: Profile) -> Measured:
    pairs_ = pairs(p)
    tokens = probe_tokens(MAIN[1])
    return Measured(
        pairs=pairs_,
        base=[
            [accuracy(store, base_run(p, b, s), t) for s in seeds_for(p, (b, t))] for b, t in pairs_
        ],
        methods={
            m: [[accuracy(store, r) for r in method_runs(p, pair, m)] for pair in pairs_]
            for m in METHODS
        },
        lengths=prefix_lengths(p),
        by_length=[[accuracy(store, r) for r in length_runs(p, n)] for n in prefix_lengths(p)],
        sharpness={
            b: sharpness(store, base_run(p, b, 0), tokens)
            for b in dict.fromkeys(b for b, _ in pairs_)
        },
        curves={m: histories(store, method_runs(p, MAIN, m)) for m in METHODS},
        drift={
            m: drift_by_layer(probe_run(store, method_runs(p, MAIN, m)[0], tokens)) for m in METHODS
        },
    )


def prefix_length_plot(lengths, by_length, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    means = [100 * np.mean(v) for v in by_length]
    ax.plot(lengths, means, "o-", label="mean over seeds")
    for n, v in zip(lengths, by_length, strict=True):
        ax.scatter([n] * len(v), [100 * a for a in v], s=10, color="black", zorder=3)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("prefix length P (positions per layer)")
    ax.set_ylabel("held-out exact match on reverse (%)")
    ax.set_ylim(-3, 103)
    ax.set_title(f"Study: prefix-tuning {MAIN[0]} -> {MAIN[1]} by prefix length")
    ax.legend(fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def _n_layers(m: Measured) -> int:
    return len(next(iter(m.sharpness.values())))


def _sharpness_table(m: Measured) -> str:
    n_layers = _n_layers(m)
    return markdown_table(
        ["base (seed 0)"]
        + [f"L{i} largest weight" for i in range(n_layers)]
        + [f"L{i} entropy (nats)" for i in range(n_layers)],
        [
            [b] + [f"{w:.6f}" for w, _ in v] + [f"{e:.2g}" for _, e in v]
            for b, v in m.sharpness.items()
        ],
    )


def _drift_table(m: Measured) -> str:
    n_layers = _n_layers(m)
    return markdown_table(
        ["method"]
        + [f"local L{i}" for i in range(n_layers)]
        + [f"downstream L{i}" for i in range(n_layers)],
        [[name] + [f"{x:.2e}" for x in m.drift[name][0] + m.drift[name][1]] for name in METHODS],
    )


def _figures(p: Profile) -> list[Figure]:
    return [
        Figure(
            "study_accuracy.png",
            "Held-out exact match of each method tuning a 2-layer base to a new task, plus "
            "the untuned base on the target; bars are means over seeds "
            f"({len(p.seeds)} on {MAIN[0]} -> {MAIN[1]}, 1 elsewhere), whiskers min-max, "
            "dots single seeds.",
        ),
        Figure(
            "study_curves.png",
            curve_caption(f"every method on {MAIN[0]} -> {MAIN[1]}"),
        ),
        Figure(
            "study_prefix_length.png",
            f"Prefix-tuning the {MAIN[0]} base to {MAIN[1]} with longer prefixes: a longer "
            "prefix adds bias directions but never a new attention pattern.",
        ),
        Figure(
            "study_drift.png",
            "Mean total-variation drift of relative (renormalised content) attention per "
            "layer on 64 reverse inputs, seed 0, float64 copies of the models. Left: the "
            "tuned head vs the frozen head on the same layer input, ~1e-16 (rounding) for "
            "prefix, virtual-token prefix and prompt, large for full fine-tuning and LoRA on "
            "W_Q/W_K. Right: tuned vs base model on the same tokens; a prefix moves layer "
            "1's attention only through its input. Exact zeros are drawn at 1e-17.",
        ),
    ]


def render(m: Measured, p: Profile, out: Path) -> Section:
    groups = [f"{b} -> {t}" for b, t in m.pairs]
    rows = [["base (no tuning)"] + [ms(v) for v in m.base]]
    rows += [[name] + [ms(v) for v in m.methods[name]] for name in METHODS]
    table = markdown_table(["method", *groups], rows)
    bar_chart(
        groups,
        {"base": m.base, **m.methods},
        out / "study_accuracy.png",
        "Study: 2-layer bases tuned to new tasks (mean, min-max over seeds)",
    )
    prefix_length_plot(m.lengths, m.by_length, out / "study_prefix_length.png")
    length_table = markdown_table(
        ["prefix length P", "reverse accuracy"],
        [[n, ms(v)] for n, v in zip(m.lengths, m.by_length, strict=True)],
    )
    copy_l0 = m.sharpness["copy"][0][0] if "copy" in m.sharpness else None
    learning_curves(
        {f"{name}: {MAIN[0]} -> {MAIN[1]}": {name: m.curves[name]} for name in METHODS},
        out / "study_curves.png",
        "Study: learning curves on reverse, held-out exact match",
    )
    drift_heatmaps(
        list(METHODS),
        [m.drift[name][0] for name in METHODS],
        [m.drift[name][1] for name in METHODS],
        out / "study_drift.png",
        f"Study: attention drift by layer, {MAIN[0]} -> {MAIN[1]} (seed 0, float64)",
    )
    return Section(
        title="Study: copy, reversal and sorting under every tuning method",
        text=__doc__.split("\n\n", 1)[1].strip()
        + (
            "\n\nWhy copy -> reverse fails for every method, full fine-tuning included: the copy "
            "base's layer-0 head puts a mean weight of "
            f"{copy_l0:.6f} on a single key at the output queries (a saturated softmax; the "
            "table below), and the gradient of a softmax weight with respect to its score is "
            "A (1 - A), about zero there, so the attention cannot be re-aimed from the reversal "
            "loss. The sort_asc base attends diffusely and every method that can change "
            "attention learns reversal from it."
            if copy_l0 is not None
            else ""
        ),
        tables=[table, _sharpness_table(m), length_table, _drift_table(m)],
        figures=_figures(p),
    )


def report(store: Store, p: Profile, out: Path) -> Section:
    return render(measure(store, p), p, out)


EXPERIMENT = Experiment("study", "Study", runs, report)
