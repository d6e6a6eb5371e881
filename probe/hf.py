"""Probe real Hugging Face causal LMs, with PEFT adapters, exactly and at the model's memory.

The same per-layer records (:class:`~probe.probes.AttentionRecord`) our own model produces,
recorded from an HF model run with a prefix, so every probe (decomposition, local and downstream
drift, bias subspace) applies unchanged::

    from probe.hf import hf_records, check_hf
    records = hf_records(base, tokens, prefix=peft_model)        # one record per layer
    report = check_hf(base, tokens, prefix="path/to/adapter")    # the theorem's checks

Architectures (:data:`SUPPORTED_ARCHITECTURES`): GPT-2 family; the Llama family (Llama, Qwen2,
Mistral: rotary positions, grouped-query attention, with or without q/k/v biases); GPT-NeoX
(Pythia: partial rotary, parallel attention). One code path serves all of them.

Route. The model that runs is the PEFT model itself (or the plain HF model), its own modules,
unchanged and uncopied: for the duration of a run its attention implementation is switched to a
recording function registered with transformers' ``AttentionInterface``. That function receives
exactly what the model's attention receives -- rotated queries, the keys and values *after* the
cache was prepended (PEFT's prefix, read from its cache), the mask, the scale -- computes eager
attention from them and keeps q, k, v, the pattern and z. A forward pre-hook on each attention
module keeps its input (the norm's output) and its rotary cos/sin, from which the *frozen* head
is recomputed with the base weights (a LoRA layer's ``base_layer``) and our own rotation. This is
smaller, faster and more exact than TransformerLens's bridge (which needed a deep copy per run
and a bridge build, 76% of the old run time, and re-ran the model to check itself): the model and
its positions are PEFT's own, and :func:`verify_hf` compares the content logits with the PEFT
model's own forward (its default attention) and a few greedy ``generate`` steps with
``generate``.

A prefix can be given as a PEFT prefix-tuning, prompt-tuning or p-tuning model, a saved adapter
directory of one of those kinds, a raw per-layer key/value prefix (:class:`~probe.model.KVPrefix`
or ``(keys, values)`` in our layout ``[P, kv_head, d_head]`` / ``[batch, P, kv_head, d_head]``),
a transformers ``Cache`` ([batch, kv_head, P, d_head]), or a soft prompt [P, d_model]. Weight
adapters (LoRA, ...) and fine-tuned copies are given as ``tuned_model=``.

Positions. HF and PEFT put the content at positions P..P+T-1:

- prefix tuning: the P cached keys are used as they are, never rotated (PEFT stores them after
  the point where the model rotates its own keys). On a rotary model a prefix key therefore
  scores like a key at position 0: q_m . k_p depends on the query's position m. On GPT-2,
  positions only enter through the input embedding, so the prefix keys carry none;
- prompt tuning: the virtual tokens sit at positions 0..P-1 (rotated / position-embedded there);
- a raw key/value prefix is used as given (not rotated), content at ``position_offset`` (P).

Grouped-query attention: records have one k/v per *query* head (the heads of a group share the
same keys and values); ``prefix_k/prefix_v`` likewise.

TransformerLens hook names: :func:`hf_cache` returns the recorded tensors under
``blocks.{l}.ln1.hook_out``, ``blocks.{l}.attn.hook_q`` (``hook_rot_q`` on rotary models: the
rotated query, as TransformerLens names it), ``hook_k``/``hook_rot_k``, ``hook_v``,
``hook_pattern``, ``hook_z``, ``hook_prefix_k``, ``hook_prefix_v``.

Needs the optional extra: ``pip install 'prefix-probe[hf]'``. Importing this module is cheap and
safe without it; the entry points raise :class:`MissingExtraError` saying what to install.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import importlib
import json
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from probe.config import KVPrefix
from probe.hf_arch import ARCHITECTURES, Arch, Shape, base_module, head_params, rotate

if TYPE_CHECKING:
    from probe.probes import AttentionRecord, Drift, TheoremCheck

INSTALL_HINT = "pip install 'prefix-probe[hf]'"
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)

# Prompt-learning PEFT methods we can turn into a per-layer key/value prefix.
PREFIX_PEFT_TYPES = ("PREFIX_TUNING",)
PROMPT_PEFT_TYPES = ("PROMPT_TUNING", "P_TUNING")

_ATTN_NAME = "prefix_probe_record"  # our entry in transformers' AttentionInterface

# `probe check-theorem --base HF_DIR`'s default number of inputs (our own models: 256). The
# check's cost is two forwards per input, and 128 inputs already overdetermine what it
# estimates: per head and layer the bias subspace stacks N = 128 x T rows (2,432 for the
# 19-token sort_asc inputs) against 3 d_head columns (192 on GPT-2 small), its ranks are at most
# P and d_head, and every identity error and drift maximum is taken over those N query rows.
# At 256, the GPT-2-small check took 27 s at load 3.3 on 2 cores; at 128, 18 s.
CHECK_INPUTS = 128


class MissingExtraError(ImportError):
    """The optional ``hf`` extra (peft, transformers) is not installed."""


def require_hf(peft: bool = True) -> SimpleNamespace:
    """Import the optional HF stack lazily; raise :class:`MissingExtraError` naming the fix.

    Returns a namespace with ``transformers`` and (``peft=True``) ``peft``; registers the
    recording attention. Paths without an adapter pass ``peft=False``: importing peft costs
    ~0.15 s of a check's start-up that they do not use.
    """
    try:
        import transformers
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

        peft_module = importlib.import_module("peft") if peft else None
    except ImportError as e:
        raise MissingExtraError(
            f"probing Hugging Face models needs the optional packages peft and transformers "
            f"(import failed: {e}); install them with: {INSTALL_HINT}"
        ) from e
    if _ATTN_NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(_ATTN_NAME, _recording_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(_ATTN_NAME, eager_mask)  # HF's own additive mask
    return SimpleNamespace(transformers=transformers, peft=peft_module)


# ------------------------------------------------------------------------------------------
# Architectures
# ------------------------------------------------------------------------------------------


def _architecture(model: nn.Module) -> Arch:
    """The model's :class:`~probe.hf_arch.Arch`; one-line errors for what the probes cannot take."""
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


def _hf_model(model: nn.Module) -> nn.Module:
    """The HF CausalLM inside a PEFT model (or the model itself)."""
    return model.get_base_model() if _is_peft(model) else model


# ------------------------------------------------------------------------------------------
# The recording attention function
# ------------------------------------------------------------------------------------------


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
    k = key.repeat_interleave(groups, dim=1) if groups > 1 else key
    v = value.repeat_interleave(groups, dim=1) if groups > 1 else value
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
    batch alive until the forward ends (GPT-2 small, 64 inputs of 19 tokens: ~100 MiB a run)."""
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


@contextlib.contextmanager
def _record_mode(models: Sequence[nn.Module]) -> Iterator[None]:
    """Within the block, ``models`` (PEFT or HF models) run in eval mode with the recording
    attention and the input pre-hooks; everything is restored on exit. A forward records into
    its thread's :class:`_Recorder` (:func:`_recording`)."""
    require_hf(peft=False)
    training = [(m, m.training) for m in models]
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
        for m in models:
            m.eval()
        yield
    finally:
        for cfg, impl in impls:
            cfg._attn_implementation = impl
        for m, was_training in reversed(training):
            m.train(was_training)
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _recording(
    model: nn.Module, on_layer: Callable[[int, dict], None], moded: bool = False
) -> Iterator[_Recorder]:
    """Within the block, a forward of ``model`` (a PEFT or HF model) on this thread records into
    a new :class:`_Recorder` (``on_layer`` per layer). ``moded``: the caller already holds
    :func:`_record_mode` for ``model``; else it is entered (and left) here."""
    hf_model = _hf_model(model)
    n_layers = len(_architecture(hf_model).layers(hf_model))
    rec = _Recorder(on_layer)
    prev, _THREAD.recorder = _Recorder.current(), rec
    try:
        with contextlib.nullcontext() if moded else _record_mode([model]):
            yield rec
    finally:
        _THREAD.recorder = prev
    if rec.seen and len(rec.seen) != n_layers:
        raise RuntimeError(
            f"the recording attention ran at layers {sorted(rec.seen)} of {n_layers}; this "
            f"{type(hf_model).__name__} does not route every layer through AttentionInterface"
        )


# ------------------------------------------------------------------------------------------
# Resolving what the caller passed into a run setup
# ------------------------------------------------------------------------------------------


def _is_peft(obj: Any) -> bool:
    return type(obj).__module__.startswith("peft.") and hasattr(obj, "peft_config")


def _peft_cfg(pm: Any):
    return pm.peft_config[pm.active_adapter]


def _peft_type(pm: Any) -> str:
    cfg = _peft_cfg(pm)
    return str(getattr(cfg.peft_type, "value", cfg.peft_type))


def is_peft_adapter_dir(path: str | Path) -> bool:
    """True if ``path`` is a directory holding a saved PEFT adapter: an ``adapter_config.json``
    with PEFT's ``peft_type``. Our own adapters use the same file name but have a ``format``
    field and no ``peft_type``, so the two never get confused. Needs no optional package."""
    try:
        meta = json.loads((Path(path) / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and "peft_type" in meta and "format" not in meta


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


@dataclass
class _Setup:
    """How to run the tuned model and the base model on a batch of content tokens.

    base: the plain HF model whose weights (``base_layer`` of a LoRA layer) are the frozen head.
    runner: what is called: a PEFT model (prompt learning or weights) or a plain HF model.
    kind: "peft_prefix", "peft_prompt" (virtual tokens in front), "kv" (raw key/value prefix
        passed as the cache), "none".
    kv: the raw prefix for kind "kv", [batch or 1, P, G, e] per layer.
    base_off: a context in which ``base_runner`` runs the base model (adapters disabled).
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
    what: str = ""

    @property
    def tuned(self) -> nn.Module:
        return _hf_model(self.runner)


def _check_prefix_config(pm: Any, base: nn.Module, where: str) -> None:
    """D1: a PEFT prefix adapter (a PeftModel, or its saved config as a namespace) made for
    another model shape, named in one line."""
    cfg, s = (_peft_cfg(pm), _shape(base)) if _is_peft(pm) else (pm, _shape(base))
    kind = str(getattr(cfg.peft_type, "value", cfg.peft_type))
    if kind not in PREFIX_PEFT_TYPES + PROMPT_PEFT_TYPES:
        return
    if kind in PREFIX_PEFT_TYPES:
        want = {
            "num_layers": s.n_layers,
            "token_dim": s.n_kv_heads * s.d_head,
            "num_attention_heads": s.n_kv_heads,
        }
    else:
        want = {"token_dim": s.d_model}
    bad = [
        f"{k}={getattr(cfg, k)} (the model needs {v})"
        for k, v in want.items()
        if getattr(cfg, k, v) != v
    ]
    if bad:
        raise ValueError(
            f"{where}: this {kind} adapter was made for another model shape: "
            f"{', '.join(bad)}; use an adapter trained on this base model"
        )


def _check_adapter_base(adapter_dir: Path, base: nn.Module) -> dict:
    """Read adapter_config.json; the architecture mismatch check (a Llama adapter on GPT-2)."""
    try:
        meta = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{adapter_dir}/adapter_config.json is unreadable ({e})") from None
    recorded = meta.get("base_model_name_or_path") or ""
    cfg_path = Path(recorded) / "config.json" if recorded else None
    if cfg_path is not None and cfg_path.is_file():
        try:
            theirs = json.loads(cfg_path.read_text()).get("model_type")
        except (OSError, ValueError):
            theirs = None
        mine = base.config.model_type
        if theirs and theirs != mine:
            raise ValueError(
                f"{adapter_dir} was made for a {theirs} model ({recorded}) but the base model is "
                f"{mine}; load the adapter onto the model it was trained on"
            )
    return meta


def load_peft_adapter(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Load a saved PEFT adapter onto ``model`` and return the PeftModel (in eval mode).

    Prompt-learning adapters leave ``model``'s modules as they are; weight adapters (LoRA) wrap
    them in place (no copy of the model: call ``.unload()`` on the result to restore them).
    Mismatches (another architecture or width, missing weights) raise one-line ValueErrors."""
    hf = require_hf()
    adapter_dir = Path(adapter_dir)
    if not is_peft_adapter_dir(adapter_dir):
        raise FileNotFoundError(
            f"{adapter_dir} is not a saved PEFT adapter directory (no adapter_config.json); "
            "save one with peft_model.save_pretrained(dir)"
        )
    meta = _check_adapter_base(adapter_dir, model)
    _check_prefix_config(SimpleNamespace(**meta), model, str(adapter_dir))
    try:
        with warnings.catch_warnings():  # PEFT calls an API transformers deprecates; not ours
            warnings.filterwarnings("ignore", ".*is_gradient_checkpointing", FutureWarning)
            pm = hf.peft.PeftModel.from_pretrained(model, str(adapter_dir))
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        _unwrap_lora(model)
        first = next((ln.strip() for ln in str(e).splitlines() if "mismatch" in ln), None)
        first = first or str(e).strip().splitlines()[0]
        raise ValueError(
            f"{adapter_dir} does not fit the base model {type(model).__name__} "
            f"(d_model={_shape(model).d_model}): {first.rstrip('.')}; use an adapter trained on "
            "this base model"
        ) from None
    _check_prefix_config(pm, model, str(adapter_dir))
    return pm.eval()


def _unwrap_lora(model: nn.Module) -> None:
    """Undo a failed in-place injection: put every tuner layer's base_layer back."""
    for name, mod in list(model.named_modules()):
        if hasattr(mod, "base_layer") and name:
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], mod.base_layer)


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
    if db != dt:  # D5: torch.equal across dtypes is always False, so nothing would be checked
        raise ValueError(
            f"the base model is {db} but the tuned/PEFT model {dt}; convert one (e.g. "
            f"model.to({dt})) so both run in one dtype"
        )


def _setup(base_model, prefix, tuned_model, batch: int) -> _Setup:
    """Interpret the caller's (base_model, prefix, tuned_model) as a :class:`_Setup`."""
    require_hf(peft=False)
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
    if _is_peft(prefix):
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
        s = _Setup(
            base_model,
            prefix,
            "peft_prefix" if kind in PREFIX_PEFT_TYPES else "peft_prompt",
            P=P,
            what=f"a PEFT {kind} adapter, P={P}",
        )
    else:
        runner = tuned_model if tuned_model is not None else base_model
        _check_pair(base_model, _hf_model(runner))
        kv = hf_prefix(_hf_model(runner), prefix, batch) if prefix is not None else None
        s = _Setup(base_model, runner, "kv" if kv else "none", P=kv[0].length if kv else 0, kv=kv)
        if kv:
            s.what = f"a key/value prefix, P={s.P}"
        if _is_peft(runner):
            s.what = " and ".join(filter(None, [s.what, f"a PEFT {_peft_type(runner)} adapter"]))
        elif runner is not base_model:
            s.what = " and ".join(filter(None, [s.what, "a fine-tuned model"]))
        s.what = s.what or "the base model alone"
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


# ------------------------------------------------------------------------------------------
# Raw prefix forms -> per-layer KVPrefix [batch, P, G, e]
# ------------------------------------------------------------------------------------------


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
    hf = require_hf(peft=False)
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
    was_training = model.training
    model.eval()
    try:
        out = model(
            inputs_embeds=prompt.to(param),
            position_ids=torch.arange(P, device=param.device).expand(prompt.shape[0], P),
            past_key_values=hf.transformers.DynamicCache(),
            use_cache=True,
            logits_to_keep=1,
        )
    finally:
        model.train(was_training)
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
        was_training = prefix.training
        prefix.eval()  # no dropout in the prompt encoder
        try:
            prompt = prefix.get_prompt(batch)
        finally:
            prefix.train(was_training)
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


# ------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------


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
    s: _Setup, layer: int, r: dict, T: int, frozen: bool = True, recompute: int | None = None
) -> AttentionRecord:
    """The recorded tensors of one layer -> an AttentionRecord of the T content queries.

    recompute: on a layer whose head input side *is* the base's own modules (:func:`_own_head`:
    the same norm and q/k/v modules, no adapter wrapped around them, so recomputing the frozen
    head is the very call the run just made, on the very same input), the frozen head is
    recomputed from the base weights on the first ``recompute`` inputs only and the recorded
    q/k/v stand for it on the others (exact: same weights, same input). None: every input."""
    from probe.probes import AttentionRecord

    arch = _architecture(s.base)
    shape = _shape(s.base)
    groups = shape.n_heads // shape.n_kv_heads
    q, key, value, w, z = r["q"], r["k"], r["v"], r["pattern"], r["z"]
    S = q.shape[2] - T  # leading virtual-token queries (prompt tuning)
    K = key.shape[2]
    P = K - T
    if not frozen:  # the base run: only its pattern is used (downstream drift)
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

    def ours(t):  # [b, G, K, e] -> [b, K, H, e], one k/v per query head
        t = t.transpose(1, 2)
        return t.repeat_interleave(groups, dim=2) if groups > 1 else t

    k_all, v_all = ours(key), ours(value)
    rec = dict(
        q=q[:, :, S:].transpose(1, 2),
        k=k_all[:, P:],
        v=v_all[:, P:],
        prefix_k=k_all[:, :P] if P else None,
        prefix_v=v_all[:, :P] if P else None,
        pattern=w[:, :, S:],
        z=z[:, S:],
        layer=layer,
    )
    b = q.shape[0]
    n = b if recompute is None or not s.own_head[layer] else min(recompute, b)
    base_attn = arch.attn(arch.layers(s.base)[layer])
    frozen_qkv = None
    if n:
        x = r["x"][:n, S:].contiguous()
        q_f, k_f, v_f = arch.qkv(base_attn, x, shape)
        if arch.rotary:
            cos, sin = (c[:n, S:] for c in r["pos"])
            q_f, k_f = rotate(q_f, cos, sin), rotate(k_f, cos, sin)
        if groups > 1:
            k_f, v_f = (t.repeat_interleave(groups, dim=2) for t in (k_f, v_f))
        frozen_qkv = (q_f, k_f, v_f)
    if n < b:  # the recorded rows stand for the frozen head on the other inputs
        own = (rec["q"], rec["k"], rec["v"])
        frozen_qkv = (
            own
            if not n
            else tuple(torch.cat([f, o[n:]]) for f, o in zip(frozen_qkv, own, strict=True))
        )
    tuned_attn = arch.attn(arch.layers(s.tuned)[layer])
    return AttentionRecord(
        **rec,
        q_frozen=frozen_qkv[0],
        k_frozen=frozen_qkv[1],
        v_frozen=frozen_qkv[2],
        W_O=arch.W_O(tuned_attn, shape, False).detach(),
        W_O_frozen=arch.W_O(base_attn, shape, True).detach(),
    )


class _Stop(Exception):
    """Raised after the last layer's attention was recorded when nothing after it is needed."""


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
    moded: bool = False,
) -> Tensor | None:
    """Run tokens[rows] with recording; ``on_record(record)`` per layer, in layer order (None:
    no records, only the logits). ``stop``: end the forward once the last layer's attention is
    recorded (the last MLP, the final norm and the logits are not computed; returns None)."""
    T = tokens.shape[1]
    last = _shape(s.base).n_layers - 1

    def on_layer(layer, r):
        if on_record is not None:
            on_record(_make_record(s, layer, r, T, frozen=not base, recompute=recompute))
        if stop and layer == last:
            raise _Stop

    with _recording(s.base_runner if base else s.runner, on_layer, moded):
        try:
            return _forward(s, tokens, offset, rows, keep, base)
        except _Stop:
            return None


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
        verify_hf(s, tokens, offset)
    records: list[AttentionRecord] = []
    _run(s, tokens, offset, slice(None), records.append)
    return records


def _prepared(base_model, prefix, tuned_model, tokens, position_offset):
    batch = tokens.shape[0] if isinstance(tokens, Tensor) and tokens.ndim == 2 else 1
    s = _setup(base_model, prefix, tuned_model, batch)
    offset = _offset(s, position_offset)
    _check_tokens(s.base, tokens, offset)
    return s, offset


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


@torch.no_grad()
def verify_hf(s: _Setup, tokens: Tensor, offset: int, rows: int = 2, steps: int = 3) -> float:
    """Check the recording run against the real thing; -> the max content-logit difference.

    On the first ``rows`` inputs the recording run's content logits must equal the runner's own
    forward (its configured attention, e.g. sdpa; a PEFT model's own positions and cache) to
    ``100 eps (1 + max|logit|)``; for a PEFT or plain runner, ``steps`` greedy steps from the
    first input must match ``generate`` token for token. Raises RuntimeError otherwise.
    """
    sub = slice(0, min(rows, tokens.shape[0]))
    ours = _run(s, tokens, offset, sub, None, keep=0)
    was_training = s.runner.training
    s.runner.eval()
    try:
        ref = _forward(s, tokens, offset, sub, 0)
    finally:
        s.runner.train(was_training)
    err = (ours - ref).abs().max().item()
    tol = 100 * torch.finfo(ref.dtype).eps * (1.0 + ref.abs().max().item())
    if not err <= tol:
        raise RuntimeError(
            f"the recording run does not reproduce {type(s.tuned).__name__}'s own forward (max "
            f"content-logit difference {err:.3g} > {tol:.3g}); something in this config is not "
            "supported"
        )
    if s.kind == "kv" or (s.kind == "none" and offset != 0) or steps <= 0:
        return err  # generate cannot take a raw prefix or shifted positions
    seq = tokens[:1]
    for _ in range(steps):
        nxt = _run(s, seq, offset, slice(None), None, keep=1)[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gen = s.runner.generate(  # the mask given: inferred from pad_token_id, it would hide
            input_ids=tokens[:1],  # every content token that happens to be 0
            attention_mask=torch.ones_like(tokens[:1]),
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
        )
    new_gen, new_ours = gen[0, tokens.shape[1] :], seq[0, tokens.shape[1] :]
    if not torch.equal(new_gen, new_ours[: len(new_gen)]):
        raise RuntimeError(
            f"greedy steps through the recording run ({new_ours.tolist()}) differ from "
            f"{type(s.runner).__name__}.generate ({new_gen.tolist()}): the positions or the "
            "prefix are not the model's own"
        )
    return err


# ------------------------------------------------------------------------------------------
# The theorem check, in chunks, at the model's memory
# ------------------------------------------------------------------------------------------


class _LayerAcc:
    """One layer's probe results accumulated over chunks of the batch.

    The bias subspace needs the singular values of matrices stacked over every row N =
    batch x T. All four of them (z W_O, z_base W_O_f, U, D; see probes.BiasSubspace) are G @ C
    for G = [z | z_base | (1 - alpha) z_base] [N, 3e] per head and a fixed C [3e, d]; with
    G = Q R (R [3e, 3e], updated chunk by chunk by a QR of [R; G_chunk]) their singular values
    are those of R @ C. Exact, [3e, 3e] of memory per head, one small SVD per matrix."""

    def __init__(self):
        self.n = 0
        self.R: Tensor | None = None
        self.alpha, self.beta, self.local, self.down = [], [], [], []
        self.p_err = self.z_err = self.a_err = None
        self.p_tol = self.z_tol = 0.0
        self.P = 0
        self.W = None

    def add(self, rec: AttentionRecord, base_rec: AttentionRecord | None, factor: float):
        from probe import probes

        d = probes.decompose(_without_bias_out(rec))
        pt, zt = probes.tolerances(rec, factor)
        self.p_tol, self.z_tol, self.P = max(self.p_tol, pt), max(self.z_tol, zt), rec.P
        mx = torch.maximum
        self.p_err = d.pattern_error if self.p_err is None else mx(self.p_err, d.pattern_error)
        self.z_err = d.z_error if self.z_err is None else mx(self.z_err, d.z_error)
        self.a_err = d.alpha_error if self.a_err is None else mx(self.a_err, d.alpha_error)
        self.alpha.append(d.alpha.transpose(0, 1).flatten(1))  # [H, b T]
        self.beta.append(d.beta.transpose(0, 1).flatten(1, 2))  # [H, b T, P]
        N = rec.q.shape[0] * rec.q.shape[1]
        self.local.append((probes.local_drift(rec), N))
        if base_rec is not None:
            self.down.append((probes.downstream_drift(rec, base_rec), N))
        keep = (1 - d.alpha).permute(1, 0, 2)[..., None]  # [H, b, T, 1]
        z, zb = (t.permute(2, 0, 1, 3) for t in (rec.z, d.z_base))  # [H, b, T, e]
        G = torch.cat([z, zb, keep * zb], -1).flatten(1, 2)  # [H, N, 3e]
        self.dtype = G.dtype
        G = G.float() if G.dtype in (torch.float16, torch.bfloat16) else G  # no half QR on CPU
        if self.R is not None:  # [R; G], laid out column-major as LAPACK takes it (no copy)
            G = torch.cat([self.R.mT, G.mT], -1).mT
        with _small_linalg():
            self.R = torch.linalg.qr(G, mode="r")[1]
        self.n += z.shape[1] * z.shape[2]
        self.W = (rec.W_O, rec.base_W_O)

    def result(self, layer: int):
        from probe import probes

        alpha = torch.cat(self.alpha, 1)[None]  # [1, H, N]
        beta = torch.cat(self.beta, 1)[None]  # [1, H, N, P]
        dec = probes.Decomposition(
            layer=layer,
            P=self.P,
            alpha=alpha,
            beta=beta,
            A=None,
            z_base=None,
            bias=None,
            bias_out=None,
            pattern_error=self.p_err,
            z_error=self.z_err,
            alpha_error=self.a_err,
        )
        W, Wf = (w.to(self.R.dtype) for w in self.W)
        e = W.shape[1]
        # [W_O; W_Of]^T = Q_w R_w (Q_w [d, 2e] orthonormal): any A W_O + B W_Of equals
        # (A R_w[:, :e]^T + B R_w[:, e:]^T) Q_w^T, whose singular values are those of the
        # small [3e, 2e] factor, so no SVD ever touches d_model.
        Rw = torch.linalg.qr(torch.cat([W, Wf], 1).transpose(1, 2), mode="r")[1]  # [H, 2e, 2e]
        Wr, Wfr = Rw[..., :e].transpose(1, 2), Rw[..., e:].transpose(1, 2)  # [H, e, 2e]
        R = self.R
        z_part, zb_part, kb_part = R[..., :e] @ Wr, R[..., e : 2 * e] @ Wfr, R[..., 2 * e :] @ Wfr
        svd = torch.linalg.svdvals
        out_sv, base_sv = svd(z_part), svd(zb_part)
        sv, change_sv = svd(z_part - kb_part), svd(z_part - zb_part)
        scale = torch.maximum(out_sv[:, 0], base_sv[:, 0])
        tol = max(self.n, W.shape[-1]) * torch.finfo(self.dtype).eps * scale
        sub = probes.BiasSubspace(
            layer=layer,
            P=self.P,
            singular_values=sv,
            rank=(sv > tol[:, None]).sum(-1),
            change_singular_values=change_sv,
            change_rank=(change_sv > tol[:, None]).sum(-1),
            tol=tol,
        )
        return dec, _merge_drift(self.local), _merge_drift(self.down) if self.down else None, sub


def _without_bias_out(rec: AttentionRecord) -> AttentionRecord:
    """The record with W_O [H, e, 0]: decompose() then skips its [b, T, H, d_model] bias_out,
    which the check does not use (the subspace comes from z and z_base; see _LayerAcc)."""
    import copy

    r = copy.copy(rec)
    r.W_O = rec.W_O[..., :0]
    return r


def _merge_drift(parts: list[tuple[Drift, int]]) -> Drift:
    """Drifts of several chunks (each with its N = batch x T query rows) as one."""
    from probe.probes import Drift

    tv_sum, rows, unobs = 0.0, 0, 0
    for d, N in parts:
        seen = N - d.unobservable  # [H] observable rows of this chunk
        tv_sum, rows, unobs = tv_sum + d.tv_mean * seen, rows + seen, unobs + d.unobservable
    first = parts[0][0]
    return Drift(
        layer=first.layer,
        kind=first.kind,
        max_abs=torch.stack([d.max_abs for d, _ in parts]).amax(0),
        tv_mean=tv_sum / rows.clamp_min(1),
        tv_max=torch.stack([d.tv_max for d, _ in parts]).amax(0),
        unobservable=unobs,
    )


def chunk_size(model: nn.Module, T: int, budget: float = 1 / 24) -> int:
    """Inputs per chunk so that one chunk's activations stay within ``budget`` x the model's
    size: a layer's tensors (about 16 [T, d_model]-sized ones per input) times two runs.

    The default is a 24th: the allocator's heap holds several times a chunk's live activations
    between runs (freed blocks it keeps), so the peak beyond the weights grows with the chunk,
    and three threads hold a chunk's tensors at once (tuned run, base run, probes). On GPT-2
    small (19 tokens) it gives 11 inputs a chunk: three runs each peaked 637-643 MiB beyond the
    interpreter against 675-693 at 16 inputs (a 16th), for ~4% more CPU time; chunks of 64 had
    peaked ~280 MiB higher than 16 on one thread."""
    s = _shape(model)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    per_input = 2 * 16 * T * max(s.d_model, s.n_heads * s.d_head) * _dtype(model).itemsize
    return max(1, min(256, int(budget * model_bytes // max(per_input, 1))))


@torch.no_grad()
def check_hf(
    base_model: nn.Module,
    tokens: Int[Tensor, "batch pos"] | Sequence[Tensor],
    prefix: Any = None,
    tuned_model: nn.Module | None = None,
    *,
    position_offset: int | None = None,
    downstream: bool = True,
    tol_factor: float = 16.0,
    verify: bool = True,
    chunk: int | None = None,
) -> TheoremCheck:
    """Run every probe of :func:`probe.probes.check_theorem` on an HF model with a prefix.

    Arguments as for :func:`hf_records`; ``tokens`` may also be a list of [1, T_i] tensors (texts
    of different lengths, each its own chunk). The batch is processed ``chunk`` inputs at a time
    (default :func:`chunk_size`: a 24th of the model's size in activations) and the per-layer
    results merged: errors and drift maxima are maxima, tolerances the largest chunk's, the bias
    subspace exact over all rows. The merged decompositions keep ``alpha`` [1, H, N] and
    ``beta`` [1, H, N, P] over the N = batch x T content rows; ``A``, ``z_base``, ``bias`` and
    ``bias_out`` are None (use :func:`hf_records` on a few inputs for those).
    """
    return _check_hf(
        base_model,
        tokens,
        prefix,
        tuned_model,
        position_offset,
        downstream,
        tol_factor,
        verify,
        chunk,
    ).result


class HFCheck(NamedTuple):
    """A :func:`check_hf` run with what it was computed from (what the CLI prints).

    result: the TheoremCheck; what: a phrase naming the tuning; records: the first chunk's
    per-layer AttentionRecords of the tuned run (first input only); frozen: per layer, whether
    the head's input side equals the base's; positions: which positions prefix and content have.
    """

    result: TheoremCheck
    what: str
    records: list[AttentionRecord]
    frozen: list[bool]
    positions: str = ""


def _positions(s: _Setup, offset: int, T: int) -> str:
    rotary = _architecture(s.base).rotary
    content = f"content at positions {offset}..{offset + T - 1}"
    if s.kind == "peft_prefix":
        how = "unrotated cached keys (score as keys at position 0)" if rotary else "cached keys"
        return f"{content}; prefix: PEFT's {how}"
    if s.kind == "peft_prompt":
        return f"{content}; prefix: virtual tokens at positions 0..{s.P - 1}"
    if s.kind == "kv":
        return f"{content}; prefix: the given keys, used as they are"
    return content


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` within the block (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _small_linalg() -> Iterator[None]:
    """One thread and subnormals flushed to 0 within the block (both restored after), for the
    many small QRs/SVDs of the bias subspace: on a loaded 2-core machine LAPACK ran them 8x
    slower on two threads than on one. Values below 1e-38 are far below every tolerance."""
    threads = torch.get_num_threads()
    flushed = torch.set_flush_denormal(True)  # False where the CPU cannot
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if flushed:
            torch.set_flush_denormal(False)


def _check_hf(
    base_model,
    tokens,
    prefix,
    tuned_model,
    position_offset,
    downstream,
    tol_factor,
    verify,
    chunk=None,
) -> HFCheck:
    from probe.probes import TheoremCheck, identities_expected

    pieces = list(tokens) if not isinstance(tokens, Tensor) else None
    first = pieces[0] if pieces else tokens
    if pieces and any(p.ndim != 2 or p.shape[0] != 1 for p in pieces):
        raise ValueError("a list of token tensors takes one [1, T] tensor per text")
    s, offset = _prepared(base_model, prefix, tuned_model, first, position_offset)
    if pieces:
        for p in pieces:
            _check_tokens(s.base, p, offset)
    # Three threads at one intra-op thread each share the cores without OpenMP's barriers (which
    # cost 4x on a machine shared with other jobs): the caller's runs the tuned model; a second
    # runs the base model one chunk ahead (downstream drift; not where the base run switches an
    # adapter off, a LoRA injected into the base: there the caller's thread runs it first); a
    # third runs the probes on each layer's record as it arrives, and a layer's merged result
    # once its last chunk is in, while the tuned run goes on with the next layers.
    base_aside = downstream and s.base_off is contextlib.nullcontext
    size = chunk or chunk_size(s.base, first.shape[1])
    if s.kind == "kv" and pieces and s.kv[0].keys.shape[0] != 1:
        raise ValueError("per-example raw prefixes need one token batch, not a list of texts")
    batches = (
        [(p, slice(None)) for p in pieces]
        if pieces
        else [(tokens, slice(i, i + size)) for i in range(0, tokens.shape[0], size)]
    )
    n_layers = _shape(s.base).n_layers
    accs = [_LayerAcc() for _ in range(n_layers)]
    finals: list[Future | None] = [None] * n_layers  # each layer's merged result, to come
    kept: list[AttentionRecord] = []

    def base_records(t, rows) -> list[AttentionRecord]:
        recs: list[AttentionRecord] = []
        _run(s, t, offset, rows, recs.append, base=True, stop=True, moded=True)
        _release_heap()
        return recs

    def probe(rec: AttentionRecord, base: Future | None, last: bool):
        acc = accs[rec.layer]
        acc.add(rec, base.result()[rec.layer] if base else None, tol_factor)
        if not last:
            return None
        with _small_linalg():
            return acc.result(rec.layer)

    with contextlib.ExitStack() as stack:
        stack.enter_context(_threads(1))
        if verify:
            verify_hf(s, first, offset)
        stack.enter_context(_record_mode([s.runner, s.base_runner]))
        probes = stack.enter_context(ThreadPoolExecutor(1, initializer=_worker_thread))
        runs = ThreadPoolExecutor(1, initializer=_worker_thread) if base_aside else None
        if runs is not None:
            stack.enter_context(runs)

        def base_run(i: int) -> Future | None:
            if not downstream or i >= len(batches):
                return None
            if runs is not None:
                return runs.submit(base_records, *batches[i])
            done = Future()
            done.set_result(base_records(*batches[i]))
            return done

        queued: collections.deque[Future] = collections.deque()
        base = base_run(0)
        for i, (t, rows) in enumerate(batches):
            ahead = base_run(i + 1)  # the base run goes at most one chunk ahead
            last = i == len(batches) - 1

            def on_record(rec, base=base, last=last):
                if len(kept) == rec.layer:  # the first chunk's first input, for the CLI's header
                    kept.append(_first_row(rec))
                job = probes.submit(probe, rec, base, last)
                if last:
                    finals[rec.layer] = job
                queued.append(job)
                while len(queued) > 2:  # at most two records wait for the probes
                    queued.popleft().result()
                if rec.layer % 4 == 3:  # within a run too: ~40 MiB less peak, ~5% more time
                    _release_heap()

            _run(s, t, offset, rows, on_record, recompute=1, stop=True, moded=True)
            base = ahead
            del on_record
            _release_heap()
        merged = [job.result() for job in finals]
    result = TheoremCheck(
        decompositions=[m[0] for m in merged],
        local=[m[1] for m in merged],
        downstream=[m[2] for m in merged] if downstream else None,
        subspaces=[m[3] for m in merged],
        pattern_tol=[a.p_tol for a in accs],
        z_tol=[a.z_tol for a in accs],
        expected=identities_expected([s.P] * n_layers, s.frozen),
    )
    return HFCheck(result, s.what, kept, list(s.frozen), _positions(s, offset, first.shape[1]))


def _worker_thread() -> None:
    """A check's worker thread: one intra-op thread, no autograd (grad mode is per thread)."""
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)


def _release_heap() -> None:
    """Give the heap's free pages back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    A run frees its activations, but glibc keeps the freed blocks between live ones, so without
    this the resident memory of a check grows by several chunks' activations."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC(0)


_LIBC: Any = None


def _first_row(rec: AttentionRecord) -> AttentionRecord:
    import copy

    r = copy.copy(rec)
    for n in (
        "q",
        "k",
        "v",
        "prefix_k",
        "prefix_v",
        "pattern",
        "z",
        "q_frozen",
        "k_frozen",
        "v_frozen",
    ):
        t = getattr(rec, n)
        setattr(r, n, None if t is None else t[:1].clone())
    return r


def hf_frozen_head_layers(base: nn.Module, tuned: nn.Module) -> list[bool]:
    """Per layer, whether ``tuned`` (an HF model or a LoRA PeftModel) applies exactly ``base``'s
    head input side (norm, W_Q, W_K, W_V and biases); only there must the identities hold.
    The HF counterpart of ``probe.probes.frozen_head_layers``, which compares our model's
    weights by name instead of two models' modules."""
    _check_pair(base, _hf_model(tuned))
    return _frozen_layers(base, _hf_model(tuned))


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


# ------------------------------------------------------------------------------------------
# Directories (for `probe check-theorem --base HF_DIR --adapter ADAPTER_DIR`)
# ------------------------------------------------------------------------------------------


def load_hf_model(
    model_dir: str | Path, dtype: torch.dtype | None = None, device: str = "cpu"
) -> nn.Module:
    """Load a saved HF causal LM (offline, from a local directory) in eval mode.

    dtype: e.g. torch.float64 for the tightest check; None keeps the saved dtype. Missing or
    truncated weights raise a one-line ValueError."""
    hf = require_hf(peft=False)
    if not is_hf_model_dir(model_dir):
        raise FileNotFoundError(
            f"{model_dir} is not a Hugging Face model directory (no config.json with model_type)"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = hf.transformers.AutoModelForCausalLM.from_pretrained(
                str(model_dir), dtype="auto" if dtype is None else dtype, local_files_only=True
            )
    except Exception as e:  # OSError, SafetensorError, ...: one line, naming the directory
        if isinstance(e, (MissingExtraError, KeyboardInterrupt)):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"cannot load the model weights in {model_dir} ({type(e).__name__}: {msg}); the "
            "weights are missing or truncated: save the model again with save_pretrained"
        ) from None
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
    ``tuned_model=`` (injected into the loaded base, no copy; the base run switches it off),
    and so does an HF model directory given as ``adapter_dir`` (a fully fine-tuned model,
    loaded in the base's dtype).
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
    if _peft_cfg(adapted).is_prompt_learning:
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
    """:func:`check_hf` for a saved HF model directory and a saved PEFT adapter directory."""
    base, kwargs = load_dirs(model_dir, adapter_dir, dtype, device)
    return check_hf(base, tokens, position_offset=position_offset, tol_factor=tol_factor, **kwargs)


def tokenize_texts(model_dir: str | Path, texts: Sequence[str]) -> list[Tensor]:
    """Token ids [1, T_i] per text, with the tokenizer saved in ``model_dir`` (its defaults, so a
    BOS token where the tokenizer adds one). One-line errors when there is no tokenizer."""
    hf = require_hf(peft=False)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError("no text to probe: give --text or a --text-file with non-empty lines")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tok = hf.transformers.AutoTokenizer.from_pretrained(
                str(model_dir), local_files_only=True
            )
    except Exception as e:
        if isinstance(e, KeyboardInterrupt):
            raise
        raise ValueError(
            f"{model_dir} has no usable tokenizer ({type(e).__name__}); save one there with "
            "tokenizer.save_pretrained(dir), or probe token ids (--task)"
        ) from None
    out = [torch.tensor([tok(t)["input_ids"]], dtype=torch.long) for t in texts]
    empty = [i for i, t in enumerate(out) if t.shape[1] == 0]
    if empty:
        raise ValueError(f"text {empty[0] + 1} tokenizes to nothing")
    return out


@torch.no_grad()
def check_theorem_dirs(
    model_dir: str | Path,
    adapter_dir: str | Path | None,
    tokens: Int[Tensor, "batch pos"] | Sequence[Tensor],
    *,
    prefix_len: int = 4,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    tol_factor: float = 16.0,
    verify: bool = True,
) -> HFCheck:
    """What ``probe check-theorem --base HF_DIR [--adapter ADAPTER_DIR]`` runs.

    tokens: [batch, T] ids, or a list of [1, T_i] (texts). Without an adapter, a random
    key/value prefix of ``prefix_len`` positions per layer, in the range of the model's own
    (rotated) keys and values on the first inputs (:func:`probe.probes.random_prefix`), seeded.
    """
    from probe.probes import random_prefix

    base, kwargs = load_dirs(model_dir, adapter_dir, dtype, device)
    what = None
    if adapter_dir is None:
        first = tokens if isinstance(tokens, Tensor) else tokens[0]
        stats: dict[str, Tensor] = {}  # the base's own keys and values [b, T, G, e], no records
        last = _shape(base).n_layers - 1

        def on_layer(layer, r):
            for n in "kv":
                stats[f"blocks.{layer}.attn.hook_{n}"] = r[n].transpose(1, 2)
            if layer == last:
                raise _Stop  # nothing after the last attention is needed

        plain = _setup(base, None, None, min(16, first.shape[0]))
        # One thread for the statistics too: on a loaded 2-core machine, two threads made their
        # small mean/std reductions 10x slower (the same values: each is over one dimension).
        with _threads(1):
            with _recording(base, on_layer), contextlib.suppress(_Stop):
                _forward(plain, first[:16], 0, slice(None), 1)
            g = torch.Generator().manual_seed(seed)
            kwargs["prefix"] = random_prefix(stats, _shape(base).n_layers, prefix_len, g)
        del stats  # free the keys and values before the check
        what = f"a random key/value prefix, P={prefix_len}"
    elif "tuned_model" in kwargs:
        tuned = kwargs["tuned_model"]
        what = f"a PEFT {_peft_type(tuned)} adapter" if _is_peft(tuned) else "a fine-tuned model"
    run = _check_hf(
        base,
        tokens,
        kwargs.get("prefix"),
        kwargs.get("tuned_model"),
        None,
        True,
        tol_factor,
        verify,
    )
    return run._replace(what=what or run.what)


__all__ = [
    "CHECK_INPUTS",
    "HFCheck",
    "INSTALL_HINT",
    "SUPPORTED_ARCHITECTURES",
    "check_hf",
    "check_hf_dirs",
    "check_theorem_dirs",
    "chunk_size",
    "hf_cache",
    "hf_frozen_head_layers",
    "hf_prefix",
    "hf_records",
    "hf_records_from_dirs",
    "is_hf_model_dir",
    "is_peft_adapter_dir",
    "load_dirs",
    "load_hf_model",
    "load_peft_adapter",
    "MissingExtraError",
    "positioned_prompt_to_prefix",
    "require_hf",
    "tokenize_texts",
    "verify_hf",
]
