"""The theorem's check on an HF model, in chunks, at the model's memory, on three threads."""

from __future__ import annotations

import collections
import contextlib
import copy
import functools
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Int
from torch import Tensor, nn

from probe.hf.accumulate import _LayerAcc, _LayerResult
from probe.hf.arch import _architecture, _shape
from probe.hf.gated import gated_biases, is_adaption_prompt
from probe.hf.loading import load_dirs
from probe.hf.recording import _record_mode, _recording, _Stop
from probe.hf.resources import (
    _release_heap,
    _small_linalg,
    _threads,
    _worker_thread,
    chunk_size,
)
from probe.hf.run import _check_tokens, _forward, _prepared, _run, _Setup, _setup
from probe.hf.verify import _verify
from probe.probes import AttentionRecord, TheoremCheck, identities_expected
from probe.tuning import random_stand_in

# `probe check-theorem --base HF_DIR`'s default number of inputs (our own models: 256). The
# check's cost is two forwards per input, and 128 inputs already overdetermine what it
# estimates: per head and layer the bias subspace stacks N = 128 x T rows (2,432 for the
# 19-token sort_asc inputs) against 3 d_head columns (192 on GPT-2 small), its ranks are at most
# P and d_head, and every identity error and drift maximum is taken over those N query rows.
CHECK_INPUTS = 128


@torch.no_grad()
def check_hf(
    base_model: nn.Module,
    tokens: Int[Tensor, "batch pos"] | Sequence[Tensor],
    prefix: Any = None,
    tuned_model: nn.Module | None = None,
    *,
    position_offset: int | None = None,
    downstream: bool = True,
    tol_factor: float = 16.0,
    verify: bool = True,
    chunk: int | None = None,
) -> TheoremCheck:
    """Run every probe of :func:`probe.probes.check_theorem` on an HF model with a prefix.

    Arguments as for :func:`hf_records`; ``tokens`` may also be a list of [1, T_i] tensors (texts
    of different lengths, each its own chunk). The batch is processed ``chunk`` inputs at a time
    (default :func:`chunk_size`: a 24th of the model's size in activations) and the per-layer
    results merged: errors and drift maxima are maxima, tolerances the largest chunk's, the bias
    subspace exact over all rows. The merged decompositions keep ``alpha`` [1, H, N] and
    ``beta`` [1, H, N, P] over the N = batch x T content rows; ``A``, ``z_base``, ``bias`` and
    ``bias_out`` are None (use :func:`hf_records` on a few inputs for those).
    """
    return _check_hf(
        base_model,
        tokens,
        prefix,
        tuned_model,
        position_offset,
        downstream,
        tol_factor,
        verify,
        chunk,
    ).result


class HFCheck(NamedTuple):
    """A :func:`check_hf` run with what it was computed from (what the CLI prints).

    result: the TheoremCheck; what: a phrase naming the tuning; records: the first chunk's
    per-layer AttentionRecords of the tuned run (first input only); frozen: per layer, whether
    the head's input side equals the base's; positions: which positions prefix and content have.
    """

    result: TheoremCheck
    what: str
    records: list[AttentionRecord]
    frozen: list[bool]
    positions: str = ""


def _positions(s: _Setup, offset: int, T: int) -> str:
    rotary = _architecture(s.base).rotary
    content = f"content at positions {offset}..{offset + T - 1}"
    if s.kind == "peft_prefix":
        how = "unrotated cached keys (score as keys at position 0)" if rotary else "cached keys"
        return f"{content}; prefix: PEFT's {how}"
    if s.kind == "peft_prompt":
        return f"{content}; prefix: virtual tokens at positions 0..{s.P - 1}"
    if s.kind == "kv":
        return f"{content}; prefix: the given keys, used as they are"
    return content


def _check_hf(
    base_model,
    tokens,
    prefix,
    tuned_model,
    position_offset,
    downstream,
    tol_factor,
    verify,
    chunk=None,
) -> HFCheck:
    """:func:`check_hf` with what the CLI prints next to its result (:class:`HFCheck`)."""
    s, offset, first, batches = _chunks(
        base_model, tokens, prefix, tuned_model, position_offset, chunk
    )
    # Three threads at one intra-op thread each share the cores without OpenMP's barriers (which
    # stall when other jobs share the cores): the caller's runs the tuned model; a second
    # runs the base model one chunk ahead (downstream drift; not where the base run switches an
    # adapter off, a LoRA injected into the base: there the caller's thread runs it first); a
    # third runs the probes on each layer's record as it arrives, and a layer's merged result
    # once its last chunk is in, while the tuned run goes on with the next layers.
    base_aside = downstream and s.base_off is contextlib.nullcontext
    with contextlib.ExitStack() as stack:
        stack.enter_context(_threads(1))
        if verify:
            _verify(s, first, offset)
        stack.enter_context(_record_mode([s.runner, s.base_runner]))
        probe_pool = stack.enter_context(ThreadPoolExecutor(1, initializer=_worker_thread))
        base_pool = ThreadPoolExecutor(1, initializer=_worker_thread) if base_aside else None
        if base_pool is not None:
            stack.enter_context(base_pool)
        stream = _Stream(s, offset, downstream, tol_factor, probe_pool, base_pool)
        merged = stream.run(batches)
    n_layers = len(merged)
    result = TheoremCheck(
        decompositions=[m.decomposition for m in merged],
        local=[m.local for m in merged],
        downstream=[m.downstream for m in merged] if downstream else None,
        subspaces=[m.subspace for m in merged],
        pattern_tol=[a.p_tol for a in stream.accs],
        z_tol=[a.z_tol for a in stream.accs],
        expected=identities_expected([s.P] * n_layers, s.frozen),
    )
    if is_adaption_prompt(s.runner):  # its own identity, on the first chunk
        t, rows = batches[0]
        with _threads(1):
            result.gated = gated_biases(s, t[rows], offset, tol_factor)
    return HFCheck(
        result, s.description, stream.kept, list(s.frozen), _positions(s, offset, first.shape[1])
    )


def _chunks(
    base_model, tokens, prefix, tuned_model, position_offset, chunk
) -> tuple[_Setup, int, Tensor, list[tuple[Tensor, slice]]]:
    """The run setup, the content offset, the first tokens (the [1, T_0] first text of a list,
    else the whole [batch, T] tensor) and the chunks: (tokens, rows) per run, the rows of a
    [batch, T] tensor ``chunk`` at a time (default :func:`chunk_size`), each text of a list
    whole."""
    pieces = list(tokens) if not isinstance(tokens, Tensor) else None
    first = pieces[0] if pieces else tokens
    if pieces and any(p.ndim != 2 or p.shape[0] != 1 for p in pieces):
        raise ValueError("a list of token tensors takes one [1, T] tensor per text")
    s, offset = _prepared(base_model, prefix, tuned_model, first, position_offset)
    if pieces:
        for p in pieces:
            _check_tokens(s.base, p, offset)
    size = chunk or chunk_size(s.base, first.shape[1])
    if s.kind == "kv" and pieces and s.kv[0].keys.shape[0] != 1:
        raise ValueError("per-example raw prefixes need one token batch, not a list of texts")
    batches = (
        [(p, slice(None)) for p in pieces]
        if pieces
        else [(tokens, slice(i, i + size)) for i in range(0, tokens.shape[0], size)]
    )
    return s, offset, first, batches


class _Stream:
    """One check's chunks streamed through the threads of :func:`_check_hf`: the tuned runs on
    the caller's thread, the base runs on ``base_pool`` (None: the caller's thread, first), the
    probes on ``probe_pool``; each layer's results accumulate in a :class:`_LayerAcc` per layer."""

    def __init__(
        self,
        s: _Setup,
        offset: int,
        downstream: bool,
        tol_factor: float,
        probe_pool: ThreadPoolExecutor,
        base_pool: ThreadPoolExecutor | None,
    ):
        self.s, self.offset, self.downstream, self.tol_factor = s, offset, downstream, tol_factor
        self.probe_pool, self.base_pool = probe_pool, base_pool
        n_layers = _shape(s.base).n_layers
        self.accs = [_LayerAcc() for _ in range(n_layers)]
        self.finals: list[Future | None] = [None] * n_layers  # each layer's merged result, to come
        self.kept: list[AttentionRecord] = []  # the first input's records, for the CLI's header
        self.queued: collections.deque[Future] = collections.deque()

    def run(self, batches: list[tuple[Tensor, slice]]) -> list[_LayerResult]:
        """Every chunk's tuned run (and base run), probed; -> each layer's merged results."""
        base_records = self._base_run(batches, 0)
        for i, (t, rows) in enumerate(batches):
            ahead = self._base_run(batches, i + 1)  # the base run goes at most one chunk ahead
            last = i == len(batches) - 1
            on_record = functools.partial(self._on_record, base_records=base_records, last=last)
            _run(self.s, t, self.offset, rows, on_record, recompute=1, stop=True, mode_held=True)
            base_records = ahead
            del on_record
            _release_heap()
        return [job.result() for job in self.finals]

    def _base_records(self, t: Tensor, rows: slice) -> list[AttentionRecord]:
        recs: list[AttentionRecord] = []
        _run(self.s, t, self.offset, rows, recs.append, base=True, stop=True, mode_held=True)
        _release_heap()
        return recs

    def _base_run(self, batches: list[tuple[Tensor, slice]], i: int) -> Future | None:
        """Chunk ``i``'s base records, to come (None: no downstream drift, or no such chunk)."""
        if not self.downstream or i >= len(batches):
            return None
        if self.base_pool is not None:
            return self.base_pool.submit(self._base_records, *batches[i])
        done = Future()
        done.set_result(self._base_records(*batches[i]))
        return done

    def _on_record(self, rec: AttentionRecord, base_records: Future | None, last: bool) -> None:
        if len(self.kept) == rec.layer:  # the first chunk's first input, for the CLI's header
            self.kept.append(_first_row(rec))
        job = self.probe_pool.submit(self._probe, rec, base_records, last)
        if last:
            self.finals[rec.layer] = job
        self.queued.append(job)
        while len(self.queued) > 2:  # at most two records wait for the probes
            self.queued.popleft().result()
        if rec.layer % 4 == 3:  # within a run too: a lower peak for a little time
            _release_heap()

    def _probe(
        self, rec: AttentionRecord, base_records: Future | None, last: bool
    ) -> _LayerResult | None:
        """On the probes' thread: add the record to its layer; the merged result after the last."""
        acc = self.accs[rec.layer]
        base_rec = base_records.result()[rec.layer] if base_records else None
        acc.add(rec, base_rec, self.tol_factor)
        if not last:
            return None
        with _small_linalg():
            return acc.result(rec.layer)


def _first_row(rec: AttentionRecord) -> AttentionRecord:
    r = copy.copy(rec)
    for n in (
        "q",
        "k",
        "v",
        "prefix_k",
        "prefix_v",
        "pattern",
        "z",
        "q_frozen",
        "k_frozen",
        "v_frozen",
    ):
        t = getattr(rec, n)
        setattr(r, n, None if t is None else t[:1].clone())
    return r


def check_hf_dirs(
    model_dir: str | Path,
    adapter_dir: str | Path | None,
    tokens: Int[Tensor, "batch pos"],
    *,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    position_offset: int | None = None,
    tol_factor: float = 16.0,
) -> TheoremCheck:
    """:func:`check_hf` for a saved HF model directory and a saved PEFT adapter directory."""
    base, kwargs = load_dirs(model_dir, adapter_dir, dtype, device)
    return check_hf(base, tokens, position_offset=position_offset, tol_factor=tol_factor, **kwargs)


@torch.no_grad()
def check_theorem_dirs(
    model_dir: str | Path,
    adapter_dir: str | Path | None,
    tokens: Int[Tensor, "batch pos"] | Sequence[Tensor],
    *,
    prefix_len: int = 4,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    tol_factor: float = 16.0,
    verify: bool = True,
) -> HFCheck:
    """What ``probe check-theorem --base HF_DIR [--adapter ADAPTER_DIR]`` runs.

    tokens: [batch, T] ids, or a list of [1, T_i] (texts). Without an adapter, a random
    key/value prefix of ``prefix_len`` positions per layer, in the range of the model's own
    (rotated) keys and values on the first 16 inputs (:func:`probe.tuning.random_stand_in`),
    seeded.
    """
    base, kwargs = load_dirs(model_dir, adapter_dir, dtype, device)
    stand_in = None  # the random prefix's phrase, when there is one
    if adapter_dir is None:
        first = tokens if isinstance(tokens, Tensor) else tokens[0]
        # One thread for the statistics too: on a loaded machine, more threads slow these small
        # mean/std reductions down (the values are the same: each is over one dimension).
        with _threads(1):
            kv = _own_keys_values(base, first[:16])
            n_layers = _shape(base).n_layers
            kwargs["prefix"], stand_in = random_stand_in(kv, n_layers, prefix_len, seed)
        del kv  # free the keys and values before the check
    run = _check_hf(
        base,
        tokens,
        kwargs.get("prefix"),
        kwargs.get("tuned_model"),
        None,
        True,
        tol_factor,
        verify,
    )
    return run if stand_in is None else run._replace(what=stand_in)


def _own_keys_values(base: nn.Module, tokens: Tensor) -> dict[str, Tensor]:
    """The base's own keys and values [b, T, G, e] per layer on ``tokens`` [b, T], named as
    :func:`probe.tuning.random_stand_in` takes them; no records are made, and the forward stops
    after the last layer's attention."""
    kv: dict[str, Tensor] = {}
    last = _shape(base).n_layers - 1

    def on_layer(layer, r):
        for n in "kv":
            kv[f"blocks.{layer}.attn.hook_{n}"] = r[n].transpose(1, 2)
        if layer == last:
            raise _Stop  # nothing after the last attention is needed

    plain = _setup(base, None, None, tokens.shape[0])
    with _recording(base, on_layer), contextlib.suppress(_Stop):
        _forward(plain, tokens, 0, slice(None), 1)
    return kv
