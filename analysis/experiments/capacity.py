"""Capacity on trained models: how many completions one first token selects, hard against soft.

The paper's official code counts, on LLaMA-7B, the distinct greedy 10-token completions that the
first token alone selects: over all 32,000 hard first tokens 24,426 (76.3% of V), against
46,812 for 48,218 soft first tokens each optimised towards its own random target completion
(97.1% of them distinct): more than any hard first token could reach, since a fixed model is a
function of its prompt and V hard tokens select at most V completions. We count the same on our
pretrained bases (``probe.capacity``): every hard first token's greedy completion, K >> V soft
first tokens optimised in one batch (one per uniformly random target completion, teacher-forced
cross-entropy, Adam, a fixed step budget) and, as a control, the K random vectors the
optimisation started from (coordinate-wise at the token embeddings' mean and spread). The
bases are paper 01's three (1 layer, sort-ascending) and, in the full and paper profiles, paper
03's three too (mix4, 2 layers), reused from those experiments' runs, so nothing is pretrained
twice. Their vocabulary is V = 11, so the hard count is at most 11; targets are uniform over
the 11^10 strings of 10 tokens, most of them far from anything a sorting model continues with,
so an exact hit is rare and the count of distinct completions is the measure, as in the paper.
Where the share of distinct soft completions falls short of LLaMA's, the final loss says why: a
small model trained on one narrow task cannot be steered to most random strings (its loss on
them stays above chance, ln V), so soft tokens aimed at different targets land on shared
completions.

Positions: the soft vector takes the first token's place, and our model adds the position-0
embedding W_pos[0] to it as to a token (it is substituted for the token embedding before the
position is added), so the vector W_E[t] is token t exactly and the soft tokens range over a
superset of the hard ones. The official LLaMA has no absolute positions (rotary), so its soft
vector is likewise a free first-token embedding. (Our prompt-tuning path, by contrast, gives a
soft prompt no positional slot.) For an HF model, ``probe capacity --base HF_DIR`` runs the same
counts (GPT-2 adds its wpe[0] to the soft vector); ``--vocab 0`` sweeps the whole vocabulary,
as the paper did for LLaMA (50,257 first tokens on GPT-2 small: a GPU job).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from statistics import mean

import matplotlib.pyplot as plt

from analysis.experiments import paper01, paper03
from analysis.report import Claim, Experiment, Figure, Profile, Section, markdown_table
from analysis.runs import Run, Store
from probe import capacity as C

LLAMA = C.PAPER_LLAMA


def config(p: Profile) -> C.CapacityConfig:
    """K soft targets >> V = 11, 10-token completions as in the paper, Adam at lr 0.1."""
    return C.CapacityConfig(
        k=p.pick(24, 256, 4096),
        n=LLAMA["n"],
        steps=p.pick(10, 150, 1000),
        lr=0.1,
        seed=0,
    )


def bases(p: Profile) -> dict[str, Run]:
    """Paper 01's base runs, and from the full profile on paper 03's too (the same Run objects:
    the same keys). The quick profile keeps to paper 01's three: paper 03's bases are 2-layer
    models pretrained 3,000 steps each there, and their soft tokens cost three times as much."""
    out = {f"01 seed {r.seed}": r for r in paper01.base_runs(p)}
    if p.name in ("full", "paper"):
        out.update({f"03 seed {r.seed}": r for r in paper03.base_runs(p)})
    return out


def runs(p: Profile) -> list[Run]:
    return list(bases(p).values())


@dataclass
class Measured:
    """Per base label, :meth:`probe.capacity.Capacity.summary` (the counts, exact-hit rate,
    final loss, seconds), and the position statement of the first slot."""

    counts: dict[str, dict]
    positions: str


def measure(store: Store, p: Profile) -> Measured:
    cfg = config(p)
    counts, positions = {}, ""
    for label, run in bases(p).items():
        result = C.measure(store.model(run), cfg)
        counts[label] = result.summary()
        positions = result.positions
    return Measured(counts, positions)


# ---------------------------------------------------------------------------- the verdicts

# The acceptance bars, fixed before any result was seen. Claim 1 (the paper's): on every base,
# the K optimised soft first tokens reach more distinct completions than the V hard first
# tokens possibly can (> V). Claim 2 (the control): on every base, the K random vectors the
# optimisation started from reach fewer distinct completions than the optimised ones, so the
# count comes from the optimisation, not from merely leaving the token embeddings.


def verdict_beyond_hard(counts: dict[str, dict]) -> str:
    """soft distinct > V on every base -> supported; on some -> depends; on none -> refuted."""
    above = [b for b, c in counts.items() if c["soft_distinct"] > c["vocab"]]
    if len(above) == len(counts):
        return "supported"
    if above:
        short = ", ".join(b for b in counts if b not in above)
        return f"depends: soft distinct <= V on {short}"
    return "refuted: soft distinct <= V on every base"


def verdict_control(counts: dict[str, dict]) -> str:
    """random distinct < soft distinct on every base -> supported; on some -> depends; on
    none -> refuted."""
    below = [b for b, c in counts.items() if c["random_distinct"] < c["soft_distinct"]]
    if len(below) == len(counts):
        return "supported"
    if below:
        short = ", ".join(b for b in counts if b not in below)
        return f"depends: random vectors reach as many as the optimised ones on {short}"
    return "refuted: random vectors reach as many distinct completions on every base"


# ---------------------------------------------------------------------------- the report


def draw(m: Measured, path: Path) -> None:
    labels = list(m.counts)
    counts = list(m.counts.values())
    V, K = counts[0]["vocab"], counts[0]["k"]
    x = range(len(labels))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4), width_ratios=[1.6, 1, 1])
    ax = axes[0]
    for i, (key, name) in enumerate(
        (("hard_distinct", f"hard: all V={V} first tokens"), ("soft_distinct", f"soft: K={K}"))
        + (("random_distinct", f"random: K={K} (start)"),)
    ):
        values = [c[key] for c in counts]
        ax.bar([j + (i - 1) * 0.27 for j in x], values, width=0.27, label=name, color=f"C{i}")
        for j, v in enumerate(values):
            ax.text(j + (i - 1) * 0.27, v * 1.05, str(v), ha="center", fontsize=7)
    ax.axhline(V, color="black", ls="--", lw=0.9, label=f"V = {V}: most a hard token can reach")
    ax.axhline(K, color="grey", ls=":", lw=0.9, label=f"K = {K}")
    ax.set_yscale("log")
    ax.set_ylim(0.8, 2.2 * K)
    ax.set_xticks(list(x), labels)
    ax.set_xlabel("base (paper 01 / paper 03 runs)")
    ax.set_ylabel(f"distinct greedy {counts[0]['n']}-token completions (log)")
    ax.set_title("Distinct completions selected by the first token")
    ax.legend(fontsize=7, loc="upper left", ncol=2)

    ax = axes[1]
    for i, (key, name) in enumerate((("exact", "whole completion"), ("token_hits", "per token"))):
        values = [100 * c[key] for c in counts]
        ax.bar([j + (i - 0.5) * 0.4 for j in x], values, width=0.4, label=name, color=f"C{i + 3}")
        for j, v in enumerate(values):
            ax.text(j + (i - 0.5) * 0.4, v + 1, f"{v:.1f}", ha="center", fontsize=7)
    ax.axhline(
        100 / V, color="black", ls=":", lw=0.9, label=f"chance per token (1/V = {100 / V:.0f}%)"
    )
    ax.set_xticks(list(x), labels, rotation=30)
    ax.set_ylim(0, 105)
    ax.set_ylabel("soft tokens' completions matching their target (%)")
    ax.set_title(f"Hits of K={K} uniformly random targets")
    ax.legend(fontsize=7)

    ax = axes[2]
    names = ["LLaMA-7B\n(paper)", "ours\n(mean)"]
    hard = [LLAMA["hard_distinct"] / LLAMA["vocab"], mean(c["hard_distinct"] / V for c in counts)]
    soft = [LLAMA["soft_distinct"] / LLAMA["soft_k"], mean(c["soft_distinct"] / K for c in counts)]
    ax.bar([0 - 0.2, 1 - 0.2], [100 * h for h in hard], width=0.4, label="hard distinct / V")
    ax.bar([0 + 0.2, 1 + 0.2], [100 * s for s in soft], width=0.4, label="soft distinct / K")
    ax.set_xticks([0, 1], names)
    ax.set_ylim(0, 110)
    ax.set_ylabel("distinct completions (% of candidates)")
    ax.set_title(f"Beside the paper (LLaMA: V=32,000, K=48,218; ours V={V}, K={K})")
    ax.legend(fontsize=7)
    fig.suptitle("One first token, hard or soft: how many completions it can select")
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def table(m: Measured) -> str:
    rows = [
        [
            "LLaMA-7B (paper)",
            f"{LLAMA['hard_distinct']:,} / {LLAMA['vocab']:,}",
            f"{LLAMA['soft_distinct']:,} / {LLAMA['soft_k']:,}",
            "-",
            "-",
            "-",
        ]
    ]
    for label, c in m.counts.items():
        rows.append(
            [
                label,
                f"{c['hard_distinct']} / {c['vocab']}",
                f"{c['soft_distinct']} / {c['k']}",
                f"{100 * c['exact']:.1f}% ({100 * c['token_hits']:.1f}%)",
                f"{c['random_distinct']} / {c['k']}",
                f"{c['loss']:.3f}",
            ]
        )
    header = [
        "model",
        "hard distinct / V",
        "soft distinct / K",
        "soft exact hits (per token)",
        "random distinct / K",
        "final loss (nats)",
    ]
    return markdown_table(header, rows)


def report(store: Store, p: Profile, out: Path) -> Section:
    m = measure(store, p)
    draw(m, out / "capacity_counts.png")
    cfg = config(p)
    c = m.counts
    V = next(iter(c.values()))["vocab"]
    soft = ", ".join(f"{b}: {x['soft_distinct']}" for b, x in c.items())
    rand = ", ".join(f"{b}: {x['random_distinct']}" for b, x in c.items())
    hard = ", ".join(f"{b}: {x['hard_distinct']}" for b, x in c.items())
    exact = mean(x["exact"] for x in c.values())
    tokens = mean(x["token_hits"] for x in c.values())
    share_hard = mean(x["hard_distinct"] / x["vocab"] for x in c.values())
    share_soft = mean(x["soft_distinct"] / x["k"] for x in c.values())
    over = sum(x["random_distinct"] > x["vocab"] for x in c.values())
    caption = (
        f"*Table*: greedy {cfg.n}-token completions selected by the first token alone. Soft: "
        f"K={cfg.k} vectors, one per uniformly random target, Adam lr {cfg.lr:g} for "
        f"{cfg.steps} steps from the random vectors of the last column (seed {cfg.seed}). "
        f"Bases: paper 01's ({paper01.base_runs(p)[0].steps} steps on sort_asc)"
        + (f" and paper 03's ({paper03.model_name(p)})" if any("03" in b for b in c) else "")
        + f". First slot: {m.positions}."
    )
    return Section(
        title="Capacity: distinct completions of one hard vs one soft first token",
        text=__doc__.split("\n\n", 1)[1].strip()
        + f"\n\nMeasured (V = {V}, K = {cfg.k}): hard distinct {hard}; soft distinct {soft}; "
        f"random {rand}; mean exact-hit rate {100 * exact:.1f}% (target tokens hit in place: "
        f"{100 * tokens:.1f}%, chance {100 / V:.1f}%). As shares of the candidates: hard "
        f"{100 * share_hard:.1f}% of V (LLaMA-7B 76.3%), soft {100 * share_soft:.1f}% of K "
        f"(LLaMA-7B 97.1%); the random control exceeds V on {over} of {len(c)} bases. Final "
        f"teacher-forced loss {mean(x['loss'] for x in c.values()):.2f} nats per token "
        f"(chance: ln V = {math.log(V):.2f}).",
        tables=[table(m) + "\n\n" + caption],
        figures=[
            Figure(
                "capacity_counts.png",
                "Left: distinct greedy completions selected by the first token, per base: every "
                "hard first token (at most V, dashed), K optimised soft first tokens, and the K "
                "random vectors they started from (log scale). Middle: the share of soft tokens "
                "whose completion is exactly their random target, and of target tokens matched "
                "in place (dotted: chance, 1/V). Right: distinct completions "
                "as a share of the candidates, beside the paper's LLaMA-7B counts.",
            )
        ],
        claims=[
            Claim(
                "One soft first token reaches more distinct completions than any hard first "
                "token can (more than V)",
                "capacity",
                f"V={V}; soft distinct of K={cfg.k}: {soft}; hard: {hard} (LLaMA-7B: "
                f"{LLAMA['soft_distinct']:,} of {LLAMA['soft_k']:,} vs {LLAMA['hard_distinct']:,} "
                f"of V={LLAMA['vocab']:,}); bar: soft > V on every base",
                verdict_beyond_hard(c),
            ),
            Claim(
                "The soft tokens' reach comes from optimising them: random vectors at the "
                "embedding scale select fewer completions",
                "capacity",
                f"random distinct of K={cfg.k}: {rand}; optimised: {soft}; bar: random < soft "
                "on every base",
                verdict_control(c),
            ),
        ],
    )


EXPERIMENT = Experiment("capacity", "Capacity: hard vs soft first token", runs, report)
