"""Shared by the tests: model shapes (one hypothesis strategy), random float64 prefixes and
token batches; a run store's bytes."""

import json
from pathlib import Path

import torch
from hypothesis import strategies as st

from probe.model import KVPrefix, ModelConfig


def model_config(n_layers=2, n_heads=2, d_head=8, attn_ln=True, mlp=True) -> ModelConfig:
    """A dropout-free shape by heads and head width; an MLP of 2 d_model, or none."""
    d_model = n_heads * d_head
    return ModelConfig(
        n_layers=n_layers,
        n_heads=n_heads,
        d_model=d_model,
        d_mlp=2 * d_model if mlp else 0,
        attn_ln=attn_ln,
        dropout=0.0,
    )


def model_configs(min_d_head: int = 1) -> st.SearchStrategy[ModelConfig]:
    """Every test's random shapes: 1-3 layers, 1-4 heads of ``min_d_head``-16 dimensions, with
    and without ln1 and MLP."""
    return st.builds(
        model_config,
        n_layers=st.integers(1, 3),
        n_heads=st.integers(1, 4),
        d_head=st.integers(min_d_head, 16),
        attn_ln=st.booleans(),
        mlp=st.booleans(),
    )


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


def without_seconds(value):
    """``value`` without its wall-clock fields: ``seconds`` at any depth (``history`` too)."""
    if isinstance(value, dict):
        return {k: without_seconds(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [without_seconds(v) for v in value]
    return value


def store_bytes(root: Path) -> dict[str, bytes]:
    """Every file of every finished run, byte for byte; result.json without timings."""
    out = {}
    for path in sorted(root.glob("[!.]*/**/*")):
        if path.is_file():
            data = path.read_bytes()
            if path.name == "result.json":
                data = json.dumps(without_seconds(json.loads(data)), sort_keys=True).encode()
            out[str(path.relative_to(root))] = data
    return out
