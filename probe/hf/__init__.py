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
smaller, faster and more exact than TransformerLens's bridge (which needs a deep copy per run
and a bridge build, and re-runs the model to check itself): the model and
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

from probe.hf.arch import SUPPORTED_ARCHITECTURES
from probe.hf.check import CHECK_INPUTS, HFCheck, check_hf, check_hf_dirs, check_theorem_dirs
from probe.hf.loading import (
    INSTALL_HINT,
    MissingExtraError,
    is_hf_model_dir,
    is_peft_adapter_dir,
    load_dirs,
    load_hf_model,
    load_peft_adapter,
    require_hf,
    tokenize_texts,
)
from probe.hf.prefix import hf_prefix, positioned_prompt_to_prefix
from probe.hf.records import hf_cache, hf_frozen_head_layers, hf_records, hf_records_from_dirs
from probe.hf.resources import chunk_size
from probe.hf.verify import verify_hf

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
