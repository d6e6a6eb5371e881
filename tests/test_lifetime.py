"""A sweep's local workers live and die with their driver: kill -9 of the driver leaves no worker
behind, nor a local Ray it started; Ctrl-C stops ``probe reproduce`` with one line and a store
that resumes to the same bytes; a script that starts a sweep without a main guard is told the
fix in one line.

The process tests read /proc (Linux) to find a driver's descendants and tell a dead process (or
an unreaped zombie) from a live one; they poll with deadlines, never sleep a fixed time.
"""

from __future__ import annotations

import json
import os
import pickle
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import store_bytes

from analysis import lifetime
from analysis.experiments import EXPERIMENTS
from analysis.report import PROFILES
from analysis.runs import Run, Store, run_sweep
from prefix_probe.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMOKE = PROFILES["smoke"]
linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")

# A sweep of a base and two adapters on it, two local workers, the main guard in place.
DRIVER = """
import sys
from analysis.runs import Run, Store, run_all

if __name__ == "__main__":
    base = Run("copy", preset="tiny", steps=int(sys.argv[2]), seed=0)
    tuned = [Run("reverse", preset="tiny", method="prefix", base=base, steps=20, seed=s,
                 options={"length": 2}) for s in range(2)]
    print(run_all([base, *tuned], Store(sys.argv[1]), jobs=2))
"""
BASE = Run("copy", preset="tiny", steps=100, seed=0)
DRIVER_RUNS = [BASE] + [
    Run(
        "reverse",
        preset="tiny",
        method="prefix",
        base=BASE,
        steps=20,
        seed=s,
        options={"length": 2},
    )
    for s in range(2)
]
# The same sweep on Slurm jobs, run as local processes by submitit (no Slurm needed).
SLURM_DRIVER = DRIVER.replace(
    "from analysis.runs import Run, Store, run_all",
    "from analysis.executors import SlurmExecutor\nfrom analysis.runs import Run, Store, run_all",
).replace(
    "jobs=2)",
    "executor=SlurmExecutor(sys.argv[3], jobs=2, time_min=5, cluster='local'))",
)
# Two runs at once on a local Ray the driver starts (two 1-CPU runs); argv: store, steps.
RAY_DRIVER = """
import sys
from analysis.executors import RayExecutor
from analysis.runs import Run, Store, run_all

if __name__ == "__main__":
    runs = [Run("copy", preset="tiny", steps=int(sys.argv[2]), seed=s) for s in range(2)]
    print(run_all(runs, Store(sys.argv[1]), executor=RayExecutor(num_cpus=2)))
"""
# Long enough that a run claimed when the driver is killed is still training when Ray ends it.
RAY_RUNS = [Run("copy", preset="tiny", steps=250, seed=s) for s in range(2)]
# Ray's per-node agents: once their raylet is gone they exit, but first spend Ray's 60 s timeout
# reporting its death to the GCS, which died too. They train nothing and hold nothing of the store.
RAY_AGENTS = (b"ray::DashboardAgent", b"ray::RuntimeEnvAgent")
# The same sweep started at the script's top level: every spawned worker would run it again.
UNGUARDED = """
import sys
from analysis.runs import Run, Store, run_all

print(run_all([Run("copy", preset="tiny", steps=20, seed=0)], Store(sys.argv[1]), jobs=2))
"""


def process_state(pid: int) -> str | None:
    """The state letter of process ``pid`` (R, S, Z, ...), None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int) -> bool:
    return process_state(pid) not in (None, "Z", "X")  # a zombie has ended, reaped or not


def descendants(pid: int) -> set[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def wait_until(condition, seconds: float, what: str, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + seconds
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the driver ended (exit {proc.returncode}) before {what}")
        assert time.monotonic() < deadline, f"no {what} within {seconds} s"
        time.sleep(0.02)


def pool_workers(pid: int) -> set[int]:
    """The descendants of ``pid`` that run a sweep, not multiprocessing's resource tracker
    (which ends on its own once its parent is gone)."""
    found = set()
    for p in descendants(pid):
        try:
            if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes():
                found.add(p)
        except (FileNotFoundError, ProcessLookupError):
            pass
    return found


def claims(store: Path) -> list[Path]:
    return list(store.glob(".*.claim"))


def finished(store: Path) -> list[Path]:
    return list(store.glob("*/result.json"))


def marked(marker: str) -> dict[int, bytes]:
    """The live processes whose environment holds ``marker`` (``NAME=value``): a process and
    whatever it started, reparented or not, unless that cleared its environment. pid -> argv."""
    found, needle = {}, marker.encode() + b"\0"
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "environ").read_bytes() and alive(int(entry.name)):
                found[int(entry.name)] = (entry / "cmdline").read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            pass
    return found


@linux_only
def test_kill_9_of_the_driver_ends_its_workers(tmp_path):
    script, store = tmp_path / "driver.py", tmp_path / "store"
    script.write_text(DRIVER)
    # A base far too long to finish: a worker is training it whenever the driver is killed.
    proc = subprocess.Popen(
        [sys.executable, str(script), str(store), "1000000"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    workers: set[int] = set()
    try:
        wait_until(lambda: claims(store), 120, "run claimed by a worker", proc)
        workers = descendants(proc.pid)
        [claim] = claims(store)
        trainer = json.loads(claim.read_text())["pid"]
        assert trainer in workers and trainer != proc.pid  # trained in a spawned worker
        proc.kill()
        proc.wait()
        wait_until(lambda: not any(alive(p) for p in workers), 10, "end of every worker")
    finally:
        proc.kill()
        for pid in workers:  # a regression must not leave an orphan training for hours
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        proc.wait()


@linux_only
def test_slurm_jobs_outlive_their_driver_and_a_new_driver_waits_for_them(tmp_path):
    """kill -9 of a driver leaves its Slurm jobs running: they commit their runs, and a driver
    started meanwhile waits for the runs they hold (live claims) instead of training them."""
    pytest.importorskip("submitit")
    script, store = tmp_path / "driver.py", tmp_path / "store"
    script.write_text(SLURM_DRIVER)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(store), str(BASE.steps), str(tmp_path / "jobs")],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(lambda: claims(store), 120, "base claimed by its job", proc)
    finally:
        proc.kill()
        proc.wait()
    outcome = run_sweep(DRIVER_RUNS, Store(store), poll=0.05)
    # The base was trained by the orphaned job, not taken over: only the two adapters here.
    assert outcome.trained == 2 and not outcome.failed
    assert all(Store(store).done(r) for r in DRIVER_RUNS)
    assert not list(store.glob(".*"))


@linux_only
def test_kill_9_of_a_driver_ends_its_local_ray_and_a_rerun_finishes_the_store(tmp_path):
    """The driver's Ray tasks and the local Ray it started (raylet, GCS, workers) end within
    seconds of its kill -9; only Ray's two idle agents outlive it, for their 60 s timeout. A
    rerun takes over the killed runs' claims at once and trains exactly what did not finish."""
    pytest.importorskip("ray")
    script, store = tmp_path / "driver.py", tmp_path / "store"
    script.write_text(RAY_DRIVER)
    marker = f"PROBE_TEST_DRIVER={tmp_path}"  # inherited by every process of the driver's Ray
    env = dict(
        os.environ,
        PROBE_TEST_DRIVER=str(tmp_path),
        # Nothing listens there: the driver must start a Ray of its own all the same.
        RAY_ADDRESS="127.0.0.1:9",
        # Ray renices its workers by 15: on a machine busy with other work they would hardly
        # run, and the test would wait minutes for them.
        RAY_worker_niceness="0",
    )
    steps = str(RAY_RUNS[0].steps)
    with open(tmp_path / "driver.err", "w") as err:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(store), steps], cwd=ROOT, env=env, stdout=err,
            stderr=err,
        )  # fmt: skip
    ray_procs: dict[int, bytes] = {}
    try:
        # Killed with both runs started: each is in flight, or (a slow start) already done.
        def started():
            return claims(store) and len(claims(store)) + len(finished(store)) == len(RAY_RUNS)

        wait_until(started, 300, "both runs started", proc)
        trainers = {json.loads(c.read_text())["pid"] for c in claims(store)}
        ray_procs = marked(marker)
        assert any(b"raylet" in argv for argv in ray_procs.values())
        assert trainers and trainers <= set(ray_procs) - {proc.pid}  # trained in Ray workers
        proc.kill()
        proc.wait()

        def running():  # the driver's Ray processes still alive, Ray's idle agents aside
            ray_procs.update(marked(marker))  # and any started after the kill
            return [
                p for p, argv in ray_procs.items() if alive(p) and not argv.startswith(RAY_AGENTS)
            ]

        wait_until(lambda: not running(), 30, "end of the driver's Ray tasks and Ray")
    finally:
        proc.kill()
        proc.wait()
        for pid in set(ray_procs) | set(marked(marker)):  # not even Ray's agents left behind
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
    unfinished = [r for r in RAY_RUNS if not Store(store).done(r)]
    outcome = run_sweep(RAY_RUNS, Store(store), poll=0.05)
    assert outcome.trained == len(unfinished) >= 1 and not outcome.failed
    assert all(Store(store).done(r) for r in RAY_RUNS)
    assert not list(store.glob(".*"))  # the killed runs' claims and temporaries are gone


def reproduce_argv(runs: Path, figures: Path) -> list[str]:
    return ["reproduce", "paper04", "--profile", "smoke", "--jobs", "2", "--runs-dir", str(runs),
            "--figures-dir", str(figures)]  # fmt: skip


@linux_only
def test_ctrl_c_stops_reproduce_in_one_line_and_the_store_resumes_to_the_same_bytes(
    tmp_path, paper04_smoke
):
    runs, figures = tmp_path / "runs", tmp_path / "figures"
    store = runs / "smoke"
    argv = reproduce_argv(runs, figures)
    # Its own session, so that the signal goes to the driver and its workers, as Ctrl-C does;
    # SIGINT at its default, as in a terminal: pytest run as a shell's background job inherits
    # it ignored, and Python keeps an inherited SIG_IGN (the driver would never see Ctrl-C).
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefix_probe", *argv],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        wait_until(lambda: claims(store), 120, "run claimed by a worker", proc)
        workers = pool_workers(proc.pid)
        assert workers
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    [line] = [x for x in err.splitlines() if x.startswith("probe reproduce:")]
    assert err.rstrip().endswith(line)  # the last thing printed
    specs = EXPERIMENTS["paper04"].runs(SMOKE)
    total = len({r.key for r in specs} | {r.base.key for r in specs})
    finished = len(list(store.glob("*/result.json")))
    assert line == (
        f"probe reproduce: interrupted: {finished} of {total} runs finished (kept in "
        f"{store.resolve()}); resume with: {shlex.join(['probe', *argv])}"
    )
    assert finished < total
    assert not any(alive(p) for p in workers)  # stopped, not left to finish their runs
    assert not list(store.glob(".*"))  # no claim, no temporary: nothing half-written

    assert main(argv) == 0  # the resume command, as printed
    assert len(store_bytes(store)) == len(paper04_smoke) > 0
    assert store_bytes(store) == paper04_smoke  # as uninterrupted: weights and results, bytes


def test_a_script_without_a_main_guard_gets_one_line(tmp_path):
    script, store = tmp_path / "sweep.py", tmp_path / "store"
    script.write_text(UNGUARDED)
    done = subprocess.run(
        [sys.executable, str(script), str(store)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"{script} starts a sweep at its top level, and each local worker process (jobs > 1) "
        "imports sweep.py again and would start it anew: put the sweep under `if __name__ == "
        '"__main__":`'
    )
    assert not store.exists()  # refused before anything started


def test_a_worker_importing_an_unguarded_script_stops_with_the_same_line(monkeypatch):
    """The second line of defence, in a worker being spawned: a script the parent could not
    read still cannot start a sweep in every worker."""
    monkeypatch.setattr(lifetime.multiprocessing.current_process(), "_inheriting", True, False)
    module = {
        "__name__": "__mp_main__",
        "__file__": "/x/sweep.py",
        "check": lifetime.check_main_guard,
    }
    with pytest.raises(lifetime.MissingMainGuard, match=r"^/x/sweep.py starts a sweep.*__main__"):
        exec("check(spawning=False)", module)
    monkeypatch.undo()
    exec("check(spawning=False)", module)  # not a worker being spawned: nothing to say


def test_main_guard_forms_are_recognised():
    guards = ['if __name__ == "__main__":\n    pass', "if '__main__' == __name__:\n    pass"]
    others = ["if __name__ == 'x':\n    pass", "if True:\n    pass", "x = '__main__'"]
    parse = lifetime.ast.parse
    assert all(lifetime._is_main_guard(parse(g).body[0]) for g in guards)
    assert not any(lifetime._is_main_guard(parse(o).body[0]) for o in others)


def test_the_parent_death_signal_is_asked_for_only_from_the_main_thread():
    """Linux sends it when the spawning *thread* ends: a worker spawned by a shorter-lived
    thread must rely on the sentinel watch alone."""
    here = pickle.loads(pickle.dumps(lifetime.Lifeline()))
    assert here == lifetime.Lifeline(os.getpid(), True)
    got = []
    thread = threading.Thread(target=lambda: got.append(pickle.loads(pickle.dumps(here))))
    thread.start()
    thread.join()
    assert got == [lifetime.Lifeline(os.getpid(), False)]


def test_interrupted_line_names_the_resume_command_only_for_a_sweep():
    from analysis.runs import Interrupted
    from probe.cli import interrupted

    sweep = Interrupted(2, 5, Path("/r/smoke"))
    assert interrupted(sweep, ["reproduce", "--runs-dir", "my runs"]) == (
        "interrupted: 2 of 5 runs finished (kept in /r/smoke); "
        "resume with: probe reproduce --runs-dir 'my runs'"
    )
    assert interrupted(KeyboardInterrupt(), ["tune"]) == "interrupted"
