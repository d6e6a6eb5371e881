"""The architectures :mod:`probe.hf` probes, read straight from the HF modules (no copies).

One table entry per ``*ForCausalLM`` class says where a layer's attention, its input norm and its
projections are, how to compute the *frozen* (pre-rotation) q/k/v from the base weights, and how
to view the output projection as ``W_O [head, d_head, d_model]``. Everything else (rotary
positions, grouped-query attention, the prefix) is handled once, in :mod:`probe.hf`, from what the
attention function itself receives. :func:`_architecture` looks a model up in the table, refusing
what the probes cannot take; :func:`_hf_model` finds the HF model inside a PEFT one.

Shapes: b batch, T positions, H query heads, G key/value heads (grouped-query attention: H is a
multiple of G; GPT-2 and GPT-NeoX have G = H), e d_head, d d_model.

Imports nothing from transformers or peft at import time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Shape:
    """The sizes the probes need, normalised across config classes."""

    n_layers: int
    n_heads: int  # H, query heads
    n_kv_heads: int  # G, key/value heads
    d_model: int
    d_head: int
    n_ctx: int  # the largest position id + 1
    vocab: int


def base_module(mod: nn.Module) -> nn.Module:
    """A PEFT tuner layer's frozen inner module (``base_layer``), else ``mod`` itself."""
    return getattr(mod, "base_layer", mod)


def inner_attn(mod: nn.Module) -> nn.Module:
    """The attention module PEFT's adaption prompt wraps (``AdaptedAttention.model``), else
    ``mod``. The wrapper runs the wrapped module unchanged and adds its own gated branch
    (:mod:`probe.hf.gated`), so the content attention is recorded from the wrapped one."""
    return mod.model if hasattr(mod, "adaption_gate") and hasattr(mod, "model") else mod


def effective_weight(mod: nn.Module, name: str = "weight") -> Tensor:
    """The weight a (possibly LoRA-wrapped) module applies: base + every active, unmerged delta.

    Raises TypeError for a PEFT layer whose delta cannot be read (e.g. IA3 on this module)."""
    base = base_module(mod)
    w = getattr(base, name)
    if base is mod or name != "weight" or getattr(mod, "disable_adapters", False):
        return w
    if getattr(mod, "merged", False):  # merged adapters already live in base_layer.weight
        return w
    if not hasattr(mod, "get_delta_weight"):
        raise TypeError(f"{type(mod).__name__}: cannot read this PEFT layer's weight change")
    for adapter in getattr(mod, "active_adapters", []):
        if adapter in getattr(mod, "lora_A", {}):
            w = w + mod.get_delta_weight(adapter)
    return w


def head_params(mods: Sequence[nn.Module]) -> list[Tensor]:
    """The effective parameters of the head's input side (norm, q/k/v projections)."""
    out = []
    for mod in mods:
        base = base_module(mod)
        out.append(effective_weight(mod))
        if getattr(base, "bias", None) is not None:
            out.append(base.bias)
    return out


@dataclass(frozen=True)
class Arch:
    """How to read one architecture. ``rotary``: q/k carry rotary positions (applied by us to the
    frozen q/k with the cos/sin the model's attention received)."""

    family: str
    shape: Callable[[object], Shape]
    layers: Callable[[nn.Module], Sequence[nn.Module]]  # the CausalLM -> its decoder blocks
    attn: Callable[[nn.Module], nn.Module]  # block -> attention module
    # block -> the modules on the head's input side: norm, then the q/k/v projection(s)
    head_input: Callable[[nn.Module], list[nn.Module]]
    # (attention module, x [b, T, d]) -> frozen q [b, T, H, e], k, v [b, T, G, e] (no rotation)
    qkv: Callable[[nn.Module, Tensor, Shape], tuple[Tensor, Tensor, Tensor]]
    # (attention module, shape, frozen) -> W_O [H, e, d]: the base weight (frozen=True, a LoRA
    # layer's base_layer) or the effective one (base + active LoRA deltas)
    W_O: Callable[[nn.Module, Shape, bool], Tensor]
    rotary: bool


def _heads(t: Tensor, n: int) -> Tensor:
    return t.reshape(*t.shape[:-1], n, t.shape[-1] // n)


# GPT-2: Conv1D layers (x @ W + b, W [in, out]); c_attn packs q | k | v along the output.
def _gpt2_shape(c) -> Shape:
    return Shape(
        c.n_layer, c.n_head, c.n_head, c.n_embd, c.n_embd // c.n_head, c.n_positions, c.vocab_size
    )


def _gpt2_qkv(attn: nn.Module, x: Tensor, s: Shape):
    q, k, v = base_module(attn.c_attn)(x).split(s.d_model, dim=-1)
    return _heads(q, s.n_heads), _heads(k, s.n_kv_heads), _heads(v, s.n_kv_heads)


def _weight(mod: nn.Module, frozen: bool) -> Tensor:
    return base_module(mod).weight if frozen else effective_weight(mod)


def _gpt2_W_O(attn: nn.Module, s: Shape, frozen: bool) -> Tensor:
    w = _weight(attn.c_proj, frozen)  # [H e, d]
    return w.reshape(s.n_heads, s.d_head, s.d_model)


# Llama family: nn.Linear (x @ W.T + b, W [out, in]); separate q/k/v projections, G <= H.
def _llama_shape(c) -> Shape:
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return Shape(
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.hidden_size,
        d_head,
        c.max_position_embeddings,
        c.vocab_size,
    )


def _llama_qkv(attn: nn.Module, x: Tensor, s: Shape):
    q = base_module(attn.q_proj)(x)
    k = base_module(attn.k_proj)(x)
    v = base_module(attn.v_proj)(x)
    return _heads(q, s.n_heads), _heads(k, s.n_kv_heads), _heads(v, s.n_kv_heads)


def _linear_W_O(proj: nn.Module, s: Shape, frozen: bool) -> Tensor:
    return _weight(proj, frozen).T.reshape(s.n_heads, s.d_head, s.d_model)


# GPT-NeoX: query_key_value is nn.Linear whose output is per head [q | k | v] (interleaved).
def _neox_shape(c) -> Shape:
    n = c.num_attention_heads
    return Shape(
        c.num_hidden_layers,
        n,
        n,
        c.hidden_size,
        c.hidden_size // n,
        c.max_position_embeddings,
        c.vocab_size,
    )


def _neox_qkv(attn: nn.Module, x: Tensor, s: Shape):
    qkv = base_module(attn.query_key_value)(x).reshape(*x.shape[:-1], s.n_heads, 3 * s.d_head)
    return qkv.chunk(3, dim=-1)


_LLAMA = dict(
    family="llama",
    shape=_llama_shape,
    layers=lambda m: m.model.layers,
    attn=lambda b: inner_attn(b.self_attn),
    head_input=lambda b: [
        b.input_layernorm,
        inner_attn(b.self_attn).q_proj,
        inner_attn(b.self_attn).k_proj,
        inner_attn(b.self_attn).v_proj,
    ],
    qkv=_llama_qkv,
    W_O=lambda a, s, f: _linear_W_O(a.o_proj, s, f),
    rotary=True,
)

ARCHITECTURES: dict[str, Arch] = {
    "GPT2LMHeadModel": Arch(
        family="gpt2",
        shape=_gpt2_shape,
        layers=lambda m: m.transformer.h,
        attn=lambda b: inner_attn(b.attn),
        head_input=lambda b: [b.ln_1, inner_attn(b.attn).c_attn],
        qkv=_gpt2_qkv,
        W_O=_gpt2_W_O,
        rotary=False,
    ),
    "LlamaForCausalLM": Arch(**_LLAMA),
    "MistralForCausalLM": Arch(**_LLAMA),
    "Qwen2ForCausalLM": Arch(**_LLAMA),
    "GPTNeoXForCausalLM": Arch(
        family="neox",
        shape=_neox_shape,
        layers=lambda m: m.gpt_neox.layers,
        attn=lambda b: b.attention,
        head_input=lambda b: [b.input_layernorm, b.attention.query_key_value],
        qkv=_neox_qkv,
        W_O=lambda a, s, f: _linear_W_O(a.dense, s, f),
        rotary=True,
    ),
}


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding, written out: x [b, T, n, e], cos/sin [b, T, r] (r <= e even).

    The first r dims of each head rotate in pairs (i, i + r/2) by the angle whose cos/sin the
    model computed for that position; the remaining e - r dims (GPT-NeoX's partial rotary) pass.
    """
    r = cos.shape[-1]
    xr, xp = x[..., :r], x[..., r:]
    swapped = torch.cat((-xr[..., r // 2 :], xr[..., : r // 2]), dim=-1)
    out = xr * cos[:, :, None] + swapped * sin[:, :, None]
    return torch.cat((out, xp), dim=-1) if xp.shape[-1] else out


SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


def per_query_head(t: Tensor, groups: int, dim: int) -> Tensor:
    """Grouped-query attention's shared keys or values, repeated ``groups`` times along the head
    dimension ``dim`` so that every query head has its own (t itself when groups == 1)."""
    return t.repeat_interleave(groups, dim=dim) if groups > 1 else t


def _architecture(model: nn.Module) -> Arch:
    """The model's :class:`Arch`; one-line errors for what the probes cannot take."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise ValueError(
            f"probe.hf supports {list(SUPPORTED_ARCHITECTURES)}; got {name}. Load the model "
            "with AutoModelForCausalLM (not a bare base model)"
        )
    cfg = model.config
    if name == "GPT2LMHeadModel":
        if not getattr(cfg, "scale_attn_weights", True) or cfg.scale_attn_by_inverse_layer_idx:
            raise ValueError(
                f"{name}: scale_attn_weights=False or scale_attn_by_inverse_layer_idx=True changes "
                "the attention scale away from 1/sqrt(d_head), which the probes assume; use a "
                "config with the standard scale"
            )
        if cfg.reorder_and_upcast_attn:
            raise ValueError(
                f"{name}: reorder_and_upcast_attn=True runs a different attention kernel that "
                "the probes do not reproduce; set config.reorder_and_upcast_attn = False (same "
                "maths, standard kernel)"
            )
    return ARCHITECTURES[name]


def _shape(model: nn.Module) -> Shape:
    return _architecture(model).shape(model.config)


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _is_peft(obj: Any) -> bool:
    return type(obj).__module__.startswith("peft.") and hasattr(obj, "peft_config")


def _peft_cfg(pm: Any):
    return pm.peft_config[pm.active_adapter]


def _peft_type(pm: Any) -> str:
    cfg = _peft_cfg(pm)
    return str(getattr(cfg.peft_type, "value", cfg.peft_type))


def _hf_model(model: nn.Module) -> nn.Module:
    """The HF CausalLM inside a PEFT model (or the model itself)."""
    return model.get_base_model() if _is_peft(model) else model
