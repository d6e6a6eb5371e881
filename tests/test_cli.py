"""The command line's wiring: one parser with every layer's subcommands, and imports that only
point down the layers (tasks -> probe -> analysis -> prefix_probe), with no cycle."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from prefix_probe.cli import build_parser, main

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["tasks", "probe", "analysis", "prefix_probe"]  # each may import only those before it


def imported_packages(path: Path) -> set[str]:
    """Top-level packages and probe.* modules a file imports (also inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_point_down_the_layers(layer):
    above = LAYERS[LAYERS.index(layer) + 1 :]
    for path in (ROOT / layer).rglob("*.py"):
        climbs = {n for n in imported_packages(path) if n.split(".")[0] in above}
        assert not climbs, f"{path.relative_to(ROOT)} imports {sorted(climbs)} from above"


def test_probe_cli_imports_no_command_module_of_its_own_layer():
    """probe.bench imports probe.cli (for the CLI's defaults): the reverse would be a cycle."""
    names = imported_packages(ROOT / "probe" / "cli.py")
    assert not {n for n in names if n.startswith("probe.bench") or n == "probe.bench"}
    assert "probe.cli" in imported_packages(ROOT / "probe" / "bench.py")


def test_one_parser_has_every_layers_commands():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    expected = {"tasks", "pretrain", "tune", "evaluate", "check-theorem", "bench", "reproduce"}
    assert expected <= set(sub.choices)


def test_console_module_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "prefix_probe", "tasks"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0 and "sort_asc" in out.stdout, out.stderr


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2
