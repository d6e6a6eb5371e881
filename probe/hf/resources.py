"""Memory and threads: chunk sizes, intra-op threads, small LAPACK calls, the heap."""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from probe.hf.arch import _dtype, _shape


def chunk_size(model: nn.Module, T: int, budget: float = 1 / 24) -> int:
    """Inputs per chunk so that one chunk's activations stay within ``budget`` x the model's
    size: a layer's tensors (about 16 [T, d_model]-sized ones per input) times two runs.

    The default is a 24th: the allocator's heap holds several times a chunk's live activations
    between runs (freed blocks it keeps), so the peak beyond the weights grows with the chunk,
    and three threads hold a chunk's tensors at once (tuned run, base run, probes). Smaller
    chunks lower that peak for a little more CPU time per input."""
    s = _shape(model)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    per_input = 2 * 16 * T * max(s.d_model, s.n_heads * s.d_head) * _dtype(model).itemsize
    return max(1, min(256, int(budget * model_bytes // max(per_input, 1))))


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` within the block (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _small_linalg() -> Iterator[None]:
    """One thread and subnormals flushed to 0 within the block (both restored after), for the
    many small QRs/SVDs of the bias subspace: on a loaded 2-core machine LAPACK ran them 8x
    slower on two threads than on one. Values below 1e-38 are far below every tolerance."""
    threads = torch.get_num_threads()
    flushed = torch.set_flush_denormal(True)  # False where the CPU cannot
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if flushed:
            torch.set_flush_denormal(False)


def _worker_thread() -> None:
    """A check's worker thread: one intra-op thread, no autograd (grad mode is per thread)."""
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)


def _release_heap() -> None:
    """Give the heap's free pages back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    A run frees its activations, but glibc keeps the freed blocks between live ones, so without
    this the resident memory of a check grows by several chunks' activations."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC(0)


_LIBC: Any = None
