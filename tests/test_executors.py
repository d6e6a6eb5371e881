"""Executors: the same runs trained on a local pool, a local Ray and submitit's local executor
give the same bytes; failures are recorded in the store, retried, reported, and block only the
runs that need them; ``probe reproduce`` exits non-zero and still builds what finished.

The Ray and Slurm tests need the ``[ray]`` and ``[slurm]`` extras (both in ``[test]``) and are
skipped without them: ``pip install -e '.[test]'`` then
``pytest tests/test_executors.py``.
"""

from __future__ import annotations

import ast
import os
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest
from helpers import store_bytes

from analysis import store as store_module
from analysis.executors import Executor, LocalExecutor, SlurmExecutor, make_executor
from analysis.experiments import EXPERIMENTS
from analysis.report import PROFILES
from analysis.runs import Run, RunsFailed, Store, run_all, run_sweep, variant
from prefix_probe.cli import main
from probe.hf import MissingExtraError

SMOKE = PROFILES["smoke"]
EXPERIMENT = "paper04"  # the smallest smoke experiment: a base and 3 adapters, 20 steps each


def tiny(steps=20, **changes) -> Run:
    return variant(Run("copy", preset="tiny", steps=steps, seed=0), **changes)


def broken_base() -> Run:
    # preset() refuses an unknown field: a deterministic failure inside the worker.
    return tiny(model={"no_such_field": 1})


def smoke_runs() -> list[Run]:
    return EXPERIMENTS[EXPERIMENT].runs(SMOKE)


# ---------------------------------------------------------------------------- ray and slurm


def test_ray_two_workers_match_the_local_executor(tmp_path, paper04_smoke, monkeypatch):
    pytest.importorskip("ray")
    from analysis.executors import RayExecutor

    # Ray renices its workers by 15: on a machine busy with other work they would hardly run.
    monkeypatch.setenv("RAY_worker_niceness", "0")

    store = Store(tmp_path / "store")
    bad = broken_base()
    with RayExecutor(num_cpus=2) as ray_ex:  # a local Ray: two 1-CPU runs at once
        assert ray_ex.slots == 2
        outcome = run_sweep([*smoke_runs(), bad], store, executor=ray_ex)
    assert outcome.trained == 4
    assert store_bytes(store.root) == paper04_smoke  # weights and results, byte for byte
    # The failure crossed Ray: the worker wrote the record (its traceback), not the scheduler.
    [failure] = outcome.failed
    assert failure.run == bad and failure.error.startswith("TypeError")
    text = store.failure_path(bad.key).read_text()
    assert "Traceback" in text and "ray worker failed" not in text
    # A second reproduce (another machine, another executor) trains only what is missing.
    assert run_sweep(smoke_runs(), store).trained == 0


def test_slurm_through_submitits_local_executor_matches_the_local_executor(tmp_path, paper04_smoke):
    pytest.importorskip("submitit")
    store = Store(tmp_path / "store")
    folder = tmp_path / "submitit"
    # Every adapter's job at once once the base is done: two rounds of jobs, not three.
    with SlurmExecutor(folder, jobs=4, time_min=5, cluster="local") as slurm:
        assert run_all(smoke_runs(), store, executor=slurm) == 4
    assert store_bytes(store.root) == paper04_smoke
    # Each run was its own submitit job, in its own process, with its log in the folder.
    assert len(list(folder.glob("*_log.out"))) == 4


def test_slurm_without_sbatch_or_with_a_gpu_fraction_is_one_line(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(ValueError, match="sbatch and srun not on PATH.*--slurm-cluster local"):
        SlurmExecutor(tmp_path)
    with pytest.raises(ValueError, match="whole GPUs"):
        SlurmExecutor(tmp_path, gpus_per_run=0.5, cluster="local")


def test_slurm_options_reach_the_sbatch_script(tmp_path, monkeypatch):
    """The script submitit would give sbatch (fake sbatch/srun on PATH: no cluster needed)."""
    pytest.importorskip("submitit")
    for command in ("sbatch", "srun"):
        (tmp_path / command).write_text("#!/bin/sh\nexit 1\n")
        (tmp_path / command).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    slurm = make_executor(
        "slurm", jobs=3, device="cuda", partition="gpu", time_min=30,
        slurm_folder=tmp_path / "jobs", slurm_extra={"account": "proj"},
    )  # fmt: skip
    assert isinstance(slurm, SlurmExecutor) and slurm.slots == 3
    script = slurm._executor._executor._make_submission_file_text("python -m x", "uid")
    for line in ("--partition=gpu", "--time=30", "--gpus-per-node=1", "--cpus-per-task=1",
                 "--account=proj", f"--output={tmp_path}/jobs/%j_0_log.out"):  # fmt: skip
        assert f"#SBATCH {line}\n" in script, line
    slurm.close()


# ---------------------------------------------------------------------------- failures


def test_a_failed_base_blocks_its_adapters_only_and_leaves_a_record(tmp_path):
    store = Store(tmp_path)
    bad, good = broken_base(), tiny(steps=5)
    adapter = tiny(steps=5, method="prefix", base=bad, options={"length": 2})
    with pytest.raises(RunsFailed, match=r"2 runs did not finish.*\.failed.*--retries") as err:
        run_all([adapter, good], store)
    assert store.done(good) and not store.done(bad) and not store.done(adapter)
    failed = {f.run.key: f for f in err.value.outcome.failed}
    assert set(failed) == {bad.key, adapter.key}
    assert failed[bad.key].record == store.failure_path(bad.key)
    assert failed[adapter.key].record is None  # never started: no record, its base named
    assert failed[adapter.key].error == f"its base {bad.label} [{bad.key}] failed"
    record = store.read_failure(bad.key)
    assert record["error"].startswith("TypeError") and record["key"] == bad.key
    assert "no_such_field" in store.failure_path(bad.key).read_text()  # the traceback
    assert not store.failure_path(adapter.key).exists()  # it never ran
    assert not store.path(bad).exists()  # a failure is never a result
    assert not list(tmp_path.glob(".*.claim"))


def test_retries_recover_a_transient_failure_and_clear_its_record(tmp_path, monkeypatch):
    run, real, calls = tiny(steps=5), store_module.execute, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            print("loading shard 3")  # output the record must keep
            raise OSError("NFS hiccup")
        return real(*args, **kwargs)

    monkeypatch.setattr(store_module, "execute", flaky)
    store = Store(tmp_path / "a")
    outcome = run_sweep([run], store, retries=0)
    assert [f.error for f in outcome.failed] == ["OSError: NFS hiccup"]
    text = store.failure_path(run.key).read_text()
    assert "output:\nloading shard 3" in text
    assert run_sweep([run], store).trained == 1  # the next reproduce retries it
    assert not store.failure_path(run.key).exists()

    calls.clear()
    store = Store(tmp_path / "b")
    outcome = run_sweep([run], store, retries=1)
    assert outcome.trained == 1 and not outcome.failed and len(calls) == 2
    assert not store.failure_path(run.key).exists()


class DyingWorkers(Executor):
    """Every run's worker dies before it can write a record (a node lost, a job killed)."""

    name, slots = "test", 2

    def __init__(self):
        self.submitted = []

    def submit(self, run, store, device, attempt):
        self.submitted.append(run.key)
        future = Future()
        future.set_exception(ConnectionError("node lost\nmore detail"))
        return future


def test_a_dead_worker_is_recorded_by_the_scheduler_and_retried(tmp_path):
    store, run, executor = Store(tmp_path), tiny(steps=5), DyingWorkers()
    outcome = run_sweep([run], store, executor=executor, retries=2, poll=0.01)
    assert executor.submitted == [run.key] * 3  # first try and two retries
    [failure] = outcome.failed
    assert failure.attempts == 3
    assert failure.error == "test worker failed: ConnectionError: node lost"
    assert store.read_failure(run.key)["error"] == failure.error
    assert "more detail" in store.failure_path(run.key).read_text()


def test_reproduce_exits_1_and_builds_the_figures_of_what_finished(tmp_path, monkeypatch, capsys):
    """paper04's base fails: paper04 is skipped with a message, paper01 still gets figures."""
    base = smoke_runs()[0].base
    real = store_module.execute

    def fail_base(run, *args, **kwargs):
        if run.key == base.key:
            raise RuntimeError("CUDA out of memory")
        return real(run, *args, **kwargs)

    monkeypatch.setattr(store_module, "execute", fail_base)
    figures, store = tmp_path / "fig", tmp_path / "runs" / "smoke"
    argv = ["reproduce", EXPERIMENT, "paper01", "--profile", "smoke"]
    argv += ["--runs-dir", str(tmp_path / "runs"), "--figures-dir", str(figures)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"[{base.key}]" in err and "RuntimeError: CUDA out of memory" in err
    assert f"{store.resolve()}/.{base.key}.failed" in err  # where the details are
    assert "its base pretrain[03] mix4 seed 0" in err  # the 3 adapters were not started
    assert "paper04: skipped: 4 of its 4 runs did not finish" in err
    assert err.strip().splitlines()[-1].startswith("probe reproduce: 4 runs did not finish")
    index = (figures / "README.md").read_text()
    assert "skipped: 4 of its 4 runs" in index
    paper01 = EXPERIMENTS["paper01"].runs(SMOKE)
    assert all(Store(store).done(r) for r in paper01)
    assert any(f.suffix == ".png" and f.name.startswith("paper01") for f in figures.iterdir())
    assert not any(f.name.startswith("paper04") for f in figures.iterdir())


# ---------------------------------------------------------------------------- options


def test_missing_extras_and_misplaced_options_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if not installed
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'prefix-probe\[ray\]'"):
        make_executor("ray")
    with pytest.raises(MissingExtraError, match=r"pip install 'prefix-probe\[slurm\]'"):
        make_executor("slurm")
    runs_dir = ["--runs-dir", str(tmp_path / "r"), "--profile", "smoke"]
    for extra, line in (
        (["--executor", "ray"], "prefix-probe[ray]"),
        (["--address", "auto"], "--address does not apply to --executor local"),
        (["--executor", "ray", "--partition", "gpu"], "--partition does not apply"),
        (["--retries", "-1"], "retries must be >= 0"),
    ):
        assert main(["reproduce", *runs_dir, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and line in err, err
    assert not (tmp_path / "r").exists()  # refused before anything ran


def test_make_executor_defaults():
    local = make_executor("local")
    assert isinstance(local, LocalExecutor) and local.slots == 1
    assert make_executor("local", jobs=3).slots == 3
    with pytest.raises(ValueError, match="unknown executor 'k8s'"):
        make_executor("k8s")


class InstantWorkers(Executor):
    """Every run finishes at once, one at a time: an empty result is committed, no training."""

    name, slots = "test", 1

    def submit(self, run, store, device, attempt):
        (Path(store.root) / run.key).mkdir()
        (Path(store.root) / run.key / "result.json").write_text("{}")
        future = Future()
        future.set_result({"key": run.key})
        return future


def test_the_scheduler_hashes_each_run_once_not_on_every_poll(tmp_path, monkeypatch):
    """A key hashes the whole spec, and the scheduler's loop polls every half second for the
    whole sweep: recomputing every pending run's key on each pass kept a core 6% busy. With one
    run finishing per pass, key computations must grow with the runs, not with runs x passes."""
    calls = []
    key = Run.key.fget
    monkeypatch.setattr(Run, "key", property(lambda run: calls.append(1) or key(run)))

    def hashes(n: int) -> int:
        calls.clear()
        base = tiny(steps=5, seed=n)
        adapters = [variant(base, method="prefix", base=base, steps=s + 1) for s in range(n)]
        store = Store(tmp_path / str(n))
        outcome = run_sweep(adapters, store, executor=InstantWorkers(), poll=0.01)
        assert outcome.trained == n + 1  # n + 1 passes of the loop, one run submitted in each
        return len(calls)

    assert hashes(40) < 2.5 * hashes(20)  # linear: ~2x; recomputed every pass: ~4x


# ---------------------------------------------------------------------------- layering


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at its top or inside a function (absolute imports)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def test_store_executors_and_scheduler_import_one_way():
    """store <- lifetime <- executors <- runs: what trains a run never imports the scheduler,
    so the arrows run one way (no import circle, no private name reached across)."""
    analysis = Path(__file__).resolve().parents[1] / "analysis"
    below = {
        "store": {"analysis.lifetime", "analysis.executors", "analysis.runs"},
        "lifetime": {"analysis.store", "analysis.executors", "analysis.runs"},
        "executors": {"analysis.runs"},
    }
    for module, forbidden in below.items():
        assert not imported_modules(analysis / f"{module}.py") & forbidden, module
    assert {"analysis.executors", "analysis.store"} <= imported_modules(analysis / "runs.py")
