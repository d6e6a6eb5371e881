"""The registry of experiments that ``probe reproduce`` runs, in report order."""

from analysis.experiments import ledger, paper01, paper02, paper03, paper04, study, sweeps, theorem

EXPERIMENTS = {
    e.name: e
    for e in (
        paper01.EXPERIMENT,
        paper02.EXPERIMENT,
        paper03.EXPERIMENT,
        paper04.EXPERIMENT,
        study.EXPERIMENT,
        theorem.EXPERIMENT,
        sweeps.EXPERIMENT,
        ledger.EXPERIMENT,
    )
}
