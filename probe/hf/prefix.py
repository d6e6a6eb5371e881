"""Every accepted prefix form -> per-layer :class:`~probe.config.KVPrefix` [batch, P, G, e].

PEFT prefix/prompt-tuning models, transformers ``Cache`` s ([batch, G, P, e]), raw per-layer
``(keys, values)`` in our layout and soft prompts [P, d_model] (run through the model at
positions 0..P-1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from probe.config import KVPrefix, eval_mode
from probe.hf.arch import _is_peft, _peft_type, _shape
from probe.hf.loading import (
    PREFIX_PEFT_TYPES,
    PROMPT_PEFT_TYPES,
    _check_prefix_config,
    require_hf,
)


def _cache_to_kv(cache: Any) -> list[KVPrefix]:
    """A transformers Cache (or legacy tuple) [batch, G, P, e] -> our layout [batch, P, G, e]."""
    if hasattr(cache, "layers"):
        pairs = [(layer.keys, layer.values) for layer in cache.layers]
    else:
        pairs = [(kv[0], kv[1]) for kv in cache]
    return [KVPrefix(k.transpose(1, 2).clone(), v.transpose(1, 2).clone()) for k, v in pairs]


def _fresh_cache(prefix: Sequence[KVPrefix], rows: slice | None = None):
    """A new DynamicCache holding ``prefix`` (a forward extends its cache in place)."""
    from transformers import DynamicCache

    rows = rows or slice(None)
    return DynamicCache(
        [
            (p.keys[rows].transpose(1, 2).contiguous(), p.values[rows].transpose(1, 2).contiguous())
            for p in prefix
        ]
    )


@torch.no_grad()
def positioned_prompt_to_prefix(
    model: nn.Module, prompt: Float[Tensor, "... P d_model"], batch: int = 1
) -> list[KVPrefix]:
    """Convert a soft prompt into the exactly equivalent per-layer key/value prefix of an HF
    model, the prompt taking positions 0..P-1 (unlike ``probe.adapters.prompt_to_prefix``, whose
    prompt takes no positional slot in our model).

    The virtual tokens are run alone through ``model`` at positions 0..P-1 (where PEFT prompt
    tuning puts them; GPT-2 adds the position embedding, rotary models rotate their keys there).
    Under causal masking they never attend to the content, so their keys and values at every
    layer are a fixed prefix.

    prompt: [P, d_model] or [batch, P, d_model] input embeddings.
    Returns one KVPrefix per layer, keys/values [batch, P, G, e].
    """
    libs = require_hf(peft=False)
    d = _shape(model).d_model
    if prompt.ndim == 2:
        prompt = prompt.unsqueeze(0)
    if prompt.ndim != 3 or prompt.shape[-1] != d:
        raise ValueError(
            f"prompt has shape {tuple(prompt.shape)}; expected [P, d_model={d}] or "
            "[batch, P, d_model]"
        )
    prompt = prompt.expand(batch, *prompt.shape[1:]) if prompt.shape[0] == 1 else prompt
    P = prompt.shape[1]
    param = next(model.parameters())
    with eval_mode(model):
        out = model(
            inputs_embeds=prompt.to(param),
            position_ids=torch.arange(P, device=param.device).expand(prompt.shape[0], P),
            past_key_values=libs.transformers.DynamicCache(),
            use_cache=True,
            logits_to_keep=1,
        )
    return _cache_to_kv(out.past_key_values)


@torch.no_grad()
def hf_prefix(model: nn.Module, prefix: Any, batch: int) -> list[KVPrefix]:
    """Normalise any accepted prefix form (see the module docstring) to per-layer KV prefixes.

    ``model`` is the (plain HF) model the prefix is used with: soft prompts run through it.
    Returns ``n_layers`` KVPrefix with keys/values [batch, P, G, e] in the model's dtype
    (G key/value heads: grouped-query attention keeps G < H of them).
    """
    s = _shape(model)
    G, dh = s.n_kv_heads, s.d_head
    param = next(model.parameters())
    if _is_peft(prefix):
        kind = _peft_type(prefix)
        if kind not in PREFIX_PEFT_TYPES + PROMPT_PEFT_TYPES:
            raise ValueError(f"PEFT {kind} adapters are not prefixes; pass them as tuned_model=")
        _check_prefix_config(prefix, model, "prefix")
        with eval_mode(prefix):  # no dropout in the prompt encoder
            prompt = prefix.get_prompt(batch)
        if kind in PREFIX_PEFT_TYPES:
            kv = _cache_to_kv(prompt)
        else:
            kv = positioned_prompt_to_prefix(model, prompt, batch)
    elif isinstance(prefix, Tensor):
        kv = positioned_prompt_to_prefix(model, prefix, batch)
    elif hasattr(prefix, "layers") and not isinstance(prefix, Sequence):
        kv = _cache_to_kv(prefix)
    elif isinstance(prefix, Sequence) and not isinstance(prefix, str):
        kv = [p if isinstance(p, KVPrefix) else KVPrefix(*p) for p in prefix]
    else:
        raise TypeError(
            f"prefix of type {type(prefix).__name__} not understood; pass a PEFT prefix/prompt "
            "model, an adapter directory, per-layer (keys, values), a Cache or a soft prompt"
        )
    if len(kv) != s.n_layers:
        raise ValueError(f"prefix has {len(kv)} layers; the model has {s.n_layers}")
    out = []
    for layer, p in enumerate(kv):
        for part in p:
            if part.ndim not in (3, 4) or tuple(part.shape[-2:]) != (G, dh):
                raise ValueError(
                    f"prefix[{layer}] has shape {tuple(part.shape)}; raw prefixes use our layout "
                    f"[P, kv_head={G}, d_head={dh}] or [batch, P, kv_head, d_head] (a "
                    "transformers Cache is taken in HF's layout [batch, kv_head, P, d_head])"
                )
        if p.keys.shape != p.values.shape:
            raise ValueError(
                f"prefix[{layer}]: keys {tuple(p.keys.shape)} and values "
                f"{tuple(p.values.shape)} must have the same shape"
            )
        k, v = (t.unsqueeze(0) if t.ndim == 3 else t for t in p)
        if k.shape[0] not in (1, batch):
            raise ValueError(
                f"prefix[{layer}] has batch {k.shape[0]} but the tokens have batch {batch}"
            )
        shape = (batch, *k.shape[1:])
        out.append(KVPrefix(k.expand(shape).to(param), v.expand(shape).to(param)))
    if len({p.length for p in out}) > 1:
        raise ValueError("every layer's prefix must have the same length P")
    return out
