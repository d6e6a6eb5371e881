"""``probe reproduce``: run every experiment's runs (resumably), then regenerate figures/.

Experiments of one's own live in one's own module or file, loaded with ``--experiments-module``
(see examples/my_experiment.py): it defines ``EXPERIMENT`` (an :class:`analysis.report.Experiment`)
or ``EXPERIMENTS`` (a list), which join the registry; with no names given, only they run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from analysis.executors import EXECUTORS, Executor, make_executor
from analysis.experiments import EXPERIMENTS, default_names, register
from analysis.report import PROFILES, Experiment, Section, markdown_table
from analysis.runs import RunsFailed, Store, run_sweep
from tasks.sources import add_env_module, import_source


def load_experiments(module: str) -> list[str]:
    """Import a module (on the Python path) or a .py file of experiments, register its
    ``EXPERIMENT`` / ``EXPERIMENTS`` and return their names. Worker processes import it too (via
    ``$PREFIX_PROBE_TASK_MODULES``), so that the tasks it registers resolve there."""
    option = f"--experiments-module {module!r}"
    mod = import_source(module, option)
    found = getattr(mod, "EXPERIMENTS", None) or [getattr(mod, "EXPERIMENT", None)]
    found = list(found.values()) if isinstance(found, dict) else list(found)
    if not found or not all(isinstance(e, Experiment) for e in found):
        raise ValueError(
            f"{option}: define EXPERIMENT = analysis.report.Experiment(...) or EXPERIMENTS = [...] "
            "in it (see examples/my_experiment.py)"
        )
    add_env_module(module)
    return [register(e).name for e in found]


def reproduce(
    names: list[str],
    profile: str,
    jobs: int,
    device: str,
    runs_dir: Path,
    figures_dir: Path,
    modules: list[str] = (),
    executor: Executor | None = None,
    retries: int = 0,
) -> Path:
    """Train every unfinished run of the experiments ``names`` (default: those of ``modules``
    if given, else the built-ins but the opt-in ones, ``Experiment.default``) on ``executor``
    (default: a local pool of ``jobs`` processes) into ``runs_dir/profile``, then write their
    figures and the index (README.md; ``<names>.md`` for opt-in experiments alone).

    If runs fail, the others are still trained and every experiment whose runs all finished
    still gets its figures; the rest are listed as skipped, a summary is printed to stderr and
    :class:`RunsFailed` is raised after the index is written.
    """
    loaded = [name for m in modules for name in load_experiments(m)]
    names = list(names) or loaded
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"unknown experiments {unknown}; choose from {list(EXPERIMENTS)}")
    p = PROFILES[profile]
    experiments = [EXPERIMENTS[n] for n in names or default_names()]
    store = Store(Path(runs_dir) / profile)
    start = time.perf_counter()
    runs = [r for e in experiments for r in e.runs(p)]
    outcome = run_sweep(runs, store, jobs, device, executor=executor, retries=retries)
    trained = time.perf_counter() - start
    figures_dir.mkdir(parents=True, exist_ok=True)
    sections, skipped = [], []
    for e in experiments:
        needed = {r.key: r for r in e.runs(p)}
        needed.update({r.base.key: r.base for r in needed.values() if r.base})
        missing = [r for r in needed.values() if not store.done(r)]
        if missing:
            why = (
                f"skipped: {len(missing)} of its {len(needed)} runs did not finish "
                f"({', '.join(r.label for r in missing[:3])}{', ...' * (len(missing) > 3)})"
            )
            skipped.append(f"  {e.name}: {why}")
            sections.append(Section(e.title, f"*{why}; rerun `probe reproduce` to finish it.*"))
        else:
            sections.append(e.report(store, p, figures_dir))
    options = [f"--experiments-module {m}" for m in modules]
    # Opt-in experiments run on their own keep the default set's README.md (and claims) intact.
    opt_in = not any(e.default for e in experiments)
    name = "-".join(e.name for e in experiments) + ".md" if opt_in else "README.md"
    index = write_index(sections, profile, figures_dir, [*names, *options], name)
    print(
        f"{outcome.trained} runs trained in {trained:.0f} s; figures and tables in "
        f"{figures_dir}/ (index: {index})"
    )
    if outcome.failed:
        print(f"{len(outcome.failed)} runs did not finish:\n{outcome.summary()}", file=sys.stderr)
        if skipped:
            print("experiments without figures:\n" + "\n".join(skipped), file=sys.stderr)
        raise RunsFailed(outcome, store)
    return index


def write_index(
    sections, profile: str, figures_dir: Path, names: list[str] = (), name: str = "README.md"
) -> Path:
    """Write the figures' index ``figures_dir/name`` (and, for README.md, claims.md)."""
    command = " ".join(["probe reproduce", *names, f"--profile {profile}"])
    lines = [
        "# Figures and tables",
        "",
        f"Generated by `{command}`; do not edit by hand. Numbers are held-out exact match "
        "(3,200 test sequences) as mean ± standard deviation over seeds.",
        "",
    ]
    claims = [c for s in sections for c in s.claims]
    if claims:
        ledger = markdown_table(
            ["claim", "experiment", "measured", "verdict"],
            [[c.claim, c.experiment, c.measured, c.verdict] for c in claims],
        )
        if name == "README.md":
            (figures_dir / "claims.md").write_text(f"# Claims ledger\n\n{ledger}\n")
        lines += ["## Claims ledger", "", ledger, ""]
    for s in sections:
        lines += [f"## {s.title}", "", s.text, ""]
        for t in s.tables:
            lines += [t, ""]
        for f in s.figures:
            lines += [
                f"![{f.file}]({f.file})",
                "",
                f"*{f.file}*: {f.caption} Regenerate: `{command}`.",
                "",
            ]
        for page in s.pages:
            lines += [
                f"**Interactive:** [{page.file}]({page.file}) (open in a browser; self-contained, "
                f"no network needed): {page.caption}",
                "",
            ]
    index = figures_dir / name
    index.write_text("\n".join(lines))
    return index


def _slurm_arg(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: pass KEY=VALUE, e.g. account=myproject")
    return key, value


def cmd_reproduce(a: argparse.Namespace) -> int:
    """0 when every run finished; 1 when some failed (figures built from the rest)."""
    if a.jobs is not None and a.jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {a.jobs}; pass --jobs 1 or more")
    if a.retries < 0:
        raise ValueError(f"retries must be >= 0, got {a.retries}; pass --retries 0 or more")
    executor = make_executor(
        a.executor,
        a.jobs,
        a.device,
        address=a.address,
        cpus_per_run=a.cpus_per_run,
        gpus_per_run=a.gpus_per_run,
        partition=a.partition,
        time_min=a.time,
        slurm_folder=a.runs_dir / ".submitit",
        slurm_cluster=a.slurm_cluster,
        slurm_extra=dict(a.slurm_arg or ()),
    )
    try:
        with executor:
            reproduce(
                a.experiments,
                a.profile,
                a.jobs or 1,
                a.device,
                a.runs_dir,
                a.figures_dir,
                a.experiments_module,
                executor=executor,
                retries=a.retries,
            )
    except RunsFailed as e:
        print(f"probe reproduce: {e}", file=sys.stderr)
        return 1
    return 0


def add_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="run the experiments and regenerate figures/")
    p.add_argument(
        "experiments",
        nargs="*",
        help=f"default: {default_names()}; opt-in, run only when named: "
        f"{[n for n in EXPERIMENTS if n not in default_names()]}",
    )
    p.add_argument("--profile", default="quick", choices=sorted(PROFILES))
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--runs-dir",
        type=Path,
        default=Path("runs"),
        help="result store; with ray or slurm a path every worker sees (a shared filesystem)",
    )
    p.add_argument("--figures-dir", type=Path, default=Path("figures"))
    p.add_argument(
        "--experiments-module",
        action="append",
        default=[],
        metavar="MODULE",
        help="a module or .py file of your own experiments (EXPERIMENT or EXPERIMENTS); with no "
        "experiment names, run only its experiments; repeat",
    )
    p.add_argument(
        "--executor",
        default="local",
        choices=EXECUTORS,
        help="where runs train: local processes (default), a Ray cluster ([ray] extra) or "
        "Slurm jobs ([slurm] extra)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        help="runs in flight at once (local: processes, default 1; ray: default what the "
        "cluster fits; slurm: jobs submitted at once, default 64)",
    )
    p.add_argument("--retries", type=int, default=0, help="retry a failed run N more times")
    p.add_argument("--address", help="ray: cluster address ('auto' on a cluster node); default "
                   "a local Ray started in this process")  # fmt: skip
    p.add_argument("--cpus-per-run", type=float, help="ray/slurm: CPUs a run asks for (default 1)")
    p.add_argument(
        "--gpus-per-run",
        type=float,
        help="ray/slurm: GPUs a run asks for (ray may share one: 0.25); default 1 with "
        "--device cuda, else 0",
    )
    p.add_argument("--partition", help="slurm: partition")
    p.add_argument("--time", type=int, default=60, help="slurm: minutes a run's job may take")
    p.add_argument(
        "--slurm-arg",
        type=_slurm_arg,
        action="append",
        metavar="KEY=VALUE",
        help="slurm: any other sbatch option, e.g. account=proj or qos=high (repeat)",
    )
    p.add_argument(
        "--slurm-cluster",
        default="slurm",
        choices=["slurm", "local"],
        help="local: submitit runs each job as a local process, to try a set-up without Slurm",
    )
    p.set_defaults(run=cmd_reproduce)
