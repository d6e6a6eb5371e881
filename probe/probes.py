"""Attention-bias probes: what a key/value prefix does to a frozen attention head, measured.

The theorem. Take one head and one query position i with scores s_j = q_i . k_j / sqrt(d_head)
over its visible content keys j <= i, and put P prefix keys K_p (values V_p) before them, with
scores s_p = q_i . K_p / sqrt(d_head). The softmax over [prefix; content] splits in two:

    softmax([s_p; s_j]) = [alpha beta_p; (1 - alpha) A_ij],  alpha = sigmoid(lse_p s_p - lse_j s_j)

because exp(s_p) / Z = (Z_prefix / Z) (exp(s_p) / Z_prefix) and exp(s_j) / Z =
(Z_content / Z) (exp(s_j) / Z_content), with Z = Z_prefix + Z_content: beta = softmax over the
prefix scores, A = softmax over the content scores alone, alpha = Z_prefix / Z the prefix's share.
Weighting the values with it, the head's output is

    z_i = (1 - alpha_i) sum_j A_ij v_j + alpha_i sum_p beta_ip V_p.

Premise: the head is frozen (its ln1, W_Q, W_K, W_V are the base model's), so q, k, v and hence
A are exactly what the base head computes from the same layer input. Then a prefix can only
scale the head's own output down by (1 - alpha) and add a bias alpha sum_p beta_p V_p from a
P-dimensional span: the relative attention among content positions is unchanged at every layer
(local drift 0), the added part has rank <= P after W_O, and later layers move only because
their inputs do (downstream drift). A soft prompt acts as such a prefix at every layer
(``adapters.prompt_to_prefix``); LoRA on W_Q/W_K/W_V and full fine-tuning break the premise, and
the check says at which layers (:func:`frozen_head_layers`).

One call checks a tuned model, :func:`probe.check.check_tuned` (base, adapter or fine-tuned copy
or raw prefix, tokens), on our :class:`~probe.model.Transformer` or a Hugging Face model (also
importable from here, as ``probes.check_tuned``). Underneath, the probes read
:class:`AttentionRecord` s (one layer's recorded attention for a batch of inputs,
plain tensors), so the same code serves both. From records (:func:`records_from_cache`):

    decompose(record)                  alpha, beta, bias term, prefix-free pattern A, and the
                                       reconstruction errors of both identities of the theorem
    local_drift(record)                tuned relative attention vs the frozen head, same layer input
    downstream_drift(tuned, base)      tuned vs base model on the same tokens (two caches)
    bias_subspace(record)              singular values of the head output the frozen head does not
                                       explain: at most P of them for a prefix
    check_theorem(records, ...)        all of the above, with tolerances derived from the dtype

Every result is a dataclass for one layer whose ``rows()`` gives one dict per head, ready for
``pandas.DataFrame``; ``table(results)`` concatenates the rows of several.

Shapes: b batch, T content positions, P prefix positions, h heads, e d_head, d d_model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from einops import einsum
from jaxtyping import Bool, Float, Int
from torch import Tensor

from probe.config import KVPrefix

if TYPE_CHECKING:
    from probe.model import Transformer


@dataclass
class AttentionRecord:
    """One layer, all heads, a batch of inputs; positions are the T content positions.

    q, k, v:              [b, T, h, e]   the tuned model's content queries, keys and values
    prefix_k, prefix_v:   [b, P, h, e]   the layer's prefix (None without one)
    pattern:              [b, h, T, P + T]  the tuned model's attention, prefix columns first
    z:                    [b, T, h, e]   the tuned head's output before W_O
    q_frozen, k_frozen, v_frozen: [b, T, h, e]  the FROZEN base head recomputed on the same
                                         layer input (the tuned model's residual stream)
    W_O:                  [h, e, d]      the tuned model's output projection
    W_O_frozen:           [h, e, d]      the base model's (None: same as W_O)
    layer:                the layer index, carried into ``rows()``
    """

    q: Float[Tensor, "b T h e"]
    k: Float[Tensor, "b T h e"]
    v: Float[Tensor, "b T h e"]
    prefix_k: Float[Tensor, "b P h e"] | None
    prefix_v: Float[Tensor, "b P h e"] | None
    pattern: Float[Tensor, "b h T PT"]
    z: Float[Tensor, "b T h e"]
    q_frozen: Float[Tensor, "b T h e"]
    k_frozen: Float[Tensor, "b T h e"]
    v_frozen: Float[Tensor, "b T h e"]
    W_O: Float[Tensor, "h e d"]
    W_O_frozen: Float[Tensor, "h e d"] | None = None
    layer: int = 0

    @property
    def P(self) -> int:
        return 0 if self.prefix_k is None else self.prefix_k.shape[1]

    @property
    def T(self) -> int:
        return self.q.shape[1]

    @property
    def n_heads(self) -> int:
        return self.q.shape[2]

    @property
    def d_head(self) -> int:
        return self.q.shape[3]

    @property
    def base_W_O(self) -> Float[Tensor, "h e d"]:
        return self.W_O if self.W_O_frozen is None else self.W_O_frozen


@torch.no_grad()
def records_from_cache(
    base: Transformer,
    cache: Mapping[str, Tensor],
    W_O: Sequence[Tensor] | None = None,
    prompt_len: int = 0,
) -> list[AttentionRecord]:
    """One :class:`AttentionRecord` per layer from a tuned model's cache over the same tokens.

    ``cache`` comes from ``model.run_with_cache(tokens, prefix=...)``, from an adapter run
    (``Tuned.run_with_cache``) or from a fine-tuned copy of ``base``. The frozen head is
    recomputed from the cached layer input ``blocks.{l}.hook_resid_pre`` with ``base``'s ln1,
    W_Q, W_K, W_V and biases.

    W_O: the tuned model's per-layer output projections [h, e, d]; by default those of
    ``cache.model`` when it is a Transformer (a fine-tuned copy), else ``base``'s.
    prompt_len: for a soft-prompt run (residual hooks have prompt_len + T positions, prompt
    first), the prompt positions' keys and values become the layer's prefix and only the content
    query rows are kept. This is exact: under causal masking the prompt never sees the content,
    so it acts as a fixed key/value prefix at every layer (``adapters.prompt_to_prefix``).
    """
    from probe.model import Transformer  # here: probing an HF model never needs it

    if W_O is None:
        owner = getattr(cache, "model", None)
        owner = owner if isinstance(owner, Transformer) else base
        W_O = [block.attn.W_O for block in owner.blocks]
    S = prompt_len
    records = []
    for layer, block in enumerate(base.blocks):
        name = f"blocks.{layer}.attn.hook_"
        x = block.ln1(cache[f"blocks.{layer}.hook_resid_pre"][:, S:])
        attn = block.attn
        q_frozen, k_frozen, v_frozen = attn.project(x)
        k, v = cache[name + "k"], cache[name + "v"]
        prefix_k = cache[name + "prefix_k"] if name + "prefix_k" in cache.keys() else None
        prefix_v = cache[name + "prefix_v"] if name + "prefix_v" in cache.keys() else None
        if S:  # prompt positions join the prefix: columns stay [prefix, prompt, content]
            prefix_k = k[:, :S] if prefix_k is None else torch.cat([prefix_k, k[:, :S]], 1)
            prefix_v = v[:, :S] if prefix_v is None else torch.cat([prefix_v, v[:, :S]], 1)
        records.append(
            AttentionRecord(
                q=cache[name + "q"][:, S:],
                k=k[:, S:],
                v=v[:, S:],
                prefix_k=prefix_k,
                prefix_v=prefix_v,
                pattern=cache[name + "pattern"][:, :, S:],
                z=cache[name + "z"][:, S:],
                q_frozen=q_frozen,
                k_frozen=k_frozen,
                v_frozen=v_frozen,
                W_O=W_O[layer].detach(),
                W_O_frozen=attn.W_O.detach(),
                layer=layer,
            )
        )
    return records


# ---------------------------------------------------------------------------- attention maths


def scores(q: Float[Tensor, "b Q h e"], k: Float[Tensor, "b K h e"]) -> Float[Tensor, "b h Q K"]:
    """Attention scores q . k / sqrt(d_head), unmasked."""
    return einsum(q, k, "b q h e, b k h e -> b h q k") / math.sqrt(q.shape[-1])


def causal_mask(T: int, device=None) -> Bool[Tensor, "T T"]:
    """True where query i may see content key j (j <= i)."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def prefix_free_pattern(
    q: Float[Tensor, "b T h e"], k: Float[Tensor, "b T h e"]
) -> Float[Tensor, "b h T T"]:
    """A_ij = softmax over content j <= i of q_i . k_j / sqrt(d): the head without a prefix."""
    s = scores(q, k).masked_fill(~causal_mask(q.shape[1], q.device), float("-inf"))
    return s.softmax(-1)


def content_attention(
    pattern: Float[Tensor, "... T PT"], P: int
) -> tuple[Float[Tensor, "... T T"], Bool[Tensor, "... T"]]:
    """A pattern's content block (columns after the P prefix columns) renormalised to sum to 1
    per query, and a mask of the query rows where that is observable (content mass a normal
    float; when a prefix takes all but e.g. 1e-320 of the attention, relative content attention
    is lost to underflow, and such rows come back near 0 instead of NaN)."""
    content = pattern[..., P:]
    mass = content.sum(-1)
    observable = mass > torch.finfo(mass.dtype).tiny
    return content / mass.clamp_min(torch.finfo(mass.dtype).tiny)[..., None], observable


def relative_attention(
    record: AttentionRecord,
) -> tuple[Float[Tensor, "b h T T"], Bool[Tensor, "b h T"]]:
    """:func:`content_attention` of a record's pattern: [b, h, T, T] and the observable rows."""
    return content_attention(record.pattern, record.P)


# ---------------------------------------------------------------------------- decomposition


@dataclass
class Decomposition:
    """The theorem's decomposition of one layer (see the module docstring) and how well it
    reconstructs the recorded pattern and head output.

    alpha:    [b, h, T]     prefix attention mass, from the SCORES (logsumexp of the prefix
                            scores vs the content scores), never read off the pattern
    beta:     [b, h, T, P]  softmax over the prefix scores
    A:        [b, h, T, T]  the frozen head's prefix-free pattern (from q_frozen, k_frozen)
    z_base:   [b, T, h, e]  the frozen head's output A @ v_frozen
    bias:     [b, T, h, e]  sum_p beta_p V_p, the prefix's value mix
    bias_out: [b, T, h, d]  bias @ W_O[h], its image in the residual stream (the head adds
                            alpha * bias_out); a single fixed direction per head when P = 1
    pattern_error: [h]  max |pattern - [alpha beta, (1 - alpha) A]| (prefix, content columns)
    z_error:       [h]  max |z - ((1 - alpha) z_base + alpha bias)|
    alpha_error:   [h]  max |alpha - sum of the pattern's prefix columns|
    """

    layer: int
    P: int
    alpha: Float[Tensor, "b h T"]
    beta: Float[Tensor, "b h T P"]
    A: Float[Tensor, "b h T T"]
    z_base: Float[Tensor, "b T h e"]
    bias: Float[Tensor, "b T h e"]
    bias_out: Float[Tensor, "b T h d"]
    pattern_error: Float[Tensor, " h"]
    z_error: Float[Tensor, " h"]
    alpha_error: Float[Tensor, " h"]

    def rows(self) -> list[dict]:
        return [
            {
                "layer": self.layer,
                "head": h,
                "P": self.P,
                "alpha_mean": self.alpha[:, h].mean().item(),
                "alpha_max": self.alpha[:, h].max().item(),
                "pattern_error": self.pattern_error[h].item(),
                "z_error": self.z_error[h].item(),
                "alpha_error": self.alpha_error[h].item(),
            }
            for h in range(self.alpha.shape[1])
        ]


def _per_position(x: Float[Tensor, "b h T"]) -> Float[Tensor, "b T h 1"]:
    return x.transpose(1, 2)[..., None]


@torch.no_grad()
def decompose(record: AttentionRecord) -> Decomposition:
    """alpha, beta, bias term and prefix-free pattern of one layer, and the errors of

        pattern == [alpha beta  |  (1 - alpha) A]            (prefix columns, content columns)
        z       == (1 - alpha) z_base + alpha sum_p beta V_p

    alpha = sigmoid(logsumexp_p s_ip - logsumexp_{j<=i} s_ij) with the tuned model's scores, and
    1 - alpha = sigmoid of the negated difference (exact even when alpha rounds to 1). Without a
    prefix alpha = 0 and the identities say the tuned head equals the frozen one.
    """
    r = record
    s_content = scores(r.q, r.k).masked_fill(~causal_mask(r.T, r.q.device), float("-inf"))
    lse_content = s_content.logsumexp(-1)
    if r.P:
        s_prefix = scores(r.q, r.prefix_k)
        lse_prefix = s_prefix.logsumexp(-1)
        beta = s_prefix.softmax(-1)
        bias = einsum(beta, r.prefix_v, "b h q p, b p h e -> b q h e")
    else:
        lse_prefix = torch.full_like(lse_content, float("-inf"))
        beta = s_content.new_zeros(*s_content.shape[:3], 0)
        bias = torch.zeros_like(r.z)
    alpha = torch.sigmoid(lse_prefix - lse_content)
    keep = torch.sigmoid(lse_content - lse_prefix)  # 1 - alpha
    A = prefix_free_pattern(r.q_frozen, r.k_frozen)
    z_base = einsum(A, r.v_frozen, "b h q k, b k h e -> b q h e")

    pattern_hat = torch.cat([alpha[..., None] * beta, keep[..., None] * A], dim=-1)
    z_hat = _per_position(keep) * z_base + _per_position(alpha) * bias
    return Decomposition(
        layer=r.layer,
        P=r.P,
        alpha=alpha,
        beta=beta,
        A=A,
        z_base=z_base,
        bias=bias,
        bias_out=einsum(bias, r.W_O, "b q h e, h e d -> b q h d"),
        pattern_error=(r.pattern - pattern_hat).abs().amax((0, 2, 3)),
        z_error=(r.z - z_hat).abs().amax((0, 1, 3)),
        alpha_error=(r.pattern[..., : r.P].sum(-1) - alpha).abs().amax((0, 2)),
    )


# ---------------------------------------------------------------------------- drift


@dataclass
class Drift:
    """How far a tuned head's relative content attention moved, per head of one layer.

    kind: "local" (vs the frozen head on the same layer input; the theorem says exactly 0 for
    prefix methods) or "downstream" (vs the base model on the same tokens).
    max_abs:  [h]  max |tuned - reference| over batch, queries and keys
    tv_mean:  [h]  total variation distance per query row, mean over rows (batch x queries)
    tv_max:   [h]  its max
    unobservable: [h]  query rows left out because the prefix left no representable content mass

    Total variation, 0.5 * sum_j |p_j - q_j|, rather than KL: bounded in [0, 1], symmetric, and
    defined with the zeros of causal masking and of underflowed weights (KL is infinite or
    undefined there, and blows up on rounding noise). It is the largest difference in the
    attention any set of keys gets, so 0.1 means "up to 10% of the attention moved".
    """

    layer: int
    kind: str
    max_abs: Float[Tensor, " h"]
    tv_mean: Float[Tensor, " h"]
    tv_max: Float[Tensor, " h"]
    unobservable: Int[Tensor, " h"]

    def rows(self) -> list[dict]:
        return [
            {
                "layer": self.layer,
                "head": h,
                "kind": self.kind,
                "max_abs": self.max_abs[h].item(),
                "tv_mean": self.tv_mean[h].item(),
                "tv_max": self.tv_max[h].item(),
                "unobservable": int(self.unobservable[h]),
            }
            for h in range(self.max_abs.shape[0])
        ]


def _drift(
    layer: int,
    kind: str,
    tuned: Float[Tensor, "b h T T"],
    reference: Float[Tensor, "b h T T"],
    observable: Bool[Tensor, "b h T"],
) -> Drift:
    diff = torch.where(observable[..., None], tuned - reference, 0.0).abs()
    tv = 0.5 * diff.sum(-1)  # [b, h, T]
    rows = observable.sum((0, 2))
    return Drift(
        layer=layer,
        kind=kind,
        max_abs=diff.amax((0, 2, 3)),
        tv_mean=tv.sum((0, 2)) / rows.clamp_min(1),
        tv_max=tv.amax((0, 2)),
        unobservable=(~observable).sum((0, 2)),
    )


@torch.no_grad()
def local_drift(record: AttentionRecord) -> Drift:
    """Tuned relative content attention (the renormalised content block of the recorded
    pattern) vs the frozen head's pattern on the same layer input. Exactly 0 (to rounding) for
    prefix and prompt methods at every layer; > 0 when W_Q, W_K (or ln1) changed. Changes to
    W_V or W_O cannot show here: they do not move any pattern."""
    tuned, observable = relative_attention(record)
    reference = prefix_free_pattern(record.q_frozen, record.k_frozen)
    return _drift(record.layer, "local", tuned, reference, observable)


@torch.no_grad()
def downstream_drift(tuned: AttentionRecord, base: AttentionRecord) -> Drift:
    """Tuned vs base model on the same tokens: relative content attention of the tuned run vs
    the base run's pattern, per head. A prefix moves later layers' attention only through their
    inputs, so this is 0 at layer 0 for prefix methods and can be > 0 after it."""
    if tuned.pattern.shape[:3] != base.pattern.shape[:3]:
        raise ValueError(
            f"tuned and base records disagree on [batch, head, T]: {tuple(tuned.pattern.shape[:3])}"
            f" vs {tuple(base.pattern.shape[:3])}; record both runs on the same tokens"
        )
    rel_tuned, observable = relative_attention(tuned)
    rel_base, observable_base = relative_attention(base)
    return _drift(tuned.layer, "downstream", rel_tuned, rel_base, observable & observable_base)


# ---------------------------------------------------------------------------- bias subspace


@dataclass
class BiasSubspace:
    """Singular values, per head, of head outputs stacked over N = batch x T rows [N, d_model].

    singular_values [h, min(N, d)]: of the part the frozen head does not explain,
        U = z W_O - (1 - alpha) z_base W_O_frozen.
        For a prefix U = alpha * bias_out, which lies in span{V_p W_O}: rank <= P (for a
        prefix shared by the batch; per-example prefixes have P values per example).
        Without a prefix (alpha = 0) U is the whole change, as for full fine-tuning.
    change_singular_values [h, min(N, d)]: of the whole change D = z W_O - z_base W_O_frozen.
        For a prefix D = alpha (bias - z_base) W_O also rescales the base output, so its rank
        is NOT bounded by P (up to d_head): compare rank with change_rank.
    rank, change_rank [h]: singular values above tol.
    tol [h]: max(N, d) * eps(dtype) * the largest singular value of z W_O or z_base W_O_frozen
        (the numerical-rank rule of numpy.linalg.matrix_rank, scaled by the terms that U and D
        subtract, since their rounding error is relative to those).
    """

    layer: int
    P: int
    singular_values: Float[Tensor, "h k"]
    rank: Int[Tensor, " h"]
    change_singular_values: Float[Tensor, "h k"]
    change_rank: Int[Tensor, " h"]
    tol: Float[Tensor, " h"]

    @classmethod
    def from_spectra(
        cls,
        layer: int,
        P: int,
        sv: Float[Tensor, "h k"],
        change_sv: Float[Tensor, "h k"],
        scale: Float[Tensor, " h"],
        shape: tuple[int, int],
        dtype: torch.dtype,
    ) -> BiasSubspace:
        """Ranks from the two spectra under the tolerance rule above: ``shape`` is (N, d) and
        ``scale`` [h] the largest singular value of z W_O or z_base W_O_frozen."""
        tol = max(shape) * torch.finfo(dtype).eps * scale
        return cls(
            layer=layer,
            P=P,
            singular_values=sv,
            rank=(sv > tol[:, None]).sum(-1),
            change_singular_values=change_sv,
            change_rank=(change_sv > tol[:, None]).sum(-1),
            tol=tol,
        )

    def rows(self) -> list[dict]:
        return [
            {
                "layer": self.layer,
                "head": h,
                "P": self.P,
                "bias_rank": int(self.rank[h]),
                "change_rank": int(self.change_rank[h]),
                "bias_sv_max": self.singular_values[h, 0].item(),
                "change_sv_max": self.change_singular_values[h, 0].item(),
                "tol": self.tol[h].item(),
            }
            for h in range(self.rank.shape[0])
        ]


@torch.no_grad()
def bias_subspace(
    record: AttentionRecord, decomposition: Decomposition | None = None
) -> BiasSubspace:
    """Spectrum of what the tuned head adds beyond the rescaled frozen head, per head, over every
    input and position in the record (see :class:`BiasSubspace`). Pass ``decomposition`` to
    reuse one already computed for this record."""
    d = decomposition if decomposition is not None else decompose(record)
    out = einsum(record.z, record.W_O, "b q h e, h e d -> h b q d").flatten(1, 2)
    base_out = einsum(d.z_base, record.base_W_O, "b q h e, h e d -> h b q d").flatten(1, 2)
    keep = (1 - d.alpha).transpose(0, 1).flatten(1)[..., None]  # [b, h, T] -> [h, N, 1]
    sv = torch.linalg.svdvals(out - keep * base_out)
    change_sv = torch.linalg.svdvals(out - base_out)
    scale = torch.maximum(torch.linalg.matrix_norm(out, 2), torch.linalg.matrix_norm(base_out, 2))
    return BiasSubspace.from_spectra(
        record.layer, record.P, sv, change_sv, scale, out.shape[1:], out.dtype
    )


# ---------------------------------------------------------------------------- the whole check


def tolerances(record: AttentionRecord, factor: float = 16.0) -> tuple[float, float]:
    """(pattern_tol, z_tol): how far the identities may miss from rounding alone, for this
    record's dtype and magnitudes.

    A score s = q . k / sqrt(e) carries a rounding error of about eps * sqrt(e) * S, with
    S = max|q| * max|k| / sqrt(e) (vector norms over d_head, prefix keys included); a softmax
    weight w then moves by at most w times twice that, plus eps * sqrt(T + P) from normalising.
    So pattern_tol = factor * eps * (1 + sqrt(e) * S + sqrt(T + P)). A head output is a convex
    mix of values, so its error is at most the weights' total error times the largest value:
    z_tol = 2 * pattern_tol * max(1, max|v|). ``factor`` (default 16) covers the constants and
    the two independent computations being compared; float64 gives ~1e-13, float32 ~1e-4 on our
    models, where the observed errors are ~1e-15 and ~1e-7.
    """
    r = record
    keys = [r.k, r.k_frozen] + ([r.prefix_k] if r.P else [])
    values = [r.v, r.v_frozen] + ([r.prefix_v] if r.P else [])
    q_norm = max(t.norm(dim=-1).max().item() for t in (r.q, r.q_frozen))
    k_norm = max(t.norm(dim=-1).max().item() for t in keys)
    v_max = max(t.abs().max().item() for t in values)
    eps, e = torch.finfo(r.pattern.dtype).eps, r.d_head
    S = q_norm * k_norm / math.sqrt(e)
    pattern_tol = factor * eps * (1 + math.sqrt(e) * S + math.sqrt(r.T + r.P))
    return pattern_tol, 2 * pattern_tol * max(v_max, 1.0)


@dataclass
class TheoremCheck:
    """Everything :func:`check_theorem` measured, per layer, and which identities failed.

    expected[l]: whether layer l's identities must hold (a prefix, and a frozen head).
    gated[l]: an adaption prompt's gated-bias identity at layer l (``probe.classify.GatedBias``;
    None where the layer has no adapter); None for every other tuning.
    """

    decompositions: list[Decomposition]
    local: list[Drift]
    downstream: list[Drift] | None
    subspaces: list[BiasSubspace]
    pattern_tol: list[float]
    z_tol: list[float]
    expected: list[bool]
    gated: list | None = None

    def failures(self, layer: int | None = None, head: int | None = None) -> list[str]:
        """A line per (layer, head, identity) beyond tolerance where the identity is expected
        (only ``layer`` / ``head`` if given). NaN errors fail. The one pass rule: ``ok``, the
        CLI's per-head column and its exit status all come from here."""
        out = []
        for i, d in enumerate(self.decompositions):
            if not self.expected[i] or layer not in (None, d.layer):
                continue
            for h in range(d.pattern_error.shape[0]) if head is None else [head]:
                for identity, err, tol in (
                    ("pattern", d.pattern_error[h].item(), self.pattern_tol[i]),
                    ("alpha", d.alpha_error[h].item(), self.pattern_tol[i]),
                    ("z", d.z_error[h].item(), self.z_tol[i]),
                ):
                    if not err <= tol:  # also catches NaN
                        out.append(
                            f"layer {d.layer} head {h}: {identity} error {err:.3g} > {tol:.3g}"
                        )
        for g in self.gated or []:
            if g is not None and layer in (None, g.layer) and not g.ok:
                out.append(f"layer {g.layer}: gated-bias error {g.error:.3g} > {g.tol:.3g}")
        return out

    def classify(self):
        """The tuning's class (``probe.classify.classify``): bias only, gated bias, re-weights
        attention or attention kept, with the drift per layer."""
        from probe.classify import classify

        return classify(self)

    @property
    def ok(self) -> bool:
        return not self.failures()

    def rows(self) -> list[dict]:
        """One dict per (layer, head) with every probe's numbers."""
        rows = []
        for i, d in enumerate(self.decompositions):
            down = self.downstream[i].rows() if self.downstream is not None else None
            for h, row in enumerate(d.rows()):
                row.update(
                    pattern_tol=self.pattern_tol[i],
                    z_tol=self.z_tol[i],
                    identity_expected=self.expected[i],
                    local_max_abs=self.local[i].max_abs[h].item(),
                    local_tv_mean=self.local[i].tv_mean[h].item(),
                    local_tv_max=self.local[i].tv_max[h].item(),
                    bias_rank=int(self.subspaces[i].rank[h]),
                    change_rank=int(self.subspaces[i].change_rank[h]),
                )
                if down is not None:
                    row.update(
                        downstream_tv_mean=down[h]["tv_mean"], downstream_tv_max=down[h]["tv_max"]
                    )
                rows.append(row)
        return rows


@torch.no_grad()
def check_theorem(
    records: Sequence[AttentionRecord],
    base_records: Sequence[AttentionRecord] | None = None,
    expected: Sequence[bool] | None = None,
    tol_factor: float = 16.0,
) -> TheoremCheck:
    """Decompose every layer, measure local (and, given the base run, downstream) drift and the
    bias subspace, and compare the identity errors with :func:`tolerances`.

    expected: per layer, whether the identities must hold. Default: where the layer has a prefix.
    Pass :func:`identities_expected` for a tuning that may have changed ln1, W_Q, W_K or W_V
    (LoRA, a prefix + LoRA hybrid): the theorem says nothing there; errors are still reported.
    """
    if expected is None:
        expected = [r.P > 0 for r in records]
    decompositions = [decompose(r) for r in records]
    tols = [tolerances(r, tol_factor) for r in records]
    downstream = None
    if base_records is not None:
        downstream = [downstream_drift(t, b) for t, b in zip(records, base_records, strict=True)]
    return TheoremCheck(
        decompositions=decompositions,
        local=[local_drift(r) for r in records],
        downstream=downstream,
        subspaces=[bias_subspace(r, d) for r, d in zip(records, decompositions, strict=True)],
        pattern_tol=[t[0] for t in tols],
        z_tol=[t[1] for t in tols],
        expected=list(expected),
    )


def identities_expected(prefix_lengths: Sequence[int], frozen: Sequence[bool]) -> list[bool]:
    """Per layer, whether the theorem's identities must hold: the premise, a prefix (P > 0)
    meeting a frozen head (ln1, W_Q, W_K, W_V unchanged; :func:`frozen_head_layers`)."""
    return [P > 0 and f for P, f in zip(prefix_lengths, frozen, strict=True)]


def frozen_head_layers(base: Transformer, weights: Mapping[str, Tensor]) -> list[bool]:
    """Per layer, whether the tuned weights (full names -> tensors, e.g. ``Adapter.weights`` or
    a fine-tuned model's state dict) leave the head's input side exactly as in ``base``:
    ln1, W_Q, W_K, W_V and their biases. W_O and everything else may differ. (For HF models,
    which are compared module by module: ``probe.hf.hf_frozen_head_layers``.)"""
    params = dict(base.named_parameters())
    frozen = []
    for layer in range(base.cfg.n_layers):
        names = [f"blocks.{layer}.ln1.{p}" for p in ("w", "b")]
        names += [f"blocks.{layer}.attn.{p}" for p in ("W_Q", "W_K", "W_V", "b_Q", "b_K", "b_V")]
        names = [n for n in names if n in params and n in weights]
        frozen.append(all(torch.equal(weights[n], params[n]) for n in names))
    return frozen


def random_prefix(
    cache: Mapping[str, Tensor], n_layers: int, P: int, generator: torch.Generator | None = None
) -> list[KVPrefix]:
    """A random key/value prefix [P, h, e] per layer, Gaussian with the mean and std (per head
    and coordinate) of the cached content keys and values: a prefix in the model's own range,
    for checking the theorem on a model that has no trained one."""
    prefix = []
    for layer in range(n_layers):
        parts = []
        for kv in "kv":
            x = cache[f"blocks.{layer}.attn.hook_{kv}"].flatten(0, 1)  # [b * T, h, e]
            noise = torch.randn((P, *x.shape[1:]), generator=generator, dtype=x.dtype)
            parts.append(x.mean(0) + x.std(0, correction=0) * noise.to(x.device))
        prefix.append(KVPrefix(*parts))
    return prefix


def table(results: Iterable) -> list[dict]:
    """The rows of several results (anything with ``rows()``) in one list."""
    return [row for result in results for row in result.rows()]


def __getattr__(name: str):
    # check_tuned lives in probe.check, which runs models (ours or, through probe.hf, Hugging
    # Face ones); loading it on first use keeps this module free of both, and probe.hf free to
    # import this one.
    if name == "check_tuned":
        from probe.check import check_tuned

        return check_tuned
    raise AttributeError(f"module 'probe.probes' has no attribute {name!r}")
