"""How a long prefix spreads its attention over its positions, and the biases it really adds.

By the theorem (``probe.probes``), a head with a P-position prefix outputs

    z_i = (1 - alpha_i) sum_j A_ij v_j + alpha_i b_i,    b_i = sum_p beta_ip V_p,

where beta_i = softmax over the prefix scores is the pattern's prefix block renormalised to sum
to 1. The bias b_i can lie anywhere in the span of the P value vectors V_p, and it can differ
from input to input only as far as beta_i does. Appendix B of Petrov, Torr & Bibi (ICLR 2024)
measures how far that is: at the last position, over many inputs, the gap between the 1st and
the 99th percentile of each beta_ip. A small gap means beta barely moves, so b_i is almost one
fixed vector, and a long prefix uses little of the span its P values could reach.

Two measurements, from the per-layer records every model path produces
(:class:`~probe.probes.AttentionRecord`: our ``Transformer`` via ``records_from_cache`` /
``check_tuned``, an HF model with a PEFT prefix via ``probe.hf.hf_records``), or from bare
patterns:

    prefix_attention_spread(records)   per (layer, head, prefix position) the percentile gap of
                                       beta over inputs; per-layer means; the head = layer slice
                                       the paper's notebook measured
    bias_effective_rank(records)       per (layer, head) the rank of span{V_p} against the
                                       effective rank of the biases b produced across inputs:
                                       participation ratio and the rank holding 99% of the energy

Both compute in float64. Shapes: L layers, b inputs, h heads, T content positions, Q query
positions measured, P prefix positions, e d_head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from probe.probes import AttentionRecord

LOW, HIGH = 0.01, 0.99  # the paper's percentiles: 1st and 99th


def prefix_attention(
    pattern: Float[Tensor, "... PT"], P: int
) -> tuple[Float[Tensor, "... P"], Bool[Tensor, "..."]]:
    """The pattern's P prefix columns renormalised to sum to 1 per query (beta), in float64,
    and a mask of the rows where that is observable (prefix mass a normal float; a row whose
    prefix attention underflowed to 0 has no defined beta and comes back as zeros)."""
    if P < 1:
        raise ValueError(f"P={P}: the pattern has no prefix columns to renormalise; pass P >= 1")
    if pattern.shape[-1] < P:
        raise ValueError(f"the pattern has {pattern.shape[-1]} key columns, fewer than P={P}")
    prefix = pattern[..., :P].double()
    mass = prefix.sum(-1)
    tiny = torch.finfo(torch.float64).tiny
    observable = mass > tiny
    return prefix / mass.clamp_min(tiny)[..., None], observable


def _queries(queries: int | Sequence[int], T: int) -> list[int]:
    """Query positions as non-negative indices (negative ones count from the end)."""
    qs = [queries] if isinstance(queries, int) else list(queries)
    if not qs:
        raise ValueError("no query positions given; pass e.g. queries=-1 (the last position)")
    bad = [q for q in qs if not -T <= q < T]
    if bad:
        raise ValueError(f"query positions {bad} are outside the {T} content positions")
    return [q % T for q in qs]


def _patterns(
    source: Sequence[AttentionRecord] | Sequence[Tensor], P: int | None
) -> tuple[list[Tensor], int]:
    """Per-layer patterns [b, h, T, P + T] and the one prefix length they share."""
    if len(source) == 0:
        raise ValueError("no layers given; pass one record (or pattern) per layer")
    if all(isinstance(s, AttentionRecord) for s in source):
        lengths = {r.P for r in source}
        if len(lengths) != 1:
            raise ValueError(f"the layers have prefixes of different lengths {sorted(lengths)}")
        found = lengths.pop()
        if P is not None and P != found:
            raise ValueError(f"P={P} given, but the records' prefixes have {found} positions")
        return [r.pattern for r in source], found
    if P is None:
        raise ValueError("bare patterns do not say how many columns are prefix: pass P")
    shapes = {tuple(t.shape) for t in source}
    if len(shapes) != 1 or len(next(iter(shapes))) != 4:
        raise ValueError(f"patterns must all be [batch, head, T, P + T]; got shapes {shapes}")
    return list(source), P


def _check_bounds(low: float, high: float) -> None:
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"percentiles low={low}, high={high}: need 0 <= low < high <= 1")


# ---------------------------------------------------------------------------- attention spread


@dataclass
class PrefixSpread:
    """Percentile gaps of the renormalised prefix attention over inputs.

    gap:    [L, h, P]  quantile(high) - quantile(low) of beta_p over the inputs, per query
                       position, then averaged over the Q query positions measured
    mean:   [L, h, P]  beta_p averaged over inputs and query positions
    n_inputs: [L, h]   inputs observed (the prefix kept a representable attention mass)
    queries: the query positions measured; low, high: the percentiles (fractions)
    """

    gap: Float[Tensor, "L h P"]
    mean: Float[Tensor, "L h P"]
    n_inputs: Int[Tensor, "L h"]
    queries: tuple[int, ...]
    low: float
    high: float

    @property
    def per_layer(self) -> Float[Tensor, " L"]:
        """[L] the gap averaged over heads and prefix positions."""
        return self.gap.mean((1, 2))

    @property
    def head_equals_layer(self) -> Float[Tensor, " L"]:
        """[L] the gap of head (l mod h) in layer l, averaged over prefix positions: what the
        paper's notebook measured, indexing the head axis with the layer counter."""
        h = self.gap.shape[1]
        return torch.stack([self.gap[layer, layer % h].mean() for layer in range(len(self.gap))])

    def rows(self) -> list[dict]:
        """One dict per (layer, head): mean and max gap over prefix positions, inputs seen."""
        return [
            {
                "layer": layer,
                "head": head,
                "P": self.gap.shape[2],
                "gap_mean": self.gap[layer, head].mean().item(),
                "gap_max": self.gap[layer, head].max().item(),
                "n_inputs": int(self.n_inputs[layer, head]),
            }
            for layer in range(self.gap.shape[0])
            for head in range(self.gap.shape[1])
        ]


@torch.no_grad()
def prefix_attention_spread(
    source: Sequence[AttentionRecord] | Sequence[Tensor],
    P: int | None = None,
    queries: int | Sequence[int] = -1,
    low: float = LOW,
    high: float = HIGH,
) -> PrefixSpread:
    """The paper's Appendix B measurement, at every head.

    source: one :class:`AttentionRecord` per layer (their prefix gives P), or one pattern per
        layer [b, h, T, P + T], prefix columns first (then pass P).
    queries: the content query positions measured (default -1, the last); the gap is taken per
        position over the b inputs, then averaged over positions.
    low, high: the percentiles as fractions (default the paper's 0.01 and 0.99), with linear
        interpolation between order statistics (numpy's default).

    Inputs whose prefix attention underflowed to 0 at a (layer, head, query) are left out of
    that quantile; fewer than 2 observed inputs anywhere raise ValueError.
    """
    _check_bounds(low, high)
    patterns, P = _patterns(source, P)
    gaps, means, counts = [], [], []
    for pattern in patterns:
        qs = _queries(queries, pattern.shape[2])
        beta, observable = prefix_attention(pattern[:, :, qs], P)  # [b, h, Q, P], [b, h, Q]
        seen = observable.sum(0)  # [h, Q]
        if int(seen.min()) < 2:
            raise ValueError(
                "fewer than 2 inputs with a representable prefix attention at some head; "
                "pass more inputs or record in float64"
            )
        masked = beta.masked_fill(~observable[..., None], float("nan"))
        levels = torch.tensor([low, high], dtype=torch.float64, device=beta.device)
        q = torch.nanquantile(masked, levels, dim=0)  # [2, h, Q, P]
        gaps.append((q[1] - q[0]).mean(1))
        means.append(masked.nanmean(0).mean(1))
        counts.append(seen.min(1).values)
    return PrefixSpread(
        gap=torch.stack(gaps),
        mean=torch.stack(means),
        n_inputs=torch.stack(counts),
        queries=tuple(qs),
        low=low,
        high=high,
    )


# ---------------------------------------------------------------------------- bias rank


def participation_ratio(singular_values: Float[Tensor, "... k"]) -> Float[Tensor, "..."]:
    """(sum s^2)^2 / sum s^4 over the last axis: the number of equally strong directions that
    would hold the same energy; 1 for one direction, k for k equal ones, 0 for a zero matrix."""
    energy = singular_values.double() ** 2
    total = energy.sum(-1)
    return torch.where(total > 0, total**2 / (energy**2).sum(-1).clamp_min(1e-300), 0.0)


def energy_rank(singular_values: Float[Tensor, "... k"], share: float = 0.99) -> Int[Tensor, "..."]:
    """The fewest leading directions holding ``share`` of the energy sum s^2 (singular values in
    descending order, as ``torch.linalg.svdvals`` returns them); 0 for a zero matrix."""
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share={share}: pass an energy share in (0, 1]")
    energy = singular_values.double() ** 2
    total = energy.sum(-1, keepdim=True)
    # A share reached to rounding counts as reached: cumsum's last entry may miss total by ulps.
    short = energy.cumsum(-1) < share * total * (1 - 8 * torch.finfo(torch.float64).eps)
    return torch.where(total[..., 0] > 0, short.sum(-1) + 1, 0)


def numerical_rank(
    singular_values: Float[Tensor, "... k"], rows: int, cols: int
) -> Int[Tensor, "..."]:
    """Singular values above max(rows, cols) * eps(float64) * the largest: numpy's
    ``matrix_rank`` rule."""
    s = singular_values.double()
    tol = max(rows, cols) * torch.finfo(torch.float64).eps * s[..., :1]
    return (s > tol).sum(-1)


@dataclass
class BiasRank:
    """The span a prefix's values could reach against the biases it produces, per layer and head.

    span_rank:   [L, h]  numerical rank of the P value vectors V_p [P, e]
    bias_rank:   [L, h]  numerical rank of the biases b = beta V stacked over N = inputs x query
                         positions [N, e] (at most span_rank)
    participation: [L, h]  participation ratio of the biases' singular values (effective rank)
    energy_rank: [L, h]  directions holding ``share`` of the biases' energy
    fixed_share: [L, h]  share of the biases' energy in their mean, N |mean b|^2 / sum |b|^2:
                         1 when the prefix adds one fixed vector whatever the input
    singular_values: [L, h, min(N, e)]  of the biases, descending
    """

    span_rank: Int[Tensor, "L h"]
    bias_rank: Int[Tensor, "L h"]
    participation: Float[Tensor, "L h"]
    energy_rank: Int[Tensor, "L h"]
    fixed_share: Float[Tensor, "L h"]
    singular_values: Float[Tensor, "L h k"]
    share: float

    def rows(self) -> list[dict]:
        return [
            {
                "layer": layer,
                "head": head,
                "span_rank": int(self.span_rank[layer, head]),
                "bias_rank": int(self.bias_rank[layer, head]),
                "participation": self.participation[layer, head].item(),
                "energy_rank": int(self.energy_rank[layer, head]),
                "fixed_share": self.fixed_share[layer, head].item(),
            }
            for layer in range(self.span_rank.shape[0])
            for head in range(self.span_rank.shape[1])
        ]


def shared_values(record: AttentionRecord) -> Float[Tensor, "P h e"]:
    """The record's prefix values [P, h, e] in float64, checked to be one prefix for the whole
    batch (a per-input prefix has a span per input, which this comparison does not cover)."""
    if record.prefix_v is None:
        raise ValueError(f"layer {record.layer} has no prefix; record the run with one")
    values = record.prefix_v.double()
    if not torch.equal(values, values[:1].expand_as(values)):
        raise ValueError(
            f"layer {record.layer}: the prefix values differ between inputs; pass records of "
            "one prefix shared by the batch"
        )
    return values[0]


@torch.no_grad()
def bias_effective_rank(
    records: Sequence[AttentionRecord], queries: int | Sequence[int] = -1, share: float = 0.99
) -> BiasRank:
    """Rank of span{V_p} against the effective rank of the biases b = sum_p beta_p V_p that the
    prefix produces at ``queries`` over the records' inputs, per layer and head, in float64.

    beta is the recorded pattern's prefix block renormalised (:func:`prefix_attention`), so
    b is exactly the prefix term of the head output (the theorem's alpha-free part). Rows whose
    prefix attention underflowed are left out. The biases are not centred: a prefix that adds
    the same vector for every input has effective rank 1 (and ``fixed_share`` 1).
    """
    if not records:
        raise ValueError("no records given; pass one AttentionRecord per layer")
    fields = {name: [] for name in ("span", "rank", "pr", "energy", "fixed", "sv")}
    for record in records:
        values = shared_values(record)  # [P, h, e]
        qs = _queries(queries, record.T)
        beta, observable = prefix_attention(record.pattern[:, :, qs], record.P)
        bias = torch.einsum("bhqp,phe->hbqe", beta, values)  # [h, b, Q, e]
        keep = observable.permute(1, 0, 2)  # [h, b, Q]
        for head in range(values.shape[1]):
            rows = bias[head][keep[head]]  # [N, e]
            if rows.shape[0] == 0:
                raise ValueError(f"layer {record.layer} head {head}: no input kept any prefix mass")
            sv = torch.linalg.svdvals(rows)
            span_sv = torch.linalg.svdvals(values[:, head])
            energy = (rows**2).sum()
            fields["span"].append(numerical_rank(span_sv, *values[:, head].shape))
            fields["rank"].append(numerical_rank(sv, *rows.shape))
            fields["pr"].append(participation_ratio(sv))
            fields["energy"].append(energy_rank(sv, share))
            mean_energy = rows.shape[0] * (rows.mean(0) ** 2).sum()
            fields["fixed"].append(mean_energy / energy if energy > 0 else energy.new_tensor(1.0))
            fields["sv"].append(sv)
    L, h = len(records), records[0].n_heads
    sv = torch.nn.utils.rnn.pad_sequence(fields["sv"], batch_first=True)
    return BiasRank(
        span_rank=torch.stack(fields["span"]).view(L, h),
        bias_rank=torch.stack(fields["rank"]).view(L, h),
        participation=torch.stack(fields["pr"]).view(L, h),
        energy_rank=torch.stack(fields["energy"]).view(L, h),
        fixed_share=torch.stack(fields["fixed"]).view(L, h),
        singular_values=sv.view(L, h, -1),
        share=share,
    )
