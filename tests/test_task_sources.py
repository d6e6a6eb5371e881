"""Tasks of one's own: MODULE:NAME and path/file.py:NAME references, the prefix_probe.tasks
entry-point group, where each task came from, and one-line errors for bad references."""

import sys
import textwrap

import pytest
import torch

import tasks
import tasks.registry
import tasks.sources
from prefix_probe.cli import main
from tasks import TaskReferenceError, get_task, task_source

USER_TASKS = """
    import torch
    from tasks import Task, register

    def rotate(x):
        return x.roll(1, dims=1)

    register(Task("user_rotate", rotate, vocab_size=8, description="shift right"))
    FLIP = Task("user_flip", lambda x: x.flip(1), vocab_size=8, description="reverse")
    NOT_A_TASK = 3
"""


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch):
    """Each test starts from the built-ins and leaves no user task or module behind."""
    monkeypatch.setattr(tasks.registry, "_REGISTRY", dict(tasks.registry._REGISTRY))
    monkeypatch.setattr(tasks.registry, "_SOURCES", dict(tasks.registry._SOURCES))
    monkeypatch.setattr(tasks.sources, "_entry_points_loaded", False)
    monkeypatch.setenv(tasks.sources.ENV, "")
    modules = set(sys.modules)
    yield
    for name in set(sys.modules) - modules:
        if "user_tasks" in name or "myplug" in name:
            del sys.modules[name]


def write(path, text=USER_TASKS):
    path.write_text(textwrap.dedent(text))
    return path


def test_a_file_reference_loads_registered_and_attribute_tasks(tmp_path):
    file = write(tmp_path / "user_tasks.py")
    task = get_task(f"{file}:user_rotate")
    x = torch.arange(10).remainder(8)[None]
    assert task.name == "user_rotate" and task.targets(x).tolist() == [x.roll(1, 1).tolist()[0]]
    flip = get_task(f"{file}:FLIP")  # an attribute: registered under its own name
    assert flip.name == "user_flip" and get_task("user_flip") is flip
    assert get_task(f"{file}:user_rotate") is task  # the file is imported once
    assert task_source("user_rotate") == task_source("user_flip") == f"file {file}"
    assert task_source("sort_asc") == "built-in"


def test_a_module_reference_and_the_calling_module_as_source(tmp_path, monkeypatch):
    write(tmp_path / "user_tasks_mod.py")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert get_task("user_tasks_mod:user_rotate").name == "user_rotate"
    assert task_source("user_rotate") == "module user_tasks_mod"
    tasks.register(tasks.Task("user_here", lambda x: x, vocab_size=8))
    assert task_source("user_here") == f"module {__name__}"


@pytest.mark.parametrize(
    "ref, message",
    [
        ("no_such_module_xyz:t", "no module named 'no_such_module_xyz' on the Python path"),
        ("{dir}/missing.py:t", "no file"),
        ("{file}:nothing", "has no Task named 'nothing'"),
        ("{file}:NOT_A_TASK", "is a int, not a tasks.Task"),
        ("{broken}:t", "importing"),
        (":t", "write MODULE:NAME"),
        ("{file}:", "write MODULE:NAME"),
    ],
)
def test_bad_references_fail_in_one_line_naming_the_fix(tmp_path, ref, message):
    file = write(tmp_path / "user_tasks.py")
    broken = write(tmp_path / "user_tasks_broken.py", "raise ValueError('boom\\nsecond line')\n")
    ref = ref.format(dir=tmp_path, file=file, broken=broken)
    with pytest.raises(TaskReferenceError) as e:
        get_task(ref)
    text = str(e.value)
    assert message in text and "\n" not in text and repr(ref) in text
    if "broken" in ref:
        assert "ValueError: boom" in text and "second line" not in text


def test_cli_trains_on_a_file_task_and_lists_its_source(tmp_path, capsys):
    file = write(tmp_path / "user_tasks.py")
    argv = ["pretrain", "--task", f"{file}:user_rotate", "--preset", "tiny", "--steps", "2"]
    assert main([*argv, "--no-progress", "--threads", "1", "--out", str(tmp_path / "m")]) == 0
    assert "on user_rotate" in capsys.readouterr().out and (tmp_path / "m/config.json").exists()
    assert main(["tasks", "--load", str(file)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert f"file {file}" in lines["user_rotate"] and "built-in" in lines["sort_asc"]


def test_cli_bad_reference_is_one_line_and_exit_2(tmp_path, capsys):
    argv = ["pretrain", "--task", "no_such_module_xyz:t", "--out", str(tmp_path / "m")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "PYTHONPATH" in err and not (tmp_path / "m").exists()


def _plugin(tmp_path, value):
    dist = tmp_path / "myplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[prefix_probe.tasks]\nrot = {value}\n")
    write(tmp_path / "myplug_tasks.py", USER_TASKS.replace("user_", "plug_"))


def test_entry_point_tasks_load_on_a_miss_and_in_the_listing(tmp_path, monkeypatch):
    _plugin(tmp_path, "myplug_tasks:FLIP")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "plug_flip" not in tasks.registry._REGISTRY
    assert get_task("plug_flip").name == "plug_flip"
    assert task_source("plug_flip") == "entry point rot (myplug)"
    assert "plug_flip" in [t.name for t in tasks.list_tasks()]


def test_a_module_entry_point_registers_what_its_import_registers(tmp_path, monkeypatch):
    _plugin(tmp_path, "myplug_tasks")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert [t.name for t in tasks.list_tasks() if t.name.startswith("plug_")] == ["plug_rotate"]
    assert task_source("plug_rotate") == "entry point rot (myplug)"


def test_a_broken_entry_point_is_one_line_naming_the_package(tmp_path, monkeypatch):
    _plugin(tmp_path, "myplug_missing_module")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TaskReferenceError, match=r"fix or uninstall myplug$"):
        get_task("plug_nothing")
