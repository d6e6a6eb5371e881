"""The registry of experiments that ``probe reproduce`` runs, in report order; those with
``default=False`` (the PEFT atlas) only when named."""

from analysis.experiments import (
    atlas,
    capacity,
    constructions,
    ledger,
    paper01,
    paper02,
    paper03,
    paper04,
    prefix_spread,
    study,
    sweeps,
    theorem,
)

EXPERIMENTS = {
    e.name: e
    for e in (
        paper01.EXPERIMENT,
        paper02.EXPERIMENT,
        paper03.EXPERIMENT,
        paper04.EXPERIMENT,
        study.EXPERIMENT,
        theorem.EXPERIMENT,
        constructions.EXPERIMENT,
        capacity.EXPERIMENT,
        prefix_spread.EXPERIMENT,
        sweeps.EXPERIMENT,
        ledger.EXPERIMENT,
        atlas.EXPERIMENT,
    )
}


def default_names() -> list[str]:
    """The experiments ``probe reproduce`` runs when given no names: all but the opt-in ones."""
    return [name for name, e in EXPERIMENTS.items() if e.default]


def register(experiment):
    """Add an experiment of one's own (``probe reproduce --experiments-module``) and return it;
    a name already taken by another experiment raises ValueError."""
    old = EXPERIMENTS.get(experiment.name)
    if old is not None and old is not experiment:
        raise ValueError(
            f"an experiment named {experiment.name!r} already exists; give yours another name"
        )
    EXPERIMENTS[experiment.name] = experiment
    return experiment
