"""What every layer shares about a model and a prefix, without the model itself.

:class:`ModelConfig` (a model's shape, validated when built), the paper's :data:`PRESETS`,
:class:`KVPrefix` (one layer's key/value prefix) and :class:`GatedPrompt` (one layer's gated
adaption prompt). They live apart from :mod:`probe.model` so that probing a Hugging Face model
(:mod:`probe.hf`, ``probe check-theorem --base HF_DIR``) imports neither our model nor
transformer-lens: it uses neither, and importing them slows its start-up. :mod:`probe.model`
and :mod:`probe` export them too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import NamedTuple

from torch import Tensor, nn

# Pretraining's optimiser defaults (TrainConfig's, and ``probe pretrain``'s). Changing them
# changes every base model, so the experiments' run keys follow them.
PRETRAIN_LR = 3e-3
PRETRAIN_WEIGHT_DECAY = 0.1  # AdamW's, on matrices only


@dataclass(frozen=True)
class ModelConfig:
    """Shape and options of a model; validated when built.

    ``d_mlp=0`` makes the model attention-only; ``attn_ln=False`` drops the pre-attention
    LayerNorm (the paper's 02 model). ``n_ctx`` counts content positions only: prefixes and soft
    prompts take no positional slot, and are capped by ``max_prefix`` instead.
    """

    n_layers: int
    n_heads: int
    d_model: int
    d_vocab: int = 11
    n_ctx: int = 20
    d_mlp: int | None = None  # None -> 4 * d_model
    attn_ln: bool = True
    dropout: float = 0.1
    max_prefix: int = 256

    def __post_init__(self):
        for name in ("n_layers", "n_heads", "d_model", "d_vocab", "n_ctx", "max_prefix"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(
                    f"ModelConfig.{name} must be a positive int, got {getattr(self, name)!r}"
                )
        if self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig: d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "d_model must equal n_heads * d_head, so pick d_model as a multiple of n_heads."
            )
        if self.d_mlp is None:
            object.__setattr__(self, "d_mlp", 4 * self.d_model)
        if self.d_mlp < 0:
            raise ValueError(
                f"ModelConfig.d_mlp must be >= 0 (0 = attention-only), got {self.d_mlp}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"ModelConfig: unknown fields {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**d)


# The paper's minGPT models (1 / 1 / 4 layers). "tiny" is for tests and the smoke profile.
PRESETS: dict[str, ModelConfig] = {
    "01": ModelConfig(n_layers=1, n_heads=1, d_model=96),
    "02": ModelConfig(n_layers=1, n_heads=4, d_model=256, attn_ln=False),
    "03": ModelConfig(n_layers=4, n_heads=4, d_model=256),
    "tiny": ModelConfig(n_layers=2, n_heads=2, d_model=32),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named preset, optionally with fields overridden (``preset("01", dropout=0.0)``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name].to_dict(), **overrides})


class KVPrefix(NamedTuple):
    """One layer's prefix: P key and value positions per head.

    keys, values: [P, n_heads, d_head], or [batch, P, n_heads, d_head] for per-example prefixes.
    """

    keys: Tensor
    values: Tensor

    @property
    def length(self) -> int:
        return self.keys.shape[-3]


class GatedPrompt(NamedTuple):
    """One layer's adaption prompt (LLaMA-Adapter): P_a key and value positions per head that
    every content query attends to through a softmax of their own, the result scaled per head
    by ``gate`` and added to the head's output (``probe.adapters.AdaptionPrompt``).

    keys, values: [P_a, n_heads, d_head]; gate: [n_heads].
    """

    keys: Tensor
    values: Tensor
    gate: Tensor

    @property
    def length(self) -> int:
        return self.keys.shape[-3]


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Run the body with every submodule of ``modules`` in eval mode (no dropout), then restore
    each submodule's own mode, whatever it was (also on an exception)."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, training in saved:
            m.training = training
