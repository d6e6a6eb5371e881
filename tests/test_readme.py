"""The README's Python examples run as pasted, and the identities they show hold to rounding.

Every ```python block of README.md runs on its own, in a fresh namespace, with torch seeded and
a DropoutActiveWarning turned into an error. Each variable a block names ``*_error`` must be at
rounding. The Hugging Face block needs the ``hf`` extra and the hub; the hub is out of reach in
tests, so ``from_pretrained`` there returns a tiny random GPT-2 (the same class, offline) and a
stand-in tokenizer, and the probe calls run exactly as written.
"""

import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import tasks.library
from probe.model import DropoutActiveWarning

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)
# PEFT calls a transformers API that transformers deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
ROUNDING = 1e-6  # float32 examples: errors are 0 or ~1e-7 (float64: ~1e-16)


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


def test_the_readme_shows_identities():
    """The examples keep computing the identities (a README edit cannot drop them silently)."""
    names = {name for block in BLOCKS for name in re.findall(r"^(\w+_error) =", block, re.M)}
    assert {"z_error", "prompt_error"} <= names, names
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs_as_pasted(index, monkeypatch, capsys):
    block = BLOCKS[index]
    if "from_pretrained" in block:
        offline_hub(monkeypatch)
    # A block may register a task: keep the registry as it was for the other tests.
    monkeypatch.setattr(tasks.library, "_REGISTRY", dict(tasks.library._REGISTRY))
    torch.manual_seed(0)
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DropoutActiveWarning)
        exec(compile(block, f"README.md python block {index}", "exec"), namespace)
    for name, value in namespace.items():
        if name.endswith("_error"):
            error = float(torch.as_tensor(value).detach().max())
            assert 0 <= error <= ROUNDING, f"{name} = {error:.3g}"
    for line in capsys.readouterr().out.splitlines():  # what a user sees printed, too
        if line.startswith("max |"):
            assert float(line.rsplit("=", 1)[1]) <= ROUNDING, line
