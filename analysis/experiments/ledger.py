"""The claims ledger: the field's claims about prefix-tuning (the ``Claim`` rows below), the runs
behind each and a verdict by rule.

Verdicts are computed from the measured numbers by the rules below, fixed before any result
was seen; they are "supported", "refuted" or "depends: <condition>". Differences between two
settings count only beyond a noise margin: max(2 percentage points, sd_a + sd_b) over seeds.
The ledger's runs are the study's and the sweeps' own Run objects (same spec, same key), so
nothing is trained twice.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from analysis.experiments import study, sweeps
from analysis.report import Claim, Experiment, Profile, Section, accuracy, markdown_table
from analysis.report import mean_spread as ms
from analysis.runs import Run, Store
from probe.adapters import make_adapter

MIN_GAP = 0.02


def runs(p: Profile) -> list[Run]:
    return study.runs(p) + sweeps.runs(p)


def _mean(v: list[float]) -> float:
    return statistics.mean(v)


def _sd(v: list[float]) -> float:
    return statistics.stdev(v) if len(v) > 1 else 0.0


def margin(a: list[float], b: list[float]) -> float:
    """How far two settings' seed means must differ to count: max(2 pp, sd_a + sd_b)."""
    return max(MIN_GAP, _sd(a) + _sd(b))


def compare(a: list[float], b: list[float]) -> int:
    """+1 if a beats b beyond the margin, -1 if b beats a, 0 if within noise."""
    d = _mean(a) - _mean(b)
    return 0 if abs(d) <= margin(a, b) else (1 if d > 0 else -1)


def pp(x: float) -> str:
    return f"{100 * x:+.1f} pp"


# ---------------------------------------------------------------------------- the rules


def verdict_new_pattern(prefix_like: dict[str, list[float]], full: list[float]) -> str:
    """Claim 1: every prefix-like method stays below 5% and full FT reaches 50%, on every seed
    (the best prefix-like seed, the worst full fine-tuning seed)."""
    best_name = max(prefix_like, key=lambda k: max(prefix_like[k]))
    best = max(prefix_like[best_name])
    if best < 0.05 and min(full) >= 0.5:
        return "supported"
    if _mean(prefix_like[best_name]) >= 0.5:
        return "refuted"
    if min(full) < 0.5:
        return (
            f"depends: full fine-tuning also fails at this budget ({ms(full)}), so the gap the "
            "claim describes does not show"
        )
    return (
        f"depends: prefix-like methods reach part of the task ({best_name}, best seed: "
        f"{100 * best:.1f}%)"
    )


def verdict_elicit(
    base: list[float], prefix: dict[str, list[float]], full: dict[str, list[float]]
) -> str:
    """Claim 2: prefix elicits (beats the untuned base), matches full FT with fresh data (not
    worse beyond noise) and beats it on the smallest training set (better beyond noise)."""
    fresh, low = "fresh", next(iter(prefix))
    elicits = compare(prefix[fresh], base) > 0
    matches = compare(prefix[fresh], full[fresh]) >= 0
    beats_low = compare(prefix[low], full[low]) > 0
    if elicits and matches and beats_low:
        return "supported"
    if not elicits or (not matches and not beats_low):
        return "refuted"
    missing = "does not beat full FT in low data" if matches else "falls short of full FT"
    where = f"n={low}" if matches else "with fresh data"
    return f"depends: prefix elicits the skill and {missing} ({where})"


def verdict_better(a: list[float], b: list[float], difference: str) -> str:
    """Claims 3, 6: a beats b beyond noise -> supported; b beats a -> refuted; else depends."""
    c = compare(a, b)
    if c > 0:
        return "supported"
    if c < 0:
        return "refuted"
    return f"depends: no difference beyond noise here ({difference}: {pp(_mean(a) - _mean(b))})"


def verdict_shares(prompt: dict[int, float], prefix: dict[int, float]) -> str:
    """Claim 4: at P=1, prompt share within 0.05-0.2% and prefix within 0.25-2% (the claimed
    0.1% and 0.5-1%, each within a factor 2); otherwise name the lengths where they would be."""
    ok_prompt = [n for n, s in prompt.items() if 0.0005 <= s <= 0.002]
    ok_prefix = [n for n, s in prefix.items() if 0.0025 <= s <= 0.02]
    if 1 in ok_prompt and 1 in ok_prefix:
        return "supported"
    if not ok_prompt and not ok_prefix:
        return "refuted"
    return (
        "depends: on prefix length and model size (within the claimed band at "
        f"prompt P={ok_prompt or 'none tested'}, prefix P={ok_prefix or 'none tested'})"
    )


def verdict_length(by_length: dict[int, list[float]]) -> str:
    """Claim 5: gains from the second-longest to the longest prefix are within noise while the
    shortest to the second-longest gains beyond noise -> supported; the longest still gains ->
    refuted; no length matters -> depends."""
    ns = sorted(by_length)
    lo, mid, hi = by_length[ns[0]], by_length[ns[-2]], by_length[ns[-1]]
    late, early = compare(hi, mid), compare(mid, lo)
    if late > 0:
        return "refuted"
    if early > 0:
        return "supported"
    return (
        f"depends: prefix length makes no difference beyond noise here (P={ns[0]} "
        f"{100 * _mean(lo):.1f}%, P={ns[-1]} {100 * _mean(hi):.1f}%)"
    )


def verdict_hybrid(hybrid: list[float], prefix: list[float], lora: list[float]) -> str:
    """Claim 7: the hybrid beats the better single method beyond noise -> supported; the better
    single method beats the hybrid -> refuted; else depends."""
    best_name, best = max((("prefix", prefix), ("lora", lora)), key=lambda t: _mean(t[1]))
    c = compare(hybrid, best)
    if c > 0:
        return "supported"
    if c < 0:
        return "refuted"
    return f"depends: the hybrid ties with {best_name} alone ({pp(_mean(hybrid) - _mean(best))})"


def lr_range(by_lr: list[list[float]]) -> float:
    means = [_mean(v) for v in by_lr]
    return max(means) - min(means)


def verdict_lr(prefix: list[list[float]], full: list[list[float]]) -> str:
    """Claim 8, against full fine-tuning on learning-rate grids of the same width (100x):
    prefix's accuracy range over learning rates exceeds full FT's by 10 pp, or its worst seed
    sd exceeds 10 pp and twice full FT's -> supported; prefix's range and worst sd are both no
    larger than full FT's -> refuted; else depends."""
    r_pre, r_full = lr_range(prefix), lr_range(full)
    sd_pre, sd_full = max(_sd(v) for v in prefix), max(_sd(v) for v in full)
    if r_pre - r_full >= 0.10 or (sd_pre >= 0.10 and sd_pre >= 2 * sd_full):
        return "supported"
    if r_pre <= r_full and sd_pre <= sd_full:
        return "refuted"
    return (
        f"depends: prefix somewhat more sensitive (range {100 * r_pre:.1f} vs "
        f"{100 * r_full:.1f} pp, worst seed sd {100 * sd_pre:.1f} vs {100 * sd_full:.1f} pp)"
    )


# ---------------------------------------------------------------------------- the numbers


@dataclass
class Measured:
    """The numbers the eight claims are judged on (accuracies are per seed).

    study: on the study's MAIN pair, prefix_like (each prompt-like method, then the prefix at
    each length of the study's sweep), full and lora; study_pairs: per study pair, (pair,
    prefix at P=1, prompt at P=1). sweep: the sweeps' own Measured (every sweep point, and the
    untuned mix4 bases per task). n_base: the mix4 base's parameters; prompt_share /
    prefix_share: prefix length -> adapter parameters / base parameters.
    """

    prefix_like: dict[str, list[float]]
    full: list[float]
    lora: list[float]
    study_pairs: list[tuple[tuple[str, str], list[float], list[float]]]
    sweep: sweeps.Measured
    n_base: int
    prompt_share: dict[int, float]
    prefix_share: dict[int, float]


def measure(store: Store, p: Profile) -> Measured:
    """The study's and the sweeps' numbers that the claims need, read from the store."""

    def acc(rs):
        return [accuracy(store, r) for r in rs]

    main = study.MAIN
    prefix_like = {m: acc(study.method_runs(p, main, m)) for m in study.PROMPT_LIKE}
    prefix_like |= {f"prefix P={n}": acc(study.length_runs(p, n)) for n in study.prefix_lengths(p)}
    model = store.model(sweeps.base_runs(p)[0])
    prefix_share = {}
    for n, rs in sweeps.sweeps(p)["length"].items():
        result = store.result(rs[0])
        prefix_share[int(n.split("=")[1])] = result["n_params"] / result["base_params"]
    return Measured(
        prefix_like=prefix_like,
        full=acc(study.method_runs(p, main, "full")),
        lora=acc(study.method_runs(p, main, "lora")),
        study_pairs=[
            (
                pair,
                acc(study.method_runs(p, pair, "prefix")),
                acc(study.method_runs(p, pair, "prompt")),
            )
            for pair in study.pairs(p)
        ],
        sweep=sweeps.measure(store, p),
        n_base=model.n_params,
        prompt_share={
            n: make_adapter("prompt", model, length=n).n_params / model.n_params
            for n in sweeps.lengths(p)
        },
        prefix_share=prefix_share,
    )


# ---------------------------------------------------------------------------- the claims


def claim_new_pattern(m: Measured) -> Claim:
    main = study.MAIN
    return Claim(
        "1. Prefix-tuning cannot learn tasks needing new attention patterns (reversal: "
        "prefix 0% vs full FT 85%)",
        f"study: {main[0]} base tuned to {main[1]}",
        "; ".join(f"{k} {ms(v)}" for k, v in m.prefix_like.items())
        + f"; full {ms(m.full)}; lora {ms(m.lora)}",
        verdict_new_pattern(m.prefix_like, m.full),
    )


def claim_elicit(m: Measured) -> Claim:
    base = m.sweep.base[sweeps.TARGET]
    prefix, full = m.sweep.points["data prefix"], m.sweep.points["data full"]
    return Claim(
        "2. Prefix-tuning elicits pretrained skills; matches full FT with plenty of data, "
        "beats it in low data",
        f"sweeps: mix4 base tuned to {sweeps.TARGET}, training-set size",
        f"untuned base {ms(base)}; "
        + "; ".join(f"n={k}: prefix {ms(prefix[k])} vs full {ms(full[k])}" for k in prefix),
        verdict_elicit(base, prefix, full),
    )


def claim_prefix_vs_prompt(m: Measured) -> Claim:
    methods = m.sweep.points["methods"]
    return Claim(
        "3. Prefix-tuning is more expressive than prompt-tuning",
        f"sweeps: mix4 -> {sweeps.TARGET}, P=1 (study pairs for context)",
        f"prefix {ms(methods['prefix'])} vs prompt {ms(methods['prompt'])}; study (P=1): "
        + "; ".join(f"{b}->{t} {ms(a)} vs {ms(c)}" for (b, t), a, c in m.study_pairs),
        verdict_better(methods["prefix"], methods["prompt"], "prefix - prompt"),
    )


def claim_shares(m: Measured) -> Claim:
    return Claim(
        "4. Parameter shares: prompt-tuning about 0.1%, prefix-tuning 0.5-1%",
        f"sweeps: adapter.n_params / base parameters ({m.n_base:,}; same for every seed)",
        "prompt "
        + ", ".join(f"P={n}: {100 * v:.3f}%" for n, v in m.prompt_share.items())
        + "; prefix "
        + ", ".join(f"P={n}: {100 * v:.3f}%" for n, v in m.prefix_share.items()),
        verdict_shares(m.prompt_share, m.prefix_share),
    )


def claim_length(m: Measured) -> Claim:
    by_length = {int(k.split("=")[1]): v for k, v in m.sweep.points["length"].items()}
    return Claim(
        "5. Prefix length beyond about 50 gives diminishing returns",
        f"sweeps: prefix length on mix4 -> {sweeps.TARGET}",
        "; ".join(f"P={n}: {ms(v)}" for n, v in by_length.items()),
        verdict_length(by_length),
    )


def claim_init(m: Measured) -> Claim:
    init = m.sweep.points["init"]
    return Claim(
        "6. Initialising soft prompts from vocabulary embeddings beats random",
        f"sweeps: prompt P=1 on mix4 -> {sweeps.TARGET}",
        f"vocab {ms(init['vocab'])} vs random {ms(init['random'])}",
        verdict_better(init["vocab"], init["random"], "vocab - random"),
    )


def claim_hybrid(m: Measured) -> Claim:
    methods = m.sweep.points["methods"]
    return Claim(
        "7. A prefix + LoRA hybrid beats either alone",
        f"sweeps: mix4 -> {sweeps.TARGET}, P=1, LoRA rank 1 on W_Q/W_V",
        f"prefix+lora {ms(methods['prefix+lora'])}; prefix {ms(methods['prefix'])}; "
        f"lora {ms(methods['lora'])}",
        verdict_hybrid(methods["prefix+lora"], methods["prefix"], methods["lora"]),
    )


def claim_lr(m: Measured) -> Claim:
    prefix, full = m.sweep.points["lr prefix"], m.sweep.points["lr full"]
    common = [k for k in prefix if k in full]
    return Claim(
        "8. Prefix-tuning is sensitive to the learning rate and can be unstable",
        f"sweeps: learning rate x default (prefix {sweeps.DEFAULT_LR['prefix']:g}, full "
        f"{sweeps.DEFAULT_LR['full']:g}) on mix4 -> {sweeps.TARGET}",
        "prefix "
        + ", ".join(f"{k}: {ms(v)}" for k, v in prefix.items())
        + "; full "
        + ", ".join(f"{k}: {ms(v)}" for k, v in full.items()),
        verdict_lr([prefix[k] for k in common], [full[k] for k in common]),
    )


CLAIMS = (
    claim_new_pattern,
    claim_elicit,
    claim_prefix_vs_prompt,
    claim_shares,
    claim_length,
    claim_init,
    claim_hybrid,
    claim_lr,
)
RULES = (
    verdict_new_pattern,
    verdict_elicit,
    verdict_better,
    verdict_shares,
    verdict_length,
    verdict_hybrid,
    verdict_lr,
)


def rules_text() -> str:
    """Each rule's docstring up to its first colon (which claims), then the rule on one line."""
    return " ".join(
        f.__doc__.split(":", 1)[0] + ": " + " ".join(f.__doc__.split(":", 1)[1].split())
        for f in RULES
    )


def render(m: Measured, p: Profile, out: Path) -> Section:
    """The Section: the rules, a table of claim, experiment and verdict, and the claims."""
    rows = [claim(m) for claim in CLAIMS]
    table = markdown_table(
        ["claim", "experiment", "verdict"], [[c.claim, c.experiment, c.verdict] for c in rows]
    )
    return Section(
        title="Claims ledger: how the verdicts are decided",
        text=__doc__.split("\n\n", 1)[1].strip()
        + "\n\nRules (see analysis/experiments/ledger.py): "
        + rules_text(),
        tables=[table],
        claims=rows,
    )


def report(store: Store, p: Profile, out: Path) -> Section:
    return render(measure(store, p), p, out)


EXPERIMENT = Experiment("ledger", "Claims ledger", runs, report)
