"""The front door: the theorem's check of a tuned model, whatever the tuning and the model.

:func:`check_tuned` runs both models, ours (:class:`~probe.model.Transformer`, with an adapter of
:mod:`probe.adapters`, a fine-tuned copy or a raw prefix) or a Hugging Face one (through
:mod:`probe.hf`), and hands their attention records to the probes of :mod:`probe.probes`, which
are pure maths on records (looked up there at each call, so a patched probe takes effect). Our
model and adapters load on first use, so that checking an HF model never imports transformer-lens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from einops import einsum
from jaxtyping import Int
from torch import Tensor, nn
from torch.nn import functional as F

from probe import hf, probes
from probe.config import KVPrefix
from probe.probes import TheoremCheck

if TYPE_CHECKING:
    from probe.adapters import Adapter
    from probe.model import Transformer


@torch.no_grad()
def check_tuned(
    base: nn.Module,
    tuned: Adapter | Transformer | Sequence[KVPrefix] | Any,
    tokens: Int[Tensor, "batch pos"],
    tol_factor: float = 16.0,
) -> TheoremCheck:
    """The theorem's check of a tuned model on ``tokens``: every probe at every layer, the
    identities demanded where a prefix meets a frozen head (``probes.identities_expected``).

    base: the frozen base :class:`~probe.model.Transformer`, in the dtype to check in (float64
        for the tightest tolerances).
    tuned: an adapter of ``probe.adapters`` trained on ``base``; a fine-tuned copy of ``base``
        (a Transformer of the same shape); or a raw prefix, one :class:`KVPrefix` per layer.
        Adapters and copies run in ``base``'s dtype (cast in place).
    tokens: [batch, T] content token ids.

    A Hugging Face ``base`` goes to :func:`probe.hf.check_hf` (the same checks in chunks, at
    the model's memory), ``tuned`` then being a PEFT model, a fine-tuned HF model, a PEFT adapter
    directory or a raw prefix.
    """
    from probe.model import Transformer

    if not isinstance(base, Transformer):
        how = "tuned_model" if isinstance(tuned, nn.Module) else "prefix"
        return hf.check_hf(base, tokens, **{how: tuned}, tol_factor=tol_factor)
    records, base_records, expected, gated = _tuned_run(base, tuned, tokens, tol_factor)
    result = probes.check_theorem(records, base_records, expected, tol_factor)
    result.gated = gated
    return result


@torch.no_grad()
def tuned_records(
    base: Transformer, tuned: Adapter | Transformer | Sequence[KVPrefix], tokens: Tensor
) -> tuple[list[probes.AttentionRecord], list[probes.AttentionRecord], list[bool]]:
    """What :func:`check_tuned` checks on our Transformer: (the tuned run's records, the base
    run's records, per layer whether the identities are expected), so that
    ``probes.check_theorem(*tuned_records(base, tuned, tokens))`` is the check (less an
    adaption prompt's gated-bias identity); for a view of the patterns behind it
    (``probe.view``). Arguments as for :func:`check_tuned`."""
    return _tuned_run(base, tuned, tokens)[:3]


def _tuned_run(base, tuned, tokens, tol_factor: float = 16.0):
    """:func:`tuned_records`' three, and per layer the gated-bias identity of an adapter with
    an adaption prompt (``probe.classify.GatedBias``, None for a layer without one; None for
    every other tuning)."""
    from probe.adapters import Adapter, Tuned
    from probe.model import Transformer, eval_mode

    if not isinstance(base, Transformer):
        raise ValueError("tuned_records takes our Transformer; for an HF model use hf.hf_records")
    dtype = base.W_E.dtype
    weights, prompt_len, gated = {}, 0, None  # changed weights; soft prompt length; GatedPrompts
    with eval_mode(base, *([tuned] if isinstance(tuned, nn.Module) else [])):
        _, base_cache = base.run_with_cache(tokens)
        if isinstance(tuned, Adapter):
            adapter = tuned.to(dtype)
            _, cache = Tuned(base).add("adapter", adapter).run_with_cache(tokens)
            weights, prompt = adapter.weights(base), adapter.prompt(base)
            prompt_len = 0 if prompt is None else prompt.shape[-2]
            gated = adapter.gated(base)
        elif isinstance(tuned, Transformer):
            if tuned.cfg != base.cfg:
                raise ValueError("the fine-tuned model has another shape than the base model")
            _, cache = tuned.to(dtype).run_with_cache(tokens)
            weights = dict(tuned.named_parameters())
        else:
            _, cache = base.run_with_cache(tokens, prefix=tuned)
    W_O = [weights.get(f"blocks.{i}.attn.W_O", b.attn.W_O) for i, b in enumerate(base.blocks)]
    records = probes.records_from_cache(base, cache, W_O, prompt_len)
    expected = probes.identities_expected(
        [r.P for r in records], probes.frozen_head_layers(base, weights)
    )
    gated_checks = None
    if gated is not None:
        b_O = [weights.get(f"blocks.{i}.attn.b_O", b.attn.b_O) for i, b in enumerate(base.blocks)]
        gated_checks = [
            None if g is None else _gated_check(cache, layer, g, W_O[layer], b_O[layer], tol_factor)
            for layer, g in enumerate(gated)
        ]
    return records, probes.records_from_cache(base, base_cache), expected, gated_checks


def _gated_check(cache, layer: int, gated, W_O: Tensor, b_O: Tensor, tol_factor: float):
    """The gated-bias identity at ``layer``: what the adapted attention output holds beyond
    the head's own content attention, ``hook_attn_out - (A v W_O + b_O)`` with A the recorded
    content pattern, against ``sum_h g_h beta_h V_a,h W_O,h`` (``AdaptionPrompt``'s docstring).
    W_O [H, e, d], b_O [d]: the tuned model's. For an adaption prompt alone: with a prefix or a
    soft prompt in the same run their columns would join A (no adapter here combines them).
    """
    from probe.classify import gated_decompose

    name = f"blocks.{layer}.attn."
    own = einsum(
        cache[name + "hook_pattern"], cache[name + "hook_v"], "b h q k, b k h e -> b q h e"
    )
    # The bias inside the matmul, as the model adds it: a separate add rounds differently on
    # some CPUs, and g = 0 must give exactly nothing added.
    content_out = F.linear(own.flatten(-2), W_O.flatten(0, 1).T, b_O)
    added = cache[f"blocks.{layer}.hook_attn_out"] - content_out
    return gated_decompose(
        cache[name + "hook_q"],
        gated.keys,
        gated.values,
        gated.gate.detach(),
        W_O.detach(),
        None,
        added,
        layer=layer,
        tol_factor=tol_factor,
    )


__all__ = ["check_tuned", "tuned_records"]
