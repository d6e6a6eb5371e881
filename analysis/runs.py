"""The scheduler: train every unfinished run of a sweep, resumably, on an executor.

:func:`run_sweep` submits each run once its base is finished (here or by another process),
waits for runs other live processes hold, retries failures and reports what did not finish;
:func:`run_all` is the same, raising :class:`RunsFailed` if anything did not finish. Where runs
train (a local process pool, Ray, Slurm) is an :class:`analysis.executors.Executor`; what one
worker does (claim, train, commit) and the store, the only state the workers share, are
:mod:`analysis.store`'s. The store's names are re-exported here, so ``from analysis.runs import
Run, Store, execute`` keeps working.
"""

from __future__ import annotations

import secrets
import time
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from analysis.executors import LocalExecutor
from analysis.lifetime import check_main_guard
from analysis.store import (
    HEARTBEAT_S,
    LEGACY_WEIGHT_DECAY,
    LOG_KEEP,
    RUN_THREADS,
    STALE_AFTER_S,
    Claim,
    Run,
    RunFailed,
    Store,
    claim_and_execute,
    execute,
    one_line,
    variant,
)

__all__ = [
    "HEARTBEAT_S",
    "LEGACY_WEIGHT_DECAY",
    "LOG_KEEP",
    "RUN_THREADS",
    "STALE_AFTER_S",
    "Claim",
    "Failure",
    "Interrupted",
    "Outcome",
    "Run",
    "RunFailed",
    "RunsFailed",
    "Store",
    "claim_and_execute",
    "execute",
    "one_line",
    "run_all",
    "run_sweep",
    "variant",
]


@dataclass
class Failure:
    """A run that failed every attempt (``record``: its ``.<key>.failed``), or that was never
    started because its base failed (``record`` None, ``error`` names the base)."""

    run: Run
    error: str
    record: Path | None
    attempts: int = 0


@dataclass
class Outcome:
    """What :func:`run_sweep` did: runs this process trained, and the runs left unfinished."""

    trained: int = 0
    failed: list[Failure] = field(default_factory=list)

    def summary(self) -> str:
        """One line per unfinished run: its label, key, error and where the details are."""
        lines = []
        for f in self.failed:
            where = f"details: {f.record}" if f.record else "not started"
            tries = f" after {f.attempts} attempts" if f.attempts > 1 else ""
            lines.append(f"  {f.run.label} [{f.run.key}]{tries}: {f.error} ({where})")
        return "\n".join(lines)


class RunsFailed(RuntimeError):
    """Some runs did not finish; ``outcome`` says which and why. Raised after every other run
    was trained, so what finished is in the store."""

    def __init__(self, outcome: Outcome, store: Store):
        self.outcome = outcome
        n = len(outcome.failed)
        super().__init__(
            f"{n} run{'s' * (n != 1)} did not finish (errors and logs in "
            f"{Path(store.root)}/.<key>.failed); fix the cause and rerun to train only what is "
            "missing, or pass --retries N for transient failures"
        )


class Interrupted(KeyboardInterrupt):
    """A sweep stopped by Ctrl-C (SIGINT): its runs in flight were stopped and what they left
    removed; ``finished`` of the sweep's ``total`` runs (bases included) are in the store, and
    running the same sweep again trains only the rest."""

    def __init__(self, finished: int, total: int, root: Path):
        self.finished, self.total, self.root = finished, total, root
        super().__init__(f"{finished} of {total} runs finished (kept in {root})")


class _Sweep:
    """One :func:`run_sweep`'s bookkeeping: the pending runs, the futures in flight, the attempts
    per run, the progress bar. ``store`` is read here; ``shared`` (the same directory, resolved)
    is what the workers are sent."""

    def __init__(self, runs, store: Store, shared: Store, executor, device, poll, retries):
        self.store, self.shared, self.executor = store, shared, executor
        self.device, self.poll, self.retries = device, poll, retries
        # Pending runs by key, in submission order. A key hashes the whole spec (its base's too),
        # so each is computed once here rather than on every poll (hashing a spec is not free).
        self.todo: dict[str, Run] = {}
        self.base_key: dict[str, str | None] = {}
        self.every: set[str] = set()  # the sweep's keys, finished or not
        for run in runs:
            self._add(run)
        self.outcome = Outcome()
        self.attempts: dict[str, int] = {}
        self.done = 0  # runs finished while this sweep ran, here or by another process
        self.running: dict = {}  # future -> (key, attempt token)
        self.bar = tqdm(total=len(self.todo), desc="runs", disable=not self.todo)

    def _add(self, run: Run) -> None:
        """Queue ``run`` after its base (recursively), unless it is in the store already."""
        if run.base is not None:
            self._add(run.base)
        key = run.key
        self.every.add(key)
        if key not in self.todo and not self.store.has(key):
            self.todo[key] = run
            self.base_key[key] = run.base.key if run.base is not None else None

    def _in_flight(self) -> set[str]:
        return {key for key, _ in self.running.values()}

    def _show(self, starting: int = 0) -> None:
        """Update the bar's counts; ``starting``: a run being submitted (trained in-process)."""
        n_running = len(self.running) + starting
        self.bar.set_postfix_str(
            f"{self.done} done, {n_running} running, {len(self.outcome.failed)} failed, "
            f"{len(self.todo) - n_running} remaining"
        )

    def drive(self) -> None:
        """Schedule and collect until no run is pending."""
        while self.todo:
            in_flight = self._in_flight()
            self._drop_finished_elsewhere(in_flight)
            self._submit_ready(in_flight)
            self._show()
            if not self.running:
                if self.todo:
                    time.sleep(self.poll)  # waiting for runs (or bases) other processes hold
                continue
            finished, _ = wait(self.running, timeout=self.poll, return_when=FIRST_COMPLETED)
            for future in finished:
                self._collect(future)
        self._show()

    def _drop_finished_elsewhere(self, in_flight: set[str]) -> None:
        """Runs not in flight here that another process committed to the store."""
        finished = [key for key in self.todo if key not in in_flight and self.store.has(key)]
        for key in finished:
            del self.todo[key]
        self.done += len(finished)
        self.bar.update(len(finished))

    def _submit_ready(self, in_flight: set[str]) -> None:
        """Submit the first pending runs, in order, whose base is finished and whose claim no
        other live process holds, while the executor has free slots."""
        free = self.executor.slots - len(self.running)
        for key, run in list(self.todo.items()):
            if free <= 0:
                break
            base_key = self.base_key[key]
            if key in in_flight or (base_key is not None and not self.store.has(base_key)):
                continue
            if self.store.claimed_elsewhere(key):
                continue
            attempt = secrets.token_hex(8)
            self._show(starting=1)
            future = self.executor.submit(run, self.shared, self.device, attempt)
            self.running[future] = (key, attempt)
            free -= 1

    def _collect(self, future) -> None:
        """A finished future: the run is done, failed (retry or give up), or another process
        claimed it first (``None``: it stays pending and is waited for)."""
        key, attempt = self.running.pop(future)
        run = self.todo[key]
        try:
            result = future.result()
        except Exception as e:  # the run raised, or its worker died
            self._failed(key, run, attempt, e)
            return
        if result is not None:
            self.outcome.trained += bool(result)
            del self.todo[key]
            self.done += 1
            self.bar.update()

    def _failed(self, key: str, run: Run, attempt: str, error: Exception) -> None:
        """Count the attempt; record the failure if the worker died before it could; give up
        once the attempts exceed ``retries``."""
        self.attempts[key] = self.attempts.get(key, 0) + 1
        record = self.store.read_failure(key)
        if record is None or record.get("attempt") != attempt:
            # No record from this attempt: the worker died before writing one.
            message = f"{self.executor.name} worker failed: {one_line(error)}"
            self.store.record_failure(run, message, f"executor error:\n{error}\n", attempt)
        else:
            message = record["error"]
        if self.attempts[key] > self.retries:
            self._give_up(key, message, self.store.failure_path(key))

    def _give_up(self, key: str, error: str, record: Path | None) -> None:
        """Report ``key`` as failed, and with it every pending run that needs it as a base."""
        run = self.todo.pop(key)
        self.outcome.failed.append(Failure(run, error, record, self.attempts.get(key, 0)))
        in_flight = self._in_flight()
        for other in list(self.todo):
            if self.base_key[other] == key and other not in in_flight:
                self._give_up(other, f"its base {run.label} [{key}] failed", None)

    def finished_in_store(self) -> int:
        """How many of the sweep's runs (bases included) the store holds."""
        return sum(self.store.has(key) for key in self.every)

    def cancel_pending(self) -> None:
        for future in self.running:
            future.cancel()


def run_sweep(
    runs: list[Run],
    store: Store,
    jobs: int = 1,
    device: str = "cpu",
    poll: float = 0.5,
    executor=None,
    retries: int = 0,
) -> Outcome:
    """Run every unfinished run (and the base runs they need) on ``executor`` (default: a
    local pool of ``jobs`` processes). A tuning run is submitted once its base is finished,
    here or elsewhere; at most ``executor.slots`` runs are in flight. Runs claimed by other
    live processes are waited for, not redone. A failed run is retried up to ``retries`` times,
    then reported with the runs that needed it as a base; every other run still trains.

    Ctrl-C (KeyboardInterrupt) stops the runs in flight (:meth:`Executor.stop`), removes what
    they left and raises :class:`Interrupted`.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}; pass --jobs 1 or more")
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}; pass --retries 0 or more")
    own = executor is None
    executor = LocalExecutor(jobs) if own else executor  # starts nothing until a submit
    check_main_guard(spawning=isinstance(executor, LocalExecutor) and executor.slots > 1)
    root = Path(store.root).resolve()  # workers elsewhere must not read it against their cwd
    root.mkdir(parents=True, exist_ok=True)
    store.clean()
    shared = Store(root, stale_after=store.stale_after)  # what is sent to the workers
    sweep = _Sweep(runs, store, shared, executor, device, poll, retries)
    try:
        sweep.drive()
    except KeyboardInterrupt:
        sweep.bar.close()
        executor.stop()
        store.clean()  # the stopped workers are gone: their temporaries and claims go too
        raise Interrupted(sweep.finished_in_store(), len(sweep.every), root) from None
    finally:
        sweep.cancel_pending()
        if own:
            executor.close()
        sweep.bar.close()
    return sweep.outcome


def run_all(
    runs: list[Run],
    store: Store,
    jobs: int = 1,
    device: str = "cpu",
    poll: float = 0.5,
    executor=None,
    retries: int = 0,
) -> int:
    """:func:`run_sweep`, returning how many runs this process trained; raises
    :class:`RunsFailed` (after training every run it could) if any run did not finish."""
    outcome = run_sweep(runs, store, jobs, device, poll, executor, retries)
    if outcome.failed:
        raise RunsFailed(outcome, store)
    return outcome.trained
