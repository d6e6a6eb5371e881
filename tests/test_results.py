"""probe results: one row per stored run, printed and written as CSV and JSON lines, and the
rows round-trip with the store (same keys, same accuracies, the same Run rebuilt from a row)."""

import csv
import json

import pytest

from analysis.results import collect, run_from_spec
from analysis.runs import Run, Store, execute, variant
from prefix_probe.cli import main


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store of three finished runs: a tiny base (with an extra evaluated task), two adapters."""
    root = tmp_path_factory.mktemp("runs") / "smoke"
    root.mkdir()
    base = Run("copy", preset="tiny", model=(("n_layers", 1),), steps=3, eval_tasks=("reverse",))
    prefix = Run("reverse", method="prefix", base=base, options=(("length", 2),), steps=2)
    lora = variant(prefix, method="lora", options={"rank": 1, "targets": ["W_Q", "W_V"]}, seed=1)
    for run in (base, prefix, lora):
        execute(run, root)
    return Store(root), [base, prefix, lora]


def test_rows_round_trip_with_the_store(store):
    store, runs = store
    rows, specs = collect(store.root.parent)  # a folder of stores, as probe reproduce makes
    by_key = {r["key"]: r for r in rows}
    assert sorted(by_key) == sorted(run.key for run in runs)
    specs_by_key = {s_row["key"]: spec for s_row, spec in zip(rows, specs, strict=True)}
    for run in runs:
        r, result = by_key[run.key], store.result(run)
        assert r["path"] == str(store.path(run)) and r["store"] == "smoke"
        assert r["accuracy"] == result["accuracy"][run.task]
        assert {k[4:]: v for k, v in r.items() if k.startswith("acc_")} == result["accuracy"]
        assert (r["seed"], r["steps"], r["steps_done"]) == (run.seed, run.steps, result["steps"])
        assert r["lr"] == run.effective_lr and r["seconds"] == result["seconds"]
        assert r["base"] == (run.base.key if run.base else "")
        rebuilt = run_from_spec(specs_by_key[run.key], specs_by_key)
        assert json.dumps(rebuilt.spec()) == json.dumps(run.spec())
        assert rebuilt.key == run.key and store.done(rebuilt)
    base, prefix, lora = (by_key[run.key] for run in runs)
    assert (base["method"], base["model"], base["eval_tasks"]) == (
        "pretrain",
        "n_layers=1",
        "reverse",
    )
    assert "acc_reverse" in base and "acc_copy" in base
    assert prefix["options"] == "length=2"
    assert lora["options"] == 'rank=1 targets=["W_Q", "W_V"]'


def test_cli_prints_and_writes_csv_and_json_lines(store, tmp_path, capsys):
    store, runs = store
    assert main(["results", "--runs-dir", str(store.root), "--out", str(tmp_path / "t")]) == 0
    printed = capsys.readouterr().out
    assert all(run.key in printed for run in runs) and "3 runs ->" in printed
    lines = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    with (tmp_path / "t.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["key"] for r in table] == [r["key"] for r in lines] and len(table) == 3
    for from_csv, from_json in zip(table, lines, strict=True):
        assert from_json["spec"]["task"] == from_csv["task"]
        for name, value in from_csv.items():  # the CSV holds the JSON row's values, as text
            expected = from_json.get(name)
            assert value == ("" if expected is None else str(expected)), name
    assert store.result(runs[0])["accuracy"]["copy"] == next(
        r["accuracy"] for r in lines if r["key"] == runs[0].key
    )


def test_missing_and_empty_runs_dirs(tmp_path, capsys):
    assert main(["results", "--runs-dir", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --runs-dir" in err
    (tmp_path / "empty" / ".tmp" / "x").mkdir(parents=True)  # an interrupted run's temporary
    (tmp_path / "empty" / ".tmp" / "x" / "result.json").write_text("{}")
    assert main(["results", "--runs-dir", str(tmp_path / "empty")]) == 0
    assert "no finished runs" in capsys.readouterr().out
