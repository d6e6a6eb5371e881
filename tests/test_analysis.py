"""The analysis layer: run keys, the atomic result store, resumable ``probe reproduce``, and the
smoke profile of the experiments end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from analysis import runs
from analysis.experiments import EXPERIMENTS, ledger
from analysis.report import PROFILES
from analysis.reproduce import reproduce
from analysis.runs import Run, Store, execute, run_all, variant

ROOT = Path(__file__).resolve().parents[1]
SMOKE = PROFILES["smoke"]


def tiny_base(**changes) -> Run:
    return variant(Run("copy", preset="tiny", steps=20, seed=0), **changes)


# ---------------------------------------------------------------------------- run keys


def test_run_key_is_stable_across_processes():
    run = Run("sort_asc", preset="01", steps=150, lr=3e-3, seed=0, eval_tasks=("sort_desc",))
    code = (
        "from analysis.runs import Run;"
        "print(Run('sort_asc', preset='01', steps=150, lr=3e-3, seed=0,"
        " eval_tasks=('sort_desc',)).key)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == run.key
    assert run.key == Run(**{f.name: getattr(run, f.name) for f in dataclasses.fields(run)}).key


CHANGES = {
    "task": "sort_desc",
    "preset": "01",
    "model": {"n_layers": 3},
    "options": {"length": 2},
    "steps": 21,
    "lr": 1e-3,
    "batch_size": 32,
    "seed": 1,
    "train_size": 100,
    "target_accuracy": 0.5,
    "eval_tasks": ("sort_asc",),
}


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_run_key_changes_with_every_field(field):
    base = tiny_base()
    tuned = Run("reverse", preset="tiny", method="prefix", base=base, steps=20)
    if field == "options":
        assert variant(tuned, options=CHANGES["options"]).key != tuned.key
    else:
        assert variant(base, **{field: CHANGES[field]}).key != base.key
        assert variant(tuned, **{field: CHANGES[field]}).key != tuned.key


def test_run_key_changes_with_method_and_base():
    base = tiny_base()
    tuned = Run("reverse", preset="tiny", method="prefix", base=base, steps=20)
    assert variant(tuned, method="prompt").key != tuned.key
    assert variant(tuned, base=tiny_base(seed=1)).key != tuned.key


def test_run_key_follows_the_default_learning_rate(monkeypatch):
    # lr=None means DEFAULT_LR[method]: a changed default must not reuse a stale result.
    tuned = Run("reverse", preset="tiny", method="prefix", base=tiny_base(), steps=20)
    before = tuned.key
    monkeypatch.setitem(runs.DEFAULT_LR, "prefix", runs.DEFAULT_LR["prefix"] / 2)
    assert tuned.key != before
    assert tuned.key == variant(tuned, lr=runs.DEFAULT_LR["prefix"]).key


def test_every_field_is_covered():
    names = {f.name for f in dataclasses.fields(Run)} - {"method", "base"}
    assert names == set(CHANGES)


# ---------------------------------------------------------------------------- the store


def test_half_written_directory_is_never_a_result(tmp_path, monkeypatch):
    run = tiny_base(steps=5)
    store = Store(tmp_path)
    # A temporary from an interrupted write and a directory without result.json: not results.
    (tmp_path / f".{run.key}.abcd").mkdir(parents=True)
    (tmp_path / f".{run.key}.abcd" / "result.json").write_text("{}")
    assert not store.done(run)
    (tmp_path / run.key).mkdir()
    assert not store.done(run)
    (tmp_path / run.key).rmdir()

    # Dying at the final rename leaves nothing under the run's key.
    def die(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("analysis.runs.os.replace", die)
    with pytest.raises(KeyboardInterrupt):
        execute(run, tmp_path)
    monkeypatch.undo()
    assert not store.done(run) and not (tmp_path / run.key).exists()

    assert run_all([run], store) == 1  # stale temporaries cleared, the run redone
    assert store.done(run) and not list(tmp_path.glob(".*"))
    assert run_all([run], store) == 0


# ---------------------------------------------------------------------------- reproduce


def results(root: Path) -> dict[str, dict]:
    """Every finished run's result.json, minus wall-clock time."""
    out = {}
    for path in sorted(root.glob("*/result.json")):
        result = json.loads(path.read_text())
        result.pop("seconds")
        out[path.parent.name] = result
    return out


def test_reproduce_smoke_end_to_end(tmp_path):
    names = ["study", "theorem"]
    index = reproduce(names, "smoke", 1, "cpu", tmp_path / "runs", tmp_path / "figures")
    text = index.read_text()
    for name in ("study_accuracy.png", "study_prefix_length.png", "study_drift.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 1000
        assert f"]({name})" in text
    assert (tmp_path / "figures" / "theorem_identities.png").is_file()
    runs = {r.key for n in names for r in EXPERIMENTS[n].runs(SMOKE)}
    assert runs <= {p.name for p in (tmp_path / "runs" / "smoke").iterdir()}


def test_ledger_has_a_verdict_for_every_claim():
    verdicts = [
        ledger.verdict_better([0.5, 0.6, 0.55], [0.1, 0.1, 0.12], "x"),
        ledger.verdict_better([0.1, 0.1, 0.12], [0.5, 0.6, 0.55], "x"),
        ledger.verdict_better([0.5, 0.5, 0.5], [0.5, 0.51, 0.5], "x"),
    ]
    assert verdicts[:2] == ["supported", "refuted"] and verdicts[2].startswith("depends: ")
    assert ledger.verdict_new_pattern({"prefix": [0.0, 0.01, 0.0]}, [0.9, 0.8, 0.85]) == (
        "supported"
    )
    assert ledger.verdict_new_pattern({"prefix": [0.0] * 3}, [0.0] * 3).startswith("depends")
    assert ledger.verdict_length({1: [0.1] * 3, 16: [0.8] * 3, 64: [0.81] * 3}) == "supported"
    assert ledger.verdict_length({1: [0.1] * 3, 16: [0.5] * 3, 64: [0.8] * 3}) == "refuted"
    assert ledger.verdict_shares({1: 0.001}, {1: 0.007}) == "supported"
    assert ledger.verdict_shares({1: 0.1}, {1: 0.3}) == "refuted"


def _smoke_command(runs: Path, figures: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "prefix_probe",
        "reproduce",
        "study",
        "--profile",
        "smoke",
        "--runs-dir",
        str(runs),
        "--figures-dir",
        str(figures),
    ]


def test_killed_reproduce_resumes_and_matches_a_clean_run(tmp_path):
    runs = tmp_path / "runs"
    store = runs / "smoke"
    proc = subprocess.Popen(
        _smoke_command(runs, tmp_path / "fig"),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    try:
        while not list(store.glob("*/result.json")):
            assert proc.poll() is None, "reproduce ended before a run finished"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in store.glob("*/result.json")}
    n_total = len(
        {r.key for r in EXPERIMENTS["study"].runs(SMOKE)}
        | {r.base.key for r in EXPERIMENTS["study"].runs(SMOKE)}
    )
    assert 0 < len(finished) < n_total

    subprocess.run(
        _smoke_command(runs, tmp_path / "fig"), cwd=ROOT, check=True, capture_output=True
    )
    for path, (mtime, content) in finished.items():
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == content
    assert not list(store.glob(".*"))

    clean = tmp_path / "clean"
    reproduce(["study"], "smoke", 1, "cpu", clean, tmp_path / "fig_clean")
    assert results(store) == results(clean / "smoke")
    assert len(results(store)) == n_total
