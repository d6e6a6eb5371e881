"""The ``probe`` command line: ``probe tasks``, ``probe pretrain``, ..."""

from __future__ import annotations

import argparse
import sys

import torch

from probe.model import PRESETS, Transformer, preset
from probe.train import TrainConfig, TrainingDiverged, train
from tasks import Task, get_task, list_tasks


def check_fits(model: Transformer, task: Task) -> None:
    """Refuse a task the model cannot represent, naming the field and the fix."""
    cfg = model.cfg
    if task.vocab_size > cfg.d_vocab:
        raise ValueError(
            f"task {task.name!r} uses {task.vocab_size} token ids but the model's d_vocab is "
            f"{cfg.d_vocab}; build the model with d_vocab >= {task.vocab_size}"
        )
    if task.seq_len - 1 > cfg.n_ctx:
        raise ValueError(
            f"task {task.name!r} needs {task.seq_len - 1} positions but the model's n_ctx is "
            f"{cfg.n_ctx}; build the model with n_ctx >= {task.seq_len - 1}"
        )


def pretrain(task: Task, model: Transformer, cfg: TrainConfig):
    """Train every weight of ``model`` on ``task``; returns the TrainResult."""
    check_fits(model, task)
    model.to(cfg.device)
    return train(model, model.parameters(), task, cfg, modules=[model])


def add_train_args(p: argparse.ArgumentParser, steps: int, lr: float, batch_size: int):
    p.add_argument("--steps", type=int, default=steps, help="optimiser steps (default %(default)s)")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=batch_size, help="default %(default)s")
    p.add_argument("--seed", type=int, default=0, help="data, dropout and init seed")
    p.add_argument(
        "--target-accuracy",
        type=float,
        default=None,
        help="stop early once held-out exact match reaches this fraction",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def train_config(args) -> TrainConfig:
    return TrainConfig(
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        target_accuracy=args.target_accuracy,
        device=args.device,
        progress=not args.no_progress,
    )


def cmd_tasks(args) -> int:
    for t in list_tasks():
        print(f"{t.name:16s} vocab {t.vocab_size:2d}  {t.description}")
    return 0


def cmd_pretrain(args) -> int:
    task = get_task(args.task)
    torch.manual_seed(args.seed)
    model = Transformer(preset(args.preset))
    result = pretrain(task, model, train_config(args))
    model.save(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(
        f"pretrained preset {args.preset} ({n:,} parameters) on {task.name}: "
        f"held-out exact match {result.accuracy:.2%} after {result.steps} steps "
        f"in {result.seconds:.1f} s -> {args.out}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="probe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("tasks", help="list the registered tasks").set_defaults(run=cmd_tasks)

    p = sub.add_parser("pretrain", help="train a base model on a task")
    p.add_argument("--task", required=True, help="a task name (see `probe tasks`)")
    p.add_argument("--preset", default="01", choices=sorted(PRESETS), help="model preset")
    p.add_argument("--out", required=True, help="directory to save the model to")
    add_train_args(p, steps=1500, lr=3e-3, batch_size=128)
    p.set_defaults(run=cmd_pretrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, KeyError, FileNotFoundError, TrainingDiverged) as e:  # no traceback
        print(f"probe {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
