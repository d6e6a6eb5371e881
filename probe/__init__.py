"""prefix-probe: what prefix-, prompt-tuning, LoRA and full fine-tuning do inside attention.

The model and training names load on first use, so that ``import probe.hf`` (probing a Hugging
Face model) does not import our model or transformer-lens.
"""

import importlib

from probe.config import PRESETS, KVPrefix, ModelConfig, preset

_LAZY = {
    "Transformer": "probe.model",
    "TrainConfig": "probe.train",
    "TrainingDiverged": "probe.train",
    "evaluate": "probe.train",
    "generate": "probe.train",
    "pretrain": "probe.train",
    "tune": "probe.train",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'probe' has no attribute {name!r}")


def __dir__() -> list[str]:  # tab completion in notebooks lists the lazy names too
    return sorted([*globals(), *_LAZY])


__all__ = ["PRESETS", "KVPrefix", "ModelConfig", "preset", *_LAZY]
