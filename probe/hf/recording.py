"""The recording attention: what each layer's attention receives, kept as the model runs.

For the duration of a run the model's attention implementation is switched to
:func:`_recording_attention` (registered with transformers' ``AttentionInterface``), which computes
eager attention from exactly what the model's attention receives and hands q, k, v, the pattern
and z to the run's :class:`_Recorder`; a forward pre-hook per attention module adds its input (the
norm's output) and rotary cos/sin.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from probe.config import eval_mode
from probe.hf.arch import _architecture, _hf_model, per_query_head
from probe.hf.loading import require_hf

_ATTN_NAME = "prefix_probe_record"  # our entry in transformers' AttentionInterface


class _Recorder:
    """Per-run state: what each layer's attention saw. ``on_layer(layer, rec)`` is called as soon
    as a layer's attention ran, with ``rec`` a dict of its tensors (:func:`_recording_attention`);
    it keeps what it needs, so a run holds one layer's tensors at a time."""

    def __init__(self, on_layer: Callable[[int, dict], None]):
        self.on_layer = on_layer
        self.inputs: dict[int, tuple[Tensor, Any]] = {}  # layer -> (x, position_embeddings)
        self.seen: set[int] = set()

    @staticmethod
    def current() -> _Recorder | None:
        """The recorder of the run in progress on this thread (:func:`_check_hf` runs the base
        model on a second thread while the tuned one runs on the first)."""
        return getattr(_THREAD, "recorder", None)


_THREAD = threading.local()


def _recording_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
):
    """Eager attention that records. query [b, H, Tq, e] (rotated), key/value [b, G, K, e] with the
    cache (PEFT's prefix) prepended, attention_mask additive [b, 1, Tq, K] (HF's eager mask).
    Returns (z [b, Tq, H, e], pattern [b, H, Tq, K]) as every HF attention function does."""
    rec = _Recorder.current()
    if rec is None:
        raise RuntimeError("probe.hf's recording attention ran outside a recording run")
    window = kwargs.get("sliding_window")
    if window is not None and key.shape[2] > window:
        raise ValueError(
            f"sliding-window attention (window {window}) hides part of the prefix/content from "
            f"{key.shape[2]} keys; the theorem needs full attention: shorten the input or set "
            "config.sliding_window = None"
        )
    groups = query.shape[1] // key.shape[1]
    k, v = per_query_head(key, groups, 1), per_query_head(value, groups, 1)
    s = (query @ k.transpose(-1, -2)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    Tq, K = s.shape[-2:]
    causal = torch.ones(Tq, K, dtype=torch.bool, device=s.device).tril(K - Tq)
    s = s.masked_fill(~causal, float("-inf"))  # bottom-right causal: the cache is all visible
    if attention_mask is not None:
        m = attention_mask[..., :K]
        s = s.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else s + m
    half = query.dtype in (torch.float16, torch.bfloat16)  # softmax in float32 there, as HF does
    w = s.softmax(-1, dtype=torch.float32 if half else None).to(query.dtype)
    z = (w @ v).transpose(1, 2).contiguous()
    rec.seen.add(module.layer_idx)
    x, pos = rec.inputs.pop(module.layer_idx, (None, None))
    rec.on_layer(module.layer_idx, dict(q=query, k=key, v=value, pattern=w, z=z, x=x, pos=pos))
    return z, w


def _pre_hook(layer: int):
    def hook(module, args, kwargs):
        rec = _Recorder.current()
        if rec is None:
            return
        x = args[0] if args else kwargs["hidden_states"]
        rec.inputs[layer] = (x, kwargs.get("position_embeddings"))
        cache = kwargs.get("past_key_values", kwargs.get("layer_past"))
        if cache is not None and layer < len(getattr(cache, "layers", ())):
            _stop_growing(cache.layers[layer])

    return hook


def _stop_growing(cache_layer: Any) -> None:
    """Make a DynamicCache layer return [cached, new] keys and values without storing them. A
    recording run's cache (the prefix, PEFT's or ours, or the empty one the model makes) is not
    read after the forward, but a growing one keeps every layer's keys and values for the whole
    batch alive until the forward ends (2 x layers x batch x positions x d_model values)."""
    from transformers.cache_utils import DynamicLayer

    global _PrefixOnlyLayer
    if _PrefixOnlyLayer is None:

        class _PrefixOnly(DynamicLayer):
            def update(self, key_states, value_states, *args, **kwargs):
                if not self.is_initialized or self.keys.numel() == 0:
                    return key_states, value_states
                keys = torch.cat([self.keys, key_states], dim=-2)
                return keys, torch.cat([self.values, value_states], dim=-2)

        _PrefixOnlyLayer = _PrefixOnly
    if type(cache_layer) is DynamicLayer:
        cache_layer.__class__ = _PrefixOnlyLayer


_PrefixOnlyLayer: type | None = None


def _register() -> None:
    """Register :func:`_recording_attention` with transformers (once): as attention function
    ``_ATTN_NAME``, with HF's own additive eager mask."""
    require_hf(peft=False)
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

    if _ATTN_NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(_ATTN_NAME, _recording_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(_ATTN_NAME, eager_mask)


@contextlib.contextmanager
def _record_mode(models: Sequence[nn.Module]) -> Iterator[None]:
    """Within the block, ``models`` (PEFT or HF models) run in eval mode with the recording
    attention and the input pre-hooks; everything is restored on exit. A forward records into
    its thread's :class:`_Recorder` (:func:`_recording`)."""
    _register()
    hf_models = list({id(h): h for h in map(_hf_model, models)}.values())
    impls = [(h.config, h.config._attn_implementation) for h in hf_models]
    handles = []
    try:
        for h in hf_models:
            arch = _architecture(h)
            handles += [
                arch.attn(b).register_forward_pre_hook(_pre_hook(i), with_kwargs=True)
                for i, b in enumerate(arch.layers(h))
            ]
            h.config._attn_implementation = _ATTN_NAME
        with eval_mode(*models):
            yield
    finally:
        for cfg, impl in impls:
            cfg._attn_implementation = impl
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _recording(
    model: nn.Module, on_layer: Callable[[int, dict], None], mode_held: bool = False
) -> Iterator[_Recorder]:
    """Within the block, a forward of ``model`` (a PEFT or HF model) on this thread records into
    a new :class:`_Recorder` (``on_layer`` per layer). ``mode_held``: the caller already holds
    :func:`_record_mode` for ``model``; else it is entered (and left) here."""
    hf_model = _hf_model(model)
    n_layers = len(_architecture(hf_model).layers(hf_model))
    rec = _Recorder(on_layer)
    prev, _THREAD.recorder = _Recorder.current(), rec
    try:
        with contextlib.nullcontext() if mode_held else _record_mode([model]):
            yield rec
    finally:
        _THREAD.recorder = prev
    if rec.seen and len(rec.seen) != n_layers:
        raise RuntimeError(
            f"the recording attention ran at layers {sorted(rec.seen)} of {n_layers}; this "
            f"{type(hf_model).__name__} does not route every layer through AttentionInterface"
        )


class _Stop(Exception):
    """Raised after the last layer's attention was recorded when nothing after it is needed."""
