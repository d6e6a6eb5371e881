"""The ``probe`` command line: one parser with every layer's subcommands.

Each layer registers its own subcommands with an ``add_command(s)(subparsers)`` function next to
the code they run; this module, at the top of the layers, is the one place that imports them all:

    tasks, pretrain, tune, evaluate, check-theorem   probe.cli.add_commands
    bench                                            probe.bench.add_command
    reproduce                                        analysis.reproduce.add_command
    recipes                                          analysis.recipes.add_command
    results                                          analysis.results.add_command

Parsing, the thread setting and the one-line error handling are ``probe.cli.main``'s.
"""

from __future__ import annotations

import argparse
import sys

from analysis import recipes, reproduce, results
from probe import bench
from probe import cli as probe_cli

REGISTRARS = (
    probe_cli.add_commands,
    bench.add_command,
    reproduce.add_command,
    recipes.add_command,
    results.add_command,
)


def build_parser() -> argparse.ArgumentParser:
    return probe_cli.build_parser(*REGISTRARS)


def main(argv: list[str] | None = None) -> int:
    return probe_cli.main(argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())
