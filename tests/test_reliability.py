"""Issue 12: output paths are never destroyed, nothing non-finite is saved or loaded, adapters
are checksummed, crashed saves are cleaned up safely, and every expected CLI failure is one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from prefix_probe.cli import main
from probe import cli, io, train
from probe.adapters import load_adapter, make_adapter
from probe.cli import row_names
from probe.model import Transformer, preset

ROOT = Path(__file__).resolve().parents[1]


def tiny(seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset("tiny"))


def pretrain_argv(out, *extra) -> list[str]:
    return ["pretrain", "--task", "copy", "--preset", "tiny", "--out", str(out), "--steps", "2",
            "--no-progress", *extra]  # fmt: skip


def tune_argv(base, out, *extra) -> list[str]:
    return ["tune", "--base", str(base), "--task", "reverse", "--method", "prefix", "--out",
            str(out), "--steps", "2", "--no-progress", *extra]  # fmt: skip


def one_line_error(capsys, *needles) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture
def no_training(monkeypatch):
    """Make any training fail loudly: a refused --out must be refused before training."""

    def boom(*args, **kwargs):
        raise AssertionError("trained although the output path is refused")

    monkeypatch.setattr(train, "pretrain", boom)  # the commands import them when they run
    monkeypatch.setattr(train, "tune", boom)


# ---------------------------------------------------------------------------- 1. --out


def test_out_never_replaces_user_files_and_is_checked_before_training(
    tmp_path, capsys, no_training
):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("precious")
    assert main(pretrain_argv(user, "--overwrite")) == 2
    one_line_error(capsys, "not a prefix-probe model or adapter", "choose a new or empty")
    assert (user / "notes.txt").read_text() == "precious"

    afile = tmp_path / "file.txt"
    afile.write_text("precious")
    assert main(pretrain_argv(afile, "--overwrite")) == 2
    one_line_error(capsys, "is not a directory")
    assert afile.read_text() == "precious"

    # Impossible or unwritable paths are refused up front, not after training.
    assert main(pretrain_argv(afile / "sub")) == 2
    one_line_error(capsys, "is not a directory")
    assert main(pretrain_argv("/proc/prefix-probe-test/m")) == 2
    one_line_error(capsys, "cannot write to /proc")


def test_overwrite_replaces_only_our_own_saves_and_never_the_base(tmp_path, capsys):
    model = tmp_path / "m"
    assert main(pretrain_argv(model)) == 0
    first = Transformer.load(model).fingerprint()
    assert main(pretrain_argv(model, "--seed", "1")) == 2
    one_line_error(capsys, "already holds a saved model", "--overwrite")
    assert Transformer.load(model).fingerprint() == first
    assert main(pretrain_argv(model, "--seed", "1", "--overwrite")) == 0
    second = Transformer.load(model).fingerprint()
    assert second != first and [p.name for p in tmp_path.iterdir()] == ["m"]

    capsys.readouterr()
    for out in (model, model / "adapter"):
        assert main(tune_argv(model, out, "--overwrite")) == 2
        one_line_error(capsys, "base model", "destroy")
    assert Transformer.load(model).fingerprint() == second
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]

    # The library refuses too: a save never replaces without overwrite=True.
    with pytest.raises(io.TargetError, match="--overwrite"):
        tiny().save(model)
    with pytest.raises(io.TargetError, match="not a prefix-probe"):
        (model / "extra").write_text("x")
        tiny().save(model, overwrite=True)


# ---------------------------------------------------------------------------- 2. non-finite


def test_a_blow_up_in_the_last_step_is_not_saved(tmp_path, capsys):
    out = tmp_path / "m"
    assert main(pretrain_argv(out, "--steps", "1", "--lr", "1e41")) == 2
    one_line_error(capsys, "NaN or Inf after step 1", "lower the learning rate")
    assert not out.exists() and not list(tmp_path.iterdir())


def test_non_finite_weights_are_never_saved_nor_loaded(tmp_path, capsys):
    model = tiny()
    with torch.no_grad():
        model.W_U[0, 0] = float("inf")
    with pytest.raises(io.NonFiniteError, match="W_U"):
        model.save(tmp_path / "m")
    assert not list(tmp_path.iterdir())

    # A NaN file with a matching fingerprint (written behind our back) is refused on load.
    path = tiny().save(tmp_path / "m")
    state = io.load_tensors(path / "model.safetensors")
    state["W_E"][1, 2] = float("nan")
    save_file(state, path / "model.safetensors")
    meta = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**meta, "fingerprint": io.fingerprint(state)}))
    with pytest.raises(io.CorruptFileError, match="W_E hold NaN or Inf"):
        Transformer.load(path)
    assert main(["evaluate", "--base", str(path), "--task", "copy", "--n", "8"]) == 2
    one_line_error(capsys, "NaN or Inf")


# ---------------------------------------------------------------------------- 3. check-theorem


def test_check_theorem_in_float64_accepts_the_adapter_of_a_float32_base(tmp_path, capsys):
    base = tiny()
    base_dir = base.save(tmp_path / "base")
    adapter = make_adapter("prefix", base, length=2).save(tmp_path / "a", base)
    argv = ["check-theorem", "--base", str(base_dir), "--adapter", str(adapter), "--n", "8"]
    assert main([*argv, "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert "prefix adapter" in out and "torch.float64" in out and " ok " in out


# ---------------------------------------------------------------------------- 6. evaluate rows


def test_row_names_are_unique_and_short():
    assert row_names(["runs/a/adapter", "runs/b/adapter", "x/other"]) == [
        "a/adapter",
        "b/adapter",
        "other",
    ]
    assert row_names(["p/q", "p/q"]) == ["q", "q#2"]


def test_evaluate_gives_each_adapter_its_own_row(tmp_path, capsys):
    base = tiny()
    base_dir = base.save(tmp_path / "base")
    paths = []
    for i, name in enumerate(("k1", "k2")):
        torch.manual_seed(i)
        paths.append(make_adapter("prompt", base).save(tmp_path / name / "adapter", base))
    argv = ["evaluate", "--base", str(base_dir), "--task", "copy", "--n", "8"]
    assert main([*argv, "--adapter", str(paths[0]), "--adapter", str(paths[1])]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == ["(base)", "k1/adapter", "k2/adapter"]


# ---------------------------------------------------------------------------- 7. one-line errors


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_cuda_on_a_cpu_torch_is_one_line(tmp_path, capsys, no_training):
    assert main(pretrain_argv(tmp_path / "m", "--device", "cuda")) == 2
    one_line_error(capsys, "--device cuda", "--device cpu")


def test_bad_numbers_are_one_line(tmp_path, capsys, no_training):
    base = tiny().save(tmp_path / "base")
    # --lr 0 was a TypeError traceback on pretrain and silently the default on tune.
    for argv in (pretrain_argv(tmp_path / "m", "--lr", "0"), tune_argv(base, tmp_path / "a",
                 "--lr", "0"), pretrain_argv(tmp_path / "m", "--steps", "0")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        one_line_error(capsys, "error: argument --", "positive")
    assert main(["reproduce", "--jobs", "0", "--runs-dir", str(tmp_path / "r")]) == 2
    one_line_error(capsys, "jobs must be >= 1")
    assert not (tmp_path / "r").exists()


def test_broken_config_json_is_one_line(tmp_path, capsys):
    path = tiny().save(tmp_path / "m")
    meta = json.loads((path / "config.json").read_text())
    cases = [
        ({k: v for k, v in meta.items() if k != "fingerprint"}, "lacks the key 'fingerprint'"),
        ({**meta, "fingerprint": 7}, "'fingerprint' is a int, expected a str"),
        ({**meta, "config": [1]}, "'config' is a list"),
        ({**meta, "config": {**meta["config"], "dropout": "x"}}, "bad model config"),
    ]
    for broken, message in cases:
        (path / "config.json").write_text(json.dumps(broken))
        assert main(["evaluate", "--base", str(path), "--task", "copy", "--n", "8"]) == 2
        one_line_error(capsys, message)


def test_unexpected_errors_say_how_to_report_and_debug_shows_the_traceback(monkeypatch, capsys):
    def bug(args):
        raise ZeroDivisionError("oops")

    monkeypatch.setattr(cli, "cmd_tasks", bug)
    assert main(["tasks"]) == 3
    one_line_error(capsys, "internal error: ZeroDivisionError: oops", "--debug", "report")
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "tasks"])
    with pytest.raises(ZeroDivisionError):
        main(["tasks", "--debug"])
    monkeypatch.setenv("PROBE_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        main(["tasks"])


# ---------------------------------------------------------------------------- 8. checksums


def test_adapter_with_flipped_bytes_or_nan_is_refused(tmp_path):
    base = tiny()
    path = make_adapter("lora", base).save(tmp_path / "a", base)
    data = bytearray((path / "adapter.safetensors").read_bytes())
    good = bytes(data)
    data[-3] ^= 0x01  # the low bits of the last float: still finite, just wrong
    (path / "adapter.safetensors").write_bytes(bytes(data))
    assert not io.non_finite(io.load_tensors(path / "adapter.safetensors"))
    with pytest.raises(io.CorruptFileError, match="checksum"):
        load_adapter(path, base)

    (path / "adapter.safetensors").write_bytes(good)
    state = io.load_tensors(path / "adapter.safetensors")
    next(iter(state.values())).view(-1)[0] = float("nan")
    save_file(state, path / "adapter.safetensors")
    with pytest.raises(io.CorruptFileError, match="NaN or Inf"):
        load_adapter(path, base)


# ---------------------------------------------------------------------------- 9. crashed saves


def killed_save(path: Path, at: str) -> None:
    """Save a model to ``path`` in a subprocess that SIGKILLs itself at ``at``: "write" (the
    first safetensors file) or "swap" (between the two renames of an overwrite)."""
    code = f"""
import os, signal, torch
from probe import io
from probe.model import Transformer, preset
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if {at!r} == "write":
    io.save_file = die
else:
    io.os.rename = die
torch.manual_seed(5)
Transformer(preset("tiny")).save({str(path)!r}, overwrite=True)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ,
                          "PYTHONPATH": str(ROOT)}, capture_output=True)  # fmt: skip
    assert proc.returncode == -9, proc.stderr.decode()


def test_a_killed_save_leaves_temporaries_that_the_next_save_cleans(tmp_path):
    path = tmp_path / "m"
    killed_save(path, "write")
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".m.tmp-{io.HOST}-")
    # Another live process's save in progress, and one on another host, are not touched.
    live = tmp_path / f".m.tmp-{io.HOST}-1-abcdefgh"  # pid 1 is alive
    remote = tmp_path / ".m.tmp-otherhost-12345-abcdefgh"
    live.mkdir(), remote.mkdir()
    tiny().save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m", live.name, remote.name])


def test_a_save_killed_mid_overwrite_restores_the_previous_version(tmp_path):
    path = tiny(seed=3).save(tmp_path / "m")
    before = Transformer.load(path).fingerprint()
    killed_save(path, "swap")
    assert not path.exists()  # killed between the two renames
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()].count(".m.old") == 1
    with pytest.raises(io.TargetError, match="--overwrite"):
        tiny().save(path)  # the previous version is back, so this is an overwrite
    assert Transformer.load(path).fingerprint() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
