"""An adaption prompt's gated bias, measured from PEFT's own modules (LLaMA-Adapter).

PEFT's ``AdaptionPromptModel`` replaces the attention module of the top ``adapter_layers``
layers by an ``AdaptedAttention`` that runs the original module unchanged and adds a gated,
separately-softmaxed attention over ``adapter_len`` learned prompt vectors (the derivation:
:func:`probe.classify.gated_decompose`). The recording run sees the wrapped module's attention
(:func:`probe.hf.arch.inner_attn`), so the content attention is checked by the usual probes;
here forward hooks on the wrapper and on the wrapped module take their two outputs, whose
difference is what the adapter added, and the identity is checked against it with the query
the wrapped attention received. PEFT supports it on Llama, Mistral and GPT-2.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from probe.classify import GatedBias, gated_decompose
from probe.hf.arch import _architecture, _is_peft, _peft_type, _shape, per_query_head
from probe.hf.recording import _recording
from probe.hf.run import _forward, _Setup


def is_adaption_prompt(model: Any) -> bool:
    """Whether ``model`` is a PEFT adaption-prompt (LLaMA-Adapter) model."""
    return _is_peft(model) and _peft_type(model) == "ADAPTION_PROMPT"


def _wrappers(model: nn.Module) -> dict[int, nn.Module]:
    """Layer index -> PEFT's AdaptedAttention wrapper, for the adapted layers of ``model``."""
    out = {}
    for i, block in enumerate(_architecture(model).layers(model)):
        for child in block.children():
            if hasattr(child, "adaption_gate") and hasattr(child, "model"):
                out[i] = child
    return out


def _adapter_kv(wrapper: nn.Module, family: str, n_heads: int) -> tuple[Tensor, Tensor]:
    """The adapter's keys and values [P_a, H, e], as PEFT computes them: the prompt through the
    wrapped module's own key/value projections, unrotated, one per query head."""
    inner, prompt = wrapper.model, wrapper.adaption_prompt[0]  # [P_a, d]
    if family == "gpt2":
        _, k, v = inner.c_attn(prompt).split(prompt.shape[-1], dim=-1)
    else:
        k, v = inner.k_proj(prompt), inner.v_proj(prompt)
    e = inner.head_dim
    k, v = (t.reshape(t.shape[0], -1, e) for t in (k, v))
    groups = n_heads // k.shape[1]
    return per_query_head(k, groups, 1), per_query_head(v, groups, 1)


def _adapter_out_map(wrapper: nn.Module, family: str, n_heads: int) -> tuple[Tensor, Tensor | None]:
    """W_A [H, e, d] and b_A [d] (or None): what PEFT applies to the head-concatenated adapter
    mix. Llama/Mistral: ``o_proj`` (its bias too); GPT-2: nothing (the identity)."""
    inner = wrapper.model
    if family == "gpt2":
        p = inner.c_proj.weight
        d = p.shape[1]
        return torch.eye(d, dtype=p.dtype, device=p.device).reshape(n_heads, d // n_heads, d), None
    w = inner.o_proj.weight  # [d, H e]
    return w.T.reshape(n_heads, -1, w.shape[0]), inner.o_proj.bias


@torch.no_grad()
def gated_biases(
    s: _Setup,
    tokens: Tensor,
    offset: int,
    tol_factor: float = 16.0,
    softmax_dtype: torch.dtype = torch.float32,
) -> list[GatedBias | None]:
    """Per layer, the gated-bias identity on ``tokens`` [b, T] (None where a layer has no
    adapter), from one recording run of the adaption-prompt model ``s.runner``.

    softmax_dtype: the dtype PEFT's adapter softmax runs in (``F.softmax(..., dtype=float32)``
    in the pinned PEFT, whatever the model's dtype): its rounding sets the tolerance."""
    model = s.tuned
    arch, shape = _architecture(model), _shape(model)
    wrappers = _wrappers(model)
    queries: dict[int, Tensor] = {}
    outputs: dict[tuple[int, str], Tensor] = {}

    def keep(layer: int, which: str):
        def hook(module, args, output):
            outputs[layer, which] = output[0] if isinstance(output, tuple) else output

        return hook

    def on_layer(layer, r):
        if layer in wrappers:
            queries[layer] = r["q"].transpose(1, 2)  # [b, T, H, e], rotated as the model does

    handles = []
    try:
        for i, w in wrappers.items():
            handles += [
                w.register_forward_hook(keep(i, "adapted")),
                w.model.register_forward_hook(keep(i, "wrapped")),
            ]
        with _recording(s.runner, on_layer):
            _forward(s, tokens, offset, slice(None), 1)
    finally:
        for h in handles:
            h.remove()
    out: list[GatedBias | None] = [None] * shape.n_layers
    for i, w in wrappers.items():
        k_a, v_a = _adapter_kv(w, arch.family, shape.n_heads)
        W_A, b_A = _adapter_out_map(w, arch.family, shape.n_heads)
        out[i] = gated_decompose(
            queries[i],
            k_a,
            v_a,
            w.adaption_gate.item(),
            W_A,
            b_A,
            outputs[i, "adapted"] - outputs[i, "wrapped"],
            layer=i,
            tol_factor=tol_factor,
            softmax_dtype=softmax_dtype,
        )
    return out


__all__ = ["gated_biases", "is_adaption_prompt"]
