"""The architectures table of :mod:`probe.hf`, under its former name: see :mod:`probe.hf.arch`."""

from probe.hf.arch import (
    ARCHITECTURES,
    Arch,
    Shape,
    base_module,
    effective_weight,
    head_params,
    rotate,
)

__all__ = [
    "ARCHITECTURES",
    "Arch",
    "Shape",
    "base_module",
    "effective_weight",
    "head_params",
    "rotate",
]
