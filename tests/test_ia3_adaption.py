"""Our IA3 and adaption-prompt adapters under the theorem: each one's identity as a property of
random float64 models, a must-fail test per class, conversions to PEFT where exact, and
check-theorem on saved adapters (probe.adapters, probe.check, probe.hf.convert)."""

import pytest
import torch
from helpers import model_config, model_configs
from hypothesis import given, settings
from hypothesis import strategies as st

import probe.model
from probe.adapters import AdaptionPromptConfig, IA3Config, make_adapter
from probe.check import check_tuned
from probe.classify import GATED, KEPT, REWEIGHTS, gated_decompose
from probe.config import GatedPrompt
from probe.model import Transformer


def base_of(cfg, seed=0) -> Transformer:
    """A float64 model of ``cfg`` with non-zero biases (so that IA3's bias scaling matters)."""
    torch.manual_seed(seed)
    model = Transformer(cfg).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.split(".")[-1].startswith("b_"):
                p.normal_(0, 0.1)
    return model


def tokens(batch=3, T=9, seed=2, vocab=11):
    return torch.randint(0, vocab, (batch, T), generator=torch.Generator().manual_seed(seed))


def ia3(base, targets=("W_K", "W_V", "W_out"), seed=1, keys_one=False):
    """An IA3 adapter with its scales at 1 + 0.5 N(0, 1) (key scales back at 1 if asked)."""
    torch.manual_seed(seed)
    adapter = make_adapter("ia3", base, targets=targets)
    with torch.no_grad():
        for name, p in adapter.scales.items():
            if not (keys_one and name.endswith("W_K")):
                p.add_(0.5 * torch.randn_like(p))
    return adapter


def adaption(base, length=3, layers=None, gate=None, seed=1):
    """An adaption prompt with gates N(0, 1) per head (or all ``gate``)."""
    torch.manual_seed(seed)
    adapter = make_adapter("adaption_prompt", base, length=length, layers=layers)
    with torch.no_grad():
        adapter.gate.normal_() if gate is None else adapter.gate.fill_(gate)
    return adapter


# ------------------------------------------------------------------ IA3


@settings(max_examples=12, deadline=None)
@given(cfg=model_configs(), seed=st.integers(0, 2**16))
def test_ia3_as_weights_is_ia3_as_scaled_activations(cfg, seed):
    """Scaling W_K, W_V (and b_K, b_V) and W_out's rows is the model that scales the keys,
    values and MLP hidden units themselves (PEFT's way), to float64 rounding."""
    base = base_of(cfg, seed)
    targets = ("W_Q", "W_K", "W_V") + (("W_out",) if cfg.d_mlp else ())
    adapter = ia3(base, targets, seed)
    scales = {k.replace("__", "."): v.detach() for k, v in adapter.scales.items()}
    hooks = []
    for layer in range(cfg.n_layers):
        for x in "qkv":
            s = scales[f"blocks.{layer}.attn.W_{x.upper()}"]
            hooks.append((f"blocks.{layer}.attn.hook_{x}", lambda t, hook, s=s: t * s))
        if cfg.d_mlp:
            s = scales[f"blocks.{layer}.mlp.W_out"]
            hooks.append((f"blocks.{layer}.mlp.hook_post", lambda t, hook, s=s: t * s))
    x = tokens()
    expected = base.run_with_hooks(x, fwd_hooks=hooks)
    torch.testing.assert_close(adapter(base, x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_layers", [2, 3])
def test_ia3_key_scale_one_keeps_attention_any_other_re_weights(n_layers):
    """Must-fail pair: with every key scale 1 (values and MLP scaled) each pattern is the frozen
    head's, no bias and no drift; one key scale of 1.5 at the top layer re-weights that layer
    alone; a query scale does the same."""
    base = base_of(model_config(n_layers=n_layers, n_heads=2, d_head=8))
    adapter = ia3(base, ("W_Q", "W_K", "W_V", "W_out"), keys_one=True)
    with torch.no_grad():
        for name, p in adapter.scales.items():
            if name.endswith("W_Q"):
                p.fill_(1.0)
    kept = check_tuned(base, adapter, tokens()).classify()
    assert kept.name == KEPT and kept.max_drift < 1e-12 and kept.identity_ok
    top = n_layers - 1
    for which in ("W_K", "W_Q"):
        scale = adapter.scales[f"blocks__{top}__attn__{which}"]
        with torch.no_grad():
            scale[1, 3] = 1.5
        moved = check_tuned(base, adapter, tokens()).classify()
        assert moved.name == REWEIGHTS and moved.reweighted_layers == [top]
        assert max(moved.drift[:top]) < 1e-12 and moved.drift[top] > 1e-6
        with torch.no_grad():
            scale.fill_(1.0)
    assert check_tuned(base, adapter, tokens()).classify().name == KEPT


def test_ia3_scaling_every_key_channel_alike_still_re_weights():
    """A uniform key scale c is a softmax temperature: the relative attention moves (c != 1)."""
    base = base_of(model_config(n_layers=1, n_heads=2, d_head=8))
    adapter = make_adapter("ia3", base, targets=("W_K",))
    with torch.no_grad():
        adapter.scales["blocks__0__attn__W_K"].fill_(2.0)
    assert check_tuned(base, adapter, tokens()).classify().name == REWEIGHTS


def test_ia3_options_are_checked():
    with pytest.raises(ValueError, match="choose from"):
        IA3Config(targets=("W_O",))
    with pytest.raises(ValueError, match="attention-only"):
        make_adapter("ia3", base_of(model_config(mlp=False)))
    assert make_adapter("ia3", base_of(model_config(mlp=False)), targets=("W_K",)).n_params == 32


# ------------------------------------------------------------------ adaption prompt


@settings(max_examples=12, deadline=None)
@given(cfg=model_configs(), P_a=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_adaption_prompt_gated_bias_identity_holds_exactly(cfg, P_a, seed):
    """At every adapted layer the output is the frozen head's own attention (local drift 0,
    weight 1) plus sum_h g_h beta_h V_a,h W_O,h, to float64 rounding; rank <= P_a."""
    base = base_of(cfg, seed)
    layers = 1 + seed % cfg.n_layers
    result = check_tuned(base, adaption(base, P_a, layers, seed=seed), tokens())
    c = result.classify()
    assert c.name == GATED and c.identity_ok and result.ok
    assert c.max_drift < 1e-12
    first = cfg.n_layers - layers
    assert all(g is None for g in result.gated[:first])
    for g in result.gated[first:]:
        assert g.ok and g.error < 1e-12 and (g.rank <= P_a).all()
        assert g.gates.shape == (cfg.n_heads,) and abs(g.gate) == g.gates.abs().max()
        torch.testing.assert_close(g.beta.sum(-1), torch.ones_like(g.beta[..., 0]))
    assert 1 <= c.bias_rank <= P_a


def test_gate_zero_is_the_base_model_exactly_and_a_gate_moves_it():
    base = base_of(model_config(n_layers=2))
    x = tokens()
    adapter = make_adapter("adaption_prompt", base, length=2)  # gates start at 0
    torch.testing.assert_close(adapter(base, x), base(x), rtol=0, atol=0)
    zero = check_tuned(base, adapter, x)
    assert zero.classify().name == GATED and all(g.error == 0.0 for g in zero.gated)
    with torch.no_grad():
        adapter.gate[1, 0] = 0.5
    assert not torch.allclose(adapter(base, x), base(x))


def test_the_fused_and_the_recorded_attention_paths_agree():
    from probe.adapters import Tuned

    base = base_of(model_config(n_layers=2))
    tuned = Tuned(base).add("a", adaption(base))
    logits, cache = tuned.run_with_cache(tokens())  # explicit attention, pattern recorded
    torch.testing.assert_close(tuned(tokens()), logits, rtol=0, atol=1e-12)
    assert cache["pattern", 0].shape[-1] == tokens().shape[1]  # no prompt column joins A


def test_a_wrong_gated_identity_fails(monkeypatch):
    """Must-fail: a model whose gated mix is off by 0.1% fails the identity at every adapted
    layer; the prefix's coupled softmax over the same prompt keys does not satisfy it either."""
    base = base_of(model_config(n_layers=2))
    adapter = adaption(base)
    mix = probe.model.gated_mix
    monkeypatch.setattr(probe.model, "gated_mix", lambda q, g: 1.001 * mix(q, g))
    result = check_tuned(base, adapter, tokens())
    assert not result.ok and not result.classify().identity_ok
    assert sum("gated-bias error" in line for line in result.failures()) == 2
    monkeypatch.undo()
    # the same keys and values as a prefix: one softmax over [prompt; content]
    gated = adapter.gated(base)
    _, cache = base.run_with_cache(
        tokens(), prefix=[probe.model.KVPrefix(g.keys, g.values) for g in gated]
    )
    _, plain = base.run_with_cache(tokens())
    layer = 0
    g = gated[layer]
    added = cache["blocks.0.hook_attn_out"] - plain["blocks.0.hook_attn_out"]
    W_O = base.blocks[layer].attn.W_O.detach()
    check = gated_decompose(
        cache["q", 0], g.keys.detach(), g.values.detach(), g.gate.detach(), W_O, None, added
    )
    assert not check.ok


def test_adaption_prompt_options_and_inputs_are_checked():
    base = base_of(model_config(n_layers=2))
    with pytest.raises(ValueError, match="layers"):
        AdaptionPromptConfig(layers=0)
    with pytest.raises(ValueError, match="base model has 2 layers"):
        make_adapter("adaption_prompt", base, layers=3)
    g = adaption(base).gated(base)
    with pytest.raises(ValueError, match="one entry per layer"):
        base(tokens(), gated=g[:1])
    bad = GatedPrompt(g[0].keys, g[0].values, g[0].gate[:1])
    with pytest.raises(ValueError, match="one gate per head"):
        base(tokens(), gated=[bad, None])
    with pytest.raises(ValueError, match=r"\[P_a, n_heads"):
        base(tokens(), gated=[GatedPrompt(g[0].keys[:, :1], g[0].values, g[0].gate), None])


# ------------------------------------------------------------------ PEFT and the CLI


def test_ia3_converts_exactly_to_peft_and_classifies_alike():
    pytest.importorskip("peft")
    from probe import hf
    from probe.hf.convert import ia3_to_peft, to_gpt2

    base = base_of(model_config(n_layers=2, n_heads=2, d_head=8))
    x = tokens()
    torch.testing.assert_close(to_gpt2(base)(input_ids=x).logits, base(x), rtol=0, atol=1e-12)
    for targets, name in ((("W_K", "W_V", "W_out"), REWEIGHTS), (("W_V", "W_out"), KEPT)):
        adapter = ia3(base, targets)
        peft_model = ia3_to_peft(adapter, base)
        torch.testing.assert_close(
            peft_model(input_ids=x).logits, adapter(base, x), rtol=0, atol=1e-12
        )
        theirs = hf.check_hf(to_gpt2(base), x, tuned_model=peft_model)  # verified vs PEFT
        assert theirs.ok and theirs.classify().name == name
        assert check_tuned(base, adapter, x).classify().name == name
    with pytest.raises(ValueError, match="attn_ln"):
        to_gpt2(base_of(model_config(attn_ln=False)))


def test_check_theorem_classifies_our_saved_adapters(tmp_path, capsys):
    from probe.cli import main

    base = base_of(model_config(n_layers=2))
    base.save(tmp_path / "base")
    adaption(base).save(tmp_path / "ap", base)
    ia3(base).save(tmp_path / "ia3", base)
    ia3(base, keys_one=True).save(tmp_path / "kept", base)
    cmd = ["check-theorem", "--base", str(tmp_path / "base"), "--n", "8", "--task", "copy"]
    assert main([*cmd, "--adapter", str(tmp_path / "ap")]) == 0
    out = capsys.readouterr().out
    assert "class: gated bias" in out and out.count("gated bias, gate") == 2
    assert main([*cmd, "--adapter", str(tmp_path / "ia3")]) == 0
    assert "class: re-weights attention" in capsys.readouterr().out
    assert main([*cmd, "--adapter", str(tmp_path / "kept")]) == 0
    assert "class: attention kept" in capsys.readouterr().out
