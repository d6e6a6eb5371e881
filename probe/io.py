"""Safe, atomic persistence: safetensors for tensors, JSON beside them; never unpickle.

Guarantees of :func:`save_dir`:

* A save writes every file into a temporary sibling ``.<name>.tmp-<host>-<pid>-<random>`` and
  renames it into place, so an interrupted save never leaves anything half-written under the
  target name.
* It never deletes what it did not write: a regular file, or a non-empty directory that is not a
  prefix-probe model or adapter, is refused; one of ours is replaced only with ``overwrite=True``.
* Nothing non-finite is saved; nothing non-finite is loaded.
* A crash (kill -9) can leave a temporary sibling; the next save to the same path removes it
  once its owner is provably dead (same host, pid gone). If the crash fell between the two
  renames of an overwrite, the previous version sits in ``.<name>.old-...`` and is restored.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

MODEL_FORMAT = "prefix-probe-model/1"
# /2 keeps the adapter's typed config under "config"; /1 had the same fields under "hparams".
ADAPTER_FORMAT = "prefix-probe-adapter/2"
ADAPTER_FORMATS = (ADAPTER_FORMAT, "prefix-probe-adapter/1")  # what loads
# What a directory of ours holds: its JSON file -> (kind, formats, every file it may contain).
SAVED_KINDS = {
    "config.json": ("model", (MODEL_FORMAT,), {"config.json", "model.safetensors"}),
    "adapter_config.json": (
        "adapter",
        ADAPTER_FORMATS,
        {"adapter_config.json", "adapter.safetensors"},
    ),
}
# Host names go into temporary names; keep them to characters every filesystem takes.
HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "localhost"
_OWNED = re.compile(r"^(?P<host>.+)-(?P<pid>\d+)-(?P<rand>[A-Za-z0-9_]+)$")


class CorruptFileError(ValueError):
    """A saved file is truncated, corrupt, of the wrong kind or does not fit what loads it."""


class TargetError(ValueError):
    """An output path that must not be written: foreign files, a file, no permission."""


class NonFiniteError(ValueError):
    """Tensors hold NaN or infinite values, which are never saved."""


def fingerprint(state: dict[str, Tensor]) -> str:
    """16 hex digits of SHA-256 over names, shapes, dtypes and bytes of the tensors."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def non_finite(state: dict[str, Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or +-Inf."""
    return sorted(
        k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()
    )


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (a zombie or another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_tag() -> str:
    """``<host>-<pid>-``: the prefix that names this process as a temporary's owner."""
    return f"{HOST}-{os.getpid()}-"


def parse_owner(rest: str) -> tuple[str, int] | None:
    """(host, pid) from the ``<host>-<pid>-<random>`` tail of a temporary's name, or None."""
    m = _OWNED.match(rest)
    return (m["host"], int(m["pid"])) if m else None


def owner_dead(host: str, pid: int) -> bool:
    """Provably dead: on this host and the pid is gone. Another host's owner is never proven
    dead here (the run store uses claim heartbeats for that)."""
    return host == HOST and pid != os.getpid() and not pid_alive(pid)


def saved_kind(path: Path) -> str | None:
    """ "model" or "adapter" if ``path`` is a directory that holds one of ours and nothing else."""
    if not path.is_dir() or path.is_symlink():
        return None
    names = {p.name for p in path.iterdir()}
    for meta_file, (kind, formats, allowed) in SAVED_KINDS.items():
        if meta_file in names and names <= allowed:
            try:
                meta = json.loads((path / meta_file).read_text())
            except (OSError, ValueError):
                return None
            return kind if isinstance(meta, dict) and meta.get("format") in formats else None
    return None


def clean_temporaries(path: Path) -> None:
    """Remove the temporaries of earlier saves to ``path`` whose owner is provably dead, and
    restore a previous version that a crash left mid-overwrite (see the module docstring)."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for entry in path.parent.iterdir():
        for kind in ("tmp", "old"):
            prefix = f".{path.name}.{kind}-"
            if not entry.name.startswith(prefix):
                continue
            owner = parse_owner(entry.name[len(prefix) :])
            if owner is None or not owner_dead(*owner):
                continue
            if kind == "old" and not path.exists() and entry.is_dir():
                try:  # the crash fell between the renames: put the previous save back
                    os.rename(entry, path)
                except OSError:
                    pass  # another process restored it or saved there first; leave this one
            else:
                shutil.rmtree(entry, ignore_errors=True)


def check_target(path: str | Path, overwrite: bool = False) -> Path:
    """Refuse an output path that a save must not replace, before any work is done.

    Allowed: a path that does not exist under a writable directory, an empty directory, and,
    with ``overwrite``, a directory holding one of our models or adapters and nothing else.
    Raises :class:`TargetError` naming the problem and the fix.
    """
    path = Path(path)
    clean_temporaries(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise TargetError(
            f"{path} exists and is not a directory; refusing to replace it: choose a new path"
        )
    if path.is_dir() and any(path.iterdir()):
        kind = saved_kind(path)
        if kind is None:
            found = sorted(p.name for p in path.iterdir())[:3]
            raise TargetError(
                f"{path} is not empty and is not a prefix-probe model or adapter (holds "
                f"{', '.join(found)}...); refusing to touch it: choose a new or empty directory"
            )
        if not overwrite:
            raise TargetError(
                f"{path} already holds a saved {kind}; pass --overwrite to replace it, or "
                "choose a new directory"
            )
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise TargetError(f"cannot create {path}: {ancestor} is not a directory; choose another")
    try:  # the real test of writability (os.access is wrong for root and read-only mounts)
        os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{owner_tag()}", dir=ancestor))
    except OSError as e:
        raise TargetError(
            f"cannot write to {ancestor} ({e.strerror}); choose a writable output directory"
        ) from None
    return path


def save_dir(
    path: str | Path,
    tensors: dict[str, dict[str, Tensor]],
    jsons: dict[str, dict],
    overwrite: bool = False,
) -> Path:
    """Create directory ``path`` holding safetensors and JSON files, written in a temporary
    sibling first: a new ``path`` appears in one rename; replacing an existing directory of ours
    (only with ``overwrite``) takes two, the old one moved aside and the new one moved in (a
    crash between them is repaired by the next save; see the module docstring). The staging
    and the umask are :func:`staging_dir` and :func:`publish_dir`, shared with the run store;
    unlike the store, which keeps a result another process committed first, a save that finds
    ``path`` taken refuses it or, with ``overwrite``, replaces it.

    Refuses (before writing anything) non-finite tensors (:class:`NonFiniteError`) and a target
    that :func:`check_target` refuses.
    """
    path = Path(path)
    for name, state in tensors.items():
        bad = non_finite(state)
        if bad:
            raise NonFiniteError(
                f"refusing to save {path / name}: {', '.join(bad[:3])} hold NaN or Inf; the "
                "training diverged: lower the learning rate"
            )
    check_target(path, overwrite)
    with staging_dir(path) as tmp:
        for name, state in tensors.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp / name)
        for name, obj in jsons.items():
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        if not path.exists():  # fails, never replaces, if a non-empty directory appeared meanwhile
            publish_dir(tmp, path)
            return path
        # Ours and overwrite=True (check_target): keep the old one until tmp is in.
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-{owner_tag()}", dir=path.parent))
        os.replace(path, old)
        try:
            publish_dir(tmp, path)
        except BaseException:
            if old.exists() and not path.exists():
                os.rename(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    return path


@contextmanager
def staging_dir(path: Path) -> Iterator[Path]:
    """A fresh, empty directory to fill in place of ``path``: a temporary sibling
    ``.<name>.tmp-<host>-<pid>-<random>`` (on the same filesystem, so the final rename is atomic;
    named by its owner, so :func:`clean_temporaries` and the run store's sweep remove it only
    once that owner is provably dead). Whatever is still there when the block exits (it raised,
    or :func:`publish_dir` refused) is removed; a published one has already left.

    Shared by :func:`save_dir` and the run store's commit (``analysis.store.execute``), which
    differ only in what they do when ``path`` already holds something (see each).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{owner_tag()}", dir=path.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: Path, path: Path) -> None:
    """Give ``tmp`` and everything under it the modes the umask gives new files (0666 & ~umask)
    and directories (0777 & ~umask), then rename it to ``path`` in one step.

    The modes: mkdtemp makes 0700 and safetensors writes 0600, while files written with open()
    follow the umask; without this a shared results folder would be private to its writer.
    The rename replaces nothing but an empty directory: if a non-empty one is at ``path`` it
    raises OSError (errno ENOTEMPTY or EEXIST) and ``tmp`` stays where it was, so what to do
    about an existing result is the caller's decision.
    """
    mask = umask()
    for folder, _, files in os.walk(tmp):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                os.chmod(os.path.join(folder, name), 0o666 & ~mask)
    os.rename(tmp, path)


def umask() -> int:
    """The process's umask, read without changing it where Linux shows it, else set and reset."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(ln for ln in status.splitlines() if ln.startswith("Umask:")).split()[1], 8)
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o077)
        os.umask(mask)
        return mask


def read_json(
    path: Path, expect_format: str | tuple[str, ...], required: dict[str, type] | None = None
) -> dict:
    """Read a JSON file whose ``format`` field must be ``expect_format`` (or one of several)
    and whose ``required`` keys must be present with the given types."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected a directory written by save()")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path} is not valid JSON ({e}); the save is corrupt") from None
    formats = (expect_format,) if isinstance(expect_format, str) else expect_format
    if not isinstance(meta, dict) or meta.get("format") not in formats:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        want = " or ".join(repr(f) for f in formats)
        raise CorruptFileError(f"{path}: format {got!r}, expected {want}")
    for key, kind in (required or {}).items():
        if key not in meta:
            raise CorruptFileError(f"{path} lacks the key {key!r}; the save is corrupt: re-save")
        if not isinstance(meta[key], kind):
            raise CorruptFileError(
                f"{path}: {key!r} is a {type(meta[key]).__name__}, expected a {kind.__name__}; "
                "the save is corrupt: re-save"
            )
    return meta


def load_tensors(path: Path) -> dict[str, Tensor]:
    """Load a safetensors file, turning low-level failures into a clear CorruptFileError;
    non-finite values are refused too."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptFileError(f"{path} is truncated or corrupt ({e}); re-save it") from None
    bad = non_finite(state)
    if bad:
        raise CorruptFileError(
            f"{path}: {', '.join(bad[:3])} hold NaN or Inf; the training that wrote it diverged "
            "or the file is corrupt: retrain with a lower learning rate"
        )
    return state


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
