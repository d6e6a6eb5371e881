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
    # Pending runs by key, in submission order. A key hashes the whole spec (its base's too),
    # so each is computed once here: recomputing them on every poll kept the scheduler busy.
    todo: dict[str, Run] = {}
    base_key: dict[str, str | None] = {}
    every: set[str] = set()  # the sweep's keys, finished or not

    def add(run: Run):
        if run.base is not None:
            add(run.base)
        key = run.key
        every.add(key)
        if key not in todo and not store.has(key):
            todo[key] = run
            base_key[key] = run.base.key if run.base is not None else None

    for run in runs:
        add(run)
    outcome, attempts, done_count = Outcome(), {}, 0
    bar = tqdm(total=len(todo), desc="runs", disable=not todo)
    running: dict = {}  # future -> (key, attempt token)

    def show(starting: int = 0):  # starting: a run being submitted (trained, in-process)
        n_running = len(running) + starting
        bar.set_postfix_str(
            f"{done_count} done, {n_running} running, {len(outcome.failed)} failed, "
            f"{len(todo) - n_running} remaining"
        )

    def give_up(key: str, error: str, record: Path | None):
        run = todo.pop(key)
        outcome.failed.append(Failure(run, error, record, attempts.get(key, 0)))
        in_flight = {k for k, _ in running.values()}
        for other in list(todo):  # runs that need it as a base cannot start
            if base_key[other] == key and other not in in_flight:
                give_up(other, f"its base {run.label} [{key}] failed", None)

    try:
        while todo:
            in_flight = {k for k, _ in running.values()}
            finished = [k for k in todo if k not in in_flight and store.has(k)]
            for key in finished:  # by another process
                del todo[key]
            done_count += len(finished)
            bar.update(len(finished))
            free = executor.slots - len(running)
            for key, run in list(todo.items()):  # submit the first ready runs, in order
                if free <= 0:
                    break
                base = base_key[key]
                if key in in_flight or (base is not None and not store.has(base)):
                    continue
                if store.claimed_elsewhere(key):
                    continue
                attempt = secrets.token_hex(8)
                show(starting=1)
                running[executor.submit(run, shared, device, attempt)] = (key, attempt)
                free -= 1
            show()
            if not running:
                if todo:
                    time.sleep(poll)  # waiting for runs (or bases) that other processes hold
                continue
            finished_futures, _ = wait(running, timeout=poll, return_when=FIRST_COMPLETED)
            for future in finished_futures:
                key, attempt = running.pop(future)
                run = todo[key]
                try:
                    result = future.result()
                except Exception as e:  # the run raised, or its worker died
                    attempts[key] = attempts.get(key, 0) + 1
                    record = store.read_failure(key)
                    if record is None or record.get("attempt") != attempt:
                        # No record from this attempt: the worker died before writing one.
                        error = f"{executor.name} worker failed: {one_line(e)}"
                        store.record_failure(run, error, f"executor error:\n{e}\n", attempt)
                    else:
                        error = record["error"]
                    if attempts[key] > retries:
                        give_up(key, error, store.failure_path(key))
                    continue
                if result is not None:  # None: another process claimed it first; wait
                    outcome.trained += bool(result)
                    del todo[key]
                    done_count += 1
                    bar.update()
        show()
    except KeyboardInterrupt:
        bar.close()
        executor.stop()
        store.clean()  # the stopped workers are gone: their temporaries and claims go too
        raise Interrupted(sum(store.has(k) for k in every), len(every), root) from None
    finally:
        for future in running:
            future.cancel()
        if own:
            executor.close()
        bar.close()
    return outcome


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
