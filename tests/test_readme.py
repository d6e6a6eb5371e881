"""The README's and the documentation's Python examples run as pasted, and the identities they
show hold to rounding; CI runs the README's own test command.

Every ```python block of README.md and of docs/**/*.md runs on its own, in a fresh namespace,
with torch seeded and a DropoutActiveWarning turned into an error. Each variable a block names
``*_error`` must be at rounding. The Hugging Face block needs the ``hf`` extra and the hub; the
hub is out of reach in tests, so ``from_pretrained`` there returns a tiny random GPT-2 (the same
class, offline) and a stand-in tokenizer, and the probe calls run exactly as written.

A docs block too slow for the tests (long training) is marked by the line
``<!-- docs-test: skip (REASON) -->`` right before its fence: it is reported as skipped, with its
reason, never silently dropped. The README's blocks can not be skipped.
"""

import re
import shlex
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import tasks.registry
from probe.model import DropoutActiveWarning

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
SKIP = re.compile(r"<!-- docs-test: skip \((?P<reason>[^)]+)\) -->")
# A fence, with the line before it (a skip marker, or anything else).
FENCE = re.compile(r"^(?P<before>[^\n]*)\n```python\n(?P<code>.*?)^```", re.S | re.M)
# PEFT calls a transformers API that transformers deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
ROUNDING = 1e-6  # float32 examples: errors are 0 or ~1e-7 (float64: ~1e-16)


def python_blocks(path: Path) -> list[tuple[str, str, str | None]]:
    """(name, code, skip reason or None) of each ```python block of a Markdown file."""
    text = "\n" + path.read_text()
    where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    out = []
    for i, m in enumerate(re.finditer(FENCE, text)):
        before = m.group("before").rsplit("\n", 1)[-1]
        skip = SKIP.fullmatch(before.strip())
        out.append((f"{where} block {i}", m.group("code"), skip and skip["reason"]))
    return out


README_BLOCKS = python_blocks(README)
DOC_BLOCKS = [b for page in sorted(DOCS.rglob("*.md")) for b in python_blocks(page)]
BLOCKS = README_BLOCKS + DOC_BLOCKS


def offline_hub(monkeypatch):
    """Make AutoModelForCausalLM / AutoTokenizer.from_pretrained work without the hub."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")

    def model(name, dtype=torch.float32, **_):
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50)
        return transformers.GPT2LMHeadModel(cfg).to(dtype)

    def tokenizer(name, **_):
        return lambda text, return_tensors: SimpleNamespace(
            input_ids=torch.tensor([[len(word) for word in text.split()]])
        )

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer)


def test_the_examples_show_the_identities():
    """The examples keep computing the identities (an edit cannot drop them silently), and the
    README shows one example per layer that runs."""
    names = {name for _, code, _ in BLOCKS for name in re.findall(r"^(\w+_error) =", code, re.M)}
    assert {"z_error", "prompt_error"} <= names, names
    assert len(README_BLOCKS) >= 3 and not any(skip for *_, skip in README_BLOCKS)
    readme = "".join(code for _, code, _ in README_BLOCKS)
    for layer in ("from tasks import", "from probe import", "from analysis."):
        assert layer in readme, f"the README has no example importing {layer!r}"


def test_the_skip_marker_is_read(tmp_path):
    """The marker skips exactly the block after it, and a marker with no reason is no marker."""
    page = "# t\n\n<!-- docs-test: skip (trains for an hour) -->\n```python\nslow()\n```\n\n"
    page += "```python\nfast()\n```\n<!-- docs-test: skip () -->\n```python\nalso_fast()\n```\n"
    path = tmp_path / "page.md"
    path.write_text(page)
    got = [(code.strip(), skip) for _, code, skip in python_blocks(path)]
    assert got == [("slow()", "trains for an hour"), ("fast()", None), ("also_fast()", None)]


@pytest.mark.parametrize("name, code, skip", BLOCKS, ids=[name for name, *_ in BLOCKS])
def test_python_block_runs_as_pasted(name, code, skip, monkeypatch, capsys):
    if skip:
        pytest.skip(f"marked in the page: {skip}")
    if "from_pretrained" in code:
        offline_hub(monkeypatch)
    # A block may register a task: keep the registry as it was for the other tests.
    monkeypatch.setattr(tasks.registry, "_REGISTRY", dict(tasks.registry._REGISTRY))
    torch.manual_seed(0)
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DropoutActiveWarning)
        exec(compile(code, name, "exec"), namespace)
    for var, value in namespace.items():
        if var.endswith("_error"):
            error = float(torch.as_tensor(value).detach().max())
            assert 0 <= error <= ROUNDING, f"{var} = {error:.3g}"
    for line in capsys.readouterr().out.splitlines():  # what a user sees printed, too
        if line.startswith("max |"):
            assert float(line.rsplit("=", 1)[1]) <= ROUNDING, line


def quick_start() -> list[str]:
    """The README's quick-start commands, one line each."""
    section = README.read_text().split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def commands(line: str) -> list[list[str]]:
    """A shell line's commands (split at &&), each as its words."""
    return [shlex.split(part) for part in line.split("&&")]


def test_ci_runs_the_readme_test_command():
    """.ci/run sets up as the README's second command does (with the docs extra on top, so CI
    also builds the site) and then runs exactly the README's test command."""
    readme = commands(quick_start()[1])
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci = [shlex.split(line) for line in ci_lines if line and not line.startswith("#")]
    assert readme[0] in ci and readme[-1] in ci, f"{readme} is not what .ci/run runs"
    install = readme[1]
    ci_install = [c for c in ci if c[:2] == install[:2]]
    assert len(ci_install) == 1, ci_install
    got = [w for w in ci_install[0] if w != "--quiet"]
    extras = re.fullmatch(r"\.\[(.*)\]", got[-1]).group(1).split(",")
    assert got[:-1] == install[:-1], (got, install)
    assert set(re.fullmatch(r"\.\[(.*)\]", install[-1]).group(1).split(",")) <= set(extras)
    assert "docs" in extras  # the strict site build (tests/test_docs.py) runs in CI
