"""The command line's wiring: one parser with every layer's subcommands, and imports that only
point down the layers (tasks -> probe -> analysis -> prefix_probe), with no cycle."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from prefix_probe.cli import COMMANDS, build_parser, main
from probe.cli import model_config
from probe.model import Transformer

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
    expected = {
        "tasks",
        "pretrain",
        "tune",
        "evaluate",
        "check-theorem",
        "view",
        "bench",
        "reproduce",
    }
    assert expected <= set(sub.choices)


def test_every_command_is_in_the_lazy_table_and_registers_alone():
    """prefix_probe.cli.COMMANDS names each command's registrar: a command missing there would
    still work (all registrars load) but lose the lazy start-up."""
    full = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert list(COMMANDS) == list(full)
    for name in COMMANDS:
        sub = next(a for a in build_parser([name])._actions if a.dest == "command")
        assert name in sub.choices


def run_fresh(code: str) -> None:
    """Run ``code`` in a fresh interpreter (nothing imported yet) from the repository root."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr


def test_probe_layer_commands_do_not_import_the_analysis_layer():
    """check-theorem's start-up (its time budget) does not pay for analysis and matplotlib."""
    code = (
        "import sys\n"
        "from prefix_probe.cli import build_parser\n"
        "args = build_parser(['--debug', 'check-theorem', '--base', 'x']).parse_args("
        "['--debug', 'check-theorem', '--base', 'x'])\n"
        "assert args.command == 'check-theorem'\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('analysis', 'matplotlib'))\n"
        "assert not heavy, heavy\n"
    )
    run_fresh(code)


def test_the_probe_package_loads_the_model_on_first_use():
    """`import probe` is light (an HF check never needs our model or transformer-lens); its model
    and training names still resolve, and tab completion lists them."""
    code = (
        "import sys, probe\n"
        "assert 'probe.model' not in sys.modules and 'transformer_lens' not in sys.modules\n"
        "assert {'Transformer', 'tune', 'KVPrefix'} <= set(dir(probe))\n"
        "from probe import Transformer, tune\n"
        "import probe.model, probe.train\n"
        "assert Transformer is probe.model.Transformer and tune is probe.train.tune\n"
        "assert probe.KVPrefix is probe.model.KVPrefix\n"
    )
    run_fresh(code)


def test_console_module_runs(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "prefix_probe", "tasks"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0 and "sort_asc" in out.stdout, out.stderr


def test_unknown_command_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2


# ---------------------------------------------------------------------------- model shapes


def test_set_builds_the_quick_profiles_03_variant():
    from analysis.experiments import paper03
    from analysis.report import PROFILES
    from probe.model import preset

    quick = preset("03", **dict(paper03.model_overrides(PROFILES["quick"])))
    assert model_config("03", sets=["n_layers=2", "d_model=128", "dropout=0"]) == quick
    assert quick.d_mlp == 512  # d_mlp followed d_model, as a fresh ModelConfig's does
    assert model_config("03", sets=["d_model=128", "d_mlp=64"]).d_mlp == 64
    cfg = model_config("01", sets=["attn_ln=false", "dropout=0", "d_mlp=null"])
    assert (cfg.attn_ln, cfg.dropout, cfg.d_mlp) == (False, 0, 4 * 96)


def test_config_files_json_toml_and_a_saved_model(tmp_path):
    (tmp_path / "shape.json").write_text('{"n_layers": 3, "d_model": 64}')
    (tmp_path / "shape.toml").write_text("n_layers = 3\nd_model = 64\nattn_ln = false\n")
    js = model_config("tiny", tmp_path / "shape.json")
    assert (js.n_layers, js.d_model, js.d_mlp, js.n_heads) == (3, 64, 256, 2)
    assert model_config("tiny", tmp_path / "shape.toml") == model_config(
        "tiny", tmp_path / "shape.json", ["attn_ln=false"]
    )
    assert model_config("tiny", tmp_path / "shape.json", ["n_layers=1"]).n_layers == 1  # --set wins
    Transformer(js).save(tmp_path / "saved")
    assert model_config("01", tmp_path / "saved" / "config.json") == js


@pytest.mark.parametrize(
    "sets, message",
    [
        (["n_layer=2"], r"unknown fields \['n_layer'\]"),
        (["n_heads=3"], "not divisible by n_heads=3"),
        (["n_layers=two"], "n_layers must be a positive int, got 'two'"),
        (["n_layers"], "write FIELD=VALUE"),
        (["dropout=1.5"], r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_shapes_raise_the_configs_own_errors(sets, message):
    with pytest.raises(ValueError, match=message):
        model_config("tiny", sets=sets)


def test_bad_config_file_is_one_line(tmp_path):
    (tmp_path / "bad.json").write_text("{n_layers: 2")
    with pytest.raises(ValueError, match="bad.json: not valid json .*; fix the file"):
        model_config("tiny", tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ValueError, match="expected a table of ModelConfig fields"):
        model_config("tiny", tmp_path / "list.json")


def test_pretrain_cli_builds_the_shape_it_is_given(tmp_path, capsys):
    out = tmp_path / "m"
    argv = ["pretrain", "--task", "copy", "--preset", "tiny", "--steps", "1", "--no-progress"]
    assert main([*argv, "--threads", "1", "--set", "n_layers=1", "--out", str(out)]) == 0
    assert Transformer.load(out).cfg == model_config("tiny", sets=["n_layers=1"])
    assert "preset tiny (n_layers=1)" in capsys.readouterr().out
    assert main([*argv, "--set", "d_model=33", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "d_model=33 is not divisible by n_heads=2" in err
    assert not (tmp_path / "bad").exists()
