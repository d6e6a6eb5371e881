"""See the theorem: an interactive attention view per head, inline in a notebook or one HTML file.

For one input, per layer and head, the page shows what :mod:`probe.probes` proves:

- the tuned model's raw pattern [T, P + T], prefix columns first (orange) and content (blue);
- alpha_i, the prefix's share of query i's attention;
- the content block renormalised per row beside the frozen base head's pattern A on the same
  layer input, and their difference: zero for prefix methods, visibly not for LoRA on W_Q/W_K or
  full fine-tuning;
- the head output's decomposition z_i = (1 - alpha_i) z_base,i + alpha_i b_i (norms per query,
  and the residual the identity leaves);
- the check's numbers for that head (:class:`~probe.probes.TheoremCheck`: identity errors and
  tolerances, local and downstream drift, bias rank), over every input checked.

Hovering a cell shows the query and key tokens and the cell's value in every panel; selectors
pick the model (a page may hold several tuned models), layer and head, and a grid of every head
coloured by its local drift picks one at a glance.

Usage::

    from probe import view
    page = view.view(base, {"prefix": adapter, "full FT": finetuned}, tokens)
    page                       # in a notebook: displayed inline (self-contained HTML + JS)
    page.save("view.html")     # one file, no network needed to open it

or from records and a check already made (ours or a Hugging Face model's), with
:func:`model_view` and :class:`View`; from the command line, ``probe view``.

Size. The payload is JSON inlined in the page: patterns as integers in units of 10^-digits
(content rows causal, so only j <= i is stored), alpha and norms to 4 significant digits. Only
the first ``max_positions`` content positions are shown; causal attention makes that exact, as
no query among them sees a later key. A model with more than ``max_heads`` heads is shown at
evenly spaced layers (first and last kept). The page states both.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from probe.check import check_tuned, tuned_records
from probe.probes import (
    AttentionRecord,
    TheoremCheck,
    check_theorem,
    content_attention,
    decompose,
)


@dataclass(frozen=True)
class ViewConfig:
    """How much of a check the page shows.

    max_positions: content positions shown (the first ones; exact under causal attention).
    max_heads: heads shown at most; above it, evenly spaced layers are kept, all their heads.
    digits: decimals kept of each attention weight (3: units of 0.001).
    example: which input of the batch the patterns are drawn for.
    """

    max_positions: int = 32
    max_heads: int = 144
    digits: int = 3
    example: int = 0

    def __post_init__(self):
        for name in ("max_positions", "max_heads"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ViewConfig.{name} must be an integer >= 1")
        if not isinstance(self.digits, int) or not 1 <= self.digits <= 6:
            raise ValueError("ViewConfig.digits must be an integer from 1 to 6")
        if not isinstance(self.example, int) or self.example < 0:
            raise ValueError("ViewConfig.example must be an integer >= 0 (an input's index)")


@dataclass
class ModelView:
    """One tuned model's records and check, as the page shows them.

    name: the model's label on the page. records: one AttentionRecord per layer (at least the
    example input). check: the TheoremCheck of this model (possibly over more inputs than the
    records hold). tokens: the content token strings [T] of the example input. what: a phrase
    describing the tuning. n_inputs: how many inputs the check covered (None: not stated).
    """

    name: str
    records: Sequence[AttentionRecord]
    check: TheoremCheck
    tokens: Sequence[str]
    what: str = ""
    n_inputs: int | None = None

    def __post_init__(self):
        if len(self.records) != len(self.check.decompositions):
            raise ValueError(
                f"{self.name}: {len(self.records)} records but the check has "
                f"{len(self.check.decompositions)} layers; pass the records the check was made from"
            )
        if not self.records:
            raise ValueError(f"{self.name}: no records; record at least one layer")
        if len(self.tokens) != self.records[0].T:
            raise ValueError(
                f"{self.name}: {len(self.tokens)} token strings for {self.records[0].T} content "
                "positions; give one string per content token of the example input"
            )


# ---------------------------------------------------------------------------- recording


@torch.no_grad()
def record(
    base: nn.Module, tuned: Any, tokens: Tensor
) -> tuple[list[AttentionRecord], TheoremCheck]:
    """(records, check) of ``tuned`` on ``tokens`` [batch, T]: our Transformer through
    :func:`tuned_records`, a Hugging Face base through ``probe.hf`` (``hf_records`` for the
    records, :func:`~probe.check.check_tuned` for the check; ``tuned`` as check_tuned takes)."""
    from probe.model import Transformer

    if isinstance(base, Transformer):
        records, base_records, expected = tuned_records(base, tuned, tokens)
        return records, check_theorem(records, base_records, expected)
    from probe import hf

    how = "tuned_model" if isinstance(tuned, nn.Module) else "prefix"
    return hf.hf_records(base, tokens, **{how: tuned}), check_tuned(base, tuned, tokens)


def model_view(
    name: str,
    base: nn.Module,
    tuned: Any,
    tokens: Tensor,
    token_strings: Sequence[str] | None = None,
    example: int = 0,
    what: str = "",
) -> ModelView:
    """Record and check ``tuned`` on ``tokens`` [batch, T] (see :func:`record`) for the page;
    ``token_strings`` label input ``example`` (default: the token ids)."""
    if not 0 <= example < tokens.shape[0]:
        raise ValueError(f"example {example} is not an input index: tokens has {tokens.shape[0]}")
    records, check = record(base, tuned, tokens)
    labels = [str(t) for t in tokens[example].tolist()] if token_strings is None else token_strings
    return ModelView(name, records, check, list(labels), what, n_inputs=tokens.shape[0])


# ---------------------------------------------------------------------------- the payload


def _finite(x: float, sig: int = 4) -> float | None:
    """x to ``sig`` significant digits; None (shown as n/a) when not finite, as JSON has no NaN."""
    return float(f"{x:.{sig}g}") if math.isfinite(x) else None


def _ints(t: Tensor, scale: int) -> list:
    """A tensor as nested lists of integers in units of 1/scale (-1 marks a non-finite value)."""
    q = torch.where(t.isfinite(), (t.double() * scale).round(), torch.full_like(t.double(), -1))
    return q.long().tolist()


def _example(r: AttentionRecord, ex: int, T: int) -> AttentionRecord:
    """Input ``ex``'s first T content positions of a record: exact, as no query among them
    sees a later key."""
    one = slice(ex, ex + 1)
    cut = {n: getattr(r, n)[one, :T] for n in ("q", "k", "v", "z", "q_frozen", "k_frozen")}
    prefix = {
        n: None if getattr(r, n) is None else getattr(r, n)[one] for n in ("prefix_k", "prefix_v")
    }
    return replace(
        r, **cut, **prefix, v_frozen=r.v_frozen[one, :T], pattern=r.pattern[one, :, :T, : r.P + T]
    )


def _head(r: AttentionRecord, d, h: int, scale: int, row: dict, failed: bool) -> dict:
    """One head's panel data: patterns (integers), alpha, output norms, the check's numbers."""
    content, observable = content_attention(r.pattern[0, h].double(), r.P)
    base = d.A[0, h].double()
    alpha = d.alpha[0, h].double()
    z = r.z[0, :, h].double()
    base_part = (1 - alpha)[:, None] * d.z_base[0, :, h].double()
    bias_part = alpha[:, None] * d.bias[0, :, h].double()
    norms = {
        "z": z.norm(dim=-1),
        "base": base_part.norm(dim=-1),
        "bias": bias_part.norm(dim=-1),
        "residual": (z - base_part - bias_part).norm(dim=-1),
    }
    T = r.T
    stats = {k: _finite(float(v), 3) if isinstance(v, float) else v for k, v in row.items()}
    stats["check"] = ("FAIL" if failed else "ok") if row["identity_expected"] else "-"
    return {
        "head": h,
        "prefix": _ints(r.pattern[0, h, :, : r.P], scale),
        "content": [row_[: i + 1] for i, row_ in enumerate(_ints(content, scale))],
        "base": [row_[: i + 1] for i, row_ in enumerate(_ints(base, scale))],
        "unobservable": [i for i in range(T) if not observable[i]],
        "alpha": [_finite(float(a)) for a in alpha],
        "norms": {k: [_finite(float(x)) for x in v] for k, v in norms.items()},
        "stats": stats,
    }


def _pick(n: int, k: int) -> list[int]:
    """k evenly spaced indices of range(n), first and last included (all of them if k >= n)."""
    if k >= n:
        return list(range(n))
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _model_payload(m: ModelView, cfg: ViewConfig, layers: list[int]) -> dict:
    n_batch = m.records[0].q.shape[0]
    if cfg.example >= n_batch:
        raise ValueError(
            f"{m.name}: example {cfg.example} is not an input of the records ({n_batch} inputs)"
        )
    T = min(cfg.max_positions, m.records[0].T)
    scale = 10**cfg.digits
    rows = {(row["layer"], row["head"]): row for row in m.check.rows()}
    out = []
    for i in layers:
        r = _example(m.records[i], cfg.example, T)
        d = decompose(r)
        heads = []
        for h in range(r.n_heads):
            failed = bool(m.check.failures(r.layer, h))
            heads.append(_head(r, d, h, scale, rows[(r.layer, h)], failed))
        out.append({"layer": r.layer, "expected": m.check.expected[i], "heads": heads})
    return {
        "name": m.name,
        "what": m.what,
        "P": m.records[0].P,
        "n_inputs": m.n_inputs,
        "tokens": [str(t) for t in m.tokens[:T]],
        "downstream": m.check.downstream is not None,
        "layers": out,
    }


def payload(models: Sequence[ModelView], title: str, config: ViewConfig | None = None) -> dict:
    """The page's data (JSON-ready): one entry per model, per shown layer and head.

    Every model must have the same number of layers and heads (one base model, several
    tunings). See the module docstring for the rounding and subsampling."""
    cfg = config or ViewConfig()
    if not models:
        raise ValueError("no model to show; give at least one ModelView")
    shapes = {(len(m.records), m.records[0].n_heads) for m in models}
    if len(shapes) > 1:
        raise ValueError(
            f"the models have different (layers, heads): {sorted(shapes)}; "
            "show tunings of one base model per page"
        )
    n_layers, n_heads = shapes.pop()
    layers = _pick(n_layers, max(1, cfg.max_heads // n_heads))
    T_full = max(m.records[0].T for m in models)
    notes = [
        f"Attention weights are rounded to {cfg.digits} decimals; alpha and norms to 4 "
        "significant digits. The check's numbers are over every input checked."
    ]
    if T_full > cfg.max_positions:
        notes.append(
            f"Showing the first {cfg.max_positions} of {T_full} content positions: exact, since "
            "under causal attention none of these queries sees a later key."
        )
    if len(layers) < n_layers:
        notes.append(
            f"Showing {len(layers)} of {n_layers} layers ({', '.join(map(str, layers))}), evenly "
            f"spaced, all {n_heads} heads each, to keep the page under {cfg.max_heads} heads."
        )
    return {
        "version": 1,
        "title": title,
        "scale": 10**cfg.digits,
        "digits": cfg.digits,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "example": cfg.example,
        "notes": notes,
        "models": [_model_payload(m, cfg, layers) for m in models],
    }


# ---------------------------------------------------------------------------- HTML


def _asset(name: str) -> str:
    return resources.files("probe").joinpath("view_static", name).read_text(encoding="utf-8")


_ISSUED: Counter[str] = Counter()  # fragment ids handed out in this process, by content


def html_fragment(data: Mapping) -> str:
    """A self-contained <div> with the view's CSS, script and data (no network access), for a
    notebook cell or to embed in a page; several may share one page."""
    blob = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    # Named by its content, so a regenerated page is byte-identical; a repeat in this process
    # (the same view twice in one notebook) gets a suffix, since ids must be unique on a page.
    key = hashlib.sha256(blob.encode()).hexdigest()[:8]
    repeat, _ISSUED[key] = _ISSUED[key], _ISSUED[key] + 1
    uid = f"ppv-{key}" + (f"-{repeat}" if repeat else "")
    return (
        f'<div class="ppv" id="{uid}"></div>\n'
        f"<style>{_asset('view.css')}</style>\n"
        f"<script>{_asset('view.js')}</script>\n"
        f'<script type="application/json" id="{uid}-data">{blob}</script>\n'
        f"<script>PrefixProbeView.mount(document.getElementById({json.dumps(uid)}), "
        f"JSON.parse(document.getElementById({json.dumps(uid + '-data')}).textContent));</script>"
    )


def html_page(data: Mapping) -> str:
    """One self-contained HTML document holding the view."""
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(str(data.get('title', 'attention view')))}</title>\n"
        '<link rel="icon" href="data:,">\n</head>\n<body>\n'
        f"{html_fragment(data)}\n</body>\n</html>\n"
    )


@dataclass
class View:
    """A built view: displayed inline by a notebook (``_repr_html_``), saved as one HTML file
    by :meth:`save`. ``data`` is the JSON payload (:func:`payload`)."""

    data: dict = field(repr=False)

    @classmethod
    def of(cls, models: Sequence[ModelView], title: str = "", config: ViewConfig | None = None):
        return cls(payload(models, title or "Attention per head: what the tuning changed", config))

    def _repr_html_(self) -> str:
        return html_fragment(self.data)

    def html(self) -> str:
        return html_page(self.data)

    def save(self, path: str | Path) -> Path:
        """Write the page to ``path`` (a .html file), atomically; returns the path."""
        path = Path(path)
        if path.suffix.lower() not in (".html", ".htm"):
            raise ValueError(f"{path} does not end in .html; name the page file.html")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.html(), encoding="utf-8")
        tmp.replace(path)
        return path


def view(
    base: nn.Module,
    tuned: Any | Mapping[str, Any],
    tokens: Tensor,
    token_strings: Sequence[str] | None = None,
    title: str = "",
    config: ViewConfig | None = None,
) -> View:
    """The view of one tuned model, or of several (a mapping name -> tuned), on ``tokens``
    [batch, T]: each is recorded and checked on every input (:func:`record`), and input
    ``config.example`` is drawn. ``tuned`` as :func:`probe.check.check_tuned` takes it."""
    cfg = config or ViewConfig()
    named = dict(tuned) if isinstance(tuned, Mapping) else {"tuned": tuned}
    models = [
        model_view(name, base, t, tokens, token_strings, example=cfg.example)
        for name, t in named.items()
    ]
    return View.of(models, title, cfg)


# ---------------------------------------------------------------------------- command line


def hf_token_strings(model_dir: str | Path, ids: Sequence[int]) -> list[str]:
    """Each token id decoded alone by the tokenizer saved in ``model_dir`` (its text, spaces
    kept); the ids as strings when the directory has no tokenizer (toy-task inputs)."""
    from probe.hf import require_hf

    try:
        tok = require_hf(peft=False).transformers.AutoTokenizer.from_pretrained(
            str(model_dir), local_files_only=True
        )
    except (OSError, ValueError):
        return [str(i) for i in ids]
    return [tok.decode([i]) for i in ids]


def _first(tokens: Tensor | list[Tensor], example: int) -> Tensor | list[Tensor]:
    """The inputs with input ``example`` moved first: an HF check keeps the first's records."""
    n = tokens.shape[0] if isinstance(tokens, Tensor) else len(tokens)
    if not 0 <= example < n:
        raise ValueError(f"--example {example} is not an input index: there are {n} inputs")
    order = [example] + [i for i in range(n) if i != example]
    return tokens[order] if isinstance(tokens, Tensor) else [tokens[i] for i in order]


def cmd_view(args) -> int:
    """Write one self-contained HTML page of every --adapter's attention on --base."""
    from probe import hf
    from probe.cli import check_inputs, hf_check_tokens, row_names

    args.n = 4 if args.n is None else args.n
    cfg = ViewConfig(args.max_positions, args.max_heads, args.digits, args.example)
    adapters = args.adapter or [None]
    names = row_names(adapters) if args.adapter else [f"random prefix, P={args.prefix_len}"]
    models = []
    if hf.is_hf_model_dir(args.base):
        tokens, inputs = hf_check_tokens(args)
        tokens = _first(tokens, args.example)
        cfg = replace(cfg, example=0)
        first = tokens[0] if isinstance(tokens, Tensor) else tokens[0][0]
        strings = hf_token_strings(args.base, first.tolist())
        for name, adapter in zip(names, adapters, strict=True):
            run = hf.check_theorem_dirs(
                args.base,
                adapter,
                tokens,
                prefix_len=args.prefix_len,
                seed=args.seed,
                dtype=getattr(torch, args.dtype) if args.dtype else None,
                device=args.device,
            )
            description = f"{run.what}; {run.positions}"
            n = tokens.shape[0] if isinstance(tokens, Tensor) else len(tokens)
            models.append(ModelView(name, run.records, run.result, strings, description, n))
    else:
        for name, adapter in zip(names, adapters, strict=True):
            base, tuned, description, tokens, task = check_inputs(args, adapter)
            models.append(model_view(name, base, tuned, tokens, None, args.example, description))
        inputs = f"{args.n} {task.name} inputs"
    title = args.title or f"{Path(args.base).name}: {', '.join(names)} ({inputs})"
    page = View.of(models, title, cfg)
    path = page.save(args.out)
    print(
        f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB): {len(models)} model(s), "
        f"{len(page.data['models'][0]['layers'])} of {page.data['n_layers']} layers x "
        f"{page.data['n_heads']} heads, input {args.example} of {inputs}"
    )
    return 0


def add_command(sub) -> None:
    """Register ``probe view`` (its inputs as check-theorem's: ``probe.cli.add_input_args``)."""
    from probe.cli import add_input_args, positive_int

    p = sub.add_parser(
        "view",
        help="write an interactive attention view per head (one self-contained HTML file)",
        description="Record and check each --adapter on --base as check-theorem does, and draw "
        "one input's attention per layer and head: the raw pattern with the prefix columns, "
        "alpha, the renormalised content beside the base head's, the head output's split.",
    )
    add_input_args(p, "inputs recorded and checked (default 4); the page draws --example")
    p.add_argument(
        "--adapter",
        action="append",
        help="an adapter or fine-tuned model directory (as for check-theorem); repeat to compare "
        "several on one page; default: a random key/value prefix",
    )
    p.add_argument("--out", required=True, help="the page to write, e.g. view.html")
    p.add_argument("--example", type=int, default=0, help="which input to draw (default 0)")
    p.add_argument("--title", help="the page's title (default: the base and adapters)")
    p.add_argument(
        "--max-positions", type=positive_int, default=32, help="content positions shown (32)"
    )
    p.add_argument(
        "--max-heads",
        type=positive_int,
        default=144,
        help="heads shown at most; above it, evenly spaced layers (144: all of GPT-2 small)",
    )
    p.add_argument("--digits", type=positive_int, default=3, help="decimals kept per weight")
    p.set_defaults(run=cmd_view)
