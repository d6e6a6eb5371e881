"""The documentation site builds with ``mkdocs build --strict`` (no broken link, no page left out
of the nav, no docstring the API reference cannot render), and the README stays a guide.

The build needs the ``docs`` extra (``pip install -c constraints.txt -e '.[docs]'``; CI installs
it); without it the build tests skip and say so.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README_MAX_LINES = 250


def test_the_readme_is_a_guide():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail to docs/"
    # Dated measurements live in docs/benchmarks.md, each with its machine and command.
    dated = [line for line in lines if re.search(r"\b20\d\d-\d\d-\d\d\b", line)]
    assert not dated, dated


def rst_module():
    pytest.importorskip(
        "griffe", reason="the docs extra is not installed: pip install -e '.[docs]'"
    )
    spec = importlib.util.spec_from_file_location("rst", ROOT / "docs" / "griffe_rst_roles.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "docstring, markdown",
    [
        (":class:`~probe.model.Transformer` s", "`Transformer` s"),
        (":func:`probe.hf.check_hf`", "`probe.hf.check_hf`"),
        (
            "see :meth:`Store.path` and :data:`TWO_TOKEN_MAX_V`.",
            "see `Store.path` and `TWO_TOKEN_MAX_V`.",
        ),
        (":py:attr:`the bound <Unconditional.sufficient_T>`", "`the bound`"),
        ("``literal`` and `code` stay", "``literal`` and `code` stay"),
    ],
)
def test_sphinx_roles_become_code_spans(docstring, markdown):
    assert rst_module().rst_roles_to_markdown(docstring) == markdown


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    if (
        importlib.util.find_spec("mkdocs") is None
        or importlib.util.find_spec("mkdocstrings") is None
    ):
        pytest.skip(
            "mkdocs and mkdocstrings are not installed: pip install -c constraints.txt -e '.[docs]'"
        )
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_the_site_builds_strictly_with_every_guide(site):
    for page in ["index", "benchmarks", *(p.stem for p in (ROOT / "docs" / "guides").glob("*.md"))]:
        where = site / "index.html" if page == "index" else next(site.rglob(f"{page}/index.html"))
        assert where.stat().st_size > 0, page


@pytest.mark.parametrize(
    "page, objects",
    [
        (
            "probes",
            ["probe.check.check_tuned", "probe.probes.TheoremCheck", "probe.probes.decompose"],
        ),
        ("hf", ["probe.hf.check_hf", "probe.hf.hf_records", "probe.hf.verify_hf"]),
        ("runs", ["analysis.runs.Run", "analysis.runs.Store", "analysis.runs.run_sweep"]),
        ("tasks", ["tasks.base.Task", "tasks.library.register"]),
        (
            "spread",
            ["probe.spread.prefix_attention_spread", "probe.spread.bias_effective_rank"],
        ),
    ],
)
def test_the_api_reference_documents_the_public_names(site, page, objects):
    html = (site / "api" / page / "index.html").read_text()
    for name in objects:
        assert f'id="{name}"' in html, f"{name} is missing from api/{page}"
    text = re.sub(r"<[^>]+>", "", html)
    assert not re.search(r":(class|func|meth|data|attr|mod):`", text), "a Sphinx role was left raw"
