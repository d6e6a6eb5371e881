"""A run setup (:class:`_Setup`) from what the caller passed, and recording runs with it.

:func:`_setup` interprets (base model, prefix, tuned model); :func:`_run` runs the tuned (or base)
model on a batch with recording and turns each layer's recorded tensors into an
:class:`~probe.probes.AttentionRecord` (:func:`_make_record`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from probe.config import KVPrefix
from probe.hf.arch import (
    _architecture,
    _dtype,
    _hf_model,
    _is_peft,
    _peft_cfg,
    _peft_type,
    _shape,
    base_module,
    head_params,
    per_query_head,
    rotate,
)
from probe.hf.loading import (
    PREFIX_PEFT_TYPES,
    PROMPT_PEFT_TYPES,
    _check_adapter_base,
    _check_prefix_config,
    is_peft_adapter_dir,
    load_peft_adapter,
    require_hf,
)
from probe.hf.prefix import _fresh_cache, hf_prefix
from probe.hf.recording import _recording, _Stop
from probe.probes import AttentionRecord
from probe.tuning import tuning_phrase


@dataclass
class _Setup:
    """How to run the tuned model and the base model on a batch of content tokens.

    base: the plain HF model whose weights (``base_layer`` of a LoRA layer) are the frozen head.
    runner: what is called: a PEFT model (prompt learning or weights) or a plain HF model.
    kind: "peft_prefix", "peft_prompt" (virtual tokens in front), "kv" (raw key/value prefix
        passed as the cache), "none".
    kv: the raw prefix for kind "kv", [batch or 1, P, G, e] per layer.
    base_off: a context in which ``base_runner`` runs the base model (adapters disabled).
    description: the phrase naming the tuning (:func:`probe.tuning.tuning_phrase`).
    """

    base: nn.Module
    runner: nn.Module
    kind: str
    P: int = 0
    kv: list[KVPrefix] | None = None
    base_runner: nn.Module | None = None
    base_off: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    frozen: list[bool] = field(default_factory=list)
    own_head: list[bool] = field(default_factory=list)  # per layer: see _own_head
    description: str = ""

    @property
    def tuned(self) -> nn.Module:
        return _hf_model(self.runner)


def _frozen_layers(base: nn.Module, tuned: nn.Module) -> list[bool]:
    """Per layer, whether ``tuned`` applies exactly ``base``'s head input side (norm, q/k/v and
    biases). Values are compared exactly; the dtypes must agree (checked before)."""
    arch = _architecture(base)
    out = []
    for bb, tb in zip(arch.layers(base), arch.layers(tuned), strict=True):
        try:
            mine = head_params([base_module(m) for m in arch.head_input(bb)])
            theirs = head_params(arch.head_input(tb))
        except TypeError:  # a PEFT layer whose change we cannot read: treat as changed
            out.append(False)
            continue
        out.append(
            len(mine) == len(theirs)
            and all(
                a.shape == b.shape and torch.equal(a, b) for a, b in zip(mine, theirs, strict=False)
            )
        )
    return out


def _check_pair(base: nn.Module, tuned: nn.Module) -> None:
    if type(base) is not type(tuned):
        raise ValueError(
            f"the base model is a {type(base).__name__} but the tuned model a "
            f"{type(tuned).__name__}; they must be the same architecture"
        )
    mine, theirs = _shape(base).__dict__, _shape(tuned).__dict__
    diff = [f"{k} {mine[k]} vs {theirs[k]}" for k in mine if mine[k] != theirs[k]]
    if diff:
        raise ValueError(
            f"the base and tuned models differ in shape ({', '.join(diff)}); "
            "tune and probe the same model"
        )
    db, dt = _dtype(base), _dtype(tuned)
    if db != dt:  # torch.equal across dtypes is always False, so nothing would be checked
        raise ValueError(
            f"the base model is {db} but the tuned/PEFT model {dt}; convert one (e.g. "
            f"model.to({dt})) so both run in one dtype"
        )


def _setup(base_model, prefix, tuned_model, batch: int) -> _Setup:
    """Interpret the caller's (base_model, prefix, tuned_model) as a :class:`_Setup`."""
    require_hf(peft=False)
    base_model, prefix, tuned_model = _resolved(base_model, prefix, tuned_model)
    if _is_peft(prefix):
        s = _peft_prefix_setup(base_model, prefix, tuned_model)
    else:
        s = _raw_setup(base_model, prefix, tuned_model, batch)
    # the base run: the base model itself, adapters switched off if they were injected into it
    s.base_runner = base_model
    if _is_peft(s.runner) and s.runner.get_base_model() is base_model:
        if not _peft_cfg(s.runner).is_prompt_learning:
            s.base_off = s.runner.disable_adapter
    s.frozen = _frozen_layers(base_model, s.tuned) if s.tuned is not base_model else None
    if s.frozen is None:
        s.frozen = [True] * _shape(base_model).n_layers
    s.own_head = _own_head(base_model, s.tuned)
    return s


def _resolved(base_model, prefix, tuned_model) -> tuple[nn.Module, Any, nn.Module | None]:
    """The caller's arguments with every adapter in its place: a prompt-learning PEFT model
    given as ``base_model`` or ``tuned_model`` moves to ``prefix``; a saved prefix adapter
    directory is loaded (onto the tuned model if any, else the base)."""
    if _is_peft(base_model):
        if _peft_cfg(base_model).is_prompt_learning and prefix is None and tuned_model is None:
            base_model, prefix = base_model.get_base_model(), base_model
        else:
            raise ValueError(
                f"base_model is a PEFT {_peft_type(base_model)} model; pass the plain HF base "
                "model as base_model and the adapted model as prefix= (prefix/prompt tuning) "
                "or tuned_model= (LoRA and other weight adapters)"
            )
    _architecture(base_model)
    if (
        tuned_model is not None
        and _is_peft(tuned_model)
        and _peft_cfg(tuned_model).is_prompt_learning
    ):
        if prefix is not None and prefix is not tuned_model:
            raise ValueError(
                "tuned_model is a prompt-learning PEFT model and prefix= is also given; pass the "
                "adapter once, as prefix="
            )
        prefix, tuned_model = tuned_model, None
    if isinstance(prefix, (str, Path)):
        if not is_peft_adapter_dir(prefix):
            raise FileNotFoundError(
                f"prefix={str(prefix)!r} is not a saved PEFT adapter directory (no "
                "adapter_config.json); save one with peft_model.save_pretrained(dir)"
            )
        kind = _check_adapter_base(Path(prefix), base_model).get("peft_type")
        if kind not in PREFIX_PEFT_TYPES + PROMPT_PEFT_TYPES:
            raise ValueError(
                f"{prefix} holds a {kind} adapter, not a prefix; load it with "
                "load_peft_adapter(model, dir) and pass it as tuned_model="
            )
        # a prompt-learning adapter leaves the model's modules alone: no copy needed
        prefix = load_peft_adapter(tuned_model if tuned_model is not None else base_model, prefix)
    return base_model, prefix, tuned_model


def _peft_prefix_setup(base_model: nn.Module, prefix: Any, tuned_model) -> _Setup:
    """A PEFT prefix/prompt-tuning model, run as it is (it runs its own base model)."""
    kind = _peft_type(prefix)
    if kind not in PREFIX_PEFT_TYPES + PROMPT_PEFT_TYPES:
        raise ValueError(
            f"prefix is a PEFT {kind} adapter; probe.hf takes prefix-tuning "
            f"{PREFIX_PEFT_TYPES} and prompt-tuning {PROMPT_PEFT_TYPES} adapters as prefix=. "
            "Pass a weight adapter (LoRA, ...) as tuned_model= instead"
        )
    if tuned_model is not None:
        raise ValueError(
            "a PEFT prefix adapter runs its own base model; pass tuned_model= "
            "only with a raw prefix"
        )
    _check_prefix_config(prefix, base_model, "prefix")
    _check_pair(base_model, prefix.get_base_model())
    P = _peft_cfg(prefix).num_virtual_tokens
    return _Setup(
        base_model,
        prefix,
        "peft_prefix" if kind in PREFIX_PEFT_TYPES else "peft_prompt",
        P=P,
        description=tuning_phrase(adapter=f"PEFT {kind}", adapter_len=P),
    )


def _raw_setup(base_model: nn.Module, prefix: Any, tuned_model, batch: int) -> _Setup:
    """No prefix or a raw one (passed as the cache), run by the tuned model if any, else by the
    base model."""
    runner = tuned_model if tuned_model is not None else base_model
    _check_pair(base_model, _hf_model(runner))
    kv = hf_prefix(_hf_model(runner), prefix, batch) if prefix is not None else None
    P = kv[0].length if kv else 0
    peft = _is_peft(runner)
    description = tuning_phrase(
        prefix_len=P if kv else None,
        adapter=f"PEFT {_peft_type(runner)}" if peft else None,
        fine_tuned=not peft and runner is not base_model,
    )
    return _Setup(base_model, runner, "kv" if kv else "none", P=P, kv=kv, description=description)


def _own_head(base: nn.Module, tuned: nn.Module) -> list[bool]:
    """Per layer, whether the tuned run's head input side (norm, q/k/v projections) *is* the
    base's: the same module objects, none wrapped by an adapter (prefix and prompt tuning, a raw
    prefix, weight adapters elsewhere). There the frozen head recomputed from the base weights
    is the same call on the same input as the run's own."""
    arch = _architecture(base)
    return [
        all(m is t and base_module(m) is m for m, t in zip(mine, theirs, strict=True))
        for mine, theirs in (
            (arch.head_input(bb), arch.head_input(tb))
            for bb, tb in zip(arch.layers(base), arch.layers(tuned), strict=True)
        )
    ]


def _check_tokens(model: nn.Module, tokens: Tensor, offset: int) -> None:
    s = _shape(model)
    if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.dtype.is_floating_point:
        got = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be an integer tensor [batch, pos]; got {got}")
    if offset + tokens.shape[1] > s.n_ctx:
        raise ValueError(
            f"positions {offset}..{offset + tokens.shape[1] - 1} exceed the model's "
            f"{s.n_ctx} positions; shorten the tokens or the prefix"
        )
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= s.vocab):
        raise ValueError(
            f"token ids must be in [0, vocab_size={s.vocab}); got range "
            f"[{int(tokens.min())}, {int(tokens.max())}]"
        )


def _offset(s: _Setup, position_offset: int | None) -> int:
    if s.kind.startswith("peft_"):
        if position_offset not in (None, s.P):
            raise ValueError(
                f"a PEFT {s.kind[5:]} adapter puts the content at positions P={s.P}..; "
                f"position_offset={position_offset} is only for raw prefixes and plain runs"
            )
        return s.P
    offset = s.P if position_offset is None else position_offset
    if offset < 0:
        raise ValueError(f"position_offset must be >= 0, got {offset}")
    return offset


def _prepared(base_model, prefix, tuned_model, tokens, position_offset):
    batch = tokens.shape[0] if isinstance(tokens, Tensor) and tokens.ndim == 2 else 1
    s = _setup(base_model, prefix, tuned_model, batch)
    offset = _offset(s, position_offset)
    _check_tokens(s.base, tokens, offset)
    return s, offset


def _forward(s: _Setup, tokens: Tensor, offset: int, rows: slice, keep: int, base: bool = False):
    """One forward of the tuned (or base) run on tokens[rows]; -> content logits [b, keep or T,
    vocab] (``keep=0``: every content position)."""
    t = tokens[rows]
    b, T = t.shape
    pos = torch.arange(offset, offset + T, device=t.device).expand(b, T)
    if base:
        with s.base_off():
            return s.base_runner(input_ids=t, position_ids=pos, logits_to_keep=keep).logits
    if s.kind.startswith("peft_"):  # PEFT chooses the positions and the cache itself
        logits = s.runner(input_ids=t, logits_to_keep=keep).logits
        return logits[:, s.P :] if s.kind == "peft_prompt" and not keep else logits
    cache = _fresh_cache(s.kv, rows) if s.kind == "kv" else None
    return s.runner(
        input_ids=t,
        position_ids=pos,
        past_key_values=cache,
        use_cache=cache is not None,
        logits_to_keep=keep,
    ).logits


def _make_record(
    s: _Setup, layer: int, r: dict, T: int, tuned_run: bool = True, recompute: int | None = None
) -> AttentionRecord:
    """The recorded tensors of one layer -> an AttentionRecord of the T content queries.

    r: the recording attention's tensors (:func:`~probe.hf.recording._recording_attention`).
    tuned_run: False for the base run, whose pattern alone is kept (:func:`_pattern_record`).
    recompute: on a layer whose head input side *is* the base's own modules (:func:`_own_head`:
    the same norm and q/k/v modules, no adapter wrapped around them, so recomputing the frozen
    head is the very call the run just made, on the very same input), the frozen head is
    recomputed from the base weights on the first ``recompute`` inputs only and the recorded
    q/k/v stand for it on the others (exact: same weights, same input). None: every input."""
    if not tuned_run:
        return _pattern_record(layer, r, T)
    arch = _architecture(s.base)
    shape = _shape(s.base)
    groups = shape.n_heads // shape.n_kv_heads
    q, key, value = r["q"], r["k"], r["v"]
    S = q.shape[2] - T  # leading virtual-token queries (prompt tuning)
    P = key.shape[2] - T

    def ours(t):  # [b, G, K, e] -> [b, K, H, e], one k/v per query head
        return per_query_head(t.transpose(1, 2), groups, 2)

    k_all, v_all = ours(key), ours(value)
    rec = dict(
        q=q[:, :, S:].transpose(1, 2),
        k=k_all[:, P:],
        v=v_all[:, P:],
        prefix_k=k_all[:, :P] if P else None,
        prefix_v=v_all[:, :P] if P else None,
        pattern=r["pattern"][:, :, S:],
        z=r["z"][:, S:],
        layer=layer,
    )
    b = q.shape[0]
    n = b if recompute is None or not s.own_head[layer] else min(recompute, b)
    own = (rec["q"], rec["k"], rec["v"])
    frozen_qkv = _frozen_qkv(s, layer, r, S, n) if n else own
    if 0 < n < b:  # the recorded rows stand for the frozen head on the other inputs
        frozen_qkv = tuple(torch.cat([f, o[n:]]) for f, o in zip(frozen_qkv, own, strict=True))
    base_attn = arch.attn(arch.layers(s.base)[layer])
    tuned_attn = arch.attn(arch.layers(s.tuned)[layer])
    return AttentionRecord(
        **rec,
        q_frozen=frozen_qkv[0],
        k_frozen=frozen_qkv[1],
        v_frozen=frozen_qkv[2],
        W_O=arch.W_O(tuned_attn, shape, False).detach(),
        W_O_frozen=arch.W_O(base_attn, shape, True).detach(),
    )


def _frozen_qkv(s: _Setup, layer: int, r: dict, S: int, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """The frozen head's q, k, v [n, T, H, e] on the first ``n`` inputs: the base weights applied
    to the recorded attention input from query ``S`` on, rotated with the recorded cos/sin on
    rotary models, k and v one per query head."""
    arch = _architecture(s.base)
    shape = _shape(s.base)
    groups = shape.n_heads // shape.n_kv_heads
    x = r["x"][:n, S:].contiguous()
    q_f, k_f, v_f = arch.qkv(arch.attn(arch.layers(s.base)[layer]), x, shape)
    if arch.rotary:
        cos, sin = (c[:n, S:] for c in r["pos"])
        q_f, k_f = rotate(q_f, cos, sin), rotate(k_f, cos, sin)
    k_f, v_f = per_query_head(k_f, groups, 2), per_query_head(v_f, groups, 2)
    return q_f, k_f, v_f


def _pattern_record(layer: int, r: dict, T: int) -> AttentionRecord:
    """The base run's record: only its pattern [b, H, T, P + T] is used (downstream drift), so
    every other tensor is empty (a last dimension of 0)."""
    q, w = r["q"], r["pattern"]
    S = q.shape[2] - T  # leading virtual-token queries (prompt tuning)
    P = r["k"].shape[2] - T
    empty = q.new_empty(q.shape[0], T, q.shape[1], 0)
    none = q.new_empty(q.shape[0], P, q.shape[1], 0) if P else None
    return AttentionRecord(
        q=empty,
        k=empty,
        v=empty,
        prefix_k=none,
        prefix_v=none,
        pattern=w[:, :, S:],
        z=empty,
        q_frozen=empty,
        k_frozen=empty,
        v_frozen=empty,
        W_O=empty[0, 0],
        layer=layer,
    )


def _run(
    s: _Setup,
    tokens: Tensor,
    offset: int,
    rows: slice,
    on_record,
    keep: int = 1,
    base: bool = False,
    recompute: int | None = None,
    stop: bool = False,
    mode_held: bool = False,
) -> Tensor | None:
    """Run tokens[rows] with recording; ``on_record(record)`` per layer, in layer order (None:
    no records, only the logits). ``stop``: end the forward once the last layer's attention is
    recorded (the last MLP, the final norm and the logits are not computed; returns None)."""
    T = tokens.shape[1]
    last = _shape(s.base).n_layers - 1

    def on_layer(layer, r):
        if on_record is not None:
            on_record(_make_record(s, layer, r, T, tuned_run=not base, recompute=recompute))
        if stop and layer == last:
            raise _Stop

    with _recording(s.base_runner if base else s.runner, on_layer, mode_held):
        try:
            return _forward(s, tokens, offset, rows, keep, base)
        except _Stop:
            return None
