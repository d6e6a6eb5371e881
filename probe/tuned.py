"""A frozen base model holding several named adapters, switched per call (PEFT-style).

:class:`Tuned` runs any adapter of :mod:`probe.adapters` (exported there too) over its base;
``run_with_cache`` records the base model's hooks during the adapted run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import ActivationCache

from probe.model import Transformer

if TYPE_CHECKING:
    from probe.adapters import Adapter


class Tuned(nn.Module):
    """A frozen base model holding several named adapters, switched per call (PEFT-style).

    ``Tuned(base).add("desc", make_adapter("prefix", base))`` holds one adapter and makes it
    active; ``tuned(tokens)`` then runs it, ``tuned(tokens, adapter=None)`` runs the base model
    alone, and ``tuned.use(name)`` switches the active one.
    """

    def __init__(self, base: Transformer):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.adapters = nn.ModuleDict()
        self.active: str | None = None

    def add(self, name: str, adapter: Adapter, activate: bool = True) -> Tuned:
        if adapter.base_cfg != self.base.cfg:
            raise ValueError(f"adapter {name!r} was built for another model shape")
        self.adapters[name] = adapter
        if activate:
            self.active = name
        return self

    def use(self, name: str | None) -> Tuned:
        if name is not None and name not in self.adapters:
            raise KeyError(f"no adapter {name!r}; have {sorted(self.adapters)}")
        self.active = name
        return self

    def remove(self, name: str) -> Adapter:
        adapter = self.adapters.pop(name)
        if self.active == name:
            self.active = None
        return adapter

    def forward(
        self,
        tokens: Int[Tensor, "batch pos"],
        adapter: str | None = "active",
        positions: slice = slice(None),
    ) -> Float[Tensor, "batch position d_vocab"]:
        name = self.active if adapter == "active" else adapter
        if name is None:
            return self.base(tokens, positions=positions)
        return self.adapters[name](self.base, tokens, positions)

    def run_with_cache(self, tokens, adapter: str | None = "active", **cache_kwargs):
        """Logits and an ActivationCache of the base model's hooks, run with the adapter.

        Warns once, like :meth:`Transformer.run_with_cache`, if the base is in training mode.
        """
        self.base.warn_if_dropout(stacklevel=3)
        cache, fwd, _ = self.base.get_caching_hooks(**cache_kwargs)
        with self.base.hooks(fwd_hooks=fwd):
            logits = self(tokens, adapter)
        return logits, ActivationCache(cache, self.base)


__all__ = ["Tuned"]
