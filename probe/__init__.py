"""prefix-probe: what prefix-, prompt-tuning, LoRA and full fine-tuning do inside attention."""

from probe.model import PRESETS, KVPrefix, ModelConfig, Transformer, preset
from probe.train import TrainConfig, TrainingDiverged, evaluate, generate, pretrain, tune

__all__ = [
    "PRESETS",
    "KVPrefix",
    "ModelConfig",
    "Transformer",
    "preset",
    "TrainConfig",
    "TrainingDiverged",
    "evaluate",
    "generate",
    "pretrain",
    "tune",
]
