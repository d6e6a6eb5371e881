"""Declarative training runs and a result store keyed by the full spec: what one worker does.

A :class:`Run` names everything that determines its result (task, model, method, options,
budget, seed, and its base run), so its key is a hash of that spec: re-running skips finished
runs and an interrupted sweep resumes. A run's directory is written in a temporary sibling
(``.<key>.tmp-<host>-<pid>-*``) and renamed into place once complete (:func:`execute`), so a
half-written run is never read back as a result.

Several processes, on one host or on several sharing a filesystem, may work on one store at
once (see :class:`Store`): each run is claimed before it is trained
(:func:`claim_and_execute`, what every executor's worker runs), claims of crashed processes
are taken over, and a result, once committed, is never replaced. Every run trains at
``RUN_THREADS`` intra-op threads whatever ``jobs`` is, so its numbers do not depend on how it
was scheduled.

A run that raises leaves ``.<key>.failed`` in the store (the error, the traceback and the
run's output), never a result; it is removed once the run succeeds.

Which runs to train, where and in what order is :mod:`analysis.runs`'s (the scheduler) and
:mod:`analysis.executors`' (the workers); this module imports neither.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from io import StringIO, TextIOBase
from pathlib import Path
from typing import Any

import torch

from probe import io
from probe.adapters import AdapterConfig, adapter_config, load_adapter
from probe.config import PRETRAIN_LR, PRETRAIN_WEIGHT_DECAY
from probe.model import Transformer, preset
from probe.train import DEFAULT_LR, DEFAULT_WEIGHT_DECAY, TrainConfig, evaluate, pretrain, tune
from tasks import get_task
from tasks.errors import first_line

# Intra-op threads of every run, part of its key: float reductions split over another number of
# threads round differently, so the thread count must not follow --jobs or the core count.
RUN_THREADS = 1
# The weight decay every run trained with before it became a Run field. A spec whose weight decay
# is this one leaves it out of its key, so that those runs' keys, and the stores holding them,
# stay valid: it is fixed, whatever the training defaults become.
LEGACY_WEIGHT_DECAY = 0.1
# The held-out sequences a run scores at each point of its learning curve (progress, early stop);
# its result's accuracy uses every test sequence.
CURVE_SEQUENCES = 512
HEARTBEAT_S = 20.0  # how often a worker refreshes the claims it holds
STALE_AFTER_S = 300.0  # a claim not refreshed for this long belongs to a dead process or host


@dataclass(frozen=True)
class Run:
    """One training run: pretraining a base model (``method=None``) or tuning an adapter on it.

    ``model`` holds the preset's overrides and ``options`` the adapter's options (the fields of
    its :class:`~probe.adapters.AdapterConfig`), each given as a dict (or as (field, value)
    pairs) and kept as pairs, hashable. The key records the options as given, not the resolved
    config: ``{"length": 1}`` and ``{"length": 1, "init": "random"}`` build the same prompt but
    are two keys, as they always were, so that existing stores keep their results.
    ``eval_tasks`` are the extra tasks the result reports accuracy on.
    """

    task: str
    preset: str = "01"
    model: Mapping[str, Any] | tuple = ()
    method: str | None = None
    options: Mapping[str, Any] | tuple = ()
    base: Run | None = None
    steps: int = 1000
    lr: float | None = None  # None -> DEFAULT_LR[method] (PRETRAIN_LR for pretraining)
    batch_size: int = 64
    warmup: int = 50  # linear warm-up steps before the cosine decay (TrainConfig.warmup)
    seed: int = 0
    train_size: int | None = None  # None -> fresh samples every step; else a fixed train set
    target_accuracy: float | None = None
    eval_tasks: tuple[str, ...] = ()
    # The learning curve scores outputs after the first k: 1 for a mix4 base, whose exact match
    # without a task token is capped near 25-30% and so says little about the skills it holds.
    eval_given: int = 0
    weight_decay: float | None = (
        None  # None -> DEFAULT_WEIGHT_DECAY[method] or PRETRAIN_WEIGHT_DECAY
    )
    betas: tuple[float, float] | None = None  # Adam's (beta1, beta2); None -> TrainConfig's
    schedule: str | None = None  # after the warm-up; None -> TrainConfig's (cosine)

    def __post_init__(self):
        if (self.method is None) != (self.base is None):
            raise ValueError("a Run pretrains (no method, no base) or tunes (method and base)")
        for name in ("model", "options"):
            object.__setattr__(self, name, _pairs(getattr(self, name)))
        if self.betas is not None:
            object.__setattr__(self, "betas", tuple(self.betas))
        if self.betas is not None or self.schedule is not None:
            self.train_config("cpu")  # fail at spec time on bad optimiser settings
        get_task(self.task)  # fail at spec time on an unknown task
        for name in self.eval_tasks:
            get_task(name)
        if self.method is not None:
            self.adapter_config  # noqa: B018  (fail at spec time on unknown options)
        elif self.options:
            raise ValueError("a pretraining Run takes no adapter options")

    @property
    def adapter_config(self) -> AdapterConfig:
        """The typed config of the adapter this run tunes."""
        return adapter_config(self.method, **dict(self.options))

    def spec(self) -> dict:
        """Everything that determines the result; defaults resolved, so that changing a
        default (``DEFAULT_LR``) changes the key instead of reusing a stale result."""
        d = asdict(self)
        d["base"] = self.base.key if self.base else None
        d["lr"] = self.effective_lr
        d["threads"] = RUN_THREADS
        # Left out at the legacy value, so that the keys of runs from before the field still hold.
        d["weight_decay"] = self.effective_weight_decay
        if d["weight_decay"] == LEGACY_WEIGHT_DECAY:
            del d["weight_decay"]
        for name in ("betas", "schedule"):  # likewise: keys from before these fields
            if d[name] is None:
                del d[name]
        return d

    @property
    def effective_lr(self) -> float:
        return self.lr or (DEFAULT_LR[self.method] if self.method else PRETRAIN_LR)

    @property
    def effective_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return DEFAULT_WEIGHT_DECAY[self.method] if self.method else PRETRAIN_WEIGHT_DECAY

    @property
    def key(self) -> str:
        text = json.dumps(self.spec(), sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        method = self.method or f"pretrain[{self.preset}]"
        return f"{method} {self.task} seed {self.seed}"

    def train_config(self, device: str) -> TrainConfig:
        return TrainConfig(
            steps=self.steps,
            lr=self.effective_lr,
            weight_decay=self.effective_weight_decay,
            batch_size=self.batch_size,
            warmup=min(self.warmup, self.steps),
            seed=self.seed,
            target_accuracy=self.target_accuracy,
            device=device,
            progress=False,
            eval_every=max(10, self.steps // 20),  # a 20-point learning curve per run
            eval_size=CURVE_SEQUENCES,
            eval_given=self.eval_given,
            train_size=self.train_size,
            **({"betas": self.betas} if self.betas is not None else {}),
            **({"schedule": self.schedule} if self.schedule is not None else {}),
        )


def variant(run: Run, **changes) -> Run:
    """A copy of ``run`` with some fields changed."""
    return replace(run, **changes)


def _pairs(fields: Mapping[str, Any] | tuple) -> tuple:
    """(field, value) pairs, hashable (list values as tuples): a dict's sorted by field, given
    pairs in their order. Either way the key serialises them exactly as it always did."""
    items = sorted(fields.items()) if isinstance(fields, Mapping) else fields
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in items)


@dataclass(frozen=True)
class Claim:
    """Who is training a run: written once into ``root/.<key>.claim`` (created atomically with
    O_EXCL, which works across hosts on a shared filesystem); its mtime is the heartbeat."""

    host: str
    pid: int
    token: str

    def owned_by_me(self) -> bool:
        return (self.host, self.pid) == (io.HOST, os.getpid())


@dataclass
class Store:
    """Results on disk: ``root/<key>/result.json`` plus ``model/`` or ``adapter/``.

    Shared by many processes and hosts: ``<key>/`` appears in one atomic rename and is never
    replaced; ``.<key>.claim`` says who is training it (stale when its pid is gone on this host
    or its heartbeat is older than ``stale_after`` seconds); ``.<key>.tmp-<host>-<pid>-*`` is a
    run being written, removed only once its owner is provably dead.
    """

    root: Path
    _cache: dict = field(default_factory=dict)
    stale_after: float = STALE_AFTER_S

    def path(self, run: Run) -> Path:
        return Path(self.root) / run.key

    def done(self, run: Run) -> bool:
        return self.has(run.key)

    def has(self, key: str) -> bool:
        """Whether the run with this key is committed (its ``result.json`` exists)."""
        return (Path(self.root) / key / "result.json").is_file()

    def result(self, run: Run) -> dict:
        if run.key not in self._cache:
            self._cache[run.key] = json.loads((self.path(run) / "result.json").read_text())
        return self._cache[run.key]

    def model(self, run: Run) -> Transformer:
        """The base model of a pretraining run, or the base a tuning run was tuned on."""
        base = run if run.method is None else run.base
        return Transformer.load(self.path(base) / "model")

    def adapter(self, run: Run, base: Transformer):
        return load_adapter(self.path(run) / "adapter", base)

    # ------------------------------------------------------------------ claims

    def claim_path(self, key: str) -> Path:
        return Path(self.root) / f".{key}.claim"

    def read_claim(self, path: Path) -> tuple[Claim | None, float] | None:
        """(claim, heartbeat mtime) of a claim file; claim None if unreadable (a writer killed
        between creating and filling it); None if there is no such file."""
        try:
            mtime = path.stat().st_mtime
            data = json.loads(path.read_text())
            return Claim(data["host"], int(data["pid"]), data["token"]), mtime
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return None, mtime

    def is_stale(self, claim: Claim | None, mtime: float) -> bool:
        if claim is not None and claim.host == io.HOST and not io.pid_alive(claim.pid):
            return True  # proof: its process is gone
        return time.time() - mtime > self.stale_after  # its host or process stopped beating

    def claimed_elsewhere(self, key: str) -> bool:
        """A live claim on ``key`` by another process."""
        got = self.read_claim(self.claim_path(key))
        return got is not None and not self.is_stale(*got) and not (got[0] and got[0].owned_by_me())

    def try_claim(self, key: str) -> Claim | None:
        """Claim ``key`` for this process, taking over a stale claim; None if it is live."""
        path = self.claim_path(key)
        for _ in range(3):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if not self._break_if_stale(path):
                    return None
                continue
            claim = Claim(io.HOST, os.getpid(), secrets.token_hex(8))
            with os.fdopen(fd, "w") as f:
                json.dump({**asdict(claim), "started": time.time()}, f)
            return claim
        return None

    def _break_if_stale(self, path: Path) -> bool:
        """Remove a stale claim; True if the claim is gone (so claiming may be retried)."""
        got = self.read_claim(path)
        if got is None:
            return True
        if not self.is_stale(*got):
            return False
        # Rename first, so that of several processes breaking it only one succeeds.
        grave = path.with_name(f"{path.name}.stale-{io.owner_tag()}{secrets.token_hex(4)}")
        try:
            os.rename(path, grave)
        except FileNotFoundError:
            return True
        if self.read_claim(grave) != got:  # re-claimed between our read and rename: give back
            try:
                os.link(grave, path)
            except FileExistsError:
                pass  # a third claimant won; at worst one run is trained twice, same bytes
        grave.unlink(missing_ok=True)
        return True

    def release(self, claim: Claim, key: str) -> None:
        path = self.claim_path(key)
        got = self.read_claim(path)
        if got is not None and got[0] == claim:
            path.unlink(missing_ok=True)

    @contextmanager
    def holding(self, claim: Claim, key: str):
        """Refresh the claim's heartbeat in a thread while the body runs; release it after."""
        stop = threading.Event()

        def beat():
            while not stop.wait(HEARTBEAT_S):
                got = self.read_claim(self.claim_path(key))
                if got is not None and got[0] == claim:
                    os.utime(self.claim_path(key))

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.release(claim, key)

    # ------------------------------------------------------------------ failures

    def failure_path(self, key: str) -> Path:
        return Path(self.root) / f".{key}.failed"

    def record_failure(self, run: Run, error: str, details: str, attempt: str) -> Path:
        """Write ``.<key>.failed``: the one-line error, who failed and ``details`` (traceback,
        output). Replaced whole (rename) on each attempt, so a reader never sees half of one."""
        path = self.failure_path(run.key)
        text = (
            f"error: {error}\n"
            f"run: {run.label}\nkey: {run.key}\n"
            f"host: {io.HOST}\npid: {os.getpid()}\nattempt: {attempt}\n"
            f"at: {datetime.now(timezone.utc).isoformat(timespec='seconds')}\n"
            f"spec: {json.dumps(run.spec(), sort_keys=True, default=list)}\n\n{details}"
        )
        # Named like a result's temporary, so clean() removes it if its writer dies mid-write.
        tmp = path.with_name(f"{path.name}.tmp-{io.owner_tag()}{secrets.token_hex(4)}")
        tmp.write_text(text)
        os.replace(tmp, path)
        return path

    def read_failure(self, key: str) -> dict | None:
        """The header fields of ``.<key>.failed`` (error, run, host, attempt, ...), or None."""
        try:
            text = self.failure_path(key).read_text()
        except FileNotFoundError:
            return None
        header = text.split("\n\n", 1)[0]
        return dict(line.split(": ", 1) for line in header.splitlines() if ": " in line)

    def clear_failure(self, key: str) -> None:
        self.failure_path(key).unlink(missing_ok=True)

    def clean(self) -> list[Path]:
        """Remove what provably dead processes left: their temporaries and claims. A live
        process's temporaries and anything this store did not name are left alone."""
        removed = []
        for entry in Path(self.root).glob(".*"):
            name = entry.name
            if name.endswith(".claim"):
                got = self.read_claim(entry)
                if got is not None and self.is_stale(*got) and self._break_if_stale(entry):
                    removed.append(entry)
                continue
            key, sep, rest = name[1:].partition(".tmp-")
            if not sep:
                key, sep, rest = name[1:].partition(".claim.stale-")
            owner = io.parse_owner(rest) if sep else None
            if owner is None:
                continue
            host, pid = owner
            if host == io.HOST:
                dead = io.owner_dead(host, pid)
            else:  # another host: dead once it holds no fresh claim and the file is old
                got = self.read_claim(self.claim_path(key))
                holder = got[0] if got else None
                fresh = got is not None and not self.is_stale(*got)
                mine = holder is not None and (holder.host, holder.pid) == owner
                try:
                    old = time.time() - entry.stat().st_mtime > self.stale_after
                except FileNotFoundError:  # another process cleaned it first
                    continue
                dead = old and not (fresh and mine)
            if dead:  # several processes may clean at once: missing entries are fine
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
        return removed


def execute(run: Run, root: Path, device: str = "cpu") -> dict:
    """Train one run and commit its directory ``<root>/<key>`` (``model/`` or ``adapter/``,
    and ``result.json``); returns the result.

    The commit is :func:`probe.io.staging_dir` then :func:`probe.io.publish_dir`, as in
    ``io.save_dir``: one atomic rename of a temporary sibling, with the umask's modes. Unlike
    ``save_dir``, finding the key already committed is no error and never a replacement: the
    run is deterministic in its spec, so another process that committed it first wrote the same
    result, and its directory stays while this one is discarded.
    """
    cfg = run.train_config(device)
    task = get_task(run.task)
    if run.method is None:
        torch.manual_seed(run.seed)
        model = Transformer(preset(run.preset, **dict(run.model)))
        result = pretrain(task, model, cfg)
        forward, n_params = model, model.n_params
    else:
        model = Transformer.load(Path(root) / run.base.key / "model", device)
        adapter, result = tune(model, task, run.adapter_config, cfg)
        forward, n_params = partial(adapter, model), adapter.n_params
    model.eval()
    accuracy = {
        name: evaluate(forward, get_task(name), device=device)
        for name in dict.fromkeys((run.task, *run.eval_tasks))
    }
    given = {  # the skills a base holds once told the task (see Run.eval_given)
        name: evaluate(forward, get_task(name), device=device, given=run.eval_given)
        for name in accuracy
        if run.eval_given
    }
    summary = {
        "spec": run.spec(),
        "key": run.key,
        "steps": result.steps,
        "seconds": result.seconds,
        "accuracy": accuracy,
        **({"accuracy_given": given} if given else {}),
        "history": result.history,
        "n_params": n_params,
        "base_params": model.n_params,
    }
    target = Path(root) / run.key
    with io.staging_dir(target) as tmp:
        if run.method is None:
            model.save(tmp / "model")
        else:
            adapter.save(tmp / "adapter", model)
        (tmp / "result.json").write_text(json.dumps(summary, indent=1) + "\n")
        try:  # never replaces a non-empty directory: a committed result stays
            io.publish_dir(tmp, target)
        except OSError as e:
            done = (target / "result.json").is_file()
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not done:
                raise
            # Another process committed the same run meanwhile: same spec, same bytes; keep it.
    return summary


class RunFailed(Exception):
    """A run raised; its error, traceback and output are in the store's ``.<key>.failed``.
    Carries only strings, so it crosses any executor's pickling."""

    def __init__(self, key: str, message: str):
        super().__init__(key, message)
        self.key, self.message = key, message

    def __str__(self) -> str:
        return self.message


class _Tee(TextIOBase):
    """Writes to a stream and keeps a copy: the run's output still shows where the worker's
    output goes (terminal, Ray or Slurm log) and is kept for its failure record."""

    def __init__(self, stream, copy: StringIO):
        self.stream, self.copy = stream, copy

    def write(self, text: str) -> int:
        self.copy.write(text)
        if self.stream is not None:
            self.stream.write(text)
        return len(text)

    def flush(self) -> None:
        if self.stream is not None:
            self.stream.flush()


LOG_KEEP = 100_000  # characters of a failed run's output kept in its record (the end)


one_line = first_line  # the name the scheduler and its users import


def claim_and_execute(run: Run, store: Store, device: str, attempt: str = "") -> dict | None:
    """Claim, train and commit ``run`` at RUN_THREADS threads; None if another live process
    holds its claim. A run found finished once claimed is not trained again. If the run raises,
    its failure record is written while the claim is still held and :class:`RunFailed` raised;
    ``attempt`` names this try in the record, so the scheduler can tell it was written."""
    claim = store.try_claim(run.key)
    if claim is None:
        return None
    with store.holding(claim, run.key):
        if store.done(run):
            store.clear_failure(run.key)
            return {}
        threads = torch.get_num_threads()
        torch.set_num_threads(RUN_THREADS)
        log = StringIO()
        try:
            with redirect_stdout(_Tee(sys.stdout, log)), redirect_stderr(_Tee(sys.stderr, log)):
                result = execute(run, Path(store.root), device)
        except Exception as e:
            details = f"traceback:\n{traceback.format_exc()}\noutput:\n{log.getvalue()[-LOG_KEEP:]}"
            store.record_failure(run, one_line(e), details, attempt)
            raise RunFailed(run.key, one_line(e)) from None
        finally:
            torch.set_num_threads(threads)
        store.clear_failure(run.key)
        return result
