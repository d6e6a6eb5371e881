"""PEFT atlas: which tuning methods can re-weight attention, and what each of ours learns.

Two halves. On tiny random float64 models, every method is classified by what it measurably
does to attention (``probe.classify``): our own adapters on a model of ours, and every PEFT
method on every architecture ``probe.hf`` supports, verified against PEFT's own forward and
``generate`` (``probe.atlas``). Trained, our six methods -- prefix, soft prompt, LoRA, full
fine-tuning, IA3 (keys, values, MLP) and a gated adaption prompt -- tune the study's
sort-ascending base (2 layers) to reversal and paper 01's (1 layer) to sort-descending, on the
same bases; prefix, prompt, LoRA and full fine-tuning are those experiments' own runs, shared
from the store. Both tasks need a new attention pattern: the bias-only and gated-bias classes
cannot make one, IA3 can (its key scales re-weight attention), within its per-channel reach.

Opt-in (``default=False``): ``probe reproduce`` leaves it out; ``probe reproduce atlas`` runs it
and writes its index to ``atlas.md`` beside the figures, not over their README.md.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from analysis.experiments import paper01, study
from analysis.plots import bar_chart
from analysis.report import (
    Experiment,
    Figure,
    Profile,
    Section,
    accuracy,
    curve_note,
    markdown_table,
)
from analysis.report import mean_spread as ms
from analysis.runs import Run, Store, variant
from probe import atlas
from probe.check import check_tuned
from probe.classify import CLASSES, DERIVATIONS
from probe.hf import MissingExtraError

METHODS = ("prefix", "prompt", "lora", "full", "ia3", "adaption_prompt")
SHARED = ("prefix", "prompt", "lora", "full")  # the study's and paper 01's own runs
# The new methods' options: IA3's own targets; one prompt vector per layer, as the P=1 prefix.
NEW = {"ia3": {}, "adaption_prompt": {"length": 1}}
TASKS = ("study: sort_asc -> reverse", "01: sort_asc -> sort_desc")


def methods(p: Profile) -> tuple[str, ...]:
    """The trained methods: on the smoke profile, to stay within seconds, the two new ones and
    the prefix beside them; all six elsewhere."""
    return p.pick(("prefix", "ia3", "adaption_prompt"), METHODS, METHODS)


def _new(run: Run, method: str) -> Run:
    """The prefix run of an experiment with ``method`` instead: same base, task, budget, seed."""
    return variant(run, method=method, options=NEW[method])


def study_runs(p: Profile, method: str) -> list[Run]:
    """``method`` tuning the study's sort_asc bases to reverse, one run per seed."""
    if method in SHARED:
        return study.method_runs(p, study.MAIN, method)
    return [_new(r, method) for r in study.method_runs(p, study.MAIN, "prefix")]


def paper01_runs(p: Profile, method: str) -> list[Run]:
    """``method`` tuning paper 01's sort_asc bases to sort_desc, one run per seed."""
    if method in SHARED:
        return [paper01.tuned(p, b, method) for b in paper01.base_runs(p)]
    return [_new(paper01.tuned(p, b, "prefix"), method) for b in paper01.base_runs(p)]


def runs(p: Profile) -> list[Run]:
    return [r for m in methods(p) for r in (*study_runs(p, m), *paper01_runs(p, m))]


def random_subset(p: Profile) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(our methods, PEFT methods, architectures) of the random-model tables: for the smoke
    profile, to stay within seconds, a bias-only, a gated-bias and a re-weighting one of ours
    and two of PEFT's on GPT-2; every one elsewhere."""
    everything = (tuple(atlas.OWN_METHODS), atlas.METHODS, atlas.ARCHS)
    smoke = (("prefix", "adaption_prompt", "ia3 (K,V,MLP)"), ("adaption prompt", "IA3 (V,FFN)"))
    return p.pick((*smoke, ("gpt2",)), everything, everything)


@dataclass
class Measured:
    """accuracy: method -> per task (TASKS order) the per-seed accuracies; classes: method ->
    per task the class of seed 0's trained adapter (float64 check on 64 held-out inputs);
    curves: method -> per task whether the seeds' learning curves had flattened;
    own / peft: the random-model cells (``probe.atlas.AtlasCell``); peft_note: why the PEFT
    cells are missing, if they are."""

    accuracy: dict[str, list[list[float]]]
    classes: dict[str, list[str]]
    curves: dict[str, list[str]]
    own: list
    peft: list
    peft_note: str


def _class(store: Store, run: Run, task: str) -> str:
    base = store.model(run)
    adapter = store.adapter(run, base)  # checked against the base as saved, before the cast
    return check_tuned(base.double(), adapter, study.probe_tokens(task)).classify().name


def measure(store: Store, p: Profile) -> Measured:
    groups = {m: (study_runs(p, m), paper01_runs(p, m)) for m in methods(p)}
    own_methods, peft_methods, archs = random_subset(p)
    peft, note = [], ""
    try:
        with warnings.catch_warnings():  # PEFT's notices about random initialisations
            warnings.simplefilter("ignore")
            peft = [atlas.atlas_cell(m, a) for m in peft_methods for a in archs]
    except MissingExtraError as e:
        note = str(e)
    return Measured(
        accuracy={m: [[accuracy(store, r) for r in rs] for rs in g] for m, g in groups.items()},
        classes={
            m: [_class(store, g[0][0], "reverse"), _class(store, g[1][0], "sort_desc")]
            for m, g in groups.items()
        },
        curves={m: [curve_note(store, rs) for rs in g] for m, g in groups.items()},
        own=[atlas.own_cell(label) for label in own_methods],
        peft=peft,
        peft_note=note,
    )


def _cell_rows(cells: list) -> list[list]:
    rows = []
    for c in cells:
        if c.note:
            rows.append([c.method, c.arch, "n/a", "", "", c.note])
        else:
            ok = "yes" if c.verified else "NO"
            rows.append([c.method, c.arch, c.name, f"{c.max_drift:.2e}", c.bias_rank, ok])
    return rows


def _grid(cells: list) -> str:
    archs = list(dict.fromkeys(c.arch for c in cells))
    by = {(c.method, c.arch): c for c in cells}
    rows = [
        [m] + [by[m, a].name or "n/a" for a in archs]
        for m in dict.fromkeys(c.method for c in cells)
    ]
    return markdown_table(["PEFT method", *archs], rows)


def render(m: Measured, p: Profile, out: Path) -> Section:
    trained = markdown_table(
        ["method", *TASKS, "class of seed 0's adapter (study / 01)", "curves (study / 01)"],
        [
            [k, *(ms(v) for v in acc), " / ".join(m.classes[k]), " / ".join(m.curves[k])]
            for k, acc in m.accuracy.items()
        ],
    )
    header = ["method", "model", "class", "max local drift", "bias rank", "verified"]
    own = markdown_table(header, _cell_rows(m.own))
    tables = [trained, own]
    if m.peft:
        tables += [_grid(m.peft), markdown_table(header, _cell_rows(m.peft))]
    bar_chart(
        list(TASKS),
        m.accuracy,
        out / "atlas_accuracy.png",
        "Atlas: each method tuned to a task that needs a new attention pattern",
    )
    derivations = "; ".join(f"**{k}**: {DERIVATIONS[k]}" for k in CLASSES)
    peft_line = "" if m.peft else f" No PEFT tables: {m.peft_note}"
    text = __doc__.split("\n\n", 1)[1].strip()
    text += (
        "\n\nTables: trained accuracy (held-out exact match, mean ± sd over seeds, worst seed), "
        "with the class of each method's seed-0 adapter; our adapters on a random model; "
        "PEFT's methods by architecture, then cell by cell (verified: PEFT's forward and "
        f"`generate` reproduced and the class's identity held).{peft_line} Classes and where "
        f"each identity is derived: {derivations}."
    )
    return Section(
        title="PEFT atlas: which methods can re-weight attention",
        text=text,
        tables=tables,
        figures=[
            Figure(
                "atlas_accuracy.png",
                "Held-out exact match of each of our methods tuning the study's 2-layer "
                "sort-ascending base to reversal and paper 01's 1-layer base to sort-descending; "
                "bars are means over seeds, whiskers min-max, dots single seeds.",
            )
        ],
    )


def report(store: Store, p: Profile, out: Path) -> Section:
    return render(measure(store, p), p, out)


EXPERIMENT = Experiment("atlas", "PEFT atlas", runs, report, default=False)
