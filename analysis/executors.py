"""Where runs train: a local process pool, a Ray cluster or a Slurm cluster.

An :class:`Executor` trains one run per :meth:`Executor.submit` and answers with a
``concurrent.futures.Future`` of :func:`analysis.store.claim_and_execute`'s return: the
result, ``{}`` (already finished), ``None`` (another process holds the run's claim) or an
exception. Everything else
(which runs are ready, claims, commits, retries, failure records) is
:func:`analysis.runs.run_sweep`'s, the same for every executor; the store, a directory every
worker sees, is the only state they share. A run trains at ``RUN_THREADS`` threads on every
executor, so its result is the same bytes whichever executor trained it.

Ray and Slurm are optional extras (``prefix-probe[ray]``, ``prefix-probe[slurm]``), imported
only when chosen.

When the driver (the process running the sweep) dies, however it dies:

* local: its workers end with it (:mod:`analysis.lifetime`);
* ray: Ray ends the driver's tasks when the driver's job ends, which its death does; a Ray
  started by the driver (no ``address``) ends with it, its raylet, GCS and workers within
  seconds, its two idle agent processes once Ray's 60 s timeout for reporting the raylet's
  death has passed;
* slurm: submitted jobs keep running and commit their runs to the store; jobs still queued
  start later and do the same.

Whatever a dead worker left (a temporary, a claim) is cleaned or taken over by the next sweep,
and a run whose claim is still live (a Slurm job still training, its heartbeat fresh) is waited
for, not trained twice, so rerunning the same sweep finishes it with the same bytes.
"""

from __future__ import annotations

import importlib
import os
import shutil
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

from analysis.lifetime import Lifeline, check_main_guard, sigint_deferred, worker_init
from analysis.store import RUN_THREADS, Run, Store, claim_and_execute
from probe.hf import MissingExtraError

EXECUTORS = ("local", "ray", "slurm")
SLURM_SLOTS = 64  # Slurm jobs kept submitted at once unless --jobs says otherwise


def _require(module: str, extra: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"--executor {extra} needs {module}, which is not installed here: "
            f"pip install 'prefix-probe[{extra}]'"
        ) from e


class Executor:
    """Trains runs somewhere. ``slots``: how many runs the scheduler keeps in flight."""

    name = "executor"
    slots = 1

    def submit(self, run: Run, store: Store, device: str, attempt: str) -> Future:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the executor started (pools, a local Ray); runs in flight are lost
        (their claims go stale and are taken over)."""

    def stop(self) -> None:
        """End the runs in flight now (the sweep was interrupted), then :meth:`close`."""
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LocalExecutor(Executor):
    """``jobs`` spawned processes on this machine; ``jobs=1`` trains in this process (nothing
    to pickle, a debugger works). The workers ignore SIGINT and end when this process ends
    (:mod:`analysis.lifetime`); :meth:`stop` terminates them."""

    name = "local"

    def __init__(self, jobs: int = 1):
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {jobs}; pass --jobs 1 or more")
        self.slots = jobs
        self._pool = None

    def _new_pool(self) -> ProcessPoolExecutor:
        check_main_guard()
        return ProcessPoolExecutor(
            self.slots,
            mp_context=get_context("spawn"),
            initializer=worker_init,
            initargs=(Lifeline(),),
        )

    def _submit(self, *args) -> Future:
        # The pool spawns its workers in submit, in this thread: defer Ctrl-C while it does.
        with sigint_deferred():
            return self._pool.submit(claim_and_execute, *args)

    def submit(self, run: Run, store: Store, device: str, attempt: str) -> Future:
        if self.slots == 1:
            future = Future()
            try:
                future.set_result(claim_and_execute(run, store, device, attempt))
            except Exception as e:
                future.set_exception(e)
            return future
        if self._pool is None:
            self._pool = self._new_pool()
        try:
            return self._submit(run, store, device, attempt)
        except BrokenProcessPool:  # a worker died (killed, out of memory): start a new pool
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            return self._submit(run, store, device, attempt)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def stop(self) -> None:
        """Terminate the workers and wait until they have exited, so that what they leave in
        the store belongs to provably dead processes (:meth:`Store.clean` removes it)."""
        if self._pool is not None:
            # The pool's processes: no public handle on them before Python 3.14.
            workers = list(getattr(self._pool, "_processes", {}).values())
            for worker in workers:
                worker.terminate()
            for worker in workers:
                worker.join(5)
                if worker.is_alive():  # SIGTERM not acted on (stuck in the kernel): SIGKILL
                    worker.kill()
                    worker.join()
        self.close()


class RayExecutor(Executor):
    """Runs as Ray tasks, each asking for ``cpus_per_run`` CPUs and ``gpus_per_run`` GPUs
    (fractions share a GPU). With ``address`` it joins that cluster (``"auto"``: the one this
    node belongs to); without, it starts a local Ray of its own with ``num_cpus`` CPUs
    (default: this machine's), whatever ``RAY_ADDRESS`` says, and shuts it down on
    :meth:`close`. Ray's own task retries are off: ``--retries`` decides. ``jobs`` (default:
    what the cluster can run at once) caps the runs in flight.

    If the driver dies, Ray ends its tasks (they belong to the driver's job, which ends with
    it), and a local Ray it started ends too (its two idle agents a minute later); an
    interrupted sweep's :meth:`close` ends the Ray connection this executor made, which does the
    same. The next sweep cleans what the killed tasks left."""

    name = "ray"

    def __init__(
        self,
        address: str | None = None,
        jobs: int | None = None,
        cpus_per_run: float = RUN_THREADS,
        gpus_per_run: float = 0.0,
        num_cpus: int | None = None,
    ):
        ray = _require("ray", "ray")
        self._ray, self._started = ray, False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False)
            else:
                # "local": a new Ray of this process's own, even where RAY_ADDRESS is set or
                # a `ray start` cluster runs here (ray.init() would join that instead).
                ray.init(
                    address="local",
                    num_cpus=num_cpus,
                    include_dashboard=False,
                    log_to_driver=False,
                )
            self._started = True
        self._task = ray.remote(claim_and_execute).options(
            num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0
        )
        total = ray.cluster_resources()
        fit = int(total.get("CPU", 1) // cpus_per_run) if cpus_per_run else 1_000_000
        if gpus_per_run:
            fit = min(fit, int(total.get("GPU", 0) // gpus_per_run))
        if fit < 1:
            self.close()
            raise ValueError(
                f"no node of the Ray cluster has {cpus_per_run} CPUs and {gpus_per_run} GPUs "
                f"free for a run (cluster: {total}); lower --cpus-per-run / --gpus-per-run"
            )
        self.slots = jobs or fit

    def submit(self, run: Run, store: Store, device: str, attempt: str) -> Future:
        return self._task.remote(run, store, device, attempt).future()

    def close(self) -> None:
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False


class SlurmExecutor(Executor):
    """One Slurm job per run, through submitit: ``partition``, ``time_min`` (the job's time
    limit), ``gpus_per_run`` and ``cpus_per_run`` per job, ``extra`` any other sbatch option
    (``{"account": "x", "qos": "y"}``). Job scripts and logs go to ``folder``. ``cluster``
    ``"local"`` runs each job as a local process through submitit's own local executor (for
    tests and a dry run; no Slurm needed). ``jobs`` (default 64) caps the jobs submitted at
    once; Slurm queues them.

    An interrupted sweep (Ctrl-C) cancels its jobs (:meth:`close`). A driver that dies without
    that (kill -9, its node lost) leaves its jobs to Slurm: they run and commit their runs to
    the store, and a sweep started meanwhile waits for the runs they hold (live claims) instead
    of training them again."""

    name = "slurm"

    def __init__(
        self,
        folder: Path,
        jobs: int | None = None,
        partition: str | None = None,
        time_min: int = 60,
        gpus_per_run: int = 0,
        cpus_per_run: int = RUN_THREADS,
        extra: dict | None = None,
        cluster: str = "slurm",
    ):
        submitit = _require("submitit", "slurm")
        missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
        if cluster == "slurm" and missing:
            raise ValueError(
                f"--executor slurm: {' and '.join(missing)} not on PATH; run probe on a Slurm "
                "login node (or pass --slurm-cluster local to try the set-up on this machine)"
            )
        if gpus_per_run != int(gpus_per_run):
            raise ValueError(
                f"--gpus-per-run {gpus_per_run}: Slurm allocates whole GPUs; pass an integer"
            )
        self._executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
        params = {
            "name": "probe-run",
            "timeout_min": time_min,
            "cpus_per_task": int(cpus_per_run),
            "gpus_per_node": int(gpus_per_run),
        }
        if partition:
            params["slurm_partition"] = partition
        if extra:
            params["slurm_additional_parameters"] = dict(extra)
        self._executor.update_parameters(**params)
        self.slots = jobs or SLURM_SLOTS
        # job.result() polls the job's state; one waiting thread per job in flight.
        self._threads = ThreadPoolExecutor(self.slots, thread_name_prefix="slurm-wait")
        self._jobs: dict = {}

    def submit(self, run: Run, store: Store, device: str, attempt: str) -> Future:
        job = self._executor.submit(claim_and_execute, run, store, device, attempt)
        future = self._threads.submit(job.result)
        self._jobs[future] = job
        future.add_done_callback(lambda f: self._jobs.pop(f, None))
        return future

    def close(self) -> None:
        for job in list(self._jobs.values()):  # interrupted: do not leave jobs in the queue
            job.cancel(check=False)
        self._threads.shutdown(wait=False, cancel_futures=True)


def make_executor(
    name: str,
    jobs: int | None = None,
    device: str = "cpu",
    address: str | None = None,
    cpus_per_run: float | None = None,
    gpus_per_run: float | None = None,
    partition: str | None = None,
    time_min: int = 60,
    slurm_folder: Path | None = None,
    slurm_cluster: str = "slurm",
    slurm_extra: dict | None = None,
) -> Executor:
    """The executor ``name`` with its options; options that do not apply to it are refused,
    so a misspelt set-up fails before anything is submitted. ``gpus_per_run`` defaults to 1
    on a CUDA ``device``, else 0; ``cpus_per_run`` to ``RUN_THREADS``."""
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; choose from {list(EXECUTORS)}")
    if jobs is not None and jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}; pass --jobs 1 or more")
    wrong = {
        "--address": address is not None and name != "ray",
        "--partition": partition is not None and name != "slurm",
        "--gpus-per-run": gpus_per_run is not None and name == "local",
        "--cpus-per-run": cpus_per_run is not None and name == "local",
    }
    for option, bad in wrong.items():
        if bad:
            raise ValueError(f"{option} does not apply to --executor {name}; drop it")
    cpus = RUN_THREADS if cpus_per_run is None else cpus_per_run
    gpus = (1 if device.startswith("cuda") else 0) if gpus_per_run is None else gpus_per_run
    if cpus < 0 or gpus < 0:
        raise ValueError("--cpus-per-run and --gpus-per-run must be >= 0")
    if name == "local":
        return LocalExecutor(jobs or 1)
    if name == "ray":
        # A local Ray gets as many CPUs as runs asked for (--jobs), else the machine's.
        local_cpus = None if address else (int(jobs * cpus) if jobs else os.cpu_count())
        return RayExecutor(address, jobs, cpus, gpus, local_cpus)
    folder = slurm_folder or Path("runs") / ".submitit"
    return SlurmExecutor(folder, jobs, partition, time_min, gpus, cpus, slurm_extra, slurm_cluster)
