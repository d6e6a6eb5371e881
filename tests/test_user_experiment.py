"""An experiment of one's own (examples/my_experiment.py, outside analysis/) runs through
`probe reproduce --experiments-module` into its own figures folder, and its runs list in
`probe results`; bad modules fail in one line."""

import os
import sys
from pathlib import Path

import pytest
import torch

import analysis.experiments
import tasks.registry
from analysis.experiments import EXPERIMENTS
from prefix_probe.cli import main
from tasks import sources

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = "examples/my_experiment.py"


def forget_example_module():
    for name in [n for n in sys.modules if n.startswith("_prefix_probe_file_my_experiment_")]:
        del sys.modules[name]


@pytest.fixture(autouse=True)
def isolated(monkeypatch):
    """Leave the experiment and task registries, the env and the thread count as they were."""
    monkeypatch.setattr(analysis.experiments, "EXPERIMENTS", EXPERIMENTS)
    saved = dict(EXPERIMENTS)
    monkeypatch.setattr(tasks.registry, "_REGISTRY", dict(tasks.registry._REGISTRY))
    monkeypatch.setattr(tasks.registry, "_SOURCES", dict(tasks.registry._SOURCES))
    monkeypatch.setenv(sources.ENV, "")  # recorded, so the value reproduce sets is undone
    monkeypatch.chdir(ROOT)
    threads = torch.get_num_threads()
    forget_example_module()
    yield
    forget_example_module()
    EXPERIMENTS.clear()
    EXPERIMENTS.update(saved)
    torch.set_num_threads(threads)  # run_all sets its own


def test_a_user_experiment_reproduces_into_its_own_folder(tmp_path, capsys):
    shipped = (ROOT / "figures" / "README.md").read_bytes()
    runs, figures = tmp_path / "runs", tmp_path / "figs"
    argv = ["reproduce", "--experiments-module", EXAMPLE, "--profile", "smoke"]
    assert main([*argv, "--runs-dir", str(runs), "--figures-dir", str(figures)]) == 0
    index = (figures / "README.md").read_text()
    assert "## Mine: rotate1 from a sort-ascending base" in index
    assert "## Paper 01" not in index and "![mine_rotate1.png]" in index  # only the user's
    assert f"--experiments-module {EXAMPLE}" in index  # the regenerate command is complete
    assert (figures / "mine_rotate1.png").stat().st_size > 1000
    claims = (figures / "claims.md").read_text()
    assert "full fine-tuning learns rotate1 better than a P=4 prefix" in claims
    assert (ROOT / "figures" / "README.md").read_bytes() == shipped  # figures/ untouched
    assert str(Path(EXAMPLE).resolve()) in os.environ[sources.ENV]  # for --jobs N workers

    capsys.readouterr()
    assert main(["results", "--runs-dir", str(runs)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:-1]]
    assert sorted(r[1] for r in rows) == ["rotate1", "rotate1", "sort_asc"]

    # Run again: every run is stored, so nothing trains, and the figures are the same.
    before = (figures / "README.md").read_text()
    assert main([*argv, "--runs-dir", str(runs), "--figures-dir", str(figures)]) == 0
    assert "0 runs trained" in capsys.readouterr().out
    assert (figures / "README.md").read_text() == before


def test_a_plain_task_name_resolves_through_the_env_modules(monkeypatch):
    """What a spawned worker does: the module is listed, the name is not yet registered."""
    monkeypatch.setenv(sources.ENV, str(ROOT / EXAMPLE))
    assert "rotate1" not in tasks.registry._REGISTRY
    assert tasks.get_task("rotate1").description == "shift right by one"


def test_bad_experiment_modules_fail_in_one_line(tmp_path, capsys):
    (tmp_path / "none.py").write_text("X = 1\n")
    (tmp_path / "clash.py").write_text(
        "from analysis.report import Experiment\n"
        "EXPERIMENT = Experiment('paper01', 't', lambda p: [], lambda s, p, d: None)\n"
    )
    for module, message in [
        (str(tmp_path / "none.py"), "define EXPERIMENT = analysis.report.Experiment"),
        (str(tmp_path / "clash.py"), "an experiment named 'paper01' already exists"),
        ("no_such_experiments_xyz", "no module named 'no_such_experiments_xyz'"),
    ]:
        argv = ["reproduce", "--experiments-module", module, "--runs-dir", str(tmp_path)]
        assert main([*argv, "--figures-dir", str(tmp_path / "f")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
