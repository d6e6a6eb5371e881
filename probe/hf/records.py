"""The public records API: per-layer attention records and TransformerLens-named caches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn

from probe.hf.arch import _architecture, _hf_model
from probe.hf.loading import load_dirs
from probe.hf.recording import _recording
from probe.hf.run import _check_pair, _forward, _frozen_layers, _make_record, _prepared, _run
from probe.hf.verify import _verify
from probe.probes import AttentionRecord


@torch.no_grad()
def hf_records(
    base_model: nn.Module,
    tokens: Int[Tensor, "batch pos"],
    prefix: Any = None,
    tuned_model: nn.Module | None = None,
    *,
    position_offset: int | None = None,
    verify: bool = True,
) -> list[AttentionRecord]:
    """Per-layer attention records of an HF causal LM run on ``tokens`` with a prefix.

    base_model: the plain, frozen HF model; its attention weights give ``q/k/v_frozen`` and
        ``W_O_frozen``. A PEFT prefix/prompt-tuning model is also accepted here alone.
    tokens: [batch, T] token ids, no padding.
    prefix: None, a PEFT prefix/prompt-tuning model, a saved adapter directory, a raw prefix
        (see the module docstring).
    tuned_model: the model whose weights run the content when they differ from the base: a
        LoRA (or other weight adapter) PeftModel, run as it is, or a fine-tuned HF model.
    position_offset: first content position id for raw prefixes and plain runs. Default: P with a
        prefix (HF/PEFT convention), 0 without. Pass P for a base run to compare with a prefix run.
    verify: check the recording run against the model's own forward (:func:`verify_hf`).

    Returns one :class:`~probe.probes.AttentionRecord` per layer: q, k, v, z [batch, T, H, e]
    of the tuned run (content only; q, k rotated on rotary models; k, v one per query head);
    prefix_k, prefix_v [batch, P, H, e] (None without a prefix); pattern [batch, H, T, P + T],
    prefix columns first; q/k/v_frozen [batch, T, H, e] from the *base* weights applied to the
    tuned run's attention input, rotated at the content positions; W_O, W_O_frozen [H, e, d].
    """
    s, offset = _prepared(base_model, prefix, tuned_model, tokens, position_offset)
    if verify:
        _verify(s, tokens, offset)
    records: list[AttentionRecord] = []
    _run(s, tokens, offset, slice(None), records.append)
    return records


def hf_cache(
    base_model: nn.Module,
    tokens: Int[Tensor, "batch pos"],
    prefix: Any = None,
    tuned_model: nn.Module | None = None,
    *,
    position_offset: int | None = None,
) -> dict[str, Tensor]:
    """The tuned run's recorded tensors under TransformerLens hook names (see the module
    docstring); shapes as in :func:`hf_records`, ``ln1.hook_out`` [batch, T, d_model]."""
    s, offset = _prepared(base_model, prefix, tuned_model, tokens, position_offset)
    rotary = _architecture(s.base).rotary
    cache: dict[str, Tensor] = {}
    T = tokens.shape[1]

    def on_layer(layer, r):
        a = f"blocks.{layer}."
        rec = _make_record(s, layer, r, T)
        cache[a + "ln1.hook_out"] = r["x"][:, r["q"].shape[2] - T :]
        cache[a + ("attn.hook_rot_q" if rotary else "attn.hook_q")] = rec.q
        cache[a + ("attn.hook_rot_k" if rotary else "attn.hook_k")] = rec.k
        for n in ("v", "pattern", "z", "prefix_k", "prefix_v"):
            if getattr(rec, n) is not None:
                cache[a + "attn.hook_" + n] = getattr(rec, n)

    with _recording(s.runner, on_layer), torch.no_grad():
        _forward(s, tokens, offset, slice(None), 1)
    return cache


def hf_frozen_head_layers(base: nn.Module, tuned: nn.Module) -> list[bool]:
    """Per layer, whether ``tuned`` (an HF model or a LoRA PeftModel) applies exactly ``base``'s
    head input side (norm, W_Q, W_K, W_V and biases); only there must the identities hold.
    The HF counterpart of ``probe.probes.frozen_head_layers``, which compares our model's
    weights by name instead of two models' modules."""
    _check_pair(base, _hf_model(tuned))
    return _frozen_layers(base, _hf_model(tuned))


def hf_records_from_dirs(
    model_dir: str | Path,
    adapter_dir: str | Path | None,
    tokens: Int[Tensor, "batch pos"],
    *,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    position_offset: int | None = None,
) -> list[AttentionRecord]:
    """:func:`hf_records` for a saved HF model directory and a saved PEFT adapter directory
    (see :func:`load_dirs`); ``adapter_dir=None`` records the base model alone."""
    base, kwargs = load_dirs(model_dir, adapter_dir, dtype, device)
    return hf_records(base, tokens, position_offset=position_offset, **kwargs)
