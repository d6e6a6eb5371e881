"""The analysis layer: run keys, the atomic result store, resumable ``probe reproduce``, and the
smoke profile of the experiments end to end."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import store_bytes, without_seconds

from analysis import report
from analysis.experiments import EXPERIMENTS, ledger
from analysis.report import PROFILES
from analysis.reproduce import reproduce
from analysis.runs import RUN_THREADS, Run, Store, execute, run_all, variant
from prefix_probe.cli import main
from probe import io, train

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


# The keys of the quick profile's experiments (every run and the base runs they need, as the
# store names their directories). Existing stores must keep hitting their cached results, so a
# change here retrains: make it only on purpose (a new recipe), never as a side effect of a
# change to Run.spec(). Last changed: 02's bases at 3,000 steps and its prefixes at 300, 03's
# prefix on hist at 500.
QUICK_KEYS = {
    "paper01": "a4b2f08c595f6d3c",
    "paper02": "df1cd4142cf43178",
    "paper03": "b717bdc27f6012d6",
    "paper04": "3336d7ef61598566",
    "study": "65fb87dabd596d5c",
    "theorem": "da53224655fb0b49",
    "constructions": "e3b0c44298fc1c14",  # trains nothing: the digest of no keys
    "capacity": "c1e2555c83adb9b9",  # paper01's bases: nothing trained of its own
    "prefix_spread": "0923f8fa800ee274",
    "sweeps": "43e6f6b355ce033f",
    "ledger": "2e5e43d0b42e13b9",
    "atlas": "a4230fc451570ce9",  # opt-in; shares study's and paper01's runs and bases
}


def _with_bases(experiment_runs: list[Run]) -> dict[str, Run]:
    out = {}
    for run in experiment_runs:
        while run is not None:
            out[run.key] = run
            run = run.base
    return out


@pytest.mark.parametrize("name", sorted(QUICK_KEYS))
def test_quick_profile_run_keys_are_pinned(name):
    keys = sorted(_with_bases(EXPERIMENTS[name].runs(PROFILES["quick"])))
    digest = hashlib.sha256(" ".join(keys).encode()).hexdigest()[:16]
    assert digest == QUICK_KEYS[name], f"{name}: run keys changed; stores would be retrained"


def test_known_run_keys_are_pinned():
    """Three keys written out: a base, a LoRA run on it, a prefix + LoRA run (options as given)."""
    from analysis.experiments import paper01, study

    quick = PROFILES["quick"]
    base = paper01.base_runs(quick)[0]
    lora = study.method_runs(quick, study.MAIN, "lora")[0]
    hybrid = study.method_runs(quick, study.MAIN, "prefix+lora")[1]
    assert (base.key, lora.key, hybrid.key) == (
        "6c752ce7f2f49942",
        "9548540916a5be06",
        "2114d642b025aa9c",
    )
    default = [r for e in EXPERIMENTS.values() if e.default for r in e.runs(quick)]
    assert len(_with_bases(default)) == 156  # the opt-in atlas adds its own on top


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
    "warmup": 10,
    "eval_given": 1,
    "weight_decay": 0.01,
    "betas": (0.9, 0.999),
    "schedule": "constant",
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


def test_bad_optimiser_settings_fail_when_the_run_is_specified():
    with pytest.raises(ValueError, match="schedule must be 'cosine' or 'constant'"):
        tiny_base(schedule="linear")
    with pytest.raises(ValueError, match="betas must be two numbers"):
        tiny_base(betas=(0.9, 1.5))


def test_run_key_changes_with_method_and_base():
    base = tiny_base()
    tuned = Run("reverse", preset="tiny", method="prefix", base=base, steps=20)
    assert variant(tuned, method="prompt").key != tuned.key
    assert variant(tuned, base=tiny_base(seed=1)).key != tuned.key


def test_run_key_follows_the_default_learning_rate(monkeypatch):
    # lr=None means DEFAULT_LR[method]: a changed default must not reuse a stale result.
    tuned = Run("reverse", preset="tiny", method="prefix", base=tiny_base(), steps=20)
    before = tuned.key
    monkeypatch.setitem(train.DEFAULT_LR, "prefix", train.DEFAULT_LR["prefix"] / 2)
    assert tuned.key != before
    assert tuned.key == variant(tuned, lr=train.DEFAULT_LR["prefix"]).key


def test_run_key_follows_the_default_weight_decay(monkeypatch):
    tuned = Run("reverse", preset="tiny", method="prefix", base=tiny_base(), steps=20)
    before = tuned.key
    monkeypatch.setitem(train.DEFAULT_WEIGHT_DECAY, "prefix", 0.05)
    assert tuned.key != before
    assert tuned.key == variant(tuned, weight_decay=0.05).key


def test_run_keys_from_before_weight_decay_was_a_field_still_hit():
    # Every run trained with 0.1 before the field existed; such runs keep their old keys (a
    # quick-profile base, as written into stores then), so old stores are not retrained.
    from analysis.experiments import paper01

    old_base = paper01.base_runs(PROFILES["quick"])[0]
    assert old_base.key == "6c752ce7f2f49942"
    assert "weight_decay" not in old_base.spec()
    tuned = Run("reverse", preset="tiny", method="prefix", base=tiny_base(), steps=20)
    assert tuned.spec()["weight_decay"] == 0.0
    assert variant(tuned, weight_decay=0.1).spec().get("weight_decay") is None
    assert variant(tuned, weight_decay=0.1).train_config("cpu").weight_decay == 0.1
    assert tuned.train_config("cpu").weight_decay == 0.0


def test_every_field_is_covered():
    names = {f.name for f in dataclasses.fields(Run)} - {"method", "base"}
    assert names == set(CHANGES)


# ---------------------------------------------------------------------------- the store


def test_half_written_directory_is_never_a_result(tmp_path, monkeypatch):
    run = tiny_base(steps=5)
    store = Store(tmp_path)
    # A temporary from an interrupted write and a directory without result.json: not results.
    dead = tmp_path / f".{run.key}.tmp-{io.HOST}-{dead_pid()}-abcdefgh"
    dead.mkdir(parents=True)
    (dead / "result.json").write_text("{}")
    assert not store.done(run)
    (tmp_path / run.key).mkdir()
    assert not store.done(run)
    (tmp_path / run.key).rmdir()

    # Dying at the final rename leaves nothing under the run's key.
    def die(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("analysis.store.os.rename", die)
    with pytest.raises(KeyboardInterrupt):
        execute(run, tmp_path)
    monkeypatch.undo()
    assert not store.done(run) and not (tmp_path / run.key).exists()

    assert run_all([run], store) == 1  # a dead process's temporaries cleared, the run redone
    assert store.done(run) and not list(tmp_path.glob(".*"))
    assert run_all([run], store) == 0


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def tiny_runs(steps=20) -> list[Run]:
    base = tiny_base(steps=steps)
    return [base] + [
        Run("reverse", preset="tiny", method=m, base=base, steps=steps) for m in ("prefix", "lora")
    ]


def test_jobs_do_not_change_a_runs_bytes(tmp_path):
    runs_ = tiny_runs()
    assert run_all(runs_, Store(tmp_path / "j1"), jobs=1) == 3
    assert run_all(runs_, Store(tmp_path / "j2"), jobs=2) == 3
    one, two = store_bytes(tmp_path / "j1"), store_bytes(tmp_path / "j2")
    assert len(one) == 3 * 3 and one == two  # model/adapter files and results, all identical
    assert {json.loads(one[f"{r.key}/result.json"])["spec"]["threads"] for r in runs_} == {
        RUN_THREADS
    }


def test_two_processes_share_a_store_and_train_each_run_once(tmp_path):
    code = (
        "import sys; sys.path.insert(0, 'tests');"
        "from test_analysis import tiny_runs; from analysis.runs import Store, run_all;"
        f"print(run_all(tiny_runs(steps=60), Store({str(tmp_path)!r})))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err.decode()
    assert sum(int(out.split()[-1]) for out, _ in outs) == 3  # each run trained exactly once
    store = Store(tmp_path)
    assert all(store.done(r) for r in tiny_runs(steps=60))
    assert not list(tmp_path.glob(".*"))  # claims released, temporaries gone


def test_stale_claims_are_taken_over_and_only_dead_temporaries_removed(tmp_path):
    store = Store(tmp_path, stale_after=60)
    base, tuned, other = tiny_runs(steps=5)

    def claim(key, host, pid, age=0.0):
        path = store.claim_path(key)
        path.write_text(json.dumps({"host": host, "pid": pid, "token": "t"}))
        os.utime(path, (time.time() - age, time.time() - age))

    claim(base.key, io.HOST, dead_pid())  # this host, process gone: stale at once
    claim(tuned.key, "otherhost", 4242, age=3600)  # another host, no heartbeat for an hour
    claim(other.key, "otherhost", 4242)  # another host, beating: live
    assert store.claimed_elsewhere(other.key) and store.try_claim(other.key) is None
    assert not store.claimed_elsewhere(base.key)

    def temp(key, host, pid, age=0.0) -> Path:
        path = tmp_path / f".{key}.tmp-{host}-{pid}-abcdefgh"
        path.mkdir()
        os.utime(path, (time.time() - age, time.time() - age))
        return path

    live = temp(other.key, io.HOST, 1)  # pid 1 is alive: a save in progress
    remote_live = temp(other.key, "otherhost", 4242, age=3600)  # its owner's claim is fresh
    remote_young = temp(base.key, "otherhost", 77)  # too young to call dead
    dead = temp(base.key, io.HOST, dead_pid())
    remote_dead = temp(tuned.key, "otherhost", 4242, age=3600)  # old and its claim is stale
    legacy = tmp_path / f".{base.key}.k2j3h4g5"  # not named by an owner: never ours to delete
    legacy.mkdir()

    assert run_all([base, tuned], store) == 2
    assert store.done(base) and store.done(tuned) and not store.done(other)
    left = {p.name for p in tmp_path.glob(".*")}
    assert left == {live.name, remote_live.name, remote_young.name, legacy.name,
                    store.claim_path(other.key).name}  # fmt: skip
    assert not dead.exists() and not remote_dead.exists()


def test_a_committed_result_is_never_replaced(tmp_path):
    run = tiny_base(steps=5)
    first = execute(run, tmp_path)
    before = store_bytes(tmp_path)
    again = execute(variant(run), tmp_path)  # a racing duplicate: same spec, discarded
    assert again["key"] == first["key"] and store_bytes(tmp_path) == before
    assert not list(tmp_path.glob(".*"))


def test_a_committed_run_follows_the_umask(tmp_path):
    """A shared run store stays readable as the user's umask says: the run directory (made by
    mkdtemp, 0700) and the adapter's safetensors (0600) used to keep their private modes."""
    base = tiny_base(steps=5)
    tuned = Run("copy", method="prefix", base=base, seed=0, steps=2, options={"length": 1})
    for mask, dir_mode, file_mode in ((0o022, 0o755, 0o644), (0o027, 0o750, 0o640)):
        root = tmp_path / f"u{mask:o}"
        old = os.umask(mask)
        try:
            execute(base, root)
            execute(tuned, root)
        finally:
            os.umask(old)
        for run in (base, tuned):
            for path in [root / run.key, *(root / run.key).rglob("*")]:
                want = dir_mode if path.is_dir() else file_mode
                assert stat.S_IMODE(path.stat().st_mode) == want, path


# ---------------------------------------------------------------------------- reproduce


def results(root: Path) -> dict[str, dict]:
    """Every finished run's result.json, minus wall-clock time."""
    out = {}
    for path in sorted(root.glob("*/result.json")):
        out[path.parent.name] = without_seconds(json.loads(path.read_text()))
    return out


def test_reproduce_smoke_end_to_end(tmp_path):
    names = ["paper01", "study", "theorem"]
    index = reproduce(names, "smoke", 1, "cpu", tmp_path / "runs", tmp_path / "figures")
    text = index.read_text()
    names_png = ("paper01_curves.png", "study_accuracy.png", "study_prefix_length.png")
    for name in (*names_png, "study_drift.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 1000
        assert f"]({name})" in text
    assert (tmp_path / "figures" / "theorem_identities.png").is_file()
    page = (tmp_path / "figures" / "paper01_view.html").read_text()  # probe.view, linked
    assert "[paper01_view.html](paper01_view.html)" in text and "PrefixProbeView" in page
    assert all(f'"name":"{m}"' in page for m in ("full", "lora", "prefix", "vt-prefix", "prompt"))
    runs = {r.key for n in names for r in EXPERIMENTS[n].runs(SMOKE)}
    assert runs <= {p.name for p in (tmp_path / "runs" / "smoke").iterdir()}
    # Every run keeps its learning curve: 20 points (or fewer for tiny budgets), the last at
    # the final step, with the sequences seen and training seconds so far.
    for run in EXPERIMENTS["paper01"].runs(SMOKE):
        history = Store(tmp_path / "runs" / "smoke").result(run)["history"]
        assert history[-1]["step"] == run.steps
        assert [h["sequences"] for h in history] == [h["step"] * run.batch_size for h in history]
        assert all(
            0 <= a["seconds"] <= b["seconds"] for a, b in zip(history, history[1:], strict=False)
        )


# ---------------------------------------------------------------------------- curves, profiles


class FakeStore:
    """Just enough of a Store for curve_note: result(run) with its history and steps trained."""

    def __init__(self, histories: dict[Run, list[tuple[int, float]]]):
        self.histories = histories

    def result(self, run: Run) -> dict:
        points = self.histories[run]
        history = [{"step": s, "accuracy": a} for s, a in points]
        return {"history": history, "steps": history[-1]["step"]}


def test_curve_note_tells_flat_from_rising():
    flat, rising = Run("sort_asc", steps=400), Run("sort_asc", steps=400, seed=1)
    store = FakeStore(
        {
            flat: [(100, 0.2), (200, 0.5), (300, 0.60), (400, 0.61)],
            rising: [(100, 0.1), (200, 0.2), (300, 0.3), (400, 0.4)],  # +10 pp per 100 steps
        }
    )
    assert report.rise(store.result(flat)["history"]) == pytest.approx(0.01)
    assert report.curve_note(store, [flat]) == "flat"
    assert report.curve_note(store, [rising]) == "still rising (+10.0 pp over the last quarter)"
    assert report.curve_note(store, [flat, rising]).startswith("still rising")


def test_curve_note_names_runs_that_stopped_at_their_target_instead_of_calling_them_cut_off():
    target = Run("sort_asc", steps=1000, target_accuracy=0.95)
    early, whole = variant(target, seed=1), variant(target, seed=2)
    no_target = Run("sort_asc", steps=400)
    store = FakeStore(
        {
            early: [(100, 0.2), (200, 0.9), (300, 0.96)],  # rising steeply when it stopped
            whole: [(500, 0.5), (1000, 0.9)],  # ran its whole budget: cut off, not stopped
            no_target: [(100, 0.1), (200, 0.2), (300, 0.3), (400, 0.4)],
        }
    )
    assert report.curve_note(store, [early]) == "1 of 1 stopped at the 95% target (steps 300)"
    assert report.curve_note(store, [whole]).startswith("still rising (+40.0 pp")
    assert report.curve_note(store, [no_target, early]) == (
        "still rising (+10.0 pp over the last quarter); 1 of 2 stopped at the 95% target "
        "(steps 300)"
    )


def test_full_profile_defaults_to_quick_and_unknown_profiles_are_refused():
    assert PROFILES["full"].pick(1, 2, 3) == 2
    assert PROFILES["full"].pick(1, 2, 3, full=4) == 4
    assert PROFILES["paper"].pick(1, 2, 3, full=4) == 3
    with pytest.raises(ValueError, match="unknown profile"):
        report.Profile("huge")


@pytest.mark.parametrize("profile", ["smoke", "quick", "paper"])
def test_paper04_prefix_and_lora_train_exactly_as_many_parameters(profile):
    from analysis.experiments import paper03, paper04
    from probe.adapters import make_adapter
    from probe.model import Transformer, preset

    p = PROFILES[profile]
    base = Transformer(preset("03", **dict(paper03.model_overrides(p))))
    counts = {
        m: make_adapter(m, base, **dict(paper04.options(p, m))).n_params for m in ("prefix", "lora")
    }
    assert counts["prefix"] == counts["lora"]
    if profile != "smoke":
        assert counts["lora"] == paper04.PAPER_PARAMS  # the paper's 12,288


def test_recipes_smoke_writes_its_table_and_figure(tmp_path):
    from analysis.recipes import recipes, trials

    path = recipes(2, "cpu", tmp_path / "runs", tmp_path / "figures", profile="smoke")
    text = path.read_text()
    chosen = [t for t in trials(SMOKE) if t.chosen]
    assert {t.group for t in chosen} == {t.group for t in trials(SMOKE)}  # one in every group
    for t in trials(SMOKE):
        assert t.label in text
    assert text.count("**(chosen)**") == len(chosen)
    assert (tmp_path / "figures" / "recipes.png").stat().st_size > 10_000


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


def test_a_bar_holds_only_when_every_seed_clears_it():
    """A mean that clears a bar can hide a seed that does not: the verdicts read the worst
    seed, and every reported number names it."""
    from analysis.experiments import paper03, paper04
    from analysis.report import mean_spread

    assert mean_spread([0.9, 0.95, 0.12]) == "65.7 ± 46.5% (n=3, min 12.0)"
    curves = {m: "flat" for m in ("prefix", "lora", "full")}
    passing = {"prefix": [0.01] * 3, "lora": [0.9, 0.85, 0.81], "full": [0.9] * 3}
    assert paper04.verdict(passing, curves) == "supported"
    one_short = passing | {"lora": [0.99, 0.99, 0.6]}  # mean 86%: above the bar
    assert paper04.verdict(one_short, curves).startswith("depends: 1 of 3 LoRA seeds below 80%")
    one_leak = passing | {"prefix": [0.0, 0.0, 0.12]}  # mean 4%: below the bar
    assert paper04.verdict(one_leak, curves).startswith("refuted")
    own = {t: [1.0] * 3 for t in paper03.PRETRAIN} | {"sort_asc_add1": [0.9] * 3, "hist": [0.0] * 3}
    curves = {t: "flat" for t in own}
    assert paper03.verdict(own, curves) == "supported"
    weak = own | {"sort_asc_add1": [1.0, 1.0, 0.3]}  # mean 77%: above the 50% bar
    assert paper03.verdict(weak, curves).startswith("depends: composition worst seed 30.0%")
    assert paper03.verdict(own | {"hist": [0.0, 0.0, 0.1]}, curves).startswith("refuted")
    assert ledger.verdict_new_pattern({"prefix": [0.0, 0.0, 0.1]}, [0.9] * 3) != "supported"
    assert ledger.verdict_new_pattern({"prefix": [0.0] * 3}, [0.9, 0.9, 0.4]).startswith("depends")


FAULT_EXPERIMENT = "paper04"  # the smallest smoke experiment: 4 runs, a base and 3 adapters


def _smoke_argv(runs: Path, figures: Path) -> list[str]:
    return ["reproduce", FAULT_EXPERIMENT, "--profile", "smoke", "--runs-dir", str(runs),
            "--figures-dir", str(figures)]  # fmt: skip


def test_killed_reproduce_resumes_and_matches_a_clean_run(tmp_path, paper04_smoke):
    """Fault injection: SIGKILL the whole process group while a run is in progress (a result
    committed, the next run claimed), resume, and compare with an uninterrupted run."""
    runs = tmp_path / "runs"
    store = runs / "smoke"
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefix_probe", *_smoke_argv(runs, tmp_path / "fig")],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    try:
        while not (list(store.glob("*/result.json")) and list(store.glob(".*.claim"))):
            assert proc.poll() is None, "reproduce ended before it could be killed mid-run"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in store.glob("*/result.json")}
    specs = EXPERIMENTS[FAULT_EXPERIMENT].runs(SMOKE)
    n_total = len({r.key for r in specs} | {r.base.key for r in specs})
    assert 0 < len(finished) < n_total
    assert list(store.glob(".*.claim"))  # the killed process's claim is left behind

    assert main(_smoke_argv(runs, tmp_path / "fig")) == 0  # the same command, resumed here
    for path, (mtime, content) in finished.items():
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == content
    assert not list(store.glob(".*"))  # the dead process's claim and temporaries are gone

    # The uninterrupted run (conftest): weights, configs and results, byte for byte.
    assert store_bytes(store) == paper04_smoke
    assert len(results(store)) == n_total
