"""Probe real Hugging Face causal LMs through TransformerLens's ``TransformerBridge``.

The same per-layer records (:class:`~probe.probes.AttentionRecord`) our own model produces,
recorded from an HF model (GPT-2 family) run with a prefix, so every probe (decomposition, local
and downstream drift, bias subspace) applies unchanged::

    from probe.hf import hf_records, check_hf
    records = hf_records(gpt2, tokens, prefix=peft_model)        # one record per layer
    report = check_hf(gpt2, tokens, prefix="path/to/adapter")    # the theorem's checks

A prefix can be given as

- a PEFT prefix-tuning model (``get_peft_model(model, PrefixTuningConfig(...))``), or
- a PEFT prompt-tuning or p-tuning model: its soft prompt is converted *exactly* into a per-layer
  key/value prefix by running the virtual tokens alone through the model (causal masking means
  they never see the content, so at every layer they act as a fixed key/value prefix), or
- the directory of a saved PEFT adapter of one of those kinds (``save_pretrained``), or
- a raw per-layer key/value prefix: a sequence of :class:`~probe.model.KVPrefix` or
  ``(keys, values)`` pairs, one per layer, in *our* layout ``[P, head, d_head]`` or
  ``[batch, P, head, d_head]``; or a ``transformers`` ``Cache`` (HF layout ``[batch, head, P,
  d_head]``), or
- a raw soft prompt tensor ``[P, d_model]`` or ``[batch, P, d_model]`` (added to the virtual
  tokens' position embeddings 0..P-1, as PEFT prompt-tuning does).

Positions. HF and PEFT give a prefix the positional slots 0..P-1 and the content P..P+T-1 (our
own model gives a prefix no slot). ``hf_records`` runs the content at ``position_ids = arange(
position_offset, position_offset + T)``, with ``position_offset`` defaulting to P, exactly what
PEFT's own forward does. The *local* check needs nothing more: the frozen q/k/v are recomputed
from the tuned run's own layer input, which already carries those positions. A base-model run to
compare against (downstream drift) must use the same position ids: ``hf_records(base, tokens,
position_offset=P)``; :func:`check_hf` does that for you.

Needs the optional extra: ``pip install 'prefix-probe[hf]'``. Importing this module is cheap and
safe without it; the entry points raise :class:`MissingExtraError` saying what to install.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from probe.model import KVPrefix

if TYPE_CHECKING:
    from probe.probes import AttentionRecord, TheoremCheck

INSTALL_HINT = "pip install 'prefix-probe[hf]'"

# Prompt-learning PEFT methods we can turn into a per-layer key/value prefix.
PREFIX_PEFT_TYPES = ("PREFIX_TUNING",)
PROMPT_PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING")


class MissingExtraError(ImportError):
    """The optional ``hf`` extra (peft, transformers) is not installed."""


def require_hf() -> SimpleNamespace:
    """Import the optional HF stack lazily; raise :class:`MissingExtraError` naming the fix.

    Returns a namespace with ``transformers``, ``peft`` and ``build_bridge`` (TransformerLens's
    ``build_bridge_from_module``).
    """
    try:
        import peft
        import transformers
        from transformer_lens.model_bridge.sources import build_bridge_from_module
    except ImportError as e:
        raise MissingExtraError(
            f"probing Hugging Face models needs the optional packages peft and transformers "
            f"(import failed: {e}); install them with: {INSTALL_HINT}"
        ) from e
    return SimpleNamespace(
        transformers=transformers, peft=peft, build_bridge=build_bridge_from_module
    )


# ------------------------------------------------------------------------------------------
# Architectures: how to read a layer's frozen q/k/v and W_O straight from the HF modules.
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Arch:
    """What the probes need from one HF architecture, read from the un-bridged HF modules."""

    blocks: Callable[[nn.Module], Sequence[nn.Module]]
    # (block, x [batch, T, d_model] = the attention's input, n_heads) -> q, k, v [batch, T, H, dh]
    qkv: Callable[[nn.Module, Tensor, int], tuple[Tensor, Tensor, Tensor]]
    # (block, n_heads) -> W_O [head, d_head, d_model]
    W_O: Callable[[nn.Module, int], Tensor]
    # block -> the parameters a head's q/k/v depend on (a layer is "frozen" if they are unchanged)
    head_inputs: Callable[[nn.Module], list[Tensor]]


def _gpt2_qkv(block: nn.Module, x: Tensor, n_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    d_model = x.shape[-1]
    qkv = block.attn.c_attn(x)  # Conv1D: x @ W [d_model, 3 d_model] + b
    q, k, v = qkv.split(d_model, dim=-1)
    return tuple(t.reshape(*t.shape[:-1], n_heads, d_model // n_heads) for t in (q, k, v))


def _gpt2_W_O(block: nn.Module, n_heads: int) -> Tensor:
    w = block.attn.c_proj.weight  # Conv1D [in = head * d_head, out = d_model]
    return w.reshape(n_heads, w.shape[0] // n_heads, w.shape[1])


ARCHITECTURES: dict[str, _Arch] = {
    "GPT2LMHeadModel": _Arch(
        blocks=lambda m: m.transformer.h,
        qkv=_gpt2_qkv,
        W_O=_gpt2_W_O,
        head_inputs=lambda b: [
            b.ln_1.weight,
            b.ln_1.bias,
            b.attn.c_attn.weight,
            b.attn.c_attn.bias,
        ],
    ),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


def _architecture(model: nn.Module) -> str:
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise ValueError(
            f"probe.hf supports the architectures {list(SUPPORTED_ARCHITECTURES)} (GPT-2 family: "
            f"gpt2, gpt2-medium/large/xl, distilgpt2, ...); got {name}. Load the model with "
            "AutoModelForCausalLM, not a bare base model."
        )
    cfg = model.config
    if not getattr(cfg, "scale_attn_weights", True) or getattr(
        cfg, "scale_attn_by_inverse_layer_idx", False
    ):
        raise ValueError(
            f"{name}: scale_attn_weights=False or scale_attn_by_inverse_layer_idx=True changes "
            "the attention scale away from 1/sqrt(d_head), which the probes assume; "
            "use a config with the standard scale"
        )
    return name


# ------------------------------------------------------------------------------------------
# Resolving what the caller passed into (base, tuned, prefix).
# ------------------------------------------------------------------------------------------


def _is_peft(obj: Any) -> bool:
    return type(obj).__module__.startswith("peft.") and hasattr(obj, "peft_config")


def _peft_type(pm: Any) -> str:
    cfg = pm.peft_config[pm.active_adapter]
    return str(getattr(cfg.peft_type, "value", cfg.peft_type))


def is_peft_adapter_dir(path: str | Path) -> bool:
    """True if ``path`` is a directory holding a saved PEFT adapter (``adapter_config.json``)."""
    return (Path(path) / "adapter_config.json").is_file()


def is_hf_model_dir(path: str | Path) -> bool:
    """True if ``path`` is a saved HF model directory (a ``config.json`` with ``model_type``).

    Our own saved models have a ``config.json`` with ``"format": "prefix-probe-model/1"`` and no
    ``model_type``, so the two never get confused. Needs no optional package.
    """
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        meta = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "model_type" in meta and "format" not in meta


def _plain_model(model: nn.Module, role: str) -> nn.Module:
    """An HF model without PEFT wrappers: prompt-learning -> its base; LoRA & co -> merged copy."""
    if not _is_peft(model):
        return model
    if model.peft_config[model.active_adapter].is_prompt_learning:
        return model.get_base_model()
    # LoRA and other weight adapters: merge into a copy, so the caller's model is untouched.
    merged = copy.deepcopy(model)
    if not hasattr(merged, "merge_and_unload"):
        raise ValueError(
            f"{role}: cannot merge a PEFT {_peft_type(model)} adapter into its base model; "
            "merge it yourself and pass the plain HF model"
        )
    return merged.merge_and_unload()


def _resolve(base_model, prefix, tuned_model):
    """-> (base, tuned, prefix) with base and tuned plain HF models."""
    if _is_peft(base_model):
        cfg = base_model.peft_config[base_model.active_adapter]
        if cfg.is_prompt_learning and prefix is None:
            base_model, prefix = base_model.get_base_model(), base_model
        else:
            raise ValueError(
                f"base_model is a PEFT {_peft_type(base_model)} model; pass the plain HF base "
                "model as base_model and the adapted model as prefix= (prefix/prompt tuning) "
                "or tuned_model= (LoRA and other weight adapters)"
            )
    if tuned_model is not None and _is_peft(tuned_model):
        if tuned_model.peft_config[tuned_model.active_adapter].is_prompt_learning:
            if prefix is None:
                prefix = tuned_model
            elif prefix is not tuned_model:
                raise ValueError(
                    "tuned_model is a prompt-learning PEFT model and prefix= is also given; "
                    "pass the adapter once, as prefix="
                )
        tuned_model = _plain_model(tuned_model, "tuned_model")
    if isinstance(prefix, (str, Path)):
        if not is_peft_adapter_dir(prefix):
            raise FileNotFoundError(
                f"prefix={str(prefix)!r} is not a saved PEFT adapter directory "
                "(no adapter_config.json); save one with peft_model.save_pretrained(dir)"
            )
        prefix = load_peft_adapter(tuned_model if tuned_model is not None else base_model, prefix)
    if _is_peft(prefix):
        kind = _peft_type(prefix)
        if kind not in PREFIX_PEFT_TYPES + PROMPT_PEFT_TYPES:
            raise ValueError(
                f"prefix is a PEFT {kind} adapter; probe.hf takes prefix-tuning "
                f"{PREFIX_PEFT_TYPES} and prompt-tuning {PROMPT_PEFT_TYPES} adapters as prefix=. "
                "Pass a weight adapter (LoRA, ...) as tuned_model= instead"
            )
        if tuned_model is None:
            tuned_model = prefix.get_base_model()
    if tuned_model is None:
        tuned_model = base_model
    return base_model, tuned_model, prefix


def load_peft_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Load a saved PEFT adapter onto a *copy* of ``model`` (the caller's model is untouched)."""
    hf = require_hf()
    with warnings.catch_warnings():  # PEFT calls an API transformers deprecates; not ours
        warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
        pm = hf.peft.PeftModel.from_pretrained(copy.deepcopy(model), str(adapter_dir))
    return pm.eval()


# ------------------------------------------------------------------------------------------
# Any prefix form -> per-layer KVPrefix [batch, P, head, d_head].
# ------------------------------------------------------------------------------------------


def _cache_to_kv(cache: Any) -> list[KVPrefix]:
    """A transformers Cache (or legacy tuple) [batch, head, P, d_head] -> our layout (cloned)."""
    if hasattr(cache, "layers"):
        pairs = [(layer.keys, layer.values) for layer in cache.layers]
    else:
        pairs = [(kv[0], kv[1]) for kv in cache]
    return [KVPrefix(k.transpose(1, 2).clone(), v.transpose(1, 2).clone()) for k, v in pairs]


def _fresh_cache(hf, prefix: Sequence[KVPrefix]):
    """A new DynamicCache holding ``prefix`` (a forward extends its cache in place)."""
    return hf.transformers.DynamicCache(
        [
            (p.keys.transpose(1, 2).contiguous(), p.values.transpose(1, 2).contiguous())
            for p in prefix
        ]
    )


@torch.no_grad()
def prompt_to_prefix(
    model: nn.Module, prompt: Float[Tensor, "... P d_model"], batch: int = 1
) -> list[KVPrefix]:
    """Convert a soft prompt into the exactly equivalent per-layer key/value prefix.

    The virtual tokens are run alone through ``model`` at positions 0..P-1 (where PEFT prompt
    tuning puts them; the position embedding is added to them). Under causal masking they never
    attend to the content, so their keys and values at every layer are a fixed prefix.

    prompt: [P, d_model] or [batch, P, d_model] input embeddings (before position embeddings).
    Returns one KVPrefix per layer, keys/values [batch, P, head, d_head].
    """
    hf = require_hf()
    if prompt.ndim == 2:
        prompt = prompt.unsqueeze(0)
    if prompt.ndim != 3 or prompt.shape[-1] != model.config.n_embd:
        raise ValueError(
            f"prompt has shape {tuple(prompt.shape)}; expected [P, d_model={model.config.n_embd}]"
            " or [batch, P, d_model]"
        )
    prompt = prompt.expand(batch, *prompt.shape[1:]) if prompt.shape[0] == 1 else prompt
    P = prompt.shape[1]
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        out = model(
            inputs_embeds=prompt.to(param),
            position_ids=torch.arange(P, device=param.device).expand(prompt.shape[0], P),
            past_key_values=hf.transformers.DynamicCache(),
            use_cache=True,
        )
    finally:
        model.train(was_training)
    return _cache_to_kv(out.past_key_values)


@torch.no_grad()
def hf_prefix(model: nn.Module, prefix: Any, batch: int) -> list[KVPrefix]:
    """Normalise any accepted prefix form (see the module docstring) to per-layer KV prefixes.

    ``model`` is the (plain HF) model the prefix is used with: soft prompts run through it.
    Returns ``n_layers`` KVPrefix with keys/values [batch, P, head, d_head] in the model's dtype.
    """
    cfg = model.config
    H, dh = cfg.n_head, cfg.n_embd // cfg.n_head
    param = next(model.parameters())
    if _is_peft(prefix):
        kind = _peft_type(prefix)
        if kind not in PREFIX_PEFT_TYPES + PROMPT_PEFT_TYPES:
            raise ValueError(f"PEFT {kind} adapters are not prefixes; pass them as tuned_model=")
        was_training = prefix.training
        prefix.eval()  # no dropout in the prompt encoder
        try:
            prompt = prefix.get_prompt(batch)
        finally:
            prefix.train(was_training)
        if kind in PREFIX_PEFT_TYPES:
            kv = _cache_to_kv(prompt)  # a Cache [batch, head, P, d_head]
        else:
            kv = prompt_to_prefix(model, prompt, batch)  # soft prompt [batch, P, d_model]
    elif isinstance(prefix, Tensor):
        kv = prompt_to_prefix(model, prefix, batch)
    elif hasattr(prefix, "layers") and not isinstance(prefix, Sequence):
        kv = _cache_to_kv(prefix)
    elif isinstance(prefix, Sequence) and not isinstance(prefix, str):
        kv = [p if isinstance(p, KVPrefix) else KVPrefix(*p) for p in prefix]
        for layer, p in enumerate(kv):
            for part in p:
                if part.ndim not in (3, 4) or tuple(part.shape[-2:]) != (H, dh):
                    raise ValueError(
                        f"prefix[{layer}] has shape {tuple(part.shape)}; raw prefixes use our "
                        f"layout [P, head={H}, d_head={dh}] or [batch, P, head, d_head] (a "
                        "transformers Cache is taken in HF's own layout [batch, head, P, d_head])"
                    )
    else:
        raise TypeError(
            f"prefix of type {type(prefix).__name__} not understood; pass a PEFT prefix/prompt "
            "model, an adapter directory, per-layer (keys, values), a Cache or a soft prompt"
        )
    if len(kv) != cfg.n_layer:
        raise ValueError(f"prefix has {len(kv)} layers; the model has n_layer={cfg.n_layer}")
    out = []
    for layer, p in enumerate(kv):
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


# ------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------


def _check_tokens(model: nn.Module, tokens: Tensor, offset: int) -> None:
    cfg = model.config
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.dtype.is_floating_point:
        got = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be an integer tensor [batch, pos]; got {got}")
    if offset + tokens.shape[1] > cfg.n_positions:
        raise ValueError(
            f"positions {offset}..{offset + tokens.shape[1] - 1} exceed the model's "
            f"n_positions={cfg.n_positions}; shorten the tokens or the prefix"
        )
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= cfg.vocab_size):
        raise ValueError(
            f"token ids must be in [0, vocab_size={cfg.vocab_size}); got range "
            f"[{int(tokens.min())}, {int(tokens.max())}]"
        )


def _check_same_shape(base: nn.Module, tuned: nn.Module) -> None:
    if base is tuned:
        return
    if type(base) is not type(tuned):
        raise ValueError(
            f"base_model is a {type(base).__name__} but the tuned model is a "
            f"{type(tuned).__name__}; they must be the same architecture"
        )
    for key in ("n_layer", "n_head", "n_embd"):
        if getattr(base.config, key) != getattr(tuned.config, key):
            raise ValueError(
                f"base_model and the tuned model differ in {key}: "
                f"{getattr(base.config, key)} vs {getattr(tuned.config, key)}"
            )


_HOOKS = ("ln1.hook_out", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_pattern",
          "attn.hook_z")  # fmt: skip


@torch.no_grad()
def run_bridge(
    model: nn.Module,
    tokens: Int[Tensor, "batch pos"],
    prefix: Sequence[KVPrefix] | None = None,
    position_offset: int = 0,
    names_filter: Callable[[str], bool] | None = None,
    verify: bool = True,
):
    """Run a plain HF model through a TransformerBridge with ``run_with_cache``.

    The bridge is built on a deep copy (building one rewires the model's modules in place), in
    eval mode. Content tokens take positions ``position_offset .. position_offset + T - 1``.
    With ``verify`` the bridge's logits are checked against the HF model's own forward.

    prefix: per-layer KVPrefix, keys/values [batch, P, head, d_head].
    Returns (logits [batch, T, vocab], ActivationCache). In the cache, ``blocks.{l}.attn.hook_q/
    k/v/z`` are [batch, T, head, d_head] (content only), ``hook_pattern`` is [batch, head, T,
    P + T] with the prefix columns first.
    """
    hf = require_hf()
    arch = _architecture(model)
    batch, T = tokens.shape
    device = next(model.parameters()).device
    tokens = tokens.to(device)
    pos = torch.arange(position_offset, position_offset + T, device=device).expand(batch, T)
    copied = copy.deepcopy(model).eval()
    bridge = hf.build_bridge(copied, arch, hf_config=copied.config)
    kwargs = {"position_ids": pos}
    if prefix is not None:
        kwargs["past_key_values"] = _fresh_cache(hf, prefix)
    logits, cache = bridge.run_with_cache(tokens, names_filter=names_filter, **kwargs)
    if verify:
        was_training = model.training
        model.eval()
        try:
            if prefix is not None:
                kwargs["past_key_values"] = _fresh_cache(hf, prefix)
            ref = model(input_ids=tokens, **kwargs).logits
        finally:
            model.train(was_training)
        err = (logits - ref).abs().max().item()
        tol = 1e3 * torch.finfo(ref.dtype).eps * (1.0 + ref.abs().max().item())
        if not err <= tol:
            raise RuntimeError(
                f"the TransformerBridge does not reproduce {arch}'s own forward (max logit "
                f"difference {err:.3g} > {tol:.3g}); the bridge does not support something in "
                "this model's config"
            )
    return logits, cache


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

    base_model: the plain, frozen HF model (GPT-2 family); its attention weights give
        ``q_frozen/k_frozen/v_frozen`` and ``W_O_frozen``. A PEFT prefix/prompt-tuning model is
        also accepted here alone (its base model is the base, its adapter the prefix).
    tokens: [batch, T] token ids, no padding.
    prefix: None, a PEFT prefix-tuning or prompt-tuning model, a saved adapter directory,
        per-layer (keys, values) in our layout [P, head, d_head] / [batch, P, head, d_head], a
        transformers Cache, or a soft prompt [P, d_model] (see the module docstring).
    tuned_model: the model whose weights run the content, when they differ from the base
        (a full fine-tune, or a LoRA PeftModel, merged into a copy). Default: the base (or the
        PEFT model's base, for a PEFT prefix).
    position_offset: first content position id. Default: P with a prefix (HF/PEFT convention),
        0 without. Pass P for a base run to compare with a prefix run.
    verify: check that the bridge reproduces the HF model's own logits.

    Returns one :class:`~probe.probes.AttentionRecord` per layer: q, k, v, z [batch, T, head,
    d_head] of the tuned run (content only); prefix_k, prefix_v [batch, P, head, d_head] (None
    without a prefix); pattern [batch, head, T, P + T], prefix columns first; q/k/v_frozen
    [batch, T, head, d_head] from the *base* model's weights applied to the tuned run's layer
    input (the ln_1 output); W_O, W_O_frozen [head, d_head, d_model] of the tuned and the base
    model.
    """
    require_hf()
    base, tuned, prefix = _resolve(base_model, prefix, tuned_model)
    kv, offset = _prepare(base, tuned, prefix, tokens, position_offset)
    return _records(base, tuned, kv, tokens, offset, verify)


def _prepare(base, tuned, prefix, tokens, position_offset):
    """Validate; -> (per-layer KVPrefix [batch, P, head, d_head] or None, position offset)."""
    _architecture(base)
    _architecture(tuned)
    _check_same_shape(base, tuned)
    batch = tokens.shape[0] if isinstance(tokens, Tensor) and tokens.ndim == 2 else 1
    kv = hf_prefix(tuned, prefix, batch) if prefix is not None else None
    offset = (kv[0].length if kv else 0) if position_offset is None else position_offset
    if offset < 0:
        raise ValueError(f"position_offset must be >= 0, got {offset}")
    _check_tokens(tuned, tokens, offset)
    return kv, offset


def _records(base, tuned, kv, tokens, offset, verify) -> list[AttentionRecord]:
    from probe.probes import AttentionRecord

    want = {f"blocks.{layer}.{h}" for layer in range(tuned.config.n_layer) for h in _HOOKS}
    _, cache = run_bridge(tuned, tokens, kv, offset, names_filter=want.__contains__, verify=verify)
    arch = ARCHITECTURES[type(base).__name__]
    H = base.config.n_head
    dtype, base_dtype = _dtype(tuned), _dtype(base)
    records = []
    blocks = zip(arch.blocks(base), arch.blocks(tuned), strict=True)
    for layer, (base_block, tuned_block) in enumerate(blocks):
        a = f"blocks.{layer}."
        x = cache[a + "ln1.hook_out"].to(base_dtype)  # the attention's input in the tuned run
        q_f, k_f, v_f = (t.to(dtype) for t in arch.qkv(base_block, x, H))
        records.append(
            AttentionRecord(
                q=cache[a + "attn.hook_q"],
                k=cache[a + "attn.hook_k"],
                v=cache[a + "attn.hook_v"],
                prefix_k=kv[layer].keys if kv else None,
                prefix_v=kv[layer].values if kv else None,
                pattern=cache[a + "attn.hook_pattern"],
                z=cache[a + "attn.hook_z"],
                q_frozen=q_f,
                k_frozen=k_f,
                v_frozen=v_f,
                W_O=arch.W_O(tuned_block, H).detach().clone(),
                W_O_frozen=arch.W_O(base_block, H).detach().to(dtype).clone(),
                layer=layer,
            )
        )
    return records


def frozen_head_layers_hf(base: nn.Module, tuned: nn.Module) -> list[bool]:
    """Per layer, whether ``tuned`` leaves the head's input side (ln_1, W_Q, W_K, W_V and their
    biases) exactly as in ``base``; only there must the theorem's identities hold."""
    arch = ARCHITECTURES[_architecture(base)]
    if base is tuned:
        return [True] * base.config.n_layer
    return [
        all(
            torch.equal(a, b)
            for a, b in zip(arch.head_inputs(bb), arch.head_inputs(tb), strict=True)
        )
        for bb, tb in zip(arch.blocks(base), arch.blocks(tuned), strict=True)
    ]


@torch.no_grad()
def check_hf(
    base_model: nn.Module,
    tokens: Int[Tensor, "batch pos"],
    prefix: Any = None,
    tuned_model: nn.Module | None = None,
    *,
    position_offset: int | None = None,
    downstream: bool = True,
    tol_factor: float = 16.0,
    verify: bool = True,
) -> TheoremCheck:
    """Run every probe of :func:`probe.probes.check_theorem` on an HF model with a prefix.

    Arguments as for :func:`hf_records`. With ``downstream`` the base model is also run on the
    same tokens *at the same position ids* (content at ``position_offset`` .. , P by default)
    for the downstream drift. The identities are expected at layers with a prefix whose head
    input side (ln_1, c_attn) the tuned model left unchanged; ``result.ok``,
    ``result.failures()`` and ``result.rows()`` (one dict per layer and head) report them.
    """
    return _check_hf(
        base_model, tokens, prefix, tuned_model, position_offset, downstream, tol_factor, verify
    ).result


class HFCheck(NamedTuple):
    """A :func:`check_hf` run with what it was computed from (what the CLI prints).

    result: the TheoremCheck; what: a phrase naming the tuning; records: the tuned run's
    per-layer AttentionRecords; frozen: per layer, whether ln_1/c_attn equal the base's.
    """

    result: TheoremCheck
    what: str
    records: list[AttentionRecord]
    frozen: list[bool]


def _check_hf(
    base_model, tokens, prefix, tuned_model, position_offset, downstream, tol_factor, verify
) -> HFCheck:
    from probe.probes import check_theorem

    require_hf()
    base, tuned, prefix = _resolve(base_model, prefix, tuned_model)
    kv, offset = _prepare(base, tuned, prefix, tokens, position_offset)
    records = _records(base, tuned, kv, tokens, offset, verify)
    base_records = _records(base, base, None, tokens, offset, verify) if downstream else None
    frozen = frozen_head_layers_hf(base, tuned)
    expected = [kv is not None and f for f in frozen]
    result = check_theorem(records, base_records, expected=expected, tol_factor=tol_factor)
    return HFCheck(result, _describe(prefix, base, tuned, kv), records, frozen)


def _describe(prefix, base, tuned, kv) -> str:
    parts = []
    if _is_peft(prefix):
        parts.append(f"a PEFT {_peft_type(prefix)} adapter, P={kv[0].length}")
    elif kv is not None:
        parts.append(f"a key/value prefix, P={kv[0].length}")
    if tuned is not base:
        mine, theirs = base.state_dict(), tuned.state_dict()
        if mine.keys() != theirs.keys() or any(not torch.equal(mine[k], theirs[k]) for k in mine):
            parts.append("changed weights")
    return " and ".join(parts) or "the base model alone"


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


# ------------------------------------------------------------------------------------------
# Directories (for `probe check-theorem --base HF_DIR --adapter ADAPTER_DIR`)
# ------------------------------------------------------------------------------------------


def load_hf_model(
    model_dir: str | Path, dtype: torch.dtype | None = None, device: str = "cpu"
) -> nn.Module:
    """Load a saved HF causal LM (offline, from a local directory) in eval mode.

    dtype: e.g. torch.float64 for the tightest check; None keeps the saved dtype."""
    hf = require_hf()
    if not is_hf_model_dir(model_dir):
        raise FileNotFoundError(
            f"{model_dir} is not a Hugging Face model directory (no config.json with model_type)"
        )
    model = hf.transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype="auto" if dtype is None else dtype, local_files_only=True
    )
    _architecture(model)
    return model.to(device).eval()


def load_dirs(
    model_dir: str | Path,
    adapter_dir: str | Path | None,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a saved HF model directory and (optionally) a saved PEFT adapter directory.

    Returns (base model, keyword arguments for :func:`hf_records` / :func:`check_hf`): a
    prefix/prompt-tuning adapter becomes ``prefix=``; a weight adapter (LoRA, ...) becomes
    ``tuned_model=`` (merged into a copy of the base), and so does an HF model directory given
    as ``adapter_dir`` (a fully fine-tuned model, loaded in the base's dtype).
    """
    base = load_hf_model(model_dir, dtype=dtype, device=device)
    if adapter_dir is None:
        return base, {}
    if is_hf_model_dir(adapter_dir):  # a fully fine-tuned copy
        return base, {"tuned_model": load_hf_model(adapter_dir, _dtype(base), device)}
    if not is_peft_adapter_dir(adapter_dir):
        raise FileNotFoundError(
            f"{adapter_dir} is neither a saved PEFT adapter directory (adapter_config.json) nor "
            "a Hugging Face model directory; save one with model.save_pretrained(dir)"
        )
    adapted = load_peft_adapter(base, adapter_dir)
    if adapted.peft_config[adapted.active_adapter].is_prompt_learning:
        return base, {"prefix": adapted}
    return base, {"tuned_model": adapted}


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


def check_hf_dirs(
    model_dir: str | Path,
    adapter_dir: str | Path | None,
    tokens: Int[Tensor, "batch pos"],
    *,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    position_offset: int | None = None,
    tol_factor: float = 16.0,
) -> TheoremCheck:
    """:func:`check_hf` for a saved HF model directory and a saved PEFT adapter directory: what
    ``probe check-theorem --base HF_DIR --adapter ADAPTER_DIR`` runs."""
    base, kwargs = load_dirs(model_dir, adapter_dir, dtype, device)
    return check_hf(base, tokens, position_offset=position_offset, tol_factor=tol_factor, **kwargs)


@torch.no_grad()
def check_theorem_dirs(
    model_dir: str | Path,
    adapter_dir: str | Path | None,
    tokens: Int[Tensor, "batch pos"],
    *,
    prefix_len: int = 4,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    tol_factor: float = 16.0,
) -> HFCheck:
    """What ``probe check-theorem --base HF_DIR [--adapter ADAPTER_DIR]`` runs.

    Without an adapter, a random key/value prefix of ``prefix_len`` positions per layer, in the
    range of the model's own keys and values (:func:`probe.probes.random_prefix`), seeded.
    Returns an :class:`HFCheck`: the TheoremCheck, a phrase saying what was checked, the tuned
    run's records and which layers' heads are frozen.
    """
    from probe.probes import random_prefix

    base, kwargs = load_dirs(model_dir, adapter_dir, dtype, device)
    what = None
    if adapter_dir is None:
        plain = hf_records(base, tokens)
        stats = {f"blocks.{r.layer}.attn.hook_{n}": getattr(r, n) for r in plain for n in "kv"}
        g = torch.Generator().manual_seed(seed)
        kwargs["prefix"] = random_prefix(stats, len(plain), prefix_len, g)
        what = f"a random key/value prefix, P={prefix_len}"
    elif "tuned_model" in kwargs:
        tuned = kwargs["tuned_model"]
        what = (
            f"a PEFT {_peft_type(tuned)} adapter (merged into a copy)"
            if _is_peft(tuned)
            else "a fine-tuned model"
        )
    run = _check_hf(base, tokens, kwargs.get("prefix"), kwargs.get("tuned_model"), None, True,
                    tol_factor, True)  # fmt: skip
    return run._replace(what=what or run.what)


__all__ = [
    "HFCheck",
    "INSTALL_HINT",
    "SUPPORTED_ARCHITECTURES",
    "check_hf",
    "check_hf_dirs",
    "check_theorem_dirs",
    "frozen_head_layers_hf",
    "hf_prefix",
    "hf_records",
    "hf_records_from_dirs",
    "is_hf_model_dir",
    "is_peft_adapter_dir",
    "load_dirs",
    "load_hf_model",
    "load_peft_adapter",
    "MissingExtraError",
    "prompt_to_prefix",
    "require_hf",
    "run_bridge",
]
