"""Train/eval modes (issue 18): models come ready for analysis, conversions ignore dropout and
leave the caller's mode alone, and recording a cache with dropout active warns once."""

import warnings

import pytest
import torch
from helpers import random_prefix, tokens

from probe.adapters import Tuned, make_adapter, prompt_to_prefix
from probe.model import DropoutActiveWarning, Transformer, eval_mode, preset
from probe.train import TrainConfig, pretrain
from tasks import get_task


def model_with_dropout(seed=0) -> Transformer:
    """A float64 tiny model with the presets' dropout 0.1."""
    torch.manual_seed(seed)
    return Transformer(preset("tiny")).double()


def modes(module: torch.nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in module.named_modules()}


def dropout_warnings(record) -> list[warnings.WarningMessage]:
    return [w for w in record if issubclass(w.category, DropoutActiveWarning)]


def test_built_and_loaded_models_are_in_eval_mode(tmp_path):
    model = model_with_dropout()
    assert model.cfg.dropout > 0 and not any(modes(model).values())
    model.train().save(tmp_path / "m")  # saved while training: the mode is not part of a save
    loaded = Transformer.load(tmp_path / "m")
    assert not any(modes(loaded).values())
    loaded, x = loaded.double(), tokens()
    torch.testing.assert_close(loaded(x), loaded(x), rtol=0, atol=0)  # no dropout draws


def test_run_with_cache_warns_once_in_training_mode():
    model = model_with_dropout().train()
    prefix = random_prefix(model, 2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")  # so that the once is ours, not the warnings registry's
        _, cache = model.run_with_cache(tokens(), prefix=prefix)
        model.run_with_cache(tokens(), prefix=prefix)
    [warning] = dropout_warnings(record)
    message = str(warning.message)
    assert "\n" not in message and "model.eval()" in message and "0.1" in message
    assert warning.filename == __file__  # points at the caller's line, not at model.py
    # What it warns about: the recorded pattern is not the one hook_z was computed with.
    z, pattern = cache["blocks.0.attn.hook_z"], cache["blocks.0.attn.hook_pattern"]
    v = torch.cat([prefix[0].values.expand(3, -1, -1, -1), cache["blocks.0.attn.hook_v"]], 1)
    assert (z - torch.einsum("bhqk,bkhe->bqhe", pattern, v)).abs().max() > 1e-3

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model_with_dropout().run_with_cache(tokens())  # eval mode: nothing to warn about
        Transformer(preset("tiny", dropout=0.0)).train().run_with_cache(tokens())
        tuned = Tuned(model_with_dropout()).add("p", make_adapter("prefix", model, length=2))
        tuned.train().run_with_cache(tokens())  # the adapter path warns too
    [warning] = dropout_warnings(record)
    assert warning.filename == __file__


def test_prompt_to_prefix_runs_without_dropout_and_restores_every_mode():
    model = model_with_dropout().train()
    model.blocks[0].attn.eval()  # a mixed mode: each module must get its own mode back
    before = modes(model)
    prompt = 0.02 * torch.randn(3, model.cfg.d_model, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DropoutActiveWarning)  # no dropout, so nothing to warn
        first, second = prompt_to_prefix(model, prompt), prompt_to_prefix(model, prompt)
    assert modes(model) == before
    with eval_mode(model):
        reference = prompt_to_prefix(model, prompt)
    for a, b, c in zip(first, second, reference, strict=True):
        for part in range(2):
            torch.testing.assert_close(a[part], b[part], rtol=0, atol=0)
            torch.testing.assert_close(a[part], c[part], rtol=0, atol=0)
    x = tokens()
    with eval_mode(model):  # and it is exact: the prompt and its prefix give the same logits
        torch.testing.assert_close(
            model(x, prompt=prompt), model(x, prefix=first), rtol=0, atol=1e-12
        )


def test_eval_mode_restores_modes_after_an_exception():
    model = model_with_dropout().train()
    model.blocks[1].eval()
    before = modes(model)
    with pytest.raises(RuntimeError, match="inside"), eval_mode(model):
        assert not any(modes(model).values())
        raise RuntimeError("inside")
    assert modes(model) == before


def test_per_example_prompt_converts_per_example():
    model = model_with_dropout()
    B, P = 3, 2
    prompt = 0.02 * torch.randn(B, P, model.cfg.d_model, dtype=torch.float64)
    prefix = prompt_to_prefix(model, prompt)
    c = model.cfg
    assert all(p.keys.shape == p.values.shape == (B, P, c.n_heads, c.d_head) for p in prefix)
    for i in range(B):  # example i's prefix is that of its own prompt
        own = prompt_to_prefix(model, prompt[i])
        for layer in range(c.n_layers):
            torch.testing.assert_close(prefix[layer].keys[i], own[layer].keys, rtol=0, atol=1e-14)
            torch.testing.assert_close(
                prefix[layer].values[i], own[layer].values, rtol=0, atol=1e-14
            )
    x = tokens(batch=B)
    torch.testing.assert_close(model(x, prompt=prompt), model(x, prefix=prefix), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 3, 4, 32), (3, 31), (32,)])
def test_prompt_of_a_wrong_shape_is_refused_in_one_line(shape):
    with pytest.raises(ValueError, match=r"\[P, d_model=32\]") as info:
        prompt_to_prefix(model_with_dropout(), torch.zeros(shape, dtype=torch.float64))
    assert "\n" not in str(info.value)


def test_training_sets_training_mode_itself():
    """Built in eval mode, a model still trains with dropout: train() sets the mode."""
    cfg = TrainConfig(steps=5, lr=1e-2, batch_size=16, eval_every=5, eval_size=32, progress=False)
    fingerprints = []
    for mode in ("eval", "train", "no dropout"):
        torch.manual_seed(0)
        model = Transformer(preset("tiny", dropout=0.0 if mode == "no dropout" else 0.1))
        pretrain(get_task("copy"), model.train(mode == "train"), cfg)
        assert not any(modes(model).values())  # back in eval mode, ready for analysis
        fingerprints.append(model.fingerprint())
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]
