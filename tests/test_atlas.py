"""The PEFT atlas: every method's identity on tiny random float64 models, a must-fail test per
class, and each method's class on GPT-2 and Llama (probe.classify, probe.hf.gated, probe.atlas).
"""

import copy

import pytest

pytest.importorskip("peft")

import torch  # noqa: E402
from peft import AdaptionPromptConfig, get_peft_model  # noqa: E402

from probe import hf  # noqa: E402
from probe.atlas import METHODS, atlas_cell, render_atlas, tiny_model, unit_key_scales  # noqa: E402
from probe.atlas import _ia3 as ia3_model  # noqa: E402
from probe.classify import BIAS_ONLY, GATED, KEPT, REWEIGHTS, gated_decompose  # noqa: E402
from probe.hf.gated import _wrappers, gated_biases  # noqa: E402
from probe.hf.run import _prepared  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

EXPECTED = {
    "prefix-tuning": BIAS_ONLY,
    "P-tuning": BIAS_ONLY,
    "prompt-tuning": BIAS_ONLY,
    "adaption prompt": GATED,
    "LoRA (Q,K)": REWEIGHTS,
    "DoRA (Q,K)": REWEIGHTS,
    "IA3 (K,V,FFN)": REWEIGHTS,
    "IA3 (V,FFN)": KEPT,
    "full fine-tuning": REWEIGHTS,
}


def tokens(seed=1, b=3, T=7):
    return torch.randint(1, 50, (b, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("method", list(EXPECTED))
def test_each_method_is_classified_on_gpt2_and_llama(method, arch):
    cell = atlas_cell(method, arch)
    assert cell.name == EXPECTED[method] and cell.verified and not cell.note
    if cell.name in (BIAS_ONLY, GATED, KEPT):
        assert cell.max_drift < 1e-12
    else:
        assert cell.max_drift > 1e-3
    if cell.name in (BIAS_ONLY, GATED):
        assert 1 <= cell.bias_rank <= 3  # P = adapter_len = 3


def test_lora_on_v_is_attention_kept_unless_the_projection_is_fused():
    assert atlas_cell("LoRA (V)", "llama").name == KEPT
    assert atlas_cell("LoRA (V)", "gpt2").name == REWEIGHTS  # c_attn holds W_Q and W_K too


def test_unsupported_architecture_is_a_note_not_a_result():
    cell = atlas_cell("adaption prompt", "qwen2")
    assert cell.name == "" and "PEFT" in cell.note
    text = render_atlas([cell, atlas_cell("prefix-tuning", "qwen2")])
    assert "| adaption prompt | n/a |" in text and "| prefix-tuning | bias only |" in text
    with pytest.raises(ValueError, match="unknown method"):
        atlas_cell("LoRA", "llama")
    assert set(EXPECTED) <= set(METHODS)


# ------------------------------------------------------------------ IA3: a key scale re-weights


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_ia3_key_scale_one_keeps_attention_any_other_re_weights(arch):
    base = tiny_model(arch)
    m = ia3_model(arch, base, keys=False, seed=3).eval()  # values and FFN random, keys 1
    kept = hf.check_hf(base, tokens(), tuned_model=m).classify()
    assert kept.name == KEPT and kept.max_drift < 1e-12  # a value scale moves no pattern
    # one key scale entry of layer 1 off 1: that layer alone re-weights
    with torch.no_grad():
        for name, mod in m.named_modules():
            if hasattr(mod, "ia3_l") and not mod.is_feedforward and ".1." in name:
                scale = mod.ia3_l["default"].view(-1)
                idx = {"gpt2": 32, "neox": 8}.get(arch, 0)  # first key entry of the layout
                if arch != "llama" or name.endswith("k_proj"):
                    scale[idx] = 1.5
    moved = hf.check_hf(base, tokens(), tuned_model=m).classify()
    assert moved.name == REWEIGHTS and moved.reweighted_layers == [1]
    assert moved.drift[0] < 1e-12 and moved.drift[1] > 1e-4
    unit_key_scales(m, arch)  # back to 1: kept again
    assert hf.check_hf(base, tokens(), tuned_model=m).classify().name == KEPT


# ------------------------------------------------------------------ adaption prompt: gated bias


def adaption(arch, gate, seed=4, layers=2):
    base = tiny_model(arch)
    torch.manual_seed(seed)
    cfg = AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=3, adapter_layers=layers)
    m = get_peft_model(copy.deepcopy(base), cfg).eval()
    for w in _wrappers(m.get_base_model()).values():
        w.adaption_gate.data.fill_(gate)
    return base, m


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mistral"])
@pytest.mark.parametrize("gate", [0.7, -1.3])
def test_gated_bias_identity_exact_in_float64(arch, gate, monkeypatch):
    """With PEFT's adapter softmax in the model's dtype (it hard-codes float32), the identity
    added == g beta V_a W_A holds to float64 rounding at every adapted layer."""
    import peft.tuners.adaption_prompt.layer as ap_layer

    class F64:
        @staticmethod
        def softmax(x, dim, dtype=None):
            return x.softmax(dim)

    monkeypatch.setattr(ap_layer, "F", F64)
    base, m = adaption(arch, gate)
    s, offset = _prepared(base, None, m, tokens(), None)
    gated = gated_biases(s, tokens(), offset, softmax_dtype=torch.float64)
    assert all(g is not None for g in gated)
    for g in gated:
        assert g.ok and g.error < 1e-12 and g.gate == gate
        assert (g.rank <= 3).all() and (g.rank >= 1).all()
        torch.testing.assert_close(g.beta.sum(-1), torch.ones_like(g.beta[..., 0]))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_gate_zero_is_the_base_model_and_a_gate_adds_exactly_the_gated_bias(arch):
    t = tokens()
    base, m = adaption(arch, 0.0, layers=1)  # the top layer only
    torch.testing.assert_close(m(input_ids=t).logits, base(input_ids=t).logits, rtol=0, atol=0)
    zero = hf.check_hf(base, t, tuned_model=m)
    assert zero.gated[0] is None and zero.gated[1].error == 0.0
    for w in _wrappers(m.get_base_model()).values():
        w.adaption_gate.data.fill_(0.9)
    assert not torch.allclose(m(input_ids=t).logits, base(input_ids=t).logits)
    result = hf.check_hf(base, t, tuned_model=m)  # against PEFT's forward (float32 softmax)
    c = result.classify()
    assert c.name == GATED and c.identity_ok and result.ok
    assert c.max_drift < 1e-12  # the content pattern is the frozen head's
    g = result.gated[1]
    assert g.error < 1e-6 and g.error <= g.tol


def test_a_wrong_gated_identity_fails():
    """Must-fail: the gated bias with another gate, or in the prefix's (1 - alpha) form, does not
    explain what the adapter added; a failed gated identity fails the check."""
    torch.manual_seed(0)
    b, T, H, e, Pa, d = 2, 5, 2, 4, 3, 8
    q, k_a, v_a = torch.randn(b, T, H, e), torch.randn(Pa, H, e), torch.randn(Pa, H, e)
    q, k_a, v_a = q.double(), k_a.double(), v_a.double()
    W_A = torch.randn(H, e, d, dtype=torch.float64)
    good = gated_decompose(q, k_a, v_a, 0.5, W_A, None, torch.zeros(b, T, d, dtype=q.dtype))
    added = good.bias_out.sum(2)
    assert gated_decompose(q, k_a, v_a, 0.5, W_A, None, added).ok
    assert not gated_decompose(q, k_a, v_a, 0.5 * 1.001, W_A, None, added).ok
    assert not gated_decompose(q, k_a, v_a, 0.5, W_A, torch.ones(d, dtype=q.dtype), added).ok
    # a prefix's softmax over [adapter; content] would scale the bias by alpha_i <= 1 per query
    s = torch.einsum("bthe,phe->bhtp", q, k_a) / e**0.5
    alpha = torch.sigmoid(s.logsumexp(-1)).transpose(1, 2)[..., None]  # one content key of s=0
    assert not gated_decompose(q, k_a, v_a, 0.5, W_A, None, (alpha * good.bias_out).sum(2)).ok

    base, m = adaption("llama", 0.8, layers=1)
    result = hf.check_hf(base, tokens(), tuned_model=m)
    assert result.ok
    g = result.gated[1]
    result.gated[1] = gated_decompose(
        torch.zeros(1, 1, 1, 1, dtype=torch.float64),
        torch.zeros(1, 1, 1, dtype=torch.float64),
        torch.ones(1, 1, 1, dtype=torch.float64),
        g.gate,
        torch.ones(1, 1, 1, dtype=torch.float64),
        None,
        torch.zeros(1, 1, 1, dtype=torch.float64),
        layer=1,
    )
    assert not result.ok and "gated-bias error" in result.failures()[0]
    assert not result.classify().identity_ok


def test_check_theorem_prints_the_class_and_exits_0(tmp_path, capsys):
    from probe.cli import main

    base, m = adaption("llama", 0.6)
    base.save_pretrained(tmp_path / "model")
    m.save_pretrained(tmp_path / "ap")
    ia3_model("llama", base, keys=True, seed=2).save_pretrained(tmp_path / "ia3")
    cmd = ["check-theorem", "--base", str(tmp_path / "model"), "--n", "8", "--task", "sort_asc"]
    assert main([*cmd, "--adapter", str(tmp_path / "ap")]) == 0
    out = capsys.readouterr().out
    assert "class: gated bias" in out and out.count("gated bias, gate 0.6") == 2
    assert main([*cmd, "--adapter", str(tmp_path / "ia3")]) == 0
    out = capsys.readouterr().out
    assert "class: re-weights attention" in out and "local drift per layer" in out
    assert main([*cmd, "--prefix-len", "2"]) == 0
    assert "class: bias only" in capsys.readouterr().out
