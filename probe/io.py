"""Safe, atomic persistence: safetensors for tensors, JSON beside them; never unpickle.

A save writes every file into a temporary sibling directory and renames it into place, so an
interrupted save leaves nothing half-written under the target name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


class CorruptFileError(ValueError):
    """A saved file is truncated, corrupt, of the wrong kind or does not fit what loads it."""


def fingerprint(state: dict[str, Tensor]) -> str:
    """16 hex digits of SHA-256 over names, shapes, dtypes and bytes of the tensors."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def save_dir(
    path: str | Path, tensors: dict[str, dict[str, Tensor]], jsons: dict[str, dict]
) -> Path:
    """Atomically (re)create directory ``path`` holding safetensors and JSON files."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        for name, state in tensors.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp / name)
        for name, obj in jsons.items():
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        # mkdtemp makes 0700 and safetensors writes 0600: use the umask, as open() does for JSON.
        mask = umask()
        os.chmod(tmp, 0o777 & ~mask)
        for name in (*tensors, *jsons):
            os.chmod(tmp / name, 0o666 & ~mask)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it, else set and reset."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(ln for ln in status.splitlines() if ln.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o077)
        os.umask(mask)
        return mask


def read_json(path: Path, expect_format: str) -> dict:
    """Read a JSON file whose ``format`` field must equal ``expect_format``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected a directory written by save()")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path} is not valid JSON ({e}); the save is corrupt") from None
    if not isinstance(meta, dict) or meta.get("format") != expect_format:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CorruptFileError(f"{path}: format {got!r}, expected {expect_format!r}")
    return meta


def load_tensors(path: Path) -> dict[str, Tensor]:
    """Load a safetensors file, turning low-level failures into a clear CorruptFileError."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptFileError(f"{path} is truncated or corrupt ({e}); re-save it") from None


def load_state(module: nn.Module, state: dict[str, Tensor], source: Path) -> None:
    """``load_state_dict`` that names missing, unexpected and mis-shaped tensors."""
    own = module.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or extra or bad:
        raise CorruptFileError(
            f"{source} does not fit this model: missing {missing}, unexpected {extra}, "
            f"shape mismatches {bad}"
        )
    module.load_state_dict(state)
