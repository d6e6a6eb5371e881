"""probe.hf on tiny random HF models (float64, offline): GPT-2, Llama, Qwen2, Mistral, GPT-NeoX,
with PEFT prefix, prompt and LoRA adapters, and raw prefixes.

The theorem's identities and the rotary positions are checked here with the maths written out
independently of probe.hf and the probes module, so a bug in the extraction cannot hide behind a
matching bug in a probe.
"""

import ast
import concurrent.futures
import copy
import dataclasses
import importlib.util
import json
import math
import subprocess
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
from transformers import (  # noqa: E402
    DynamicCache,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import probe  # noqa: E402
from probe import hf, probes  # noqa: E402
from probe.hf import arch as hf_arch  # noqa: E402
from probe.hf import check as hf_check  # noqa: E402
from probe.hf import prefix as hf_prefixes  # noqa: E402
from probe.hf import recording as hf_recording  # noqa: E402
from probe.hf import run as hf_run  # noqa: E402
from probe.model import KVPrefix  # noqa: E402

# PEFT calls a transformers API that transformers deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")

L, V, P, B, T = 2, 50, 3, 2, 6
TOL = 1e-12
ROPE_THETA = 10000.0


def make(arch: str, dtype=torch.float64, **over):
    """A tiny random model of one architecture (seeded)."""
    torch.manual_seed(0)
    llama = dict(num_hidden_layers=L, num_attention_heads=4, num_key_value_heads=2, hidden_size=32,
                 intermediate_size=48, vocab_size=V, max_position_embeddings=64,
                 bos_token_id=0, eos_token_id=0)  # fmt: skip
    if arch == "gpt2":
        kw = dict(
            n_layer=L,
            n_head=2,
            n_embd=32,
            vocab_size=V,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
        cfg = GPT2Config(**{**kw, **over})
        model = GPT2LMHeadModel(cfg)
    elif arch == "llama":  # grouped-query attention, no biases
        model = LlamaForCausalLM(LlamaConfig(**{**llama, **over}))
    elif arch == "qwen2":  # grouped-query attention with q/k/v biases
        model = Qwen2ForCausalLM(Qwen2Config(**{**llama, **over}))
        with torch.no_grad():  # HF initialises biases to 0: make them matter
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    proj.bias.normal_(0, 0.5)
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**{**llama, "num_key_value_heads": 1, **over}))
    elif arch == "neox":  # partial rotary (a quarter of d_head), parallel attention + MLP
        kw = dict(
            num_hidden_layers=L,
            num_attention_heads=4,
            hidden_size=32,
            intermediate_size=48,
            vocab_size=V,
            max_position_embeddings=64,
            rotary_pct=0.25,
            use_parallel_residual=True,
            bos_token_id=0,
            eos_token_id=0,
        )
        cfg = GPTNeoXConfig(**{**kw, **over})
        model = GPTNeoXForCausalLM(cfg)
    else:
        raise ValueError(arch)
    return model.eval().to(dtype)


ARCHS = ["gpt2", "llama", "qwen2", "mistral", "neox"]
ROTARY = ["llama", "qwen2", "mistral", "neox"]
LORA_QK = {"gpt2": ["c_attn"], "neox": ["query_key_value"]}


def lora_config(arch, **kw):
    targets = LORA_QK.get(arch, ["q_proj", "k_proj"])
    return LoraConfig(target_modules=targets, r=2, init_lora_weights=False,
                      fan_in_fan_out=arch == "gpt2", **kw)  # fmt: skip


@pytest.fixture(scope="module", params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def base(arch):
    return make(arch)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(1))


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
    with torch.no_grad():  # word-embedding scale: HF's random init gives tiny embeddings
        pt.prompt_encoder["default"].embedding.weight.normal_(0, 1.0)
    return pt.eval()


def dims(model):
    s = hf_arch._shape(model)
    return s.n_heads, s.n_kv_heads, s.d_head, s.d_model


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


def assert_identities(records, model):
    H, _, DH, D = dims(model)
    assert len(records) == L
    for rec in records:
        assert rec.q.shape == rec.z.shape == rec.q_frozen.shape == rec.k.shape == (B, T, H, DH)
        assert rec.prefix_k.shape == rec.prefix_v.shape == (B, P, H, DH)
        assert rec.pattern.shape == (B, H, T, P + T)
        assert rec.W_O.shape == (H, DH, D)
        errs = theorem_errors(rec)
        assert max(errs["content"], errs["prefix"], errs["z"]) < TOL, errs
        lo, hi = errs["alpha_range"]
        assert 0.02 < lo and hi < 0.98, errs  # both terms of the decomposition are exercised
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


def rope(x, positions, rot_dim):
    """Rotary embedding written from the definition: pairs (i, i + r/2) of the first r dims of
    x [b, T, n, e] turn by position * theta^(-2i/r)."""
    inv = ROPE_THETA ** (-torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    ang = positions.double()[:, None] * inv[None]  # [T, r/2]
    c, s = ang.cos()[None, :, None], ang.sin()[None, :, None]
    h = rot_dim // 2
    x1, x2, rest = x[..., :h], x[..., h:rot_dim], x[..., rot_dim:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)


def raw_qk(model, layer, x):
    """The layer's un-rotated q, k [b, T, heads, e] straight from the weights (our own reading)."""
    H, G, DH, _ = dims(model)
    if isinstance(model, GPTNeoXForCausalLM):
        qkv = (
            model.gpt_neox.layers[layer].attention.query_key_value(x).view(*x.shape[:2], H, 3 * DH)
        )
        return qkv[..., :DH], qkv[..., DH : 2 * DH]
    attn = model.model.layers[layer].self_attn
    return attn.q_proj(x).view(*x.shape[:2], H, DH), attn.k_proj(x).view(*x.shape[:2], G, DH)


def rot_dim(model):
    DH = dims(model)[2]
    return int(DH * 0.25) if isinstance(model, GPTNeoXForCausalLM) else DH


def raw_prefix(pm, model, layer):
    """PEFT's stored prefix keys and values [P, G, e] of one layer, straight from its weights."""
    _, G, DH, _ = dims(model)
    w = pm.prompt_encoder["default"].embedding.weight.view(P, 2 * L, G, DH)
    return w[:, 2 * layer], w[:, 2 * layer + 1]


# ------------------------------------------------------------------ the theorem, every arch


def test_prefix_tuning_identities_hold_at_every_layer_and_head(base, tokens, prefix_model):
    records = hf.hf_records(base, tokens, prefix=prefix_model)
    assert_identities(records, base)
    # the prefix handed to the probes is PEFT's own, as stored: never rotated; GQA repeats it
    H, G, _, _ = dims(base)
    for layer, rec in enumerate(records):
        k, v = raw_prefix(prefix_model, base, layer)
        assert torch.equal(rec.prefix_k[0], k.repeat_interleave(H // G, dim=1))
        assert torch.equal(rec.prefix_v[1], v.repeat_interleave(H // G, dim=1))


def test_prompt_tuning_identities_hold(base, tokens, prompt_model):
    assert_identities(hf.hf_records(base, tokens, prefix=prompt_model), base)


@pytest.mark.parametrize("name", ROTARY)
def test_rotary_positions_content_at_P_prefix_unrotated(name, tokens):
    """Content queries/keys are rotated at positions P..P+T-1 (PEFT's convention); prefix-tuning
    keys are PEFT's cached values, unrotated (they score as keys at position 0); prompt-tuning
    keys are the virtual tokens' keys rotated at 0..P-1."""
    model = make(name)
    torch.manual_seed(2)
    pm = get_peft_model(copy.deepcopy(model), PrefixTuningConfig(task_type="CAUSAL_LM",
                        num_virtual_tokens=P)).eval()  # fmt: skip
    cache = hf.hf_cache(model, tokens, prefix=pm)
    H, G, DH, _ = dims(model)
    r = rot_dim(model)
    content_pos = torch.arange(P, P + T)
    ANGLE = 1e-6  # HF computes rotary angles in float32 even for a float64 model
    for layer in range(L):
        x = cache[f"blocks.{layer}.ln1.hook_out"]
        q, k = raw_qk(model, layer, x)
        q_rot = cache[f"blocks.{layer}.attn.hook_rot_q"]
        k_rot = cache[f"blocks.{layer}.attn.hook_rot_k"]
        assert (q_rot - rope(q, content_pos, r)).abs().max() < ANGLE
        assert (k_rot - rope(k, content_pos, r).repeat_interleave(H // G, 2)).abs().max() < ANGLE
        assert (q_rot - rope(q, content_pos - 1, r)).abs().max() > 1e-3  # positions matter
        pk = raw_prefix(pm, model, layer)[0].repeat_interleave(H // G, 1)
        assert torch.equal(cache[f"blocks.{layer}.attn.hook_prefix_k"][0], pk)
    # prompt tuning: layer 0's prefix keys are the virtual tokens' keys rotated at 0..P-1
    torch.manual_seed(3)
    pt = get_peft_model(copy.deepcopy(model), PromptTuningConfig(task_type="CAUSAL_LM",
                        num_virtual_tokens=P)).eval()  # fmt: skip
    cache = hf.hf_cache(model, tokens, prefix=pt)
    emb = pt.prompt_encoder["default"].embedding.weight[None].double()  # [1, P, d]
    norm = (model.gpt_neox.layers[0] if name == "neox" else model.model.layers[0]).input_layernorm
    _, k = raw_qk(model, 0, norm(emb))
    want = rope(k, torch.arange(P), r).repeat_interleave(H // G, 2)
    assert (cache["blocks.0.attn.hook_prefix_k"][:1] - want).abs().max() < ANGLE


def test_hf_cache_uses_transformerlens_names(base, tokens, prefix_model):
    cache = hf.hf_cache(base, tokens, prefix=prefix_model)
    q = "hook_rot_q" if hf_arch._architecture(base).rotary else "hook_q"
    for layer in range(L):
        for n in ("ln1.hook_out", f"attn.{q}", "attn.hook_v", "attn.hook_pattern", "attn.hook_z",
                  "attn.hook_prefix_k", "attn.hook_prefix_v"):  # fmt: skip
            assert f"blocks.{layer}.{n}" in cache
    rec = hf.hf_records(base, tokens, prefix=prefix_model, verify=False)[1]
    assert torch.equal(cache[f"blocks.1.attn.{q}"], rec.q)


# ------------------------------------------------------------------ against PEFT's own forward


@pytest.mark.parametrize("kind", ["prefix", "prompt", "lora"])
def test_recording_run_equals_peft_forward_and_generate(base, tokens, prefix_model, prompt_model,
                                                         kind, arch):  # fmt: skip
    if kind == "lora":
        torch.manual_seed(5)
        model = get_peft_model(copy.deepcopy(base), lora_config(arch)).eval()
        s, offset = hf_run._prepared(base, None, model, tokens, None)
    else:
        model = prefix_model if kind == "prefix" else prompt_model
        s, offset = hf_run._prepared(base, model, None, tokens, None)
    ours = hf_run._run(s, tokens, offset, slice(None), lambda r: None, keep=0)
    with torch.no_grad():
        ref = model(input_ids=tokens).logits  # PEFT's own forward, its default attention
    ref = ref[:, P:] if kind == "prompt" else ref
    assert ours.shape == (B, T, V) and (ours - ref).abs().max() < TOL
    how = "tuned_model" if kind == "lora" else "prefix"
    with torch.no_grad():  # greedy steps agree with generate (verify_hf raises otherwise)
        assert hf.verify_hf(base, tokens, **{how: model}, steps=3) < TOL


def test_verify_detects_a_position_convention_change(base, tokens, prefix_model):
    """A raw copy of PEFT's prefix run at positions P.. equals PEFT's forward; at 0.. it does not
    (on a rotary model the scores change; on GPT-2 the position embeddings do)."""
    kv = hf.hf_prefix(base, prefix_model, B)
    with torch.no_grad():
        ref = prefix_model(input_ids=tokens).logits
    for offset, same in ((P, True), (0, False)):
        s, off = hf_run._prepared(base, kv, None, tokens, offset)
        err = (hf_run._run(s, tokens, off, slice(None), lambda r: None, keep=0) - ref).abs().max()
        assert (err < TOL) == same, (offset, err)


# ------------------------------------------------------------------ the whole check


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_check_hf_confirms_the_theorem(base, tokens, prefix_model, prompt_model, kind):
    adapter = prefix_model if kind == "prefix" else prompt_model
    H = dims(base)[0]
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
    assert any(int(s.change_rank.max()) > P for s in result.subspaces)  # the rank bound is real
    assert len(result.rows()) == L * H
    assert probes.check_tuned(base, adapter, tokens).rows() == result.rows()  # the one entry


def test_lora_on_q_k_is_detected_as_a_violation(base, tokens, prefix_model, arch):
    """LoRA on W_Q/W_K changes relative attention: local drift > 0, no identity is expected, and
    forcing the prefix identities on such a layer fails them."""
    torch.manual_seed(5)
    lora = get_peft_model(copy.deepcopy(base), lora_config(arch)).eval()
    result = hf.check_hf(base, tokens, tuned_model=lora)
    assert result.expected == [False] * L
    assert min(d.max_abs.max().item() for d in result.local) > 1e-4
    # a prefix on top of the LoRA model: the frozen head's identities fail at every layer
    kv = hf.hf_prefix(base, prefix_model, B)
    hybrid = hf.hf_records(base, tokens, prefix=kv, tuned_model=lora)
    assert min(theorem_errors(r)["content"] for r in hybrid) > 1e-4
    check = probes.check_theorem(hybrid, expected=[True] * L)
    assert not check.ok and len(check.failures()) >= L
    # the tuned head still obeys the decomposition with its own q/k
    for r in hybrid:
        own = copy.copy(r)
        own.q_frozen, own.k_frozen, own.v_frozen = r.q, r.k, r.v
        assert max(theorem_errors(own)[n] for n in ("content", "prefix", "z")) < TOL


def test_lora_on_v_only_keeps_attention(tokens):
    """LoRA on W_V alone moves no pattern: the head's input side q/k is unchanged... but v is, so
    the layer is not frozen; local drift (patterns only) stays 0."""
    base = make("llama")
    torch.manual_seed(6)
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(target_modules=["v_proj"], r=2,
                          init_lora_weights=False)).eval()  # fmt: skip
    result = hf.check_hf(base, tokens, tuned_model=lora)
    assert result.expected == [False] * L
    assert max(d.max_abs.max().item() for d in result.local) < TOL


def test_chunked_check_equals_one_chunk_and_the_probes(tokens):
    base = make("llama")
    torch.manual_seed(2)
    pm = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM",
                        num_virtual_tokens=P)).eval()  # fmt: skip
    one = hf.check_hf(base, tokens, prefix=pm, chunk=B)
    per_input = hf.check_hf(base, tokens, prefix=pm, chunk=1, verify=False)
    records = hf.hf_records(base, tokens, prefix=pm)
    base_records = hf.hf_records(base, tokens, position_offset=P)
    full = probes.check_theorem(records, base_records)
    for res in (one, per_input):
        for a, f in zip(res.subspaces, full.subspaces, strict=True):
            assert torch.equal(a.rank, f.rank) and torch.equal(a.change_rank, f.change_rank)
            torch.testing.assert_close(a.singular_values[:, :P], f.singular_values[:, :P])
            torch.testing.assert_close(a.change_singular_values[:, :4],
                                       f.change_singular_values[:, :4])  # fmt: skip
        for kind in ("local", "downstream"):
            for a, f in zip(getattr(res, kind), getattr(full, kind), strict=True):
                torch.testing.assert_close(a.tv_mean, f.tv_mean)
                torch.testing.assert_close(a.max_abs, f.max_abs)
        for a, f in zip(res.decompositions, full.decompositions, strict=True):
            torch.testing.assert_close(a.alpha.mean((0, 2)), f.alpha.mean((0, 2)))
        assert [r["bias_rank"] for r in res.rows()] == [r["bias_rank"] for r in full.rows()]


def test_chunk_size_keeps_activations_to_a_fraction_of_the_model():
    model = make("gpt2", dtype=torch.float32)
    n = hf.chunk_size(model, T=19)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 1 <= n and (n == 1 or n * 2 * 16 * 19 * 32 * 4 <= size / 24)
    with torch.device("meta"):  # GPT-2 small's shape, no memory: 11 inputs of 19 tokens a chunk
        small = GPT2LMHeadModel(GPT2Config())
    assert hf.chunk_size(small, T=19) == 11


# ------------------------------------------------------------------ what the check computes


def test_frozen_head_recomputed_where_the_run_uses_other_modules(base, tokens, prefix_model,
                                                                 arch):  # fmt: skip
    """A prefix leaves the base's own head modules in the run: the check recomputes the frozen
    head on the first input of a chunk and the recorded q/k/v stand for it on the others (the
    same call on the same input). A PEFT model on a copy of the base, or a LoRA on W_Q/W_K
    (wrapping them), runs other modules: recomputed on every input."""
    assert hf_run._prepared(base, prefix_model, None, tokens, None)[0].own_head == [False] * L
    kv = hf.hf_prefix(base, prefix_model, B)  # the same prefix, run by the base's own modules
    s, offset = hf_run._prepared(base, kv, None, tokens, None)
    assert s.own_head == [True] * L
    full, reused = [], []
    hf_run._run(s, tokens, offset, slice(None), full.append)
    hf_run._run(s, tokens, offset, slice(None), reused.append, recompute=1)
    for f, r in zip(full, reused, strict=True):
        # Recomputed from the base weights; a batch of one and a batch of B may take different
        # GEMM kernels, which round differently in the last bit on some CPUs.
        torch.testing.assert_close(r.q_frozen[:1], f.q_frozen[:1], rtol=0, atol=1e-15)
        for n in "qkv":
            assert torch.equal(getattr(r, f"{n}_frozen")[1:], getattr(r, n)[1:])
            torch.testing.assert_close(getattr(f, f"{n}_frozen"), getattr(f, n), rtol=0, atol=TOL)
    torch.manual_seed(5)
    lora = get_peft_model(copy.deepcopy(base), lora_config(arch)).eval()
    assert hf_run._prepared(base, None, lora, tokens, None)[0].own_head == [False] * L


def test_a_wrong_frozen_head_still_fails_the_chunked_check(base, tokens, prefix_model, arch,
                                                           monkeypatch):  # fmt: skip
    """The recomputation is a real check: reading the frozen head wrongly (here: its queries
    scaled by 1.01) fails the identities in chunks of one input and in one chunk of all."""
    a = hf_arch.ARCHITECTURES[type(base).__name__]

    def wrong_qkv(attn, x, shape):
        q, k, v = a.qkv(attn, x, shape)
        return 1.01 * q, k, v

    kv = hf.hf_prefix(base, prefix_model, B)  # run by the base's own modules
    assert hf.check_hf(base, tokens, prefix=kv, chunk=B).ok
    monkeypatch.setitem(hf_arch.ARCHITECTURES, type(base).__name__,
                        dataclasses.replace(a, qkv=wrong_qkv))  # fmt: skip
    for chunk in (1, B):
        res = hf.check_hf(base, tokens, prefix=kv, chunk=chunk, verify=False)
        assert not res.ok and len(res.failures()) >= L


def test_check_runs_nothing_after_the_last_attention_and_keeps_no_cache(tokens, prefix_model,
                                                                        base):  # fmt: skip
    """The check's runs end at the last layer's attention (its MLP, the final norm and the
    logits are never computed), and a recording run's cache returns [prefix, new] keys without
    keeping them (so a run never holds every layer's keys and values for its whole batch)."""
    last = hf_arch._architecture(base).layers(base)[-1]
    mlp = next(m for n, m in last.named_children() if n == "mlp")

    def boom(*_):
        raise AssertionError("the last MLP ran")

    handle = mlp.register_forward_pre_hook(boom)
    try:
        with pytest.raises(AssertionError, match="last MLP"):
            base(input_ids=tokens)
        assert hf.check_hf(base, tokens, prefix=prefix_model, verify=False).ok
    finally:
        handle.remove()
    kv = hf.hf_prefix(base, prefix_model, B)
    cache = hf_prefixes._fresh_cache(kv)
    layer = cache.layers[0]
    hf_recording._stop_growing(layer)
    new = torch.zeros_like(layer.keys[:, :, :1])
    keys, _ = cache.update(new, new, 0)
    assert keys.shape[2] == P + 1 and cache.get_seq_length() == P
    assert torch.equal(keys[:, :, :P], layer.keys)


class _OneThreadPool:
    """A stand-in for ThreadPoolExecutor that runs each task at once, on the calling thread."""

    def __init__(self, *_, initializer=None, initargs=()):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *_):
        return False

    def submit(self, fn, *args):
        future = concurrent.futures.Future()
        future.set_result(fn(*args))
        return future


def test_base_runs_on_a_second_thread_give_the_same_check(tokens, monkeypatch):
    """With a prefix the base runs go on a second thread and the probes on a third (one
    intra-op thread each): the same numbers as one thread doing everything, and the caller's
    thread count and grad mode are back after."""
    base = make("llama")
    torch.manual_seed(2)
    pm = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM",
                        num_virtual_tokens=P)).eval()  # fmt: skip
    threads = torch.get_num_threads()
    two = hf.check_hf(base, tokens, prefix=pm, chunk=1)
    assert torch.get_num_threads() == threads and torch.is_grad_enabled()
    monkeypatch.setattr(hf_check, "ThreadPoolExecutor", _OneThreadPool)
    one = hf.check_hf(base, tokens, prefix=pm, chunk=1)
    for kind in ("local", "downstream"):
        for a, b in zip(getattr(one, kind), getattr(two, kind), strict=True):
            assert torch.equal(a.max_abs, b.max_abs) and torch.equal(a.tv_mean, b.tv_mean)
    for a, b in zip(one.subspaces, two.subspaces, strict=True):
        assert torch.equal(a.singular_values, b.singular_values)
    assert one.downstream[1].max_abs.max() > 1e-6  # the base run's patterns really arrived


def test_verification_sees_content_tokens_equal_to_the_pad_id(arch):
    """verify_hf gives generate pad_token_id=0, and toy-task inputs contain token 0. Where the
    model's eos id is not 0 (GPT-2's is 50256), generate would infer a mask hiding every such
    token, and the CLI's check of every PEFT adapter failed on sort_asc inputs."""
    base = make(arch, eos_token_id=V - 1)
    ids = torch.randint(1, V - 1, (B, T), generator=torch.Generator().manual_seed(4))
    ids[:, 1::2] = 0
    torch.manual_seed(5)
    adapted = [
        get_peft_model(copy.deepcopy(base), config).eval()
        for config in (
            PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
            PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
            lora_config(arch),
        )
    ]
    with torch.no_grad():  # a prompt of word-embedding scale (HF's init makes it tiny)
        adapted[1].prompt_encoder["default"].embedding.weight.normal_(0, 1.0)
    for model, how in zip(adapted, ("prefix", "prefix", "tuned_model"), strict=True):
        assert len(hf.hf_records(base, ids, **{how: model})) == L  # raises on a mismatch


def test_the_cli_check_copies_no_model(tmp_path, monkeypatch):
    """check_theorem_dirs runs the loaded model's own modules: no module is deep-copied, with a
    random prefix or a saved adapter."""
    base = make("gpt2", dtype=torch.float32)
    base.save_pretrained(tmp_path / "model")
    torch.manual_seed(2)
    get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM",
                   num_virtual_tokens=P)).save_pretrained(tmp_path / "prefix")  # fmt: skip

    def no_copy(module, memo):
        raise AssertionError(f"deepcopy of a {type(module).__name__}")

    monkeypatch.setattr(torch.nn.Module, "__deepcopy__", no_copy, raising=False)
    ids = torch.randint(1, V, (8, T), generator=torch.Generator().manual_seed(1))
    for adapter in (None, tmp_path / "prefix"):
        assert hf.check_theorem_dirs(tmp_path / "model", adapter, ids).result.ok


# ------------------------------------------------------------------ prefix forms, dirs


def test_a_peft_model_alone_is_base_plus_prefix(base, tokens, prefix_model):
    assert max_record_diff(hf.hf_records(prefix_model, tokens), hf.hf_records(
        base, tokens, prefix=prefix_model)) == 0.0  # fmt: skip


def test_raw_prefix_forms_agree_with_the_peft_adapter(base, tokens, prefix_model, prompt_model):
    H, G, _, _ = dims(base)
    ref = hf.hf_records(base, tokens, prefix=prefix_model)
    kv = [KVPrefix(r.prefix_k[0, :, :: H // G], r.prefix_v[0, :, :: H // G]) for r in ref]
    assert max_record_diff(ref, hf.hf_records(base, tokens, prefix=kv)) < TOL  # [P, G, e]
    pairs = [(p.keys.expand(B, -1, -1, -1), p.values.expand(B, -1, -1, -1)) for p in kv]
    assert max_record_diff(ref, hf.hf_records(base, tokens, prefix=pairs)) < TOL
    cache = DynamicCache([(k.transpose(1, 2), v.transpose(1, 2)) for k, v in pairs])
    assert max_record_diff(ref, hf.hf_records(base, tokens, prefix=cache)) < TOL
    assert cache.get_seq_length() == P  # the caller's cache is not extended
    soft = prompt_model.get_prompt(1)[0].detach()  # [P, d_model]: the prompt adapter's prompt
    ref_pt = hf.hf_records(base, tokens, prefix=prompt_model)
    assert max_record_diff(ref_pt, hf.hf_records(base, tokens, prefix=soft)) < TOL


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
    assert_identities(from_dirs, base)
    result = hf.check_hf_dirs(tmp_path / "model", tmp_path / "prompt", tokens)
    assert result.ok and result.expected == [True] * L


def test_our_model_and_adapter_dirs_are_not_hf_or_peft_dirs(tmp_path, prefix_model):
    from probe.adapters import make_adapter
    from probe.model import Transformer, preset

    ours = Transformer(preset("tiny"))
    ours.save(tmp_path / "ours")
    make_adapter("prefix", ours).save(tmp_path / "our_adapter", ours)
    assert not hf.is_hf_model_dir(tmp_path / "ours")
    assert not hf.is_hf_model_dir(tmp_path / "missing")
    assert not hf.is_peft_adapter_dir(tmp_path / "our_adapter")  # same file name, ours
    assert not hf.is_peft_adapter_dir(tmp_path / "missing")
    prefix_model.save_pretrained(tmp_path / "peft")
    assert hf.is_peft_adapter_dir(tmp_path / "peft")


def test_users_models_are_left_untouched(base, tokens, prefix_model, arch, tmp_path):
    before = {n: t.clone() for n, t in base.state_dict().items()}
    types = [type(m) for m in base.modules()]
    impl = base.config._attn_implementation
    hf.hf_records(base, tokens, prefix=prefix_model)
    torch.manual_seed(5)
    lora = get_peft_model(copy.deepcopy(base), lora_config(arch)).eval()
    hf.check_hf(base, tokens, tuned_model=lora)
    prefix_model.save_pretrained(tmp_path / "prefix")
    hf.hf_records(base, tokens, prefix=tmp_path / "prefix")
    assert [type(m) for m in base.modules()] == types and base.config._attn_implementation == impl
    assert all(torch.equal(before[n], t) for n, t in base.state_dict().items())


def test_lora_injected_into_the_base_itself(tokens):
    """get_peft_model(base) wraps base's own modules: the frozen head is read from base_layer and
    the base run switches the adapter off."""
    base = make("llama")
    ref = hf.check_hf(base, tokens, tuned_model=get_peft_model(
        copy.deepcopy(base), lora_config("llama")).eval())  # fmt: skip
    torch.manual_seed(0)  # same LoRA init as inside copy: reseed to rebuild it identically
    base2 = make("llama")
    in_place = get_peft_model(base2, lora_config("llama")).eval()
    res = hf.check_hf(base2, tokens, tuned_model=in_place)
    assert res.expected == [False] * L
    assert min(d.max_abs.max().item() for d in res.local) > 1e-4
    for a, b in zip(res.downstream, ref.downstream, strict=True):
        assert a.max_abs.max() > 1e-4 and b.max_abs.max() > 1e-4


# ------------------------------------------------------------------ errors (one line each)


def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def test_D1_prefix_adapter_for_another_width(base, tokens, tmp_path, arch):
    other = make(arch, hidden_size=48) if arch != "gpt2" else make(arch, n_embd=48)
    pm = get_peft_model(other, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    with pytest.raises(ValueError, match="another model shape") as e:
        hf.check_hf(base, tokens, prefix=pm)
    assert "token_dim" in one_line(e)
    pm.save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="another model shape") as e:
        hf.hf_records(base, tokens, prefix=tmp_path / "wide")
    one_line(e)


def test_D2_lora_adapter_for_another_width(tokens, tmp_path):
    base = make("llama")
    get_peft_model(make("llama", hidden_size=48), lora_config("llama")).save_pretrained(
        tmp_path / "lora")  # fmt: skip
    with pytest.raises(ValueError, match="does not fit the base model") as e:
        hf.load_peft_adapter(base, tmp_path / "lora")
    assert "size mismatch" in one_line(e)
    assert not any(hasattr(m, "base_layer") for m in base.modules())  # injection undone


def test_D3_missing_or_truncated_weights(tmp_path, capsys):
    from probe.cli import main

    base = make("gpt2")
    base.save_pretrained(tmp_path / "m")
    capsys.readouterr()
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="missing or truncated") as e:
        hf.load_hf_model(tmp_path / "m")
    one_line(e)
    weights.unlink()
    with pytest.raises(ValueError, match="missing or truncated"):
        hf.load_hf_model(tmp_path / "m")
    assert main(["check-theorem", "--base", str(tmp_path / "m"), "--n", "2"]) == 2
    err = capsys.readouterr().err
    assert "missing or truncated" in err and err.count("\n") == 1


def test_D4_reorder_and_upcast_attn_rejected(tokens):
    model = make("gpt2", reorder_and_upcast_attn=True)
    with pytest.raises(ValueError, match="reorder_and_upcast_attn") as e:
        hf.hf_records(model, tokens)
    one_line(e)


def test_D5_base_and_peft_model_in_different_dtypes(tokens):
    base32 = make("gpt2", dtype=torch.float32)
    pm = get_peft_model(copy.deepcopy(base32).double(), PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P))  # fmt: skip
    with pytest.raises(ValueError, match="float32 but the tuned/PEFT model torch.float64") as e:
        hf.check_hf(base32, tokens, prefix=pm)
    one_line(e)
    # same values in one dtype: every layer is frozen and checked
    res = hf.check_hf(base32.double(), tokens, prefix=pm.eval())
    assert res.expected == [True] * L and res.ok


def test_adapter_for_another_architecture(tokens, tmp_path):
    """A Llama prefix adapter of matching shapes on a GPT-2 base: named, not run silently."""
    llama = make("llama", num_key_value_heads=2)
    llama.save_pretrained(tmp_path / "llama")
    llama = LlamaForCausalLM.from_pretrained(tmp_path / "llama")  # name_or_path = the dir
    pm = get_peft_model(llama, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    pm.save_pretrained(tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["base_model_name_or_path"] == str(tmp_path / "llama")
    gpt2 = make("gpt2", n_head=2)
    with pytest.raises(ValueError, match="made for a llama model") as e:
        hf.hf_records(gpt2, tokens, prefix=tmp_path / "adapter")
    one_line(e)


def test_errors_name_the_problem(base, tokens, prefix_model, arch):
    H, G, DH, _ = dims(base)
    with pytest.raises(ValueError, match="layout"):
        hf.hf_records(base, tokens, prefix=[(torch.zeros(P, DH, G), torch.zeros(P, DH, G))] * L)
    with pytest.raises(ValueError, match="layers"):
        hf.hf_records(base, tokens, prefix=[(torch.zeros(P, G, DH), torch.zeros(P, G, DH))])
    with pytest.raises(ValueError, match="positions"):
        hf.hf_records(base, torch.zeros(1, 63, dtype=torch.long), prefix=prefix_model)
    with pytest.raises(ValueError, match="token ids"):
        hf.hf_records(base, torch.full((1, 4), V), prefix=prefix_model)
    with pytest.raises(FileNotFoundError, match="adapter"):
        hf.hf_records(base, tokens, prefix="/nonexistent/adapter")
    with pytest.raises(ValueError, match="AutoModelForCausalLM"):
        hf.hf_records(base.base_model, tokens)


def test_missing_extra_says_what_to_install(monkeypatch, tokens, tmp_path):
    """Without peft a plain model is still probed (only adapters need it) and an adapter says
    what to install; without transformers nothing HF runs."""
    base = make("gpt2")
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    assert len(hf.hf_records(base, tokens)) == L
    with pytest.raises(hf.MissingExtraError, match=r"prefix-probe\[hf\]"):
        hf.load_peft_adapter(base, tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(hf.MissingExtraError, match=r"prefix-probe\[hf\]"):
        hf.hf_records(base, tokens)


def test_probe_imports_the_hf_stack_only_lazily(monkeypatch):
    """No module of probe/ (the probe.hf package's included) imports peft or transformers at
    import time; probe.hf imports fine without peft."""
    paths = sorted(Path(probe.__file__).parent.rglob("*.py"))
    assert Path(hf_run.__file__) in paths and Path(hf.__file__) in paths
    for path in paths:
        for node in ast.parse(path.read_text()).body:  # top-level statements only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            bad = [n for n in names if n.split(".")[0] in ("peft", "transformers")]
            assert not bad, f"{path.name} imports {bad} at import time"
    monkeypatch.setitem(sys.modules, "peft", None)  # a fresh import of probe.hf, peft blocked
    for name in [m for m in sys.modules if m == "probe.hf" or m.startswith("probe.hf.")]:
        monkeypatch.delitem(sys.modules, name)  # put back after the test
    monkeypatch.setattr(probe, "hf", hf)  # the fresh import rebinds probe.hf; put back after
    fresh = importlib.import_module("probe.hf")
    assert fresh is not hf and fresh.loading is not hf.loading
    assert fresh.is_hf_model_dir("/nonexistent") is False
    with pytest.raises(fresh.MissingExtraError, match=r"prefix-probe\[hf\]"):
        fresh.require_hf()
    assert fresh.require_hf(peft=False).peft is None  # a plain model needs only transformers


# ------------------------------------------------------------------ directories and the CLI


def save_tokenizer(path: Path) -> list[str]:
    """A tiny word-level tokenizer (ids < V) saved next to a model; -> its words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the cat sat on a mat and dog ran far".split()
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    return words


def test_check_theorem_dirs_takes_every_kind_of_adapter(tokens, tmp_path):
    base = make("llama")
    base.save_pretrained(tmp_path / "model")
    torch.manual_seed(2)
    get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM",
                   num_virtual_tokens=P)).save_pretrained(tmp_path / "prefix")  # fmt: skip
    get_peft_model(copy.deepcopy(base), lora_config("llama")).save_pretrained(tmp_path / "lora")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.model.layers[1].self_attn.q_proj.weight.mul_(1.5)  # W_Q of layer 1 only
    tuned.save_pretrained(tmp_path / "finetuned")
    model = tmp_path / "model"

    run = hf.check_theorem_dirs(model, tmp_path / "prefix", tokens)
    assert run.result.ok and run.result.expected == [True] * L and "PREFIX_TUNING" in run.what
    assert "unrotated" in run.positions and f"{P}..{P + T - 1}" in run.positions
    run = hf.check_theorem_dirs(model, None, tokens, prefix_len=2, seed=1)
    assert run.result.ok and run.result.decompositions[0].P == 2 and "random" in run.what
    run = hf.check_theorem_dirs(model, tmp_path / "lora", tokens)
    assert run.result.expected == [False] * L and "LORA" in run.what
    assert min(d.max_abs.max().item() for d in run.result.local) > 1e-4
    run = hf.check_theorem_dirs(model, tmp_path / "finetuned", tokens)
    assert run.what == "a fine-tuned model"
    assert [d.max_abs.max().item() > 1e-4 for d in run.result.local] == [False, True]
    with pytest.raises(FileNotFoundError, match="neither"):
        hf.check_theorem_dirs(model, tmp_path, tokens)


def test_check_theorem_command_on_hf_dirs(tmp_path, capsys):
    from probe.cli import main

    base = make("gpt2")
    base.save_pretrained(tmp_path / "model")
    torch.manual_seed(2)
    get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM",
                   num_virtual_tokens=P)).save_pretrained(tmp_path / "prefix")  # fmt: skip
    get_peft_model(copy.deepcopy(base), lora_config("gpt2")).save_pretrained(tmp_path / "lora")
    cmd = ["check-theorem", "--base", str(tmp_path / "model"), "--n", "8", "--task", "sort_asc"]
    H = dims(base)[0]

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


def test_check_theorem_on_text_through_the_saved_tokenizer(tmp_path, capsys):
    from probe.cli import main

    base = make("llama")
    base.save_pretrained(tmp_path / "model")
    torch.manual_seed(2)
    pm = get_peft_model(copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM",
                        num_virtual_tokens=P))  # fmt: skip
    pm.save_pretrained(tmp_path / "prefix")
    cmd = [
        "check-theorem",
        "--base",
        str(tmp_path / "model"),
        "--adapter",
        str(tmp_path / "prefix"),
    ]
    assert main([*cmd, "--text", "the cat sat"]) == 2  # no tokenizer saved yet
    assert "no usable tokenizer" in capsys.readouterr().err
    save_tokenizer(tmp_path / "model")
    ids = hf.tokenize_texts(tmp_path / "model", ["the cat sat on a mat", "dog ran"])
    assert [t.tolist() for t in ids] == [[[1, 2, 3, 4, 5, 6]], [[8, 9]]]
    assert main([*cmd, "--text", "the cat sat on a mat"]) == 0
    out = capsys.readouterr().out
    assert "1 text(s), 6 tokens" in out and "FAIL" not in out and out.count(" ok ") == L * 4
    (tmp_path / "texts.txt").write_text("the cat sat on a mat\n\ndog ran far\n")
    assert main([*cmd, "--text-file", str(tmp_path / "texts.txt")]) == 0
    out = capsys.readouterr().out
    assert "2 text(s), 9 tokens" in out and "FAIL" not in out
    # the same check through the API on the same ids: texts of different lengths are chunks
    res = hf.check_hf(base, [ids[0], ids[1]], prefix=pm)
    assert res.ok and res.decompositions[0].alpha.shape == (1, 4, 6 + 2)


def test_check_theorem_on_an_hf_dir_defaults_to_fewer_inputs(tmp_path, capsys):
    """`probe check-theorem --base HF_DIR` checks hf.CHECK_INPUTS (128) inputs unless --n says
    otherwise; our own models keep 256."""
    from probe.cli import build_parser, main

    make("gpt2", dtype=torch.float32).save_pretrained(tmp_path / "model")
    capsys.readouterr()
    assert hf.CHECK_INPUTS == 128
    assert main(["check-theorem", "--base", str(tmp_path / "model")]) == 0
    assert "128 sort_asc inputs" in capsys.readouterr().out
    assert main(["check-theorem", "--base", str(tmp_path / "model"), "--n", "3"]) == 0
    assert "3 sort_asc inputs" in capsys.readouterr().out
    assert build_parser().parse_args(["check-theorem", "--base", "x"]).n is None


def test_the_cli_check_on_an_hf_model_imports_neither_our_model_nor_transformer_lens(tmp_path):
    """`probe check-theorem --base HF_DIR` end to end in a fresh interpreter: it never uses our
    model or training, and importing them would pull in transformer-lens (0.7 s of its start-up);
    without an adapter it needs no peft either (0.15 s)."""
    make("gpt2", dtype=torch.float32).save_pretrained(tmp_path / "model")
    code = (
        "import sys\n"
        "from prefix_probe.cli import main\n"
        f"assert main(['check-theorem', '--base', {str(tmp_path / 'model')!r}, '--n', '2']) == 0\n"
        "ours = sorted(m for m in sys.modules if m.split('.')[0] in ('transformer_lens', 'peft')\n"
        "              or m in ('probe.model', 'probe.train', 'probe.adapters'))\n"
        "assert not ours, ours\n"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert " ok " in out.stdout
