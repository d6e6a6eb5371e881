"""The atlas experiment: opt-in (not in `probe reproduce`'s default set, with an index of its
own), its runs shared with the study and paper 01, and its smoke profile end to end."""

import pytest

import analysis.experiments
from analysis.experiments import EXPERIMENTS, atlas, default_names, paper01, study
from analysis.report import PROFILES, Experiment, Section
from analysis.reproduce import reproduce
from probe.classify import BIAS_ONLY, GATED, REWEIGHTS

SMOKE = PROFILES["smoke"]


def test_atlas_is_registered_but_opt_in():
    assert "atlas" in EXPERIMENTS and not EXPERIMENTS["atlas"].default
    assert "atlas" not in default_names() and "study" in default_names()
    assert default_names() == [n for n in EXPERIMENTS if n != "atlas"]


def fake(name: str, default: bool) -> Experiment:
    return Experiment(
        name, name.title(), lambda p: [], lambda s, p, out: Section(name.title()), default
    )


def test_reproduce_without_names_skips_opt_in_experiments(tmp_path, monkeypatch):
    """Must-fail pair: the default set runs the default experiment only; naming the opt-in one
    runs it and writes its own index, leaving the default README.md as it was."""
    registry = {"on": fake("on", True), "extra": fake("extra", False)}
    monkeypatch.setattr(analysis.experiments, "EXPERIMENTS", registry)
    monkeypatch.setattr("analysis.reproduce.EXPERIMENTS", registry)
    figures = tmp_path / "figs"
    index = reproduce([], "smoke", 1, "cpu", tmp_path / "runs", figures)
    assert index == figures / "README.md"
    text = index.read_text()
    assert "## On" in text and "## Extra" not in text
    extra = reproduce(["extra"], "smoke", 1, "cpu", tmp_path / "runs", figures)
    assert extra == figures / "extra.md" and "## Extra" in extra.read_text()
    assert (figures / "README.md").read_text() == text
    both = reproduce(["on", "extra"], "smoke", 1, "cpu", tmp_path / "runs", figures)
    assert both == figures / "README.md" and "## Extra" in both.read_text()


@pytest.mark.parametrize("profile", ["smoke", "quick"])
def test_shared_methods_are_the_study_and_paper01_runs(profile):
    p = PROFILES[profile]
    for m in atlas.SHARED:
        assert atlas.study_runs(p, m) == study.method_runs(p, study.MAIN, m)
        assert atlas.paper01_runs(p, m) == [paper01.tuned(p, b, m) for b in paper01.base_runs(p)]
    for m in atlas.NEW:
        for new, prefix in zip(atlas.study_runs(p, m), atlas.study_runs(p, "prefix"), strict=True):
            assert (new.method, new.task, new.steps) == (m, prefix.task, prefix.steps)
            assert (new.base, new.seed, dict(new.options)) == (
                prefix.base,
                prefix.seed,
                atlas.NEW[m],
            )
    assert len(atlas.runs(p)) == 2 * len(atlas.methods(p)) * len(p.seeds)


def test_atlas_smoke_end_to_end(tmp_path):
    figures = tmp_path / "figs"
    index = reproduce(["atlas"], "smoke", 1, "cpu", tmp_path / "runs", figures)
    assert index == figures / "atlas.md" and not (figures / "README.md").exists()
    text = index.read_text()
    assert (figures / "atlas_accuracy.png").stat().st_size > 1000
    rows = {}  # the first table's row of each method: the trained one
    for line in text.splitlines():
        if line.startswith("| "):
            rows.setdefault(line.split(" | ")[0][2:], line)
    assert f"{BIAS_ONLY} / {BIAS_ONLY}" in rows["prefix"]
    assert f"{GATED} / {GATED}" in rows["adaption_prompt"]
    assert f"{REWEIGHTS} / {REWEIGHTS}" in rows["ia3"]  # trained key scales moved off 1
    assert "(n=1)" in rows["ia3"] and "ours (tiny)" in text
    assert "## PEFT atlas" in text and "--profile smoke" in text
