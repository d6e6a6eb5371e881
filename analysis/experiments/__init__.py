"""The registry of experiments that ``probe reproduce`` runs, in report order."""

from analysis.experiments import (
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
    )
}


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
