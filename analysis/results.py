"""``probe results``: every stored run as one row of a table, printed and written as CSV and
JSON lines, ready for ``pandas.read_csv("runs/results.csv")``.

A row is flat: what was trained (task, method, preset and its model overrides, the adapter's
options), how (every other field of the run's spec: lr, batch_size, the step budget ``steps``,
seed, ...), what came of it (``steps_done``, ``seconds`` of training wall time, held-out exact
match per evaluated task as ``acc_<task>``, ``accuracy`` on its own task, parameters) and where
it is (``key``, ``path``, ``base`` key). A JSON line also carries the full ``spec``, from which
:func:`run_from_spec` rebuilds the :class:`~analysis.runs.Run` (same key).
"""

from __future__ import annotations

import argparse
import csv
import json
from dataclasses import fields
from pathlib import Path

from analysis.runs import Run

# Spec fields with a column of their own (or folded into one); every other one is a column as is.
FIRST = ["task", "method", "preset", "model", "options", "seed"]
LAST = ["steps_done", "seconds", "accuracy", "n_params", "store", "base", "key", "path"]


def _pairs(pairs) -> str:
    """[(field, value), ...] -> 'field=value field=value' (JSON values), '' for none."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in pairs)


def result_files(runs_dir: Path) -> list[Path]:
    """Every finished run's result.json under ``runs_dir`` (temporaries, .dirs, skipped)."""
    runs_dir = Path(runs_dir)
    files = runs_dir.rglob("result.json")
    return sorted(
        f for f in files if not any(p.startswith(".") for p in f.relative_to(runs_dir).parts)
    )


def row(result: dict, path: Path, runs_dir: Path) -> dict:
    """One run's flat row (see the module docstring)."""
    spec = result["spec"]
    out = {
        "task": spec["task"],
        "method": spec["method"] or "pretrain",
        "preset": spec["preset"],
        "model": _pairs(spec.get("model", ())),
        "options": _pairs(spec.get("options", ())),
        "seed": spec["seed"],
    }
    for name, value in spec.items():
        if name not in out and name not in ("base", "eval_tasks"):
            out[name] = value
    out["eval_tasks"] = " ".join(spec.get("eval_tasks", ()))
    out["steps_done"] = result["steps"]
    out["seconds"] = result["seconds"]
    out["accuracy"] = result["accuracy"][spec["task"]]
    for task, acc in result["accuracy"].items():
        out[f"acc_{task}"] = acc
    out["n_params"] = result.get("n_params")
    out["store"] = str(path.parent.relative_to(runs_dir)) if path.parent != runs_dir else "."
    out["base"] = spec["base"] or ""
    out["key"] = result["key"]
    out["path"] = str(path)
    return out


def collect(runs_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(rows, specs) of every stored run under ``runs_dir`` (a store, or a folder of stores)."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        raise FileNotFoundError(
            f"no runs directory {runs_dir}; pass --runs-dir where `probe reproduce` stored runs"
        )
    rows, specs = [], []
    for file in result_files(runs_dir):
        result = json.loads(file.read_text())
        rows.append(row(result, file.parent, runs_dir))
        specs.append(result["spec"])
    return rows, specs


def columns(rows: list[dict]) -> list[str]:
    """FIRST, the other hyperparameters, LAST, then acc_<task> columns: the union over rows."""
    seen = dict.fromkeys(k for r in rows for k in r)
    accs = sorted(k for k in seen if k.startswith("acc_"))
    middle = [k for k in seen if k not in FIRST and k not in LAST and k not in accs]
    return [*FIRST, *middle, *LAST, *accs]


def write(rows: list[dict], specs: list[dict], out: str | Path) -> tuple[Path, Path]:
    """Write ``out.csv`` (flat rows) and ``out.jsonl`` (flat rows plus each run's ``spec``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path, jsonl_path = out.with_suffix(".csv"), out.with_suffix(".jsonl")
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns(rows), restval="")
        writer.writeheader()
        writer.writerows(rows)
    with jsonl_path.open("w") as f:
        for r, spec in zip(rows, specs, strict=True):
            f.write(json.dumps({**r, "spec": spec}) + "\n")
    return csv_path, jsonl_path


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def run_from_spec(spec: dict, specs_by_key: dict[str, dict]) -> Run:
    """The Run a stored spec describes (same key; ``lr`` comes back resolved, as the spec holds
    it); its base is rebuilt from ``specs_by_key`` (key -> spec)."""
    names = {f.name for f in fields(Run)}
    d = {k: _tuples(v) for k, v in spec.items() if k in names and k != "base"}
    if spec.get("base"):
        d["base"] = run_from_spec(specs_by_key[spec["base"]], specs_by_key)
    return Run(**d)


def format_table(rows: list[dict]) -> str:
    header = ["key", "task", "method", "preset", "options", "seed", "steps", "accuracy", "seconds"]
    lines = [header]
    for r in rows:
        shape = f"{r['preset']} {r['model']}".strip()
        lines.append(
            [r["key"], r["task"], r["method"], shape, r["options"], str(r["seed"]),
             str(r["steps_done"]), f"{r['accuracy']:.2%}", f"{r['seconds']:.1f}"]
        )  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines
    )


def cmd_results(args) -> int:
    rows, specs = collect(args.runs_dir)
    if not rows:
        print(f"no finished runs under {args.runs_dir}")
        return 0
    print(format_table(rows))
    csv_path, jsonl_path = write(rows, specs, args.out or Path(args.runs_dir) / "results")
    print(f"{len(rows)} runs -> {csv_path}, {jsonl_path}")
    return 0


def add_command(sub: argparse._SubParsersAction) -> None:
    """Register ``probe results`` on the CLI's subparsers."""
    p = sub.add_parser(
        "results",
        help="one row per stored run: print it, write CSV and JSON lines",
        description="Every finished run under --runs-dir (a store or a folder of stores, as "
        "`probe reproduce` writes them) as one row: task, method, preset and overrides, "
        "hyperparameters, seed, steps, accuracy per evaluated task, wall time, key, path.",
    )
    p.add_argument("--runs-dir", type=Path, default=Path("runs"), help="default %(default)s")
    p.add_argument(
        "--out",
        type=Path,
        help="write OUT.csv and OUT.jsonl (default: RUNS_DIR/results.csv and .jsonl)",
    )
    p.set_defaults(run=cmd_results)
