"""Declarative training runs, a result store keyed by the full spec, and a resumable runner.

A :class:`Run` names everything that determines its result (task, model, method, options,
budget, seed, and its base run), so its key is a hash of that spec: re-running skips finished
runs and an interrupted sweep resumes. A run's directory is written in one atomic rename
(``probe.io.save_dir``), so a half-written run is never read back as a result.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import torch
from tqdm.auto import tqdm

from probe.adapters import DEFAULT_LR, load_adapter, tune
from probe.model import Transformer, preset
from probe.train import TrainConfig, evaluate, pretrain
from tasks import get_task


@dataclass(frozen=True)
class Run:
    """One training run: pretraining a base model (``method=None``) or tuning an adapter on it.

    ``model`` holds preset overrides as sorted (field, value) pairs; ``options`` the adapter's
    keyword arguments likewise; ``eval_tasks`` are the extra tasks the result reports accuracy on.
    """

    task: str
    preset: str = "01"
    model: tuple = ()
    method: str | None = None
    options: tuple = ()
    base: Run | None = None
    steps: int = 1000
    lr: float | None = None  # None -> DEFAULT_LR[method] (3e-3 for pretraining)
    batch_size: int = 64
    warmup: int = 50  # linear warm-up steps before the cosine decay (TrainConfig.warmup)
    seed: int = 0
    train_size: int | None = None  # None -> fresh samples every step; else a fixed train set
    target_accuracy: float | None = None
    eval_tasks: tuple[str, ...] = ()
    # The learning curve scores outputs after the first k: 1 for a mix4 base, whose exact match
    # without a task token is capped near 25-30% and so says little about the skills it holds.
    eval_given: int = 0

    def __post_init__(self):
        if (self.method is None) != (self.base is None):
            raise ValueError("a Run pretrains (no method, no base) or tunes (method and base)")
        get_task(self.task)  # fail at spec time on an unknown task
        for name in self.eval_tasks:
            get_task(name)

    def spec(self) -> dict:
        """Everything that determines the result; defaults resolved, so that changing a
        default (``DEFAULT_LR``) changes the key instead of reusing a stale result."""
        d = asdict(self)
        d["base"] = self.base.key if self.base else None
        d["lr"] = self.effective_lr
        return d

    @property
    def effective_lr(self) -> float:
        return self.lr or (DEFAULT_LR[self.method] if self.method else 3e-3)

    @property
    def key(self) -> str:
        text = json.dumps(self.spec(), sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        what = self.method or f"pretrain[{self.preset}]"
        return f"{what} {self.task} seed {self.seed}"

    def train_config(self, device: str) -> TrainConfig:
        return TrainConfig(
            steps=self.steps,
            lr=self.effective_lr,
            batch_size=self.batch_size,
            warmup=min(self.warmup, self.steps),
            seed=self.seed,
            target_accuracy=self.target_accuracy,
            device=device,
            progress=False,
            eval_every=max(10, self.steps // 20),  # a 20-point learning curve per run
            eval_size=512,  # progress and early stop; results use all 3,200 test sequences
            eval_given=self.eval_given,
            train_size=self.train_size,
        )


def variant(run: Run, **changes) -> Run:
    """A copy of ``run`` with some fields changed (``options``/``model`` as dicts are fine)."""
    for name in ("options", "model"):
        if isinstance(changes.get(name), dict):
            changes[name] = tuple(sorted(changes[name].items()))
    return replace(run, **changes)


@dataclass
class Store:
    """Results on disk: ``root/<key>/result.json`` plus ``model/`` or ``adapter/``."""

    root: Path
    _cache: dict = field(default_factory=dict)

    def path(self, run: Run) -> Path:
        return Path(self.root) / run.key

    def done(self, run: Run) -> bool:
        return (self.path(run) / "result.json").is_file()

    def result(self, run: Run) -> dict:
        if run.key not in self._cache:
            self._cache[run.key] = json.loads((self.path(run) / "result.json").read_text())
        return self._cache[run.key]

    def model(self, run: Run) -> Transformer:
        """The base model of a pretraining run, or the base a tuning run was tuned on."""
        base = run if run.method is None else run.base
        return Transformer.load(self.path(base) / "model")

    def adapter(self, run: Run, base: Transformer):
        return load_adapter(self.path(run) / "adapter", base)


def execute(run: Run, root: Path, device: str = "cpu") -> dict:
    """Train one run and write its directory in one atomic rename; returns the result."""
    cfg = run.train_config(device)
    task = get_task(run.task)
    if run.method is None:
        torch.manual_seed(run.seed)
        model = Transformer(preset(run.preset, **dict(run.model)))
        result = pretrain(task, model, cfg)
        forward, n_params = model, sum(p.numel() for p in model.parameters())
    else:
        model = Transformer.load(Path(root) / run.base.key / "model", device)
        adapter, result = tune(model, task, run.method, cfg, **dict(run.options))
        forward, n_params = partial(adapter, model), adapter.n_params
    model.eval()
    accuracy = {
        name: evaluate(forward, get_task(name), device=device)
        for name in dict.fromkeys((run.task, *run.eval_tasks))
    }
    given = {  # the skills a base holds once told the task (see Run.eval_given)
        name: evaluate(forward, get_task(name), device=device, given=run.eval_given)
        for name in accuracy
        if run.eval_given
    }
    summary = {
        "spec": run.spec(),
        "key": run.key,
        "steps": result.steps,
        "seconds": result.seconds,
        "accuracy": accuracy,
        **({"accuracy_given": given} if given else {}),
        "history": result.history,
        "n_params": n_params,
        "base_params": sum(p.numel() for p in model.parameters()),
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{run.key}.", dir=root))
    try:
        if run.method is None:
            model.save(tmp / "model")
        else:
            adapter.save(tmp / "adapter", model)
        (tmp / "result.json").write_text(json.dumps(summary, indent=1) + "\n")
        os.replace(tmp, Path(root) / run.key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _worker(run: Run, root: Path, device: str, threads: int) -> dict:
    torch.set_num_threads(threads)
    return execute(run, root, device)


def run_all(runs: list[Run], store: Store, jobs: int = 1, device: str = "cpu") -> int:
    """Run every unfinished run (and the base runs they need); returns how many ran.

    Bases go first, in waves; within a wave, ``jobs`` processes run independent runs.
    """
    root = Path(store.root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".*"):  # temporaries of an interrupted earlier invocation
        shutil.rmtree(stale, ignore_errors=True)
    todo, seen = [], set()

    def add(run: Run):
        if run.base is not None:
            add(run.base)
        if run.key not in seen and not store.done(run):
            seen.add(run.key)
            todo.append(run)

    for run in runs:
        add(run)
    ran = 0
    threads = max(1, (os.cpu_count() or 1) // jobs)
    bar = tqdm(total=len(todo), desc="runs", disable=not todo)
    while todo:
        wave = [r for r in todo if r.base is None or store.done(r.base)]
        todo = [r for r in todo if r not in wave]
        if jobs == 1:
            for run in wave:
                bar.set_postfix_str(run.label)
                _worker(run, root, device, threads)
                bar.update()
        else:
            with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
                futures = [pool.submit(_worker, run, root, device, threads) for run in wave]
                for future in futures:
                    future.result()
                    bar.update()
        ran += len(wave)
    bar.close()
    return ran
