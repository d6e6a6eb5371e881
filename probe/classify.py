"""Which kind of change a tuning makes to attention: the classes of the PEFT atlas, measured.

Every tuning method lands in one of four classes, decided from what a
:class:`~probe.probes.TheoremCheck` measured (never from the method's name):

``"re-weights attention"``
    the relative attention over the content moved at some layer beyond rounding (local drift >
    the layer's pattern tolerance): LoRA / DoRA on W_Q or W_K, IA3 with a key (or query) scale
    other than 1, full fine-tuning. The drift per layer is reported.
``"gated bias"``
    an adaption prompt (LLaMA-Adapter): the content attention is the frozen head's own, and the
    output gains ``gate * softmax(q K_a^T / sqrt(e)) V_a`` through the output projection; see
    :func:`gated_decompose` for the derivation and the identity checked.
``"bias only"``
    a key/value prefix (prefix tuning, prompt tuning, P-tuning: a soft prompt acts as a prefix at
    every layer) and no drift: the theorem of :mod:`probe.probes` (module docstring), whose
    identities ``pattern = [alpha beta | (1 - alpha) A]`` and
    ``z = (1 - alpha) A v + alpha beta V_p`` are checked per head.
``"attention kept"``
    no prefix and no drift: every pattern is the frozen head's; values or later weights may
    change (LoRA on W_V / W_O, IA3 scaling values and the MLP only, the base model itself).

Shapes: b batch, T content positions, P_a adapter tokens, H query heads, e d_head, d d_model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from einops import einsum
from jaxtyping import Float, Int
from torch import Tensor

if TYPE_CHECKING:
    from probe.probes import TheoremCheck

REWEIGHTS = "re-weights attention"
GATED = "gated bias"
BIAS_ONLY = "bias only"
KEPT = "attention kept"
CLASSES = (BIAS_ONLY, GATED, REWEIGHTS, KEPT)

# Where each class's identity is derived (named in the atlas and the CLI).
DERIVATIONS = {
    BIAS_ONLY: "probe.probes (module docstring): z = (1 - alpha) A v + alpha beta V_p",
    GATED: "probe.classify.gated_decompose: o = A v W_O + gate beta V_a W_A",
    REWEIGHTS: "probe.probes.local_drift: relative attention vs the frozen head",
    KEPT: "probe.probes.local_drift: every pattern is the frozen head's",
}


@dataclass
class GatedBias:
    """The gated-bias identity of one adapted layer (see :func:`gated_decompose`).

    gate: the layer's gate g (with a gate per head, ours, the one of largest magnitude);
    gates: [H] the gate of each head; P_a: adapter tokens.
    beta:     [b, H, T, P_a]  softmax over the adapter scores alone
    bias_out: [b, T, H, d]    g beta V_a W_A per head, in the residual stream
    error: max |added - sum_h bias_out_h - b_A| over inputs, positions and d; tol: its tolerance
    rank: [H] numerical rank of each head's bias_out stacked over the b x T rows (<= P_a)
    """

    layer: int
    gate: float
    P_a: int
    beta: Float[Tensor, "b H T Pa"]
    bias_out: Float[Tensor, "b T H d"]
    error: float
    tol: float
    rank: Int[Tensor, " H"]
    gates: Float[Tensor, " H"] | None = None

    @property
    def ok(self) -> bool:
        return self.error <= self.tol  # False for NaN


@torch.no_grad()
def gated_decompose(
    q: Float[Tensor, "b T H e"],
    k_a: Float[Tensor, "Pa H e"],
    v_a: Float[Tensor, "Pa H e"],
    gate: float | Float[Tensor, " H"],
    W_A: Float[Tensor, "H e d"],
    b_A: Float[Tensor, " d"] | None,
    added: Float[Tensor, "b T d"],
    layer: int = 0,
    tol_factor: float = 16.0,
    softmax_dtype: torch.dtype | None = None,
) -> GatedBias:
    """Check the adaption prompt's identity on one layer: ``added == g sum_h beta_h V_a,h W_A,h
    (+ b_A)``, where ``added`` is the adapted attention's output minus the wrapped one's.

    Derivation. An adaption prompt (LLaMA-Adapter; PEFT's ``AdaptedAttention``) keeps the
    layer's attention module as it is and runs a second, separate attention beside it: P_a
    learned prompt vectors go through the same frozen key/value projections, K_a = prompt W_K,
    V_a = prompt W_V (never rotated: PEFT projects the prompt without a position), and every
    content query attends to them through its OWN softmax,

        beta_ip = softmax_p(q_i . K_a,p / sqrt(e)),

    weighted by a learned scalar gate g (zero-initialised; ours, ``probe.adapters.AdaptionPrompt``,
    has one per head, g_h, and maps through W_O). The layer's output is

        o_i = sum_h (sum_{j<=i} A_ij v_j)_h W_O,h + b_O  +  g sum_h (sum_p beta_ip V_a,p)_h W_A,h

    with A the frozen head's content softmax (no adapter key joins it) and W_A the map PEFT
    applies to the adapter mix: the output projection on Llama/Mistral (``o_proj``; its bias,
    if any, is added a second time: ``b_A = b_O``), the identity on GPT-2 (PEFT adds the
    head-concatenated mix after ``c_proj``). Against the prefix's identity
    ``z_i = (1 - alpha_i) A v + alpha_i beta V_p``, where one softmax over [prefix; content]
    couples the two terms (alpha_i = the prefix's share of query i's attention), here:

    - the content keeps weight exactly 1: no (1 - alpha) down-scaling, so the absolute and the
      relative content attention are both the frozen head's (local drift 0);
    - the bias weight is the constant g, not a query-dependent share in [0, 1]: it can be
      negative or exceed 1; g = 0 gives the base model exactly;
    - the added output g beta_i V_a W_A lies in span{V_a,p W_A,h}: rank <= P_a per head.

    gate: one float for the layer (PEFT) or [H], one per head (ours).
    softmax_dtype: the dtype the adapter's softmax ran in (PEFT's: float32 whatever the model's
    dtype); its eps sets the tolerance, since the weights beta carry that rounding. The formula
    itself is evaluated in q's dtype (float64 for the tightest check).
    """
    e = q.shape[-1]
    s = einsum(q, k_a, "b t h e, p h e -> b h t p") / math.sqrt(e)
    beta = s.softmax(-1)
    mix = einsum(beta, v_a, "b h t p, p h e -> b t h e")
    gates = torch.as_tensor(gate, dtype=q.dtype, device=q.device).expand(q.shape[2])
    bias_out = gates[:, None] * einsum(mix, W_A, "b t h e, h e d -> b t h d")
    predicted = bias_out.sum(2) + (0 if b_A is None else b_A)
    error = (added - predicted).abs().max().item()
    # beta's rounding (as in probes.tolerances, at the softmax's precision) through the mix and
    # W_A, plus the rounding of the two outputs whose difference ``added`` is.
    eps = max(torch.finfo(q.dtype).eps, torch.finfo(softmax_dtype or q.dtype).eps)
    S = q.norm(dim=-1).max().item() * k_a.norm(dim=-1).max().item() / math.sqrt(e)
    w_tol = tol_factor * eps * (1 + math.sqrt(e) * S + math.sqrt(k_a.shape[0]))
    w_norm = W_A.abs().sum((0, 1)).max().item()  # the largest output coordinate's row sum
    g_max = gates.abs().max().item()
    tol = w_tol * g_max * max(1.0, v_a.abs().max().item()) * max(1.0, w_norm)
    tol += tol_factor * torch.finfo(q.dtype).eps * max(1.0, added.abs().max().item())
    rows = bias_out.permute(2, 0, 1, 3).flatten(1, 2)  # [H, b T, d]
    sv = torch.linalg.svdvals(rows)
    sv_tol = max(rows.shape[1:]) * torch.finfo(q.dtype).eps * sv[:, :1].clamp_min(1e-300)
    return GatedBias(
        layer=layer,
        gate=gates[gates.abs().argmax()].item() if isinstance(gate, Tensor) else float(gate),
        P_a=k_a.shape[0],
        beta=beta,
        bias_out=bias_out,
        error=error,
        tol=tol,
        rank=(sv > sv_tol).sum(-1),
        gates=gates.clone(),
    )


@dataclass(frozen=True)
class Classification:
    """A tuning's class (one of :data:`CLASSES`) and what decided it.

    drift: per layer, the max local drift (|tuned - frozen| relative attention, max over heads);
    drift_tol: per layer, the pattern tolerance it is compared with; bias_rank: the largest
    rank of the added part over layers and heads (prefix: <= P; gated: <= P_a; otherwise the
    rank of the whole change); identity_ok: the class's own identity held where it applies.
    """

    name: str
    drift: tuple[float, ...]
    drift_tol: tuple[float, ...]
    bias_rank: int
    identity_ok: bool

    @property
    def max_drift(self) -> float:
        return max(self.drift, default=0.0)

    @property
    def derivation(self) -> str:
        return DERIVATIONS[self.name]

    @property
    def reweighted_layers(self) -> list[int]:
        return [
            i for i, (d, t) in enumerate(zip(self.drift, self.drift_tol, strict=True)) if not d <= t
        ]

    def line(self) -> str:
        """One line for the CLI: the class, the drift per layer where it re-weights, the rank."""
        text = f"class: {self.name} (bias rank {self.bias_rank}; {self.derivation})"
        if self.name == REWEIGHTS:
            per = ", ".join(f"{d:.2e}" for d in self.drift)
            text += f"\nlocal drift per layer: {per} (re-weighted layers {self.reweighted_layers})"
        return text


def classify(check: TheoremCheck) -> Classification:
    """The class of the tuning that ``check`` measured (see the module docstring)."""
    drift = tuple(d.max_abs.max().item() for d in check.local)
    tols = tuple(check.pattern_tol)
    gated = [g for g in (check.gated or []) if g is not None]
    if any(not d <= t for d, t in zip(drift, tols, strict=True)):
        name = REWEIGHTS
    elif gated:
        name = GATED
    elif any(d.P for d in check.decompositions):
        name = BIAS_ONLY
    else:
        name = KEPT
    if name == GATED:
        rank = max(int(g.rank.max()) for g in gated)
    else:
        rank = max((int(s.rank.max()) for s in check.subspaces), default=0)
    return Classification(name, drift, tols, rank, not check.failures())


__all__ = [
    "BIAS_ONLY",
    "CLASSES",
    "Classification",
    "DERIVATIONS",
    "GATED",
    "GatedBias",
    "KEPT",
    "REWEIGHTS",
    "classify",
    "gated_decompose",
]
