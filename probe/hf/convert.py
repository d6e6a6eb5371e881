"""Our model and adapters as their exact Hugging Face / PEFT counterparts, where one exists.

:func:`to_gpt2` writes a :class:`~probe.model.Transformer` into transformers' GPT-2 (the same
architecture: learned positions, pre-LayerNorm blocks, tanh GELU, an untied unembedding), and
:func:`ia3_to_peft` an :class:`~probe.adapters.IA3` adapter into PEFT's IA3 on that GPT-2, so the
HF path (:func:`probe.hf.check_hf`, verified against PEFT's own forward) can check what our
experiments trained. Both give the same logits, to rounding.

Not every adapter has a counterpart: PEFT's adaption prompt on GPT-2 adds its mix without the
output projection and has one gate per layer (``probe.adapters.AdaptionPrompt`` says why that
rules a conversion out).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from probe.hf.loading import require_hf

if TYPE_CHECKING:
    from probe.adapters import IA3
    from probe.model import Transformer


def to_gpt2(model: Transformer, attn_implementation: str = "eager") -> nn.Module:
    """A transformers ``GPT2LMHeadModel`` computing what ``model`` computes, in its dtype and
    mode (eval unless it was training). Needs a model with ln1 (``attn_ln``) and an MLP, as
    every GPT-2 block has."""
    tf = require_hf(peft=False).transformers
    c = model.cfg
    if not c.attn_ln or c.d_mlp == 0:
        raise ValueError(
            "to_gpt2 needs a model with a pre-attention LayerNorm and an MLP in every block, as "
            f"GPT-2 has; this one has attn_ln={c.attn_ln}, d_mlp={c.d_mlp}"
        )
    cfg = tf.GPT2Config(
        vocab_size=c.d_vocab,
        n_positions=c.n_ctx,
        n_embd=c.d_model,
        n_layer=c.n_layers,
        n_head=c.n_heads,
        n_inner=c.d_mlp,
        activation_function="gelu_new",  # tanh GELU, as ours
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,
        layer_norm_epsilon=model.ln_final.eps,
        tie_word_embeddings=False,  # ours has its own unembedding
        bos_token_id=None,
        eos_token_id=None,
        attn_implementation=attn_implementation,
    )
    gpt2 = tf.GPT2LMHeadModel(cfg)
    gpt2 = gpt2.to(dtype=model.W_E.dtype, device=model.device)
    gpt2.load_state_dict(_gpt2_state(model), strict=False)
    _check_loaded(gpt2, model)
    return gpt2.train(model.training)


def _gpt2_state(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under GPT-2's names and layouts (Conv1D: x @ W + b, W [in, out])."""

    def heads(W):  # [head, d_model, d_head] -> [d_model, head * d_head], head-major as GPT-2
        return W.permute(1, 0, 2).flatten(1)

    state = {
        "transformer.wte.weight": model.W_E,
        "transformer.wpe.weight": model.W_pos,
        "transformer.ln_f.weight": model.ln_final.w,
        "transformer.ln_f.bias": model.ln_final.b,
        "lm_head.weight": model.W_U.T,
    }
    for i, block in enumerate(model.blocks):
        a, p = block.attn, f"transformer.h.{i}."
        state |= {
            p + "ln_1.weight": block.ln1.w,
            p + "ln_1.bias": block.ln1.b,
            p + "attn.c_attn.weight": torch.cat([heads(a.W_Q), heads(a.W_K), heads(a.W_V)], 1),
            p + "attn.c_attn.bias": torch.cat([a.b_Q.flatten(), a.b_K.flatten(), a.b_V.flatten()]),
            p + "attn.c_proj.weight": a.W_O.flatten(0, 1),
            p + "attn.c_proj.bias": a.b_O,
            p + "ln_2.weight": block.ln2.w,
            p + "ln_2.bias": block.ln2.b,
            p + "mlp.c_fc.weight": block.mlp.W_in,
            p + "mlp.c_fc.bias": block.mlp.b_in,
            p + "mlp.c_proj.weight": block.mlp.W_out,
            p + "mlp.c_proj.bias": block.mlp.b_out,
        }
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def _check_loaded(gpt2: nn.Module, model: Transformer) -> None:
    """Every GPT-2 parameter came from ``model`` (a transformers version that renamed one would
    otherwise leave it at its random init)."""
    names = set(_gpt2_state(model))
    missing = [n for n, _ in gpt2.named_parameters() if n not in names]
    if missing:
        raise RuntimeError(
            f"to_gpt2: GPT-2 parameters {missing[:3]} have no counterpart in our model; this "
            "transformers version lays GPT-2 out differently than probe.hf.convert expects"
        )


def ia3_to_peft(adapter: IA3, base: Transformer, gpt2: nn.Module | None = None) -> Any:
    """PEFT's IA3 model equal to ``adapter`` on ``base``: ``IA3Config`` on GPT-2's ``c_attn``
    (scales of its [q | k | v] output channels, bias included; 1 for the parts ours does not
    target) and ``mlp.c_proj`` as a feed-forward module (scales of its input, the MLP's hidden
    units). ``gpt2``: ``to_gpt2(base)`` unless given (it is wrapped, not copied)."""
    peft = require_hf().peft
    targets = adapter.config.targets
    gpt2 = to_gpt2(base) if gpt2 is None else gpt2
    modules = (["c_attn"] if set(targets) & {"W_Q", "W_K", "W_V"} else []) + (
        ["mlp.c_proj"] if "W_out" in targets else []
    )
    config = peft.IA3Config(
        task_type="CAUSAL_LM",
        target_modules=modules,
        feedforward_modules=[m for m in modules if m == "mlp.c_proj"],
        fan_in_fan_out=True,  # GPT-2's Conv1D stores W as [in, out]
    )
    model = peft.get_peft_model(gpt2, config)
    scales = {k.replace("__", "."): v.detach() for k, v in adapter.scales.items()}
    c = base.cfg
    ones = torch.ones(c.n_heads, c.d_head, dtype=base.W_E.dtype, device=base.device)
    with torch.no_grad():
        for i in range(c.n_layers):
            layers = model.base_model.model.transformer.h[i]
            if "c_attn" in modules:
                parts = [scales.get(f"blocks.{i}.attn.W_{x}", ones).flatten() for x in "QKV"]
                _fill(layers.attn.c_attn, torch.cat(parts))
            if "mlp.c_proj" in modules:
                _fill(layers.mlp.c_proj, scales[f"blocks.{i}.mlp.W_out"])
    return model.train(base.training)


def _fill(module: nn.Module, values: torch.Tensor) -> None:
    scale = module.ia3_l["default"]
    scale.copy_(values.to(scale).reshape(scale.shape))


__all__ = ["ia3_to_peft", "to_gpt2"]
