"""probe.hf on a tiny random GPT-2 (float64, offline): PEFT prefix/prompt adapters, raw prefixes.

The theorem's identities are checked here with the maths written out independently of the probes
module, so a bug in the extraction cannot hide behind a matching bug in a probe.
"""

import ast
import copy
import importlib.util
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")

import torch  # noqa: E402
from peft import (  # noqa: E402
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel  # noqa: E402

import probe  # noqa: E402
from probe import hf  # noqa: E402
from probe.model import KVPrefix  # noqa: E402

# PEFT calls a transformers API that transformers deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

L, H, D, V, P, B, T = 2, 2, 32, 50, 3, 2, 6
DH = D // H
TOL = 1e-12


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=L, n_head=H, n_embd=D, vocab_size=V, n_positions=64, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg).eval().to(torch.float64)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def prefix_model(base):
    torch.manual_seed(2)
    pm = get_peft_model(
        copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    )
    with torch.no_grad():  # keep alpha away from 0 and 1 so both terms matter
        pm.prompt_encoder["default"].embedding.weight.mul_(0.7)
    return pm.eval()


@pytest.fixture(scope="module")
def prompt_model(base):
    torch.manual_seed(3)
    pt = get_peft_model(
        copy.deepcopy(base), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    )
    return pt.eval()


def theorem_errors(rec) -> dict[str, float]:
    """Max abs errors of the theorem's identities for one layer, every head and query.

    Uses the frozen base head (q/k/v_frozen) on the tuned run's layer input:
      content pattern = (1 - alpha) A,   prefix pattern = alpha beta,
      z = (1 - alpha) A v + alpha beta V^p,   alpha = sigmoid(lse_p - lse_content).
    """
    q, k, v = (t.transpose(1, 2) for t in (rec.q_frozen, rec.k_frozen, rec.v_frozen))
    kp, vp = rec.prefix_k.transpose(1, 2), rec.prefix_v.transpose(1, 2)  # [B, H, P, dh]
    n, p = q.shape[2], kp.shape[2]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    s_c = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(~causal, -math.inf)
    s_p = q @ kp.transpose(-1, -2) / math.sqrt(q.shape[-1])
    A, beta = s_c.softmax(-1), s_p.softmax(-1)
    alpha = torch.sigmoid(s_p.logsumexp(-1) - s_c.logsumexp(-1))[..., None]  # [B, H, T, 1]
    z = (1 - alpha) * (A @ v) + alpha * (beta @ vp)
    return {
        "content": (rec.pattern[..., p:] - (1 - alpha) * A).abs().max().item(),
        "prefix": (rec.pattern[..., :p] - alpha * beta).abs().max().item(),
        "z": (rec.z.transpose(1, 2) - z).abs().max().item(),
        "alpha_range": (alpha.min().item(), alpha.max().item()),
    }


def local_drift(rec) -> float:
    """Max change of relative content attention: tuned layer vs the frozen base head."""
    p = rec.pattern.shape[-1] - rec.q.shape[1]
    content = rec.pattern[..., p:]
    tuned = content / content.sum(-1, keepdim=True)
    q, k = rec.q_frozen.transpose(1, 2), rec.k_frozen.transpose(1, 2)
    n = q.shape[2]
    s = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(
        ~torch.ones(n, n, dtype=torch.bool).tril(), -math.inf
    )
    return (tuned - s.softmax(-1)).abs().max().item()


def assert_identities(records):
    assert len(records) == L
    for rec in records:
        assert rec.q.shape == rec.z.shape == rec.q_frozen.shape == (B, T, H, DH)
        assert rec.prefix_k.shape == rec.prefix_v.shape == (B, P, H, DH)
        assert rec.pattern.shape == (B, H, T, P + T)
        assert rec.W_O.shape == (H, DH, D)
        errs = theorem_errors(rec)
        assert max(errs["content"], errs["prefix"], errs["z"]) < TOL, errs
        lo, hi = errs["alpha_range"]
        assert 0.05 < lo and hi < 0.95, errs  # both terms of the decomposition are exercised
        assert local_drift(rec) < TOL
        for a, b in ((rec.q, rec.q_frozen), (rec.k, rec.k_frozen), (rec.v, rec.v_frozen)):
            torch.testing.assert_close(a, b, rtol=0, atol=TOL)


def max_record_diff(r1, r2) -> float:
    names = ("q", "k", "v", "prefix_k", "prefix_v", "pattern", "z", "q_frozen", "W_O")
    return max(
        (getattr(a, n) - getattr(b, n)).abs().max().item()
        for a, b in zip(r1, r2, strict=True)
        for n in names
    )


def test_prefix_tuning_identities_hold_at_every_layer_and_head(base, tokens, prefix_model):
    records = hf.hf_records(base, tokens, prefix=prefix_model)
    assert_identities(records)
    # the prefix handed to the probes is PEFT's own: embedding.weight viewed [P, 2L, H, dh]
    raw = prefix_model.prompt_encoder["default"].embedding.weight.view(P, 2 * L, H, DH)
    for layer, rec in enumerate(records):
        assert torch.equal(rec.prefix_k[0], raw[:, 2 * layer])
        assert torch.equal(rec.prefix_v[1], raw[:, 2 * layer + 1])


def test_bridge_run_matches_peft_forward(base, tokens, prefix_model, prompt_model):
    with torch.no_grad():
        for pm, content in ((prefix_model, slice(None)), (prompt_model, slice(P, None))):
            kv = hf.hf_prefix(base, pm, B)
            logits, cache = hf.run_bridge(base, tokens, kv, position_offset=P)
            ref = pm(input_ids=tokens).logits[:, content]
            assert (logits - ref).abs().max().item() < TOL
            assert cache["pos_embed.hook_in"][0].tolist() == list(range(P, P + T))


def test_prompt_tuning_identities_hold(base, tokens, prompt_model):
    records = hf.hf_records(base, tokens, prefix=prompt_model)
    assert_identities(records)
    # the converted prefix is the prompt positions' own keys/values in the PEFT forward
    grabbed = []
    hooks = [
        blk.attn.c_attn.register_forward_hook(lambda m, i, o: grabbed.append(o.detach()))
        for blk in prompt_model.get_base_model().transformer.h
    ]
    try:
        with torch.no_grad():
            prompt_model(input_ids=tokens)
    finally:
        for h in hooks:
            h.remove()
    for rec, qkv in zip(records, grabbed, strict=True):
        k = qkv[:, :P, D : 2 * D].reshape(B, P, H, DH)
        assert (rec.prefix_k - k).abs().max().item() < TOL


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_check_hf_runs_every_probe(base, tokens, prefix_model, prompt_model, kind):
    adapter = prefix_model if kind == "prefix" else prompt_model
    result = hf.check_hf(base, tokens, prefix=adapter)
    assert result.ok, result.failures()
    assert result.expected == [True] * L
    for d, tol in zip(result.decompositions, result.pattern_tol, strict=True):
        assert d.pattern_error.max() < TOL and d.z_error.max() < TOL and tol < 1e-10
    assert max(drift.max_abs.max().item() for drift in result.local) < TOL
    # the base run at the same position ids: layer 0 sees the same input, later layers do not
    assert result.downstream[0].max_abs.max() < TOL
    assert result.downstream[1].max_abs.max() > 1e-6
    assert all(int(s.rank.max()) <= P for s in result.subspaces)
    assert len(result.rows()) == L * H


def test_a_peft_model_alone_is_base_plus_prefix(base, tokens, prefix_model):
    assert max_record_diff(hf.hf_records(prefix_model, tokens), hf.hf_records(
        base, tokens, prefix=prefix_model)) == 0.0  # fmt: skip


def test_raw_prefix_forms_agree_with_the_peft_adapter(base, tokens, prefix_model, prompt_model):
    ref = hf.hf_records(base, tokens, prefix=prefix_model)
    kv = [KVPrefix(r.prefix_k[0], r.prefix_v[0]) for r in ref]  # [P, H, dh]: our layout
    assert max_record_diff(ref, hf.hf_records(base, tokens, prefix=kv)) < TOL
    pairs = [(r.prefix_k, r.prefix_v) for r in ref]  # [B, P, H, dh]
    assert max_record_diff(ref, hf.hf_records(base, tokens, prefix=pairs)) < TOL
    cache = DynamicCache([(r.prefix_k.transpose(1, 2), r.prefix_v.transpose(1, 2)) for r in ref])
    assert max_record_diff(ref, hf.hf_records(base, tokens, prefix=cache)) < TOL
    assert cache.get_seq_length() == P  # the caller's cache is not extended
    # a raw soft prompt is the prompt-tuning adapter's prompt
    soft = prompt_model.get_prompt(1)[0].detach()  # [P, d_model]
    ref_pt = hf.hf_records(base, tokens, prefix=prompt_model)
    assert max_record_diff(ref_pt, hf.hf_records(base, tokens, prefix=soft)) < TOL


def test_finetuned_W_Q_W_K_is_detected(base, tokens, prefix_model):
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for blk in tuned.transformer.h:  # Conv1D [d_model, 3 d_model]: columns q | k | v
            blk.attn.c_attn.weight[:, : 2 * D] += 0.05 * torch.randn(D, 2 * D, generator=g).double()
    unchanged = hf.hf_records(base, tokens, prefix=prefix_model, tuned_model=copy.deepcopy(base))
    changed = hf.hf_records(base, tokens, prefix=prefix_model, tuned_model=tuned)
    assert max(local_drift(r) for r in unchanged) < TOL
    drifts = [local_drift(r) for r in changed]
    assert min(drifts) > 1e-4, drifts
    result = hf.check_hf(base, tokens, prefix=prefix_model, tuned_model=tuned)
    assert result.expected == [False] * L  # the theorem says nothing about a changed head
    assert min(d.max_abs.max().item() for d in result.local) > 1e-4
    # the tuned head itself still obeys the decomposition with its own q/k
    for r in changed:
        own = copy.copy(r)
        own.q_frozen, own.k_frozen, own.v_frozen = r.q, r.k, r.v
        assert max(theorem_errors(own)[n] for n in ("content", "prefix", "z")) < TOL


def test_lora_on_attention_is_detected(base, tokens):
    lora_cfg = LoraConfig(
        target_modules=["c_attn"], r=2, init_lora_weights=False, fan_in_fan_out=True
    )
    torch.manual_seed(5)
    lora = get_peft_model(copy.deepcopy(base), lora_cfg).eval()
    records = hf.hf_records(base, tokens, tuned_model=lora, position_offset=0)
    assert min(local_drift(r) for r in records) > 1e-4
    assert records[0].prefix_k is None and records[0].pattern.shape == (B, H, T, T)


def test_saved_adapters_load_and_match(base, tokens, prefix_model, prompt_model, tmp_path):
    for name, pm in (("prefix", prefix_model), ("prompt", prompt_model)):
        pm.save_pretrained(tmp_path / name)
        assert hf.is_peft_adapter_dir(tmp_path / name)
        ref = hf.hf_records(base, tokens, prefix=pm)
        assert max_record_diff(ref, hf.hf_records(base, tokens, prefix=tmp_path / name)) == 0.0
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / name).eval()
        assert max_record_diff(ref, hf.hf_records(base, tokens, prefix=loaded)) == 0.0
    base.save_pretrained(tmp_path / "model")
    assert hf.is_hf_model_dir(tmp_path / "model")
    assert not hf.is_hf_model_dir(tmp_path / "prefix")
    from_dirs = hf.hf_records_from_dirs(tmp_path / "model", tmp_path / "prefix", tokens)
    assert_identities(from_dirs)
    assert max_record_diff(hf.hf_records(base, tokens, prefix=prefix_model), from_dirs) == 0.0
    result = hf.check_hf_dirs(tmp_path / "model", tmp_path / "prompt", tokens)
    assert result.ok and result.expected == [True] * L


def test_our_model_dir_is_not_an_hf_dir(tmp_path):
    from probe.model import Transformer, preset

    Transformer(preset("tiny")).save(tmp_path / "ours")
    assert not hf.is_hf_model_dir(tmp_path / "ours")
    assert not hf.is_hf_model_dir(tmp_path / "missing")


def test_base_run_must_use_the_shifted_positions(base, tokens, prefix_model):
    """Layer 0 sees the same input with and without the prefix only at the same position ids."""
    tuned = hf.hf_records(base, tokens, prefix=prefix_model)[0]
    alpha = tuned.pattern[..., :P].sum(-1, keepdim=True)
    for offset, same in ((P, True), (0, False)):
        plain = hf.hf_records(base, tokens, position_offset=offset)[0]
        assert plain.prefix_k is None and plain.pattern.shape == (B, H, T, T)
        err = (tuned.pattern[..., P:] - (1 - alpha) * plain.pattern).abs().max().item()
        assert (err < TOL) == same, (offset, err)


def test_users_models_are_left_untouched(base, tokens, prefix_model):
    keys = list(base.state_dict())
    before = {n: t.clone() for n, t in base.state_dict().items()}
    hf.hf_records(base, tokens, prefix=prefix_model)
    assert list(base.state_dict()) == keys  # the bridge was built on a copy
    assert all(torch.equal(before[n], t) for n, t in base.state_dict().items())
    assert type(base.transformer.h[0]).__name__ == "GPT2Block"


def test_errors_name_the_problem(base, tokens, prefix_model):
    with pytest.raises(ValueError, match="layout"):
        hf.hf_records(base, tokens, prefix=[(torch.zeros(P, DH, H), torch.zeros(P, DH, H))] * L)
    with pytest.raises(ValueError, match="n_layer"):
        hf.hf_records(base, tokens, prefix=[(torch.zeros(P, H, DH), torch.zeros(P, H, DH))])
    with pytest.raises(ValueError, match="n_positions"):
        hf.hf_records(base, torch.zeros(1, 63, dtype=torch.long), prefix=prefix_model)
    with pytest.raises(ValueError, match="token ids"):
        hf.hf_records(base, torch.full((1, 4), V), prefix=prefix_model)
    with pytest.raises(FileNotFoundError, match="adapter"):
        hf.hf_records(base, tokens, prefix="/nonexistent/adapter")
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        hf.hf_records(base.transformer, tokens)


def test_missing_extra_says_what_to_install(monkeypatch, base, tokens):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(hf.MissingExtraError, match=r"prefix-probe\[hf\]"):
        hf.hf_records(base, tokens)


def test_probe_imports_the_hf_stack_only_lazily(monkeypatch):
    """No module of probe/ imports peft or transformers at import time; probe.hf imports fine
    without peft."""
    for path in Path(probe.__file__).parent.glob("*.py"):
        for node in ast.parse(path.read_text()).body:  # top-level statements only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            bad = [n for n in names if n.split(".")[0] in ("peft", "transformers")]
            assert not bad, f"{path.name} imports {bad} at import time"
    monkeypatch.setitem(sys.modules, "peft", None)  # a fresh copy of probe/hf.py, peft blocked
    spec = importlib.util.spec_from_file_location("_hf_without_peft", hf.__file__)
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, fresh)
    spec.loader.exec_module(fresh)
    assert fresh.is_hf_model_dir("/nonexistent") is False
    with pytest.raises(fresh.MissingExtraError, match=r"prefix-probe\[hf\]"):
        fresh.require_hf()


def test_check_theorem_dirs_takes_every_kind_of_adapter(base, tokens, prefix_model, tmp_path):
    base.save_pretrained(tmp_path / "model")
    prefix_model.save_pretrained(tmp_path / "prefix")
    lora_cfg = LoraConfig(
        target_modules=["c_attn"], r=2, init_lora_weights=False, fan_in_fan_out=True
    )
    get_peft_model(copy.deepcopy(base), lora_cfg).save_pretrained(tmp_path / "lora")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.transformer.h[1].attn.c_attn.weight[:, :D] *= 1.5  # W_Q of layer 1 only
    tuned.save_pretrained(tmp_path / "finetuned")
    model = tmp_path / "model"

    result, what, *_ = hf.check_theorem_dirs(model, tmp_path / "prefix", tokens)
    assert result.ok and result.expected == [True] * L and "PREFIX_TUNING" in what
    result, what, *_ = hf.check_theorem_dirs(model, None, tokens, prefix_len=2, seed=1)
    assert result.ok and result.decompositions[0].P == 2 and "random" in what
    result, what, *_ = hf.check_theorem_dirs(model, tmp_path / "lora", tokens)
    assert result.expected == [False] * L and "LORA" in what
    assert min(d.max_abs.max().item() for d in result.local) > 1e-4
    result, what, *_ = hf.check_theorem_dirs(model, tmp_path / "finetuned", tokens)
    assert what == "a fine-tuned model"
    assert [d.max_abs.max().item() > 1e-4 for d in result.local] == [False, True]
    with pytest.raises(FileNotFoundError, match="neither"):
        hf.check_theorem_dirs(model, tmp_path, tokens)


def test_check_theorem_command_on_hf_dirs(base, prefix_model, tmp_path, capsys):
    from probe.cli import main

    base.save_pretrained(tmp_path / "model")
    prefix_model.save_pretrained(tmp_path / "prefix")
    lora_cfg = LoraConfig(
        target_modules=["c_attn"], r=2, init_lora_weights=False, fan_in_fan_out=True
    )
    get_peft_model(copy.deepcopy(base), lora_cfg).save_pretrained(tmp_path / "lora")
    cmd = ["check-theorem", "--base", str(tmp_path / "model"), "--n", "8", "--task", "sort_asc"]

    assert main([*cmd, "--adapter", str(tmp_path / "prefix")]) == 0
    out = capsys.readouterr().out
    assert "a PEFT PREFIX_TUNING adapter, P=3" in out and "torch.float64" in out
    assert out.count(" ok ") == L * H and "FAIL" not in out
    assert main([*cmd, "--prefix-len", "2", "--dtype", "float32"]) == 0  # a random prefix
    out = capsys.readouterr().out
    assert "random key/value prefix, P=2" in out and out.count(" ok ") == L * H
    assert main([*cmd, "--adapter", str(tmp_path / "lora")]) == 0  # drift only
    assert "no prefix, so no identity applies" in capsys.readouterr().out
    assert main([*cmd, "--adapter", str(tmp_path)]) == 2
    assert "neither a saved PEFT adapter" in capsys.readouterr().err
