"""The ``probe`` command line: one parser with every layer's subcommands.

Each layer registers its own subcommands with an ``add_command(s)(subparsers)`` function next to
the code they run; this module, at the top of the layers, is the one place that knows them all
(:data:`COMMANDS`).

Registration is lazy, for start-up time: importing every registrar imports the analysis layer
(the experiments, matplotlib: 153 modules, 0.4-0.5 s) that ``probe check-theorem`` and the probe
layer's other commands never use. So when the command line names a command, only the module that
registers it is imported; with no command, ``-h``/``--help`` before it, or a command not in the
table, every registrar is, so that top-level help and the "invalid choice" error list them all.

Parsing, the thread setting and the one-line error handling are ``probe.cli.main``'s.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from probe import cli as probe_cli

# Each command -> "module:function" that registers it (one function may register several).
COMMANDS = {
    "tasks": "probe.cli:add_commands",
    "pretrain": "probe.cli:add_commands",
    "tune": "probe.cli:add_commands",
    "evaluate": "probe.cli:add_commands",
    "check-theorem": "probe.cli:add_check_theorem",
    "view": "probe.view:add_command",
    "bench": "probe.bench:add_command",
    "capacity": "probe.capacity:add_command",
    "reproduce": "analysis.reproduce:add_command",
    "recipes": "analysis.recipes:add_command",
    "results": "analysis.results:add_command",
}


def registrars(argv: Sequence[str] | None = None) -> list[Callable]:
    """The registrars the command line ``argv`` needs: the named command's only, when it is the
    first argument (after any ``--debug``) and in :data:`COMMANDS`; otherwise all of them, in
    order (``argv=None`` too)."""
    argv = list(argv or [])
    while argv and argv[0] == "--debug":
        argv.pop(0)
    if argv and argv[0] in COMMANDS:
        targets = [COMMANDS[argv[0]]]
    else:
        targets = list(dict.fromkeys(COMMANDS.values()))
    found = []
    for target in targets:
        module, _, function = target.partition(":")
        found.append(getattr(importlib.import_module(module), function))
    return found


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for the command line ``argv`` (see :func:`registrars`); with no ``argv``,
    the full parser, every command on it."""
    return probe_cli.build_parser(*registrars(argv))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return probe_cli.main(argv, build_parser(argv))


if __name__ == "__main__":
    sys.exit(main())
