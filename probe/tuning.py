"""What a theorem check ran on the base model: the phrase that names it, and the random prefix
that stands in when no adapter is given.

One place for both, whichever the backend: ``probe check-theorem`` and ``probe view`` on our
models (:mod:`probe.cli`) and on Hugging Face ones (:mod:`probe.hf`) print the same words for the
same tuning, and draw the same stand-in prefix from the same statistics and seed.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from probe.config import KVPrefix
from probe.probes import random_prefix


def tuning_phrase(
    *,
    prefix_len: int | None = None,
    random: bool = False,
    adapter: str | None = None,
    adapter_len: int | None = None,
    fine_tuned: bool = False,
) -> str:
    """The phrase naming what ran on the base model, as the CLI prints it after "BASE with".

    prefix_len: a raw key/value prefix of that many positions per layer (``random``: the
        stand-in of :func:`random_stand_in`).
    adapter: an adapter's kind as it should read: ``"prefix"`` (ours: its method), ``"PEFT
        LORA"`` (a PEFT one: its type); ``adapter_len``: its virtual tokens, where it has them.
    fine_tuned: a fine-tuned copy of the base runs instead of the base.

    The parts present are joined with "and"; none is "the base model alone". For example
    ``tuning_phrase(prefix_len=4, random=True)`` is "a random key/value prefix, P=4".
    """
    parts = []
    if prefix_len is not None:
        parts.append(f"a {'random ' if random else ''}key/value prefix, P={prefix_len}")
    if adapter is not None:
        parts.append(
            f"a {adapter} adapter" + (f", P={adapter_len}" if adapter_len is not None else "")
        )
    if fine_tuned:
        parts.append("a fine-tuned model")
    return " and ".join(parts) or "the base model alone"


def random_stand_in(
    kv: Mapping[str, Tensor], n_layers: int, P: int, seed: int
) -> tuple[list[KVPrefix], str]:
    """The prefix a check runs when no adapter is given, and its phrase: a random key/value
    prefix [P, h, e] per layer (:func:`probe.probes.random_prefix`, drawn from a generator
    seeded with ``seed``) in the range of ``kv``, the base's own keys and values on some inputs
    (``blocks.{layer}.attn.hook_k`` / ``hook_v`` [b, T, h, e], as our ``run_with_cache`` names
    them)."""
    generator = torch.Generator().manual_seed(seed)
    prefix = random_prefix(kv, n_layers, P, generator)
    return prefix, tuning_phrase(prefix_len=P, random=True)
