"""The probe layer's commands (``probe tasks``, ``pretrain``, ``tune``, ``evaluate``,
``check-theorem``) and the CLI's shared plumbing (``build_parser``, ``main``'s error handling).

The ``probe`` console script is :mod:`prefix_probe.cli`, at the top of the layers
(tasks -> probe -> analysis -> prefix_probe): it hands every layer's ``add_command(s)`` to
:func:`build_parser` here, so this module imports nothing above the probe layer.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from probe.config import PRESETS, PRETRAIN_LR, PRETRAIN_WEIGHT_DECAY, ModelConfig, preset
from probe.hf import MissingExtraError
from probe.io import MODEL_FORMAT, check_target
from tasks import get_task, list_tasks, task_source
from tasks.sources import import_source

if TYPE_CHECKING:
    from probe.train import TrainConfig

# Our model, its adapters and training are imported by the commands that use them, so that
# `probe check-theorem` on a Hugging Face model imports neither them nor transformer-lens.

TASK_HELP = (
    "a task name (see `probe tasks`), or your own: MODULE:NAME (a module on the Python path) "
    "or path/to/file.py:NAME"
)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line: the problem, then where help is."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def check_device(name: str) -> None:
    """Refuse a device this torch cannot use, naming the fix (instead of a CUDA traceback)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {name}: this torch has no usable CUDA (torch.cuda.is_available() is "
                "False); use --device cpu, or install a CUDA build of torch"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s); pick "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {name}: unsupported device type; use cpu or cuda")


def add_train_args(p: argparse.ArgumentParser, steps: int, lr: float, batch_size: int):
    p.add_argument(
        "--steps", type=positive_int, default=steps, help="optimiser steps (default %(default)s)"
    )
    p.add_argument(
        "--lr",
        type=positive_float,
        default=lr,
        help="peak learning rate (default %(default)s)"
        if lr
        else "peak learning rate (default: the method's, see probe.train.DEFAULT_LR)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=batch_size, help="default %(default)s"
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="AdamW's decoupled weight decay on matrices (default: "
        f"{PRETRAIN_WEIGHT_DECAY:g} to pretrain; the "
        "method's to tune, see probe.train.DEFAULT_WEIGHT_DECAY)",
    )
    p.add_argument("--seed", type=int, default=0, help="data, dropout and init seed")
    p.add_argument(
        "--target-accuracy",
        type=float,
        default=None,
        help="stop early once held-out exact match reaches this fraction",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads (default 0: torch's choice, one per core, so the saved weights depend "
        "on the machine's core count; the count is recorded in the saved config's environment). "
        "Use 1 on a shared machine, and the same N to compare results across machines",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a model or adapter already at --out (never anything else)",
    )


def train_config(
    args, lr: float | None = None, weight_decay: float = PRETRAIN_WEIGHT_DECAY
) -> TrainConfig:
    from probe.train import TrainConfig

    return TrainConfig(
        steps=args.steps,
        lr=args.lr if args.lr is not None else lr,
        weight_decay=args.weight_decay if args.weight_decay is not None else weight_decay,
        batch_size=args.batch_size,
        seed=args.seed,
        target_accuracy=args.target_accuracy,
        device=args.device,
        progress=not args.no_progress,
    )


def cmd_tasks(args) -> int:
    for source in args.load:  # a module or file whose import registers tasks, or MODULE:NAME
        if ":" in source:
            get_task(source)
        else:
            import_source(source, f"probe tasks --load {source!r}")
    listed = list_tasks()
    width = max(len(t.name) for t in listed) + 2
    src_width = max(len(task_source(t.name)) for t in listed) + 2
    for t in listed:
        source = task_source(t.name)
        print(f"{t.name:{width}s} vocab {t.vocab_size:2d}  {source:{src_width}s}{t.description}")
    return 0


def parse_set(item: str) -> tuple[str, object]:
    """``FIELD=VALUE`` -> (field, value); the value is read as JSON (2, 0.1, false, null), else
    kept as a string, so that ModelConfig's own checks name a wrong type."""
    field, sep, text = item.partition("=")
    if not sep or not field.strip():
        raise ValueError(f"--set {item!r}: write FIELD=VALUE, e.g. --set n_layers=2")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = {"True": True, "False": False, "None": None}.get(text, text)
    return field.strip(), value


def read_config_file(path: str | Path) -> dict:
    """ModelConfig fields from a JSON or TOML file (``.toml``), or a saved model's config.json."""
    path = Path(path)
    text = path.read_text()  # FileNotFoundError names the path
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            data = json.loads(text)
    except ModuleNotFoundError:
        raise ValueError(
            f"{path}: reading TOML needs Python >= 3.11 or `pip install tomli`; "
            "or write the config as JSON"
        ) from None
    except ValueError as e:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise ValueError(
            f"{path}: not valid {path.suffix[1:] or 'JSON'} ({e}); fix the file"
        ) from None
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a table of ModelConfig fields, got {type(data).__name__}"
        )
    if data.get("format") == MODEL_FORMAT:  # a saved model's shape
        data = data["config"]
    return data


def model_config(name: str, config_file: str | Path | None = None, sets=()) -> ModelConfig:
    """Preset ``name`` with fields overridden by ``config_file``, then by ``--set`` items.

    ``d_mlp`` follows ``d_model`` (4x) unless given, as in ModelConfig. Unknown fields and bad
    values raise ModelConfig's own errors.
    """
    overrides = read_config_file(config_file) if config_file else {}
    overrides.update(parse_set(item) for item in sets)
    fields = preset(name).to_dict()
    if "d_model" in overrides and "d_mlp" not in overrides:
        fields["d_mlp"] = None
    return ModelConfig.from_dict({**fields, **overrides})


def cmd_pretrain(args) -> int:
    from probe.model import Transformer
    from probe.train import pretrain

    check_target(args.out, args.overwrite)  # before training, not after
    task = get_task(args.task)
    torch.manual_seed(args.seed)
    model = Transformer(model_config(args.preset, args.config, args.set))
    result = pretrain(task, model, train_config(args))
    model.save(args.out, args.overwrite)
    n = model.n_params
    changes = [*([args.config] if args.config else []), *args.set]
    shape = f" ({' '.join(changes)})" if changes else ""
    print(
        f"pretrained preset {args.preset}{shape} ({n:,} parameters) on {task.name}: "
        f"held-out exact match {result.accuracy:.2%} after {result.steps} steps "
        f"in {result.seconds:.1f} s -> {args.out}"
    )
    return 0


def cmd_tune(args) -> int:
    from probe.adapters import adapter_config
    from probe.model import Transformer
    from probe.train import DEFAULT_LR, DEFAULT_WEIGHT_DECAY, tune

    out, base_dir = Path(args.out).resolve(), Path(args.base).resolve()
    if out == base_dir or base_dir in out.parents:
        raise ValueError(
            f"--out {args.out} is (inside) the base model {args.base}; saving there would destroy "
            "it: choose another directory"
        )
    check_target(args.out, args.overwrite)  # before training, not after
    base = Transformer.load(args.base, args.device)
    task = get_task(args.task)
    options = {k: v for k, v in (("length", args.length), ("rank", args.rank)) if v is not None}
    if args.targets:
        options["targets"] = args.targets.split(",")
    if args.init:
        options["init"] = args.init
    config = adapter_config(args.method, **options)  # refuses options the method does not take
    cfg = train_config(args, DEFAULT_LR[args.method], DEFAULT_WEIGHT_DECAY[args.method])
    adapter, result = tune(base, task, config, cfg)
    adapter.save(args.out, base, args.overwrite)
    print(
        f"tuned {args.method} ({adapter.n_params:,} parameters, {adapter.share(base):.2%} of the "
        f"base) on {task.name}: held-out exact match {result.accuracy:.2%} after "
        f"{result.steps} steps in {result.seconds:.1f} s -> {args.out}"
    )
    return 0


def cmd_evaluate(args) -> int:
    from probe.adapters import Tuned, load_adapter
    from probe.model import Transformer
    from probe.train import check_fits, evaluate

    base = Transformer.load(args.base, args.device).eval()
    tuned = Tuned(base)
    for name, path in zip(row_names(args.adapter), args.adapter, strict=True):
        tuned.add(name, load_adapter(path, base))
    chosen_tasks = [get_task(name) for name in args.task]
    for task in chosen_tasks:
        check_fits(base, task)
    width = max([8, *(len(n) for n in tuned.adapters)])
    print(f"{'adapter':{width}s}  " + "  ".join(f"{t.name:>13s}" for t in chosen_tasks))
    for name in [None, *tuned.adapters]:
        tuned.use(name).eval()
        accs = [evaluate(tuned, t, args.n, device=args.device) for t in chosen_tasks]
        print(f"{name or '(base)':{width}s}  " + "  ".join(f"{a:13.2%}" for a in accs))
    return 0


def row_names(paths: list[str]) -> list[str]:
    """Unique, short row names: each path's last components, as many as tell them apart
    (``a/adapter``, ``b/adapter``); a path given twice gets ``#2``."""
    parts = [Path(p).resolve().parts for p in paths]
    names = []
    for i, own in enumerate(parts):
        n = 1
        while n < len(own) and any(
            other[-n:] == own[-n:] for j, other in enumerate(parts) if j != i and other != own
        ):
            n += 1
        names.append("/".join(own[-n:]))
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            names[i] = f"{name}#{seen[name]}"
    return names


def hf_check_tokens(args) -> tuple[Tensor | list[Tensor], str]:
    """An HF ``--base``'s inputs for check-theorem and view: (token ids, a phrase naming them):
    ``--text``/``--text-file`` through the directory's tokenizer ([1, T_i] each), else ``--n``
    held-out ``--task`` inputs [n, T]."""
    from probe import hf
    from tasks import test_set

    texts = list(args.text or [])
    if args.text_file:
        texts += Path(args.text_file).read_text().splitlines()
    if args.text or args.text_file:  # real text through the directory's tokenizer
        tokens = hf.tokenize_texts(args.base, texts)
        return tokens, f"{len(tokens)} text(s), {sum(t.shape[1] for t in tokens)} tokens"
    task = get_task(args.task)
    return test_set(task, args.n, args.seed).tokens[:, :-1], f"{args.n} {task.name} inputs"


def check_inputs(args, adapter: str | None):
    """Our ``--base`` with ``adapter`` (a directory, or None for a random key/value prefix) and
    its inputs, for check-theorem and view: (base in ``--dtype``, tuned, a phrase naming it,
    tokens [n, T], the task)."""
    from probe.adapters import load_adapter
    from probe.model import Transformer
    from probe.train import check_fits
    from probe.tuning import random_stand_in, tuning_phrase
    from tasks import test_set

    base = Transformer.load(args.base, args.device)
    # An adapter is checked against the base's fingerprint as saved, so load it before the cast.
    if adapter is None:
        tuned = None
    elif (Path(adapter) / "config.json").exists():  # a saved Transformer: fine-tuned
        tuned = Transformer.load(adapter, args.device)
        if tuned.cfg != base.cfg:
            raise ValueError(f"{adapter} has another shape than the base model {args.base}")
        description = tuning_phrase(fine_tuned=True)
    else:
        tuned = load_adapter(adapter, base)
        description = tuning_phrase(adapter=tuned.method)
    if args.dtype:
        base = base.to(getattr(torch, args.dtype))
    task = get_task(args.task)
    check_fits(base, task)
    tokens = test_set(task, args.n, args.seed).tokens[:, :-1].to(args.device)
    if tuned is None:
        _, cache = base.run_with_cache(tokens)
        tuned, description = random_stand_in(cache, base.cfg.n_layers, args.prefix_len, args.seed)
    return base, tuned, description, tokens, task


def cmd_check_theorem(args) -> int:
    """Check the attention-bias theorem on a base model with an adapter or a fine-tuned copy."""
    from probe import hf
    from probe.check import check_tuned

    if args.n is None:  # fewer by default on an HF model: see probe.hf.CHECK_INPUTS
        args.n = hf.CHECK_INPUTS if hf.is_hf_model_dir(args.base) else 256
    if hf.is_hf_model_dir(args.base):  # a Hugging Face model: probe.hf (needs the hf extra)
        tokens, inputs = hf_check_tokens(args)
        run = hf.check_theorem_dirs(
            args.base,
            args.adapter,
            tokens,
            prefix_len=args.prefix_len,
            seed=args.seed,
            dtype=getattr(torch, args.dtype) if args.dtype else None,
            device=args.device,
            tol_factor=args.tol_factor,
        )
        header = f"{args.base} with {run.what}: {inputs}, {run.records[0].q.dtype}"
        header += f"\n{run.positions}"
        return print_theorem_check(header, run.result)

    base, tuned, description, tokens, task = check_inputs(args, args.adapter)
    result = check_tuned(base, tuned, tokens, args.tol_factor)
    header = f"{args.base} with {description}: {args.n} {task.name} inputs, {base.W_E.dtype}"
    return print_theorem_check(header, result)


def print_theorem_check(header: str, result) -> int:
    """Print check-theorem's table; 1 if an expected identity failed, else 0. The per-head
    column and the exit status both follow ``TheoremCheck.failures`` (a NaN error fails)."""
    print(header)
    print(
        "layer head   P  alpha  pattern_err (tol)    z_err (tol)        check  "
        "local_tv_max  downstream_tv  rank/P (change)"
    )
    for row in result.rows():
        check = "-"
        if row["identity_expected"]:
            check = "FAIL" if result.failures(row["layer"], row["head"]) else "ok"
        print(
            f"{row['layer']:5d} {row['head']:4d} {row['P']:3d} {row['alpha_mean']:6.3f}  "
            f"{row['pattern_error']:.1e} ({row['pattern_tol']:.0e})  "
            f"{row['z_error']:.1e} ({row['z_tol']:.0e})  "
            f"{check:5s}  {row['local_tv_max']:12.2e}  {row['downstream_tv_mean']:13.2e}  "
            f"{row['bias_rank']:3d}/{row['P']} ({row['change_rank']})"
        )
    failures = result.failures()
    for line in failures:
        print(f"identity failed: {line}")
    changed = [
        d.layer
        for d, ok in zip(result.decompositions, result.expected, strict=True)
        if d.P and not ok
    ]
    if changed:
        print(f"layers {changed}: a prefix, but ln1/W_Q/W_K/W_V changed too: no identity applies")
    if not any(d.P for d in result.decompositions) and not result.gated:
        print("no prefix, so no identity applies: drift and rank only")
    for g in result.gated or []:
        if g is not None:
            print(
                f"layer {g.layer}: gated bias, gate {g.gate:.3g}, error {g.error:.1e} "
                f"({g.tol:.0e})  {'ok' if g.ok else 'FAIL'}  rank {int(g.rank.max())}/{g.P_a}"
            )
    print(result.classify().line())
    return 1 if failures else 0


def build_parser(*registrars: Callable[[argparse._SubParsersAction], None]):
    """The ``probe`` parser with the subcommands each registrar adds (default: this layer's)."""
    parser = Parser(prog="probe", description="prefix-probe's command line")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error (or set PROBE_DEBUG=1)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for register in registrars or (add_commands, add_check_theorem):
        register(sub)
    for p in sub.choices.values():  # `probe CMD --debug` too; SUPPRESS keeps `probe --debug CMD`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="traceback")
    return parser


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the probe layer's training subcommands: tasks, pretrain, tune, evaluate."""
    from probe.adapters import METHODS

    p = sub.add_parser(
        "tasks", help="list the tasks: name, vocabulary, where each came from, description"
    )
    p.add_argument(
        "--load",
        action="append",
        default=[],
        metavar="MODULE",
        help="also import this module or .py file (its tasks.register calls add tasks); repeat",
    )
    p.set_defaults(run=cmd_tasks)

    p = sub.add_parser("pretrain", help="train a base model on a task")
    p.add_argument("--task", required=True, help=TASK_HELP)
    p.add_argument("--preset", default="01", choices=sorted(PRESETS), help="model preset")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a ModelConfig field of the preset, e.g. --set n_layers=2 --set "
        "d_model=128 (d_mlp follows d_model unless set); repeat; applied after --config",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="ModelConfig fields from a JSON or .toml file (or a saved model's config.json) "
        "over the preset",
    )
    p.add_argument("--out", required=True, help="directory to save the model to")
    add_train_args(p, steps=1500, lr=PRETRAIN_LR, batch_size=128)
    p.set_defaults(run=cmd_pretrain)

    p = sub.add_parser("tune", help="tune an adapter on a frozen base model")
    p.add_argument("--base", required=True, help="a model directory from `probe pretrain`")
    p.add_argument("--task", required=True, help=TASK_HELP)
    p.add_argument("--method", required=True, choices=sorted(METHODS))
    p.add_argument("--length", type=int, help="prefix / prompt length P (default 1)")
    p.add_argument("--rank", type=int, help="LoRA rank (default 1)")
    p.add_argument("--targets", help="LoRA matrices, comma-separated (default W_Q,W_V)")
    p.add_argument("--init", choices=["random", "vocab"], help="soft prompt initialisation")
    p.add_argument("--out", required=True, help="directory to save the adapter to")
    add_train_args(p, steps=600, lr=None, batch_size=64)
    p.set_defaults(run=cmd_tune)

    p = sub.add_parser("evaluate", help="accuracy table: adapters x tasks")
    p.add_argument("--base", required=True, help="a model directory from `probe pretrain`")
    p.add_argument("--adapter", action="append", default=[], help="adapter directory (repeat)")
    p.add_argument("--task", nargs="+", required=True, help=TASK_HELP + "; several")
    p.add_argument("--n", type=positive_int, default=3200, help="held-out samples (default 3200)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=cmd_evaluate)


def add_input_args(p: argparse.ArgumentParser, n_help: str) -> None:
    """The model and input options that check-theorem and view share (read by
    :func:`check_inputs` and :func:`hf_check_tokens`); ``--adapter`` is each command's own."""
    p.add_argument(
        "--base",
        required=True,
        help="a model directory from `probe pretrain`, or a Hugging Face model directory "
        "(GPT-2, Llama, Qwen2, Mistral, GPT-NeoX; needs the hf extra)",
    )
    p.add_argument(
        "--task", default="sort_asc", help="inputs from this task's held-out set: " + TASK_HELP
    )
    p.add_argument(
        "--text",
        action="append",
        help="with an HF --base: probe this text, tokenized by the directory's tokenizer (repeat)",
    )
    p.add_argument("--text-file", help="with an HF --base: probe each non-empty line of this file")
    p.add_argument("--n", type=positive_int, help=n_help)
    p.add_argument("--prefix-len", type=int, default=4, help="random prefix P, no --adapter")
    p.add_argument("--seed", type=int, default=0, help="inputs and random prefix seed")
    p.add_argument("--dtype", choices=["float32", "float64"], help="default: the saved dtype")
    p.add_argument("--device", default="cpu")


def add_check_theorem(sub: argparse._SubParsersAction) -> None:
    """Register ``check-theorem``, apart from :func:`add_commands`, whose registration imports
    the adapters (for ``--method``'s choices)."""
    p = sub.add_parser(
        "check-theorem",
        help="verify the attention-bias identities; report local/downstream drift and bias rank",
    )
    add_input_args(p, "inputs (default 256; 128 with a Hugging Face --base)")
    p.add_argument(
        "--adapter",
        help="an adapter directory (ours, or a PEFT one with an HF --base), or a fine-tuned "
        "model directory (drift only); default: a random key/value prefix",
    )
    p.add_argument(
        "--tol-factor",
        type=float,
        default=16.0,
        help="tolerance = factor x eps(dtype) x magnitudes (probe.probes.tolerances)",
    )
    p.set_defaults(run=cmd_check_theorem)


# Failures a user can cause and fix: one line, exit 2. Anything else is a bug in probe.
EXPECTED = (ValueError, KeyError, OSError, MissingExtraError)


def expected_errors() -> tuple[type[Exception], ...]:
    """:data:`EXPECTED`, and TrainingDiverged once training is loaded (only it raises that)."""
    train = sys.modules.get("probe.train")
    return EXPECTED + ((train.TrainingDiverged,) if train else ())


def interrupted(e: KeyboardInterrupt, argv: list[str] | None) -> str:
    """The one line for Ctrl-C: what the interrupted work says of itself (a sweep: how many
    runs finished) and, where it resumes (``analysis.runs.Interrupted``), the command that does."""
    line = "interrupted" + (f": {e}" if str(e) else "")
    if hasattr(e, "finished"):
        line += f"; resume with: {shlex.join(['probe', *(sys.argv[1:] if argv is None else argv)])}"
    return line


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Run a command; ``parser`` defaults to this layer's (prefix_probe.cli passes all).
    Expected failures print one line (the problem and the fix) and return 2; unexpected ones
    print one line saying how to report them and return 3. With ``--debug`` or
    ``PROBE_DEBUG=1`` the traceback is shown instead."""
    args = (parser or build_parser()).parse_args(argv)
    debug = args.debug or os.environ.get("PROBE_DEBUG", "") not in ("", "0")
    if args.command in ("pretrain", "tune") and args.threads:
        if args.threads < 0:
            print(f"probe {args.command}: error: --threads must be >= 0", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        if getattr(args, "device", None):
            check_device(args.device)
        return args.run(args)
    except KeyboardInterrupt as e:
        if debug:
            raise
        print(f"probe {args.command}: {interrupted(e, argv)}", file=sys.stderr)
        return 130
    except expected_errors() as e:
        if debug:
            raise
        print(f"probe {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if debug:
            raise
        print(
            f"probe {args.command}: internal error: {type(e).__name__}: {e}. This is a bug in "
            "probe: rerun with --debug (or PROBE_DEBUG=1) and report the command and the "
            "traceback to the prefix-probe issue tracker",
            file=sys.stderr,
        )
        return 3


if __name__ == "__main__":
    sys.exit(main())
