"""Inputs shared by the model and probe tests: random float64 prefixes and token batches."""

import torch

from probe.model import KVPrefix


def random_prefix(model, P, scale=1.0, seed=1, batch=None) -> list[KVPrefix]:
    """One random float64 KVPrefix per layer: keys × ``scale``; [P, h, e] or [batch, P, h, e]."""
    g = torch.Generator().manual_seed(seed)
    c = model.cfg
    shape = (P, c.n_heads, c.d_head) if batch is None else (batch, P, c.n_heads, c.d_head)
    return [
        KVPrefix(
            scale * torch.randn(shape, generator=g, dtype=torch.float64),
            torch.randn(shape, generator=g, dtype=torch.float64),
        )
        for _ in range(c.n_layers)
    ]


def tokens(batch=3, T=9, seed=2, vocab=11):
    """Seeded random token ids [batch, T]."""
    return torch.randint(0, vocab, (batch, T), generator=torch.Generator().manual_seed(seed))
