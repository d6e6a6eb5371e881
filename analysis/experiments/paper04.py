"""Paper experiment 04: at the same parameter count, LoRA learns a new task that a prefix cannot.

On the paper-03 mix4 base (the very same base runs, trained once), a virtual-token prefix with
P=12 and a rank-1 LoRA with exactly as many parameters are both tuned on the new task "double
histogram". The prefix can only add a bias to each attention output and stays near 0%; LoRA
changes the attention weights themselves and learns the task. Parameter count is not what limits
prefix-tuning: where it acts is. Full fine-tuning of the same base is a reference: it shows the
task is learnable from this base at all within the budget.
"""

from __future__ import annotations

from pathlib import Path

from analysis.experiments import paper03
from analysis.plots import bar_chart
from analysis.report import Claim, Experiment, Figure, Profile, Section, accuracy, markdown_table
from analysis.report import mean_spread as ms
from analysis.runs import Run, Store

TASK = "hist"
# vt-prefix: n_layers * P * d_model = 12 d per layer. Rank-1 LoRA on W_Q (d x d: 2d), W_in
# (d x 4d: 5d) and W_out (4d x d: 5d) is also 12 d per layer, so the counts are equal.
OPTIONS = {
    "vt-prefix": (("length", 12),),
    "lora": (("rank", 1), ("targets", ("W_Q", "W_in", "W_out"))),
    "full": (),
}
LABEL = {
    "vt-prefix": "prefix (virtual tokens, P=12)",
    "lora": "LoRA rank 1 on W_Q, W_in, W_out",
    "full": "full fine-tuning (reference)",
}
PAPER = {
    "vt-prefix": ("12,288", "0.31", "100,000"),
    "lora": ("12,288", "92.38", "10,000"),
    "full": ("-", "-", "-"),
}
STEPS = {"vt-prefix": (20, 500, 100000), "lora": (20, 300, 10000), "full": (20, 1000, 10000)}


def tuned(p: Profile, base: Run, method: str) -> Run:
    paper_lr = {"vt-prefix": 5e-5, "lora": 5e-3, "full": None}[method]
    return Run(
        TASK,
        method=method,
        base=base,
        seed=base.seed,
        # The paper gave the prefix 10x LoRA's steps; here it gets ~2x.
        steps=p.pick(*STEPS[method]),
        lr=p.pick(None, None, paper_lr),
        options=OPTIONS[method],
    )


def runs(p: Profile) -> list[Run]:
    return [tuned(p, b, m) for b in paper03.base_runs(p) for m in OPTIONS]


def report(store: Store, p: Profile, out: Path) -> Section:
    bases = paper03.base_runs(p)
    by = {m: [tuned(p, b, m) for b in bases] for m in OPTIONS}
    acc = {m: [accuracy(store, r) for r in rs] for m, rs in by.items()}
    n = {m: store.result(rs[0])["n_params"] for m, rs in by.items()}
    share = {m: n[m] / store.result(rs[0])["base_params"] for m, rs in by.items()}
    rows = [
        [LABEL[m], f"{n[m]:,}", f"{100 * share[m]:.2f}%", by[m][0].steps, ms(acc[m]), *PAPER[m]]
        for m in OPTIONS
    ]
    table = markdown_table(
        [
            "method",
            "parameters",
            "share of base",
            "steps",
            "hist",
            "paper params",
            "paper hist",
            "paper steps",
        ],
        rows,
    )
    caption = (
        f"Held-out exact match on double histogram (mean ± sd over {len(bases)} seeds) on the "
        f"paper-03 mix4 base ({paper03.model_name(p)}). The parameter counts are equal by "
        "construction (12 d_model per layer each); full fine-tuning trains every weight."
    )
    bar_chart(
        [TASK],
        {f"{LABEL[m]} ({n[m]:,} params)": [acc[m]] for m in OPTIONS},
        out / "paper04_prefix_vs_lora.png",
        "04: a new task at equal parameter count",
    )
    mean = {m: sum(v) / len(v) for m, v in acc.items()}
    holds = mean["lora"] - mean["vt-prefix"] >= 0.3
    if holds:
        verdict = "supported"
    elif mean["full"] >= 0.3:
        verdict = (
            f"depends: hist is learnable from this base (full FT {100 * mean['full']:.1f}%), "
            "but not by rank-1 LoRA at this budget"
        )
    else:
        verdict = "depends: not at this budget"
    return Section(
        title="Paper 04: prefix against LoRA at equal parameter count",
        text=__doc__.split("\n\n", 1)[1].strip()
        + f"\n\nMeasured: prefix {ms(acc['vt-prefix'])}, LoRA {ms(acc['lora'])}, both with "
        f"{n['lora']:,} parameters; full fine-tuning {ms(acc['full'])} in {by['full'][0].steps} "
        "steps"
        + (
            "; the paper's conclusion holds."
            if holds
            else "; LoRA is NOT far above the prefix at this budget."
        ),
        tables=[table + f"\n\n*Table*: {caption}"],
        figures=[
            Figure(
                "paper04_prefix_vs_lora.png",
                f"Double-histogram accuracy of a P=12 virtual-token prefix and of a rank-1 LoRA "
                f"with the same number of parameters ({n['lora']:,}), and of full fine-tuning as a "
                "reference, all on the paper-03 mix4 "
                f"base ({paper03.model_name(p)}); bars: mean over seeds, whiskers: min-max, "
                "dots: seeds.",
            )
        ],
        claims=[
            Claim(
                "Prefix-tuning cannot learn tasks needing new attention patterns (at equal "
                "parameter count, LoRA can)",
                "paper04",
                f"hist: prefix {ms(acc['vt-prefix'])} vs rank-1 LoRA {ms(acc['lora'])}, "
                f"{n['lora']:,} parameters each; full FT (reference) {ms(acc['full'])}",
                verdict,
            )
        ],
    )


EXPERIMENT = Experiment("paper04", "Paper 04", runs, report)
