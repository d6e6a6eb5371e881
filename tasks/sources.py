"""Tasks from outside the package: ``MODULE:NAME`` references and an entry-point group.

A task reference names a task a user defined in their own code, so that the command line (and a
:class:`analysis.runs.Run`, in any worker process) can reach it without editing this package:

    mytasks:rotate1               a module on the Python path (``sys.path``, ``PYTHONPATH``)
    path/to/mytasks.py:rotate1    a Python file

Importing the module may register tasks (``tasks.register``); ``NAME`` is then a registered task
name, or the module's attribute holding a :class:`~tasks.Task` / :class:`~tasks.Mixture` (which
is registered under its own ``name``).

Installed packages declare tasks in the entry-point group ``prefix_probe.tasks``; each entry
point loads a module (whose import registers tasks), a Task / Mixture, or a list of them:

    [project.entry-points."prefix_probe.tasks"]
    mytasks = "mytasks"                 # importing the module registers its tasks
    rotate1 = "mytasks:ROTATE1"         # one Task object

They are loaded the first time a name is not found, or the tasks are listed, and so are the modules
or files listed in the environment variable ``PREFIX_PROBE_TASK_MODULES`` (separated by
``os.pathsep``); ``probe reproduce --experiments-module`` sets it, so that worker processes find
the tasks an experiment module registers. Every failure is one line (a
:class:`TaskReferenceError`) that names the reference and what to do.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

from tasks import registry
from tasks.base import Mixture, Task
from tasks.errors import first_line

GROUP = "prefix_probe.tasks"
ENV = "PREFIX_PROBE_TASK_MODULES"
HINT = "write MODULE:NAME (a module on the Python path) or path/to/file.py:NAME"
_entry_points_loaded = False


class TaskReferenceError(registry.UnknownTaskError):
    """A task reference or task entry point that cannot be loaded (one line: what, and the fix)."""


def is_file_reference(module: str) -> bool:
    return module.endswith(".py") or "/" in module or "\\" in module


def import_source(module: str, origin: str) -> ModuleType:
    """Import a module by name or a ``.py`` file by path (once); ``origin`` prefixes errors."""
    if is_file_reference(module):
        path = Path(module).expanduser().resolve()
        if not path.is_file():
            raise TaskReferenceError(
                f"{origin}: no file {module}; pass an existing .py file or {HINT}"
            )
        # A stable, unique module name per file, so importing it again reuses the module.
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
        name = f"_prefix_probe_file_{path.stem}_{digest}"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # before running it: dataclasses and pickling look it up
        try:
            with registry.loading(f"file {module}"):
                spec.loader.exec_module(mod)
        except Exception as e:
            del sys.modules[name]
            raise TaskReferenceError(
                f"{origin}: importing {module} failed with {first_line(e)}; fix that file"
            ) from e
        return mod
    if module in sys.modules:
        return sys.modules[module]
    try:
        with registry.loading(f"module {module}"):
            return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise TaskReferenceError(
                f"{origin}: no module named {module!r} on the Python path; install it, add its "
                f"folder to PYTHONPATH, or pass the file itself: path/to/{module}.py"
            ) from None
        raise TaskReferenceError(
            f"{origin}: importing {module} failed with {first_line(e)}; fix that module"
        ) from e
    except Exception as e:
        raise TaskReferenceError(
            f"{origin}: importing {module} failed with {first_line(e)}; fix that module"
        ) from e


def _register_object(obj, source: str) -> Task | Mixture:
    if registry.registered(obj.name) is not obj:
        registry.register(obj, source=source)
    return obj


def task_from_reference(reference: str) -> Task | Mixture:
    """The task ``MODULE:NAME`` or ``path/to/file.py:NAME`` names (importing the module once)."""
    module, _, name = reference.rpartition(":")
    origin = f"task reference {reference!r}"
    if not module or not name:
        raise TaskReferenceError(f"{origin}: {HINT}")
    mod = import_source(module, origin)
    source = f"file {module}" if is_file_reference(module) else f"module {module}"
    obj = getattr(mod, name, None)
    if isinstance(obj, Task | Mixture):
        return _register_object(obj, source)
    if obj is not None:
        raise TaskReferenceError(
            f"{origin}: {module}.{name} is a {type(obj).__name__}, not a tasks.Task or "
            "tasks.Mixture; point at a Task object or a registered task name"
        )
    task = registry.registered(name)
    if task is not None:
        return task
    mine = registry.names_from(source)
    raise TaskReferenceError(
        f"{origin}: {module} has no Task named {name!r} and registered none by that name "
        f"(it registered: {', '.join(mine) or 'nothing'}); define {name} = tasks.Task(...) "
        "there or call tasks.register in it"
    )


def load_entry_points() -> None:
    """Load the tasks installed packages declare in the ``prefix_probe.tasks`` group (once)."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    for ep in entry_points(group=GROUP):
        dist = getattr(ep.dist, "name", None) or "an unknown package"
        source = f"entry point {ep.name} ({dist})"
        origin = f"task entry point {ep.name} = {ep.value!r} (group {GROUP}, package {dist})"
        try:
            with registry.loading(source):
                obj = ep.load()
        except Exception as e:
            raise TaskReferenceError(
                f"{origin} failed to load: {first_line(e)}; fix or uninstall {dist}"
            ) from e
        objs = obj if isinstance(obj, list | tuple) else [obj]
        for o in objs:
            if isinstance(o, Task | Mixture):
                _register_object(o, source)
            elif not isinstance(o, ModuleType):
                raise TaskReferenceError(
                    f"{origin} loads a {type(o).__name__}; it must name a module, a tasks.Task or "
                    "tasks.Mixture, or a list of them"
                )
    _entry_points_loaded = True


def load_env_modules() -> None:
    """Import the modules and files listed in ``$PREFIX_PROBE_TASK_MODULES`` (each once)."""
    for module in filter(None, os.environ.get(ENV, "").split(os.pathsep)):
        import_source(module, f"{ENV} entry {module!r}")


def add_env_module(module: str) -> None:
    """List ``module`` (a name, or a file, made absolute) in ``$PREFIX_PROBE_TASK_MODULES``, so
    that processes started from here import it when looking up a task."""
    if is_file_reference(module):
        module = str(Path(module).expanduser().resolve())
    listed = [m for m in os.environ.get(ENV, "").split(os.pathsep) if m]
    if module not in listed:
        os.environ[ENV] = os.pathsep.join([*listed, module])
