"""Section 3 of the paper, built by hand: what ONE soft token can make a fixed transformer do.

The paper constructs small transformers (every weight set by hand, the same for every target)
whose output is decided entirely by the virtual token(s) in front of the input
(``probe.constructions``, which derives each): one virtual token makes a 1-layer, 2-head model
generate any of the V^N strings of length N, or compute any of the V^V maps from a user token
to a token; N0 virtual tokens any map from a token to an N0-token response; a 2-layer model
any map from two tokens to one. A hard token in the virtual token's place reaches at most V
behaviours, since a fixed model is a function of its prompt. Nothing is trained: the
experiment builds the constructions, generates the paper's demonstrations, and measures over
random targets and maps at a range of softmax inverse temperatures T how often the generation
is exact. The derived threshold T* = sqrt(n) ln((n - 1)(4V - 3)) (39.65 for V = 94 and 20
positions) is where the one-layer approximate constructions become exact for every target;
the one-token map is exact at every T. The two-token model is a complete network here (its
MLP unpacks the base-V digits with ReLU steps) but needs float64, V <= 13 and large T, so it
is shown beside the others and kept out of the claims.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import torch

from analysis.report import Claim, Experiment, Figure, Profile, Section, markdown_table
from analysis.runs import Run, Store
from probe import constructions as C

V, N, N0 = 94, 20, 10  # the paper's demonstrations: printable ASCII, 20 tokens, 10-token answers
V_TWO = 10  # two-token inputs: the letters A-J
T_STAR = C.sufficient_temperature(V, N)  # = sufficient_temperature(V, 2 * N0): both n = 20
PAPER_T = {"unconditional": 50.0, "token map": 100.0, "responses": 100.0, "two tokens": 1000.0}
DEMO = "I love transformers!"
CASE_FLIP = dict(
    zip(string.ascii_letters, string.ascii_uppercase + string.ascii_lowercase, strict=True)
)
# A food for every lowercase letter, the user's letter starting it: the paper's "b" ->
# "lueberries" (the user then sees "blueberries") and 25 more of our own.
FOODS = dict(
    zip(
        string.ascii_lowercase,
        [
            "pricot", "lueberries", "arrot", "ate", "ggplant", "ennel", "rape", "azelnut",
            "ce cream", "ackfruit", "ale", "ime", "elon", "utmeg", "live", "ear", "uince",
            "aspberry", "quash", "omato", "don", "anilla", "alnut", "igua", "ogurt", "ucchini",
        ],
        strict=True,
    )
)  # fmt: skip

# The acceptance bars, fixed before any result was seen. The approximate constructions must
# generate at least 99% of random targets (maps) exactly at every tested T >= T*; the exact
# one-token map must be exact for every random map at every tested T, and the V hard tokens
# in its virtual token's place must reach at most V distinct maps.
BAR_APPROX = 0.99
BAR_EXACT = 1.0


def temperatures(p: Profile) -> tuple[float, ...]:
    """The tested T, dense around T* = 39.65 where the approximate constructions turn exact."""
    return p.pick(
        (1.0, 35.0, 39.7, 100.0, 1000.0),
        (0.01, 1.0, 10.0, 20.0, 30.0, 35.0, 38.0, 39.0, 39.5, 39.7, 40.0, 45.0, 50.0, 60.0)
        + (100.0, 1000.0),
        (0.01, 1.0, 10.0, 20.0, 30.0, 35.0, 38.0, 39.0, 39.5, 39.6, 39.7, 40.0, 45.0, 50.0)
        + (60.0, 80.0, 100.0, 1000.0),
    )


def samples(p: Profile) -> dict[str, int]:
    """Random targets / maps per T for each construction (a response map costs V inputs x N0
    steps, so fewer of them)."""
    return {
        "unconditional": p.pick(20, 200, 1000),
        "token map": p.pick(2, 20, 100),
        "responses": p.pick(1, 10, 50),
        "two tokens": p.pick(2, 20, 100),
    }


def runs(p: Profile) -> list[Run]:
    return []  # hand-built weights: nothing to train


# ---------------------------------------------------------------------------- measuring


def exact_rate(name: str, T: float, n: int, seed: int) -> float:
    """The share of ``n`` random targets (maps) that construction ``name`` generates exactly at
    temperature T; the same seeded targets at every T."""
    g = torch.Generator().manual_seed(seed)
    if name == "unconditional":
        c = C.Unconditional(V, N, T)
        targets = torch.randint(0, V, (n, N), generator=g)
        prefix = torch.stack([c.virtual_token(t.tolist()) for t in targets])
        return (C.generate(c.model(), prefix) == targets).all(dim=1).double().mean().item()
    if name == "two tokens":
        c = C.TwoToken(V_TWO, T)
        tables = torch.randint(0, V_TWO, (n, V_TWO, V_TWO), generator=g)
        prefix = torch.stack([c.virtual_tokens(t) for t in tables])
        got = C.realised_map(c.model(), prefix)[..., 0]
    else:
        c = C.Conditional(V, 1 if name == "token map" else N0, T)
        tables = torch.randint(0, V, (n, V, c.N0), generator=g)
        prefix = torch.stack([c.virtual_tokens(t) for t in tables])
        got = C.realised_map(c.model(), prefix)
    return (got == tables).flatten(1).all(dim=1).double().mean().item()


@dataclass
class Measured:
    """rates: construction -> T -> share exact; demos: construction -> (input, output) text;
    hard_maps / hard_strings: distinct behaviours of the V hard tokens on the token-map and
    unconditional models; worst: the worst-case target (all '}') generated just below and just
    above T*; foods: letters of FOODS answered exactly at T=100."""

    rates: dict[str, dict[float, float]]
    demos: dict[str, list[tuple[str, str]]]
    hard_maps: int
    hard_strings: int
    worst: dict[str, str]
    foods: int
    two_token_demo: float
    pattern: torch.Tensor


def measure(p: Profile) -> Measured:
    n = samples(p)
    rates = {
        name: {T: exact_rate(name, T, n[name], seed=i) for T in temperatures(p)}
        for i, name in enumerate(n)
    }
    demos = {}
    model, vt = C.unconditional(DEMO, V, N, PAPER_T["unconditional"])
    demos["unconditional"] = [("T=50", C.decode(C.generate(model, vt)[0]))]
    low, _ = C.unconditional(DEMO, V, N, 35.0)
    demos["unconditional"].append(("T=35", C.decode(C.generate(low, vt)[0])))
    x = torch.cat([vt[None], model.embed(torch.zeros(1, N - 1, dtype=torch.long), 1)], dim=1)
    _, cache = model.run_with_cache(x, names_filter=lambda name: "pattern" in name)

    model, vt = C.token_map(CASE_FLIP, V, PAPER_T["token map"])
    letters = string.ascii_lowercase[:13] + string.ascii_uppercase[13:]
    out = C.generate(model, vt, torch.tensor([C.encode(c) for c in letters]))[:, 0]
    demos["token map"] = [(letters, C.decode(out))]
    flip_ok = C.decode(C.realised_map(model, vt)[:, 0])
    flip_ok = sum(flip_ok[ord(c) - 32] == CASE_FLIP[c] for c in string.ascii_letters)
    hard = C.hard_token_behaviours(model)

    model, vts = C.response_map(FOODS, V, N0, PAPER_T["responses"])
    answers = C.realised_map(model, vts)
    foods = sum(C.decode(answers[ord(c) - 32]).rstrip() == w for c, w in FOODS.items())
    demos["responses"] = [(c, c + C.decode(answers[ord(c) - 32]).rstrip()) for c in "bqz"]
    demos["token map"].append(("letters flipped", f"{flip_ok}/52"))

    table = torch.randint(0, V_TWO, (V_TWO, V_TWO), generator=torch.Generator().manual_seed(0))
    model, prefix = C.two_token_map(table, V_TWO, PAPER_T["two tokens"])
    two = (C.realised_map(model, prefix)[..., 0] == table).double().mean().item()
    pairs = ["AB", "DE", "JJ"]
    got = [C.generate(model, prefix, C.encode(s, C.LETTERS))[0] for s in pairs]
    demos["two tokens"] = [(s, C.decode(g, C.LETTERS)) for s, g in zip(pairs, got, strict=True)]

    worst = {}
    for label, T in (("T* - 0.01", T_STAR - 0.01), ("T* + 0.01", T_STAR + 0.01)):
        model, vt = C.unconditional([V - 1] * N, V, N, T)
        worst[label] = C.decode(C.generate(model, vt)[0])
    uncond, _ = C.unconditional("", V, N)
    return Measured(
        rates=rates,
        demos=demos,
        hard_maps=len({tuple(r.flatten().tolist()) for r in hard}),
        hard_strings=len({tuple(r.tolist()) for r in C.hard_token_behaviours(uncond)}),
        worst=worst,
        foods=foods,
        two_token_demo=two,
        pattern=cache["pattern", 0][0],
    )


# ---------------------------------------------------------------------------- the verdicts


def verdict_approximate(rates: dict[float, float], bar: float = BAR_APPROX) -> str:
    """At every tested T >= T*, at least ``bar`` of the random targets exact -> supported; at
    some T >= T* but not all -> depends; at none -> refuted."""
    above = {T: r for T, r in rates.items() if T >= T_STAR}
    passing = [T for T, r in above.items() if r >= bar]
    if passing and len(passing) == len(above):
        return "supported"
    if passing:
        return f"depends: exact (>= {100 * bar:.0f}%) only from T={min(passing):g}"
    return f"refuted: below {100 * bar:.0f}% at every T >= T*={T_STAR:.2f}"


def verdict_map(rates: dict[float, float], hard_maps: int) -> str:
    """Every random map exact at every tested T, and the V hard tokens reach at most V maps ->
    supported; otherwise refuted, naming what failed."""
    failed = [T for T, r in rates.items() if r < BAR_EXACT]
    if hard_maps > V:
        return f"refuted: hard tokens reached {hard_maps} maps (> V={V})"
    if failed:
        return f"refuted: not every random map exact at T={', '.join(f'{T:g}' for T in failed)}"
    return "supported"


# ---------------------------------------------------------------------------- the report

LABEL = {
    "unconditional": f"unconditional, N={N}: strings exact",
    "token map": "token -> token map: maps exact",
    "responses": f"token -> {N0}-token response: maps exact",
    "two tokens": f"two tokens -> token (V={V_TWO}; not in the claims): maps exact",
}


def rate_text(rates: dict[float, float], n: int) -> str:
    return f"{100 * min(rates.values()):.1f}%" + (
        "" if min(rates.values()) == 1 else f" (worst of {n} per T)"
    )


STYLE = {
    "unconditional": {"marker": "o", "ls": "-", "lw": 3.0, "alpha": 0.55},
    "token map": {"marker": "s", "ls": "-", "lw": 1.5, "alpha": 0.9},
    "responses": {"marker": "^", "ls": "--", "lw": 1.5, "alpha": 0.9},
    "two tokens": {"marker": "d", "ls": ":", "lw": 1.5, "alpha": 0.9},
}


def draw_temperature(m: Measured, p: Profile, path: Path) -> None:
    n = samples(p)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), width_ratios=[1.3, 1], layout="constrained")
    zoom = (T_STAR - 6, T_STAR + 6)
    for ax, log in zip(axes, (True, False), strict=True):
        for name, rates in m.rates.items():
            Ts = [T for T in sorted(rates) if log or zoom[0] <= T <= zoom[1]]
            label = f"{LABEL[name]} ({n[name]} random per T)"
            ax.plot(Ts, [100 * rates[T] for T in Ts], ms=5, label=label, **STYLE[name])
        ax.axvline(T_STAR, color="black", ls="--", lw=0.9)
        ax.set_ylim(-4, 104)
        ax.set_ylabel("random targets / maps generated exactly (%)")
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("softmax inverse temperature T (log scale)")
    axes[0].set_title("All tested temperatures")
    axes[0].text(
        T_STAR * 0.85, 45, f"T* = {T_STAR:.2f}\n(sufficient: V={V},\n20 positions)", ha="right"
    )
    axes[1].set_xlim(*zoom)
    axes[1].set_xlabel("softmax inverse temperature T")
    axes[1].set_title(f"Near T* = {T_STAR:.2f} (dashed)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8)
    fig.suptitle("One virtual token, a fixed hand-built model: exact generation against T")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def draw_demos(m: Measured, path: Path) -> None:
    fig = plt.figure(figsize=(13, 8), layout="constrained")
    grid = fig.add_gridspec(2, 3, height_ratios=[1, 1.2], width_ratios=[1, 1, 0.9])
    text_ax = fig.add_subplot(grid[0, :2])
    text_ax.axis("off")
    lines = [
        f'unconditional, T=50:   virtual token -> "{m.demos["unconditional"][0][1]}"',
        f'unconditional, T=35:   virtual token -> "{m.demos["unconditional"][1][1]}"',
        f'token map (case flip): "{m.demos["token map"][0][0]}"',
        f'                    -> "{m.demos["token map"][0][1]}"',
        *[f'responses, T=100:      "{c}" -> "{w}"' for c, w in m.demos["responses"]],
        *[f'two tokens, V=10:      "{s}" -> "{o}" (random map)' for s, o in m.demos["two tokens"]],
        "hard token in the virtual token's place:",
        f"  token map: {m.hard_maps} distinct maps; unconditional: {m.hard_strings} string",
    ]
    text_ax.text(0, 1, "\n".join(lines), family="monospace", fontsize=9.5, va="top")
    text_ax.set_title("What the virtual token makes the fixed model generate", loc="left")

    bars_ax = fig.add_subplot(grid[0, 2])
    counts = {
        "1 hard token:\nbound (V)": C.hard_prompt_behaviours(V, 1),
        "1 hard token:\nmaps reached": m.hard_maps,
        "1 virtual token:\nstrings (V^N)": C.virtual_token_behaviours(V, N),
        "1 virtual token:\nmaps (V^V)": C.virtual_token_behaviours(V),
    }
    logs = [math.log10(c) for c in counts.values()]
    bars_ax.barh(list(counts), logs, color=["grey", "grey", "C0", "C1"])
    for y, (count, log) in enumerate(zip(counts.values(), logs, strict=True)):
        bars_ax.text(log + 3, y, str(count) if count < 1e6 else f"10^{log:.1f}", va="center")
    bars_ax.set_xlim(0, 240)
    bars_ax.invert_yaxis()
    bars_ax.set_xlabel(f"log10(number of behaviours), V = {V}")
    bars_ax.set_title("Behaviours one prompt token selects")

    for head, name in enumerate(("pos", "first")):
        ax = fig.add_subplot(grid[1, head])
        image = ax.imshow(m.pattern[head].numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f'Unconditional, head "{name}": attention (T=50)')
        ax.set_xticks(range(0, N, 2))
        ax.set_yticks(range(0, N, 2))
        ax.set_xlabel("key position (0 = virtual token)")
        ax.set_ylabel("query position")
    fig.colorbar(image, ax=ax, label="attention weight", shrink=0.8)
    note = fig.add_subplot(grid[1, 2])
    note.axis("off")
    note.text(
        0,
        0.95,
        'Head "pos": each position attends\nto itself and writes its one-hot\nposition.\n\n'
        'Head "first": every position reads\nthe virtual token, which holds\ntarget token i '
        "as i/V in slot i.\n\nThe decoder keeps slot i,\nReLU(h - 1) = v_i - (1 - a)(1 + v_i),"
        "\nand rounds it to the nearest k/V.",
        va="top",
        fontsize=10,
    )
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


def tables(m: Measured, p: Profile) -> list[str]:
    n = samples(p)
    demo = markdown_table(
        ["construction", "setting", "paper (demonstration)", "ours"],
        [
            [
                "unconditional",
                f"V={V}, N={N}, T=50",
                f'"{DEMO}"',
                f'"{m.demos["unconditional"][0][1]}"',
            ],
            [
                "token -> token",
                f"V={V}, T=100, case flip",
                "'f' -> 'F'",
                f"{m.demos['token map'][1][1]} letters flipped, every other token -> ' '",
            ],
            [
                "token -> response",
                f"V={V}, N0={N0}, T=100",
                "'b' -> \"blueberries\"",
                f"'b' -> \"{m.demos['responses'][0][1]}\"; {m.foods}/26 foods exact",
            ],
            [
                "two tokens -> token",
                f"V={V_TWO}, T=1000, random map",
                "100% of 100 pairs",
                f"{100 * m.two_token_demo:.0f}% of 100 pairs (a complete network here)",
            ],
        ],
    )
    Ts = temperatures(p)
    sweep = markdown_table(
        ["T", *[f"{LABEL[k]} (n={n[k]})" for k in m.rates]],
        [[f"{T:g}", *[f"{100 * m.rates[k][T]:.1f}%" for k in m.rates]] for T in Ts],
    )
    worst = "; ".join(f'{label}: "{s}"' for label, s in m.worst.items())
    return [
        demo + "\n\n*Table*: the paper's demonstrations beside ours (same V, N, T).",
        sweep + f"\n\n*Table*: share of random targets / maps generated exactly per T (the same "
        f"seeded ones at every T). T* = {T_STAR:.2f}; the worst-case target (20 x '}}') at "
        f"{worst}.",
    ]


def report(store: Store, p: Profile, out: Path) -> Section:
    m = measure(p)
    draw_temperature(m, p, out / "constructions_temperature.png")
    draw_demos(m, out / "constructions_demos.png")
    n = samples(p)
    above = {k: {T: r for T, r in m.rates[k].items() if T >= T_STAR} for k in m.rates}
    claims = [
        Claim(
            f"One virtual token makes a fixed 1-layer, 2-head transformer generate any string "
            f"of N tokens (V={V}, N={N})",
            "constructions: unconditional generation",
            f"random targets exact at T >= T*={T_STAR:.2f}: "
            f"{rate_text(above['unconditional'], n['unconditional'])}; demo at T=50: "
            f'"{m.demos["unconditional"][0][1]}"; bar >= {100 * BAR_APPROX:.0f}%',
            verdict_approximate(above["unconditional"]),
        ),
        Claim(
            f"One virtual token makes a fixed 1-layer model compute any of the V^V maps from a "
            f"token to a token; a hard token reaches at most V (V={V})",
            "constructions: token -> token map",
            f"random maps exact at every T in {min(m.rates['token map']):g}-"
            f"{max(m.rates['token map']):g}: {rate_text(m.rates['token map'], n['token map'])}; "
            f"V hard tokens reach {m.hard_maps} distinct maps",
            verdict_map(m.rates["token map"], m.hard_maps),
        ),
        Claim(
            f"N0 virtual tokens make a fixed 1-layer model answer every token with any "
            f"N0-token response (V={V}, N0={N0})",
            "constructions: token -> response",
            f"random maps exact at T >= T*={T_STAR:.2f}: "
            f"{rate_text(above['responses'], n['responses'])}; {m.foods}/26 food words; "
            f"bar >= {100 * BAR_APPROX:.0f}%",
            verdict_approximate(above["responses"]),
        ),
    ]
    return Section(
        title="Section 3: what one virtual token can make a fixed model do",
        text=__doc__.split("\n", 1)[1].strip(),
        tables=tables(m, p),
        figures=[
            Figure(
                "constructions_temperature.png",
                "Share of random targets (maps) each hand-built construction generates exactly, "
                "against the softmax inverse temperature T, the same seeded targets at every T; "
                "left all tested T (log scale), right the ones near T*. Dashed: the derived "
                "sufficient temperature T*, above which the one-layer constructions are exact "
                "for every target (for the unconditional one it is also necessary). The token "
                "map is exact at every T.",
            ),
            Figure(
                "constructions_demos.png",
                "Top: the demonstrations (generated text; at T=35 the unconditional demo's last "
                "tokens fall one short, as the one-sided error bound says) and how many "
                "behaviours a prompt token selects (log scale). Bottom: the unconditional "
                "model's two heads while generating the demo (all 20 positions, T=50).",
            ),
        ],
        claims=claims,
    )


EXPERIMENT = Experiment("constructions", "Section 3 constructions", runs, report)
