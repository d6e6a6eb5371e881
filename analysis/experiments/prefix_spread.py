"""Appendix B of the paper, measured: a long prefix barely re-weights its positions per input.

The paper trains 20 length-10 prefixes of GPT-2 (Emotion classification) and measures, at the
last position, the attention over the 10 prefix positions renormalised to sum to 1 (beta, the
weights of the prefix's value mix ``b = sum_p beta_p V_p``), then the gap between its 1st and
99th percentile across inputs, per (prefix, layer, position), averaged: 0.016-0.174 per layer,
0.107 on average. A small gap means beta hardly depends on the input, so the prefix adds almost
one fixed bias and leaves most of the span of its 10 value vectors unused. The paper's notebook
indexes the head axis with the layer counter, so it measured head l of layer l only; we
measure every head, and report the head = layer slice beside it.

Here the prefixes are paper 03's length-10 key/value prefixes on the four skills its mix4 bases
hold (sort ascending, sort descending, +1, +2; 99-100% held out), the very runs paper03 trains,
plus extra prefix seeds on the first base for sort_asc so that one (base, task) has several
prefixes, as the paper's 20 share one. The query is the last input position, where the answer
starts (it sees the input only); the gap over every output-predicting position is given too.
Beside the spread, ``probe.spread.bias_effective_rank`` compares the rank of span{V_p} with the
effective rank (participation ratio; the rank holding 99% of the energy) of the biases the
prefix actually produces across those inputs. Everything runs in float64.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from analysis.experiments import paper03
from analysis.report import (
    Claim,
    Experiment,
    Figure,
    Profile,
    Section,
    accuracy,
    markdown_table,
)
from analysis.runs import Run, Store, variant
from probe.probes import records_from_cache
from probe.spread import bias_effective_rank, prefix_attention_spread
from tasks import get_task, test_set

TASKS = paper03.PRETRAIN  # the skills the bases hold: every prefix there succeeds
SEED_TASK = "sort_asc"  # the (first base, task) that gets extra prefix seeds
# The paper's Appendix B, per GPT-2 layer 0..11 (head l of layer l; mean over its 20 prefixes).
PAPER = (0.016, 0.102, 0.174, 0.088, 0.076, 0.069, 0.080, 0.106, 0.163, 0.147, 0.156, 0.102)

# The acceptance bars, fixed before any result was seen. Spread: every layer's gap (mean over
# prefixes, heads and positions) below 0.25 -> supported; the mean over layers at 0.5 or more
# -> refuted. Rank: in every layer the biases' participation ratio at most half the span rank
# (mean over prefixes and heads) -> supported; at 0.8 of it or more on average -> refuted.
# Both need prefixes that learned their tasks: mean held-out accuracy >= 90%.
SPREAD_BAR, SPREAD_REFUTE = 0.25, 0.5
RANK_BAR, RANK_REFUTE = 0.5, 0.8
SUCCESS = 0.90


def extra_seeds(p: Profile) -> tuple[int, ...]:
    """Prefix seeds added on the first base for SEED_TASK (paper03 trains seed = base seed)."""
    return p.pick((1,), (1, 2, 3, 4), tuple(range(1, 20)))


def n_inputs(p: Profile) -> int:
    return p.pick(64, 512, 2000)


def prefixes(p: Profile) -> list[tuple[str, Run]]:
    """(label, run) of every length-10 prefix measured: paper03's on TASKS, then the extras."""
    bases = paper03.base_runs(p)
    out = [(f"{t} b{b.seed}", paper03.tuned(p, b, t)) for b in bases for t in TASKS]
    first = paper03.tuned(p, bases[0], SEED_TASK)
    return out + [(f"{SEED_TASK} b0 s{s}", variant(first, seed=s)) for s in extra_seeds(p)]


def runs(p: Profile) -> list[Run]:
    return [r for _, r in prefixes(p)]


# ---------------------------------------------------------------------------- measuring


def records(store: Store, run: Run, tokens: torch.Tensor) -> list:
    """Float64 per-layer records of a finished key/value-prefix run on ``tokens``."""
    base = store.model(run)
    adapter = store.adapter(run, base)  # checked against the base as saved, before the cast
    base, adapter = base.double(), adapter.double()
    with torch.no_grad():
        _, cache = base.run_with_cache(tokens, prefix=adapter.prefix(base))
    return records_from_cache(base, cache)


@dataclass
class Measured:
    """Per prefix (``labels`` order) and layer; h heads, P prefix positions.

    accuracy [n]: held-out exact match of each prefix on its task.
    gap [n, L, h, P]: 1st-99th percentile gap of beta over the inputs at the last input position.
    gap_outputs [n, L]: the same averaged over every output-predicting position (and heads,
        positions).
    span_rank, bias_rank, energy_rank [n, L, h]; participation, fixed_share [n, L, h]: as in
        ``probe.spread.BiasRank``, over the inputs at the last input position.
    """

    labels: list[str]
    accuracy: list[float]
    gap: np.ndarray
    gap_outputs: np.ndarray
    span_rank: np.ndarray
    bias_rank: np.ndarray
    energy_rank: np.ndarray
    participation: np.ndarray
    fixed_share: np.ndarray
    n_inputs: int
    d_head: int

    @property
    def per_layer(self) -> np.ndarray:
        """[n, L] the gap averaged over heads and prefix positions."""
        return self.gap.mean((2, 3))

    @property
    def head_equals_layer(self) -> np.ndarray:
        """[n, L] the gap of head (l mod h) of layer l: the paper notebook's slice."""
        h = self.gap.shape[2]
        return np.stack([self.gap[:, i, i % h].mean(-1) for i in range(self.gap.shape[1])], 1)


def measure(store: Store, p: Profile) -> Measured:
    """Every prefix's spread and bias ranks, read from the store and recomputed in float64."""
    return measure_prefixes(store, prefixes(p), n_inputs(p))


def measure_prefixes(store: Store, labelled: list[tuple[str, Run]], n: int) -> Measured:
    """:func:`measure` for any finished (label, key/value-prefix run) pairs, on ``n`` held-out
    inputs of each run's task."""
    if not labelled:
        raise ValueError("no prefix runs given; pass (label, run) pairs of finished prefix runs")
    out = {k: [] for k in ("acc", "gap", "out", "span", "rank", "energy", "pr", "fixed")}
    for _, run in labelled:
        task = get_task(run.task)
        tokens = test_set(task, n).tokens[:, :-1]
        last = task.input_len - 1  # sees the input only; predicts the first output token
        recs = records(store, run, tokens)
        out["acc"].append(accuracy(store, run))
        out["gap"].append(prefix_attention_spread(recs, queries=last).gap)
        outputs = range(last, tokens.shape[1])
        out["out"].append(prefix_attention_spread(recs, queries=outputs).per_layer)
        ranks = bias_effective_rank(recs, queries=last)
        out["span"].append(ranks.span_rank)
        out["rank"].append(ranks.bias_rank)
        out["energy"].append(ranks.energy_rank)
        out["pr"].append(ranks.participation)
        out["fixed"].append(ranks.fixed_share)

    def stack(key):
        return torch.stack(out[key]).numpy()

    return Measured(
        labels=[label for label, _ in labelled],
        accuracy=out["acc"],
        gap=stack("gap"),
        gap_outputs=stack("out"),
        span_rank=stack("span"),
        bias_rank=stack("rank"),
        energy_rank=stack("energy"),
        participation=stack("pr"),
        fixed_share=stack("fixed"),
        n_inputs=n,
        d_head=recs[0].d_head,
    )


# ---------------------------------------------------------------------------- verdicts


def _succeeded(m: Measured) -> str | None:
    """None when every prefix learned its task, else the 'depends' verdict naming the worst."""
    worst = min(range(len(m.labels)), key=lambda i: m.accuracy[i])
    if m.accuracy[worst] >= SUCCESS:
        return None
    return (
        f"depends: prefix {m.labels[worst]} reaches only {100 * m.accuracy[worst]:.1f}% held "
        f"out (< {100 * SUCCESS:.0f}%)"
    )


def verdict_spread(m: Measured) -> str:
    """A prefix below 90% -> depends; the mean gap over prefixes and layers >= 0.5 ->
    refuted; every prefix's gap in every layer < 0.25 -> supported (the worst prefix decides);
    else depends."""
    if (failed := _succeeded(m)) is not None:
        return failed
    if m.per_layer.mean() >= SPREAD_REFUTE:
        return "refuted"
    worst = m.per_layer.max(0)  # [L], over prefixes
    if (worst < SPREAD_BAR).all():
        return "supported"
    layer = int(worst.argmax())
    prefix = m.labels[int(m.per_layer[:, layer].argmax())]
    return f"depends: prefix {prefix} spreads {worst[layer]:.3f} in layer {layer} (>= {SPREAD_BAR})"


def verdict_rank(m: Measured) -> str:
    """A prefix below 90% -> depends; the participation ratio >= 0.8 x the span rank on
    average -> refuted; <= 0.5 x for every prefix in every layer (means over heads) ->
    supported (the worst prefix decides); else depends."""
    if (failed := _succeeded(m)) is not None:
        return failed
    pr, span = m.participation.mean(2), m.span_rank.mean(2)  # [n, L]
    if pr.mean() >= RANK_REFUTE * span.mean():
        return "refuted"
    ratio = pr / span
    if (ratio <= RANK_BAR).all():
        return "supported"
    i, layer = np.unravel_index(int(ratio.argmax()), ratio.shape)
    return (
        f"depends: prefix {m.labels[i]} has effective rank {pr[i, layer]:.2f} of span rank "
        f"{span[i, layer]:.1f} in layer {layer}"
    )


# ---------------------------------------------------------------------------- rendering


def _ms(values: np.ndarray, digits: int = 3, worst: str = "max") -> str:
    """'mean ± sd (max m)' of a 1-d array of per-prefix numbers: the worst prefix (``worst``:
    "max" or "min") beside the mean, as every seeded number here is reported."""
    sd = values.std(ddof=1) if len(values) > 1 else 0.0
    extreme = values.max() if worst == "max" else values.min()
    return f"{values.mean():.{digits}f} ± {sd:.{digits}f} ({worst} {extreme:.{digits}f})"


def draw(m: Measured, path: Path) -> None:
    """Left: per-layer gap against relative depth, ours (every head; the head = layer slice)
    and the paper's 12 GPT-2 layers. Right: span rank against effective ranks per layer."""
    per_layer, diag = m.per_layer, m.head_equals_layer
    n, L = per_layer.shape
    depth = (np.arange(L) + 0.5) / L
    paper_depth = (np.arange(len(PAPER)) + 0.5) / len(PAPER)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [3, 2]})
    rng = np.random.default_rng(0)
    for i in range(L):
        xs = depth[i] + rng.uniform(-0.02, 0.02, n)
        ax.scatter(xs, per_layer[:, i], s=10, color="tab:blue", alpha=0.35, lw=0)
    ax.errorbar(
        depth,
        per_layer.mean(0),
        yerr=[per_layer.mean(0) - per_layer.min(0), per_layer.max(0) - per_layer.mean(0)],
        fmt="o-",
        color="tab:blue",
        capsize=4,
        label=f"ours, every head: mean of {n} prefixes",
    )
    ax.plot(depth + 0.015, diag.mean(0), "s", color="tab:green", ms=6, label="ours, head = layer")
    ax.plot(paper_depth, PAPER, "^--", color="tab:red", label="paper: GPT-2, head l of layer l")
    ax.axhline(
        per_layer.mean(),
        color="tab:blue",
        lw=0.8,
        ls=":",
        label=f"ours: mean {per_layer.mean():.3f}",
    )
    ax.axhline(
        np.mean(PAPER), color="tab:red", lw=0.8, ls=":", label=f"paper: mean {np.mean(PAPER):.3f}"
    )
    ax.axhline(SPREAD_BAR, color="black", lw=0.8, ls="--", label=f"bar {SPREAD_BAR}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, max(0.45, 1.6 * per_layer.max()))
    ax.set_xlabel("relative depth (layer + 0.5) / n_layers   (ours: " + ", ".join(
        f"layer {i} at {d:.2f}" for i, d in enumerate(depth)) + ")")  # fmt: skip
    ax.set_ylabel("1st-99th percentile gap of prefix attention\n(renormalised over 10 positions)")
    ax.set_title("How much the prefix's attention moves with the input (P=10, last input position)")
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    width = 0.25
    series = (
        ("span rank of V_p", m.span_rank, "tab:grey"),
        ("bias rank, 99% energy", m.energy_rank, "tab:orange"),
        ("bias participation ratio", m.participation, "tab:purple"),
    )
    for k, (label, values, colour) in enumerate(series):
        flat = values.transpose(1, 0, 2).reshape(L, -1)  # [L, prefixes x heads]
        mean = flat.mean(1)
        bx.bar(np.arange(L) + (k - 1) * width, mean, width, color=colour, label=label,
               yerr=[mean - flat.min(1), flat.max(1) - mean], capsize=3)  # fmt: skip
    bx.axhline(m.gap.shape[-1], color="black", lw=0.8, ls="--", label="P = 10")
    bx.set_xticks(range(L), [f"layer {i}" for i in range(L)])
    bx.set_ylabel("rank (mean of prefixes x heads; bars min-max)")
    bx.set_title(f"Span of the values vs biases produced ({m.n_inputs} inputs)")
    bx.set_ylim(0, 1.45 * m.gap.shape[-1])
    bx.legend(fontsize=7, loc="upper right", ncol=2)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def tables(m: Measured) -> list[str]:
    L, h, P = m.gap.shape[1:]
    rows = [
        [
            i,
            _ms(m.per_layer[:, i]),
            _ms(m.head_equals_layer[:, i]),
            _ms(m.gap_outputs[:, i]),
            f"{m.span_rank[:, i].mean():.1f}",
            f"{m.bias_rank[:, i].mean():.1f}",
            f"{m.energy_rank[:, i].mean():.2f}",
            _ms(m.participation[:, i].mean(-1), 2),
            _ms(m.fixed_share[:, i].mean(-1), 4, "min"),
        ]
        for i in range(L)
    ]
    ours = markdown_table(
        [
            "layer",
            "gap, every head",
            f"gap, head = layer (mod {h})",
            "gap, every output position",
            "span rank",
            "bias rank",
            "99%-energy rank",
            "participation ratio",
            "energy in the mean bias",
        ],
        rows,
    ) + (
        f"\n\n*Table*: per layer, mean ± sd (worst prefix) over {len(m.labels)} prefixes "
        f"(P={P}, {h} heads of d_head {m.d_head}, {m.n_inputs} held-out inputs, float64): the "
        "1st-99th percentile gap of the renormalised prefix attention at the last input "
        "position (every head; the paper's head = layer slice) and over every output-predicting "
        "position; the rank of span{V_p}, the numerical rank, 99%-energy rank and participation "
        "ratio of the biases sum_p beta_p V_p across inputs, and the share of their energy in "
        "their mean (1: one fixed bias). Ranks are means over prefixes and heads."
    )
    compare = markdown_table(
        ["", "model", "prefixes", "per layer", "mean gap"],
        [
            [
                "paper (Appendix B)",
                "GPT-2 small, 12 layers x 12 heads, Emotion",
                "20",
                ", ".join(f"{v:.3f}" for v in PAPER),
                f"{np.mean(PAPER):.3f}",
            ],
            [
                "ours, every head",
                f"paper03 mix4 base, {L} layers x {h} heads",
                str(len(m.labels)),
                ", ".join(f"{v:.3f}" for v in m.per_layer.mean(0)),
                f"{m.per_layer.mean():.3f}",
            ],
            [
                "ours, head = layer",
                "the same",
                str(len(m.labels)),
                ", ".join(f"{v:.3f}" for v in m.head_equals_layer.mean(0)),
                f"{m.head_equals_layer.mean():.3f}",
            ],
        ],
    ) + (
        "\n\n*Table*: the paper's per-layer numbers beside ours. The models differ (12 GPT-2 "
        f"layers against our {L}), so compare the means and the range, not layer by layer."
    )
    return [ours, compare]


def figures(m: Measured) -> list[Figure]:
    L = m.gap.shape[1]
    return [
        Figure(
            "prefix_spread.png",
            "Left: per layer, the 1st-99th percentile gap across held-out inputs of a P=10 "
            "prefix's attention over its 10 positions (renormalised to sum 1) at the last input "
            "position, averaged over heads and positions; dots are prefixes, bars min-max, "
            "squares the head = layer slice the paper's notebook measured. The paper's 12 "
            f"GPT-2 numbers are a separate series: its layers are not ours ({L} here), so both "
            "are drawn against relative depth and their means are compared (dotted lines). "
            "Right: per layer, the rank of the span of the 10 value vectors against the "
            "99%-energy rank and participation ratio of the biases the prefix produces across "
            "the inputs (means over prefixes and heads, bars min-max).",
        )
    ]


def render(m: Measured, p: Profile, out: Path) -> Section:
    """The figure into ``out``, and the Section (text, tables, claims) from ``m`` alone."""
    draw(m, out / "prefix_spread.png")
    layers = m.per_layer.mean(0)
    pr, span = m.participation.mean((0, 2)), m.span_rank.mean((0, 2))
    acc, acc_min = statistics.mean(m.accuracy), min(m.accuracy)
    spread_claim = Claim(
        "A length-10 prefix's attention over its positions barely moves with the input "
        f"(Appendix B: 1st-99th percentile gap per layer << 1; bar: every prefix, every layer "
        f"< {SPREAD_BAR})",
        "prefix_spread: paper03 P=10 prefixes",
        f"gap per layer {', '.join(f'{v:.3f}' for v in layers)} (mean {layers.mean():.3f}; "
        f"head = layer slice {m.head_equals_layer.mean():.3f}) over {len(m.labels)} prefixes "
        f"at {100 * acc:.1f}% held out (min {100 * acc_min:.1f}%); paper 0.016-0.174, "
        f"mean {np.mean(PAPER):.3f}",
        verdict_spread(m),
    )
    rank_claim = Claim(
        "The biases a length-10 prefix produces have effective rank well below the rank of its "
        f"value span (bar: participation ratio <= {RANK_BAR} x span rank, every prefix and layer)",
        "prefix_spread: paper03 P=10 prefixes",
        "per layer: participation ratio "
        + ", ".join(f"{v:.2f}" for v in pr)
        + f", 99%-energy rank {', '.join(f'{v:.2f}' for v in m.energy_rank.mean((0, 2)))}, "
        + f"span rank {', '.join(f'{v:.1f}' for v in span)}",
        verdict_rank(m),
    )
    return Section(
        title="Appendix B: a long prefix acts almost as one fixed bias",
        text=__doc__.split("\n\n", 1)[1].strip()
        + f"\n\nBars fixed before the results, each read at the worst prefix: spread, every "
        f"prefix's gap < {SPREAD_BAR} in every layer (refuted at a mean >= {SPREAD_REFUTE}); "
        f"rank, participation ratio <= {RANK_BAR} x span rank for every prefix in every layer "
        f"(refuted at >= {RANK_REFUTE} x on average); both need every prefix at >= "
        f"{100 * SUCCESS:.0f}% held out. Verdicts: spread "
        f"{spread_claim.verdict}; rank {rank_claim.verdict}.",
        tables=tables(m),
        figures=figures(m),
        claims=[spread_claim, rank_claim],
    )


def report(store: Store, p: Profile, out: Path) -> Section:
    return render(measure(store, p), p, out)


EXPERIMENT = Experiment("prefix_spread", "Appendix B: prefix attention spread", runs, report)
