"""Property tests of the attention-bias theorem (``probe.probes``' docstring) through the probes,
in float64.

The probes must confirm the theorem where it holds (prefixes, soft prompts) and must fail where
it does not (changed W_Q/W_K): a probe that cannot fail is worthless.
"""

import copy
import dataclasses
import math

import pytest
import torch
from helpers import model_config, model_configs, random_prefix, tokens
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from probe import probes
from probe.adapters import make_adapter, prompt_to_prefix, vt_to_prefix
from probe.cli import main
from probe.model import KVPrefix, ModelConfig, Transformer

TOL = 1e-10


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: with intra-op threads on a busy machine, spinning threads make
    each op up to 100x slower. Restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_model(cfg: ModelConfig | None = None, seed: int = 0, **shape) -> Transformer:
    """float64 model with O(1) weights, so attention patterns are far from uniform; ``cfg`` or
    a :func:`helpers.model_config` of ``shape`` (2 layers, 2 heads of 8 by default)."""
    cfg = cfg or model_config(**shape)
    d_model = cfg.d_model
    torch.manual_seed(seed)
    model = Transformer(cfg).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.split(".")[-1]
            if leaf == "W_out":
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[0]))
            elif leaf.startswith("W_"):
                p.normal_(0.0, 1.0 / math.sqrt(d_model) if leaf != "W_E" else 1.0)
            elif leaf == "w":  # LayerNorm gain
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.5)
    return model


def perturbed(model, leaves, seed=3, lora=False) -> Transformer:
    """A tuned copy: every layer's ``leaves`` moved by as much as the weights themselves (full
    fine-tuning), or by a rank-1 update of the d_model x (head * d_head) matrix (LoRA)."""
    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.split(".")[-1] not in leaves:
                continue
            if lora:  # W [h, d, e] as [d, h*e]
                h, d, e = p.shape
                a = torch.randn(d, 1, generator=g, dtype=p.dtype)
                b = torch.randn(1, h * e, generator=g, dtype=p.dtype)
                p.add_((a @ b).view(d, h, e).permute(1, 0, 2) * p.std() / math.sqrt(e))
            else:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * p.std())
    return tuned


def records(model, x, tuned=None, **run_kwargs):
    """Records of a tuned run (``tuned`` model, or ``model`` with a prefix/prompt) and of the
    base run on the same tokens."""
    _, cache = (tuned or model).run_with_cache(x, **run_kwargs)
    _, base_cache = model.run_with_cache(x)
    prompt = run_kwargs.get("prompt")
    prompt_len = 0 if prompt is None else prompt.shape[-2]
    return (
        probes.records_from_cache(model, cache, prompt_len=prompt_len),
        probes.records_from_cache(model, base_cache),
    )


shapes = model_configs(min_d_head=2)
seeds = st.integers(0, 2**16)


def degenerate(cfg: ModelConfig) -> bool:
    """LayerNorm of a 2-d vector is (+-w1, -+w2) + b: two possible layer inputs, often one, and
    then no W_Q/W_K change can move attention among identical keys."""
    return cfg.attn_ln and cfg.d_model == 2


# ---------------------------------------------------------------------------- the identities


@settings(max_examples=40, deadline=None)
@given(
    cfg=shapes,
    seed=seeds,
    P=st.integers(1, 16),
    T=st.integers(1, 12),
    batch=st.integers(1, 3),
    scale=st.sampled_from([1.0, 30.0, -30.0]),  # typical, dominating, vanishing prefix scores
    per_example=st.booleans(),
)
@example(cfg=model_config(), seed=0, P=1, T=1, batch=1, scale=1.0, per_example=False)  # T=1
@example(cfg=model_config(n_layers=3, mlp=False), seed=1, P=16, T=12, batch=3, scale=30.0,
         per_example=True)  # fmt: skip
def test_identities_hold_at_every_layer(cfg, seed, P, T, batch, scale, per_example):
    model = random_model(cfg, seed)
    per = batch if per_example else None
    prefix = random_prefix(model, P, scale, seed=seed, batch=per)
    tuned, base = records(model, tokens(batch, T, seed=seed), prefix=prefix)
    result = probes.check_theorem(tuned, base)
    assert result.ok, result.failures()
    for r, d, local, down in zip(
        tuned, result.decompositions, result.local, result.downstream, strict=True
    ):
        assert d.pattern_error.max() < TOL and d.z_error.max() < TOL and d.alpha_error.max() < TOL
        assert ((d.alpha >= 0) & (d.alpha <= 1)).all()
        torch.testing.assert_close(d.beta.sum(-1), torch.ones_like(d.alpha), rtol=0, atol=TOL)
        assert local.max_abs.max() < TOL  # relative content attention exactly unchanged ...
        if r.layer == 0:  # ... and at layer 0 the input is the base's, so also vs the base run
            assert down.max_abs.max() < TOL
        n_values = P * (batch if per_example else 1)  # per-example prefixes span more
        assert (result.subspaces[r.layer].rank <= min(n_values, r.d_head)).all()


@pytest.mark.parametrize("scale", [30.0, -30.0, 300.0])
def test_dominating_vanishing_and_underflowing_prefix(scale):
    """Prefix keys along a large query bias: alpha ~ 1 (scale 30), ~ 0 (-30) at every query of
    every layer; at 300 the content mass underflows to 0 and relative attention is unobservable."""
    model = random_model(n_layers=2, n_heads=2, d_head=8)
    g = torch.Generator().manual_seed(5)
    u = torch.randn(2, 8, generator=g, dtype=torch.float64)
    u = u / u.norm(dim=-1, keepdim=True)  # one unit direction per head
    with torch.no_grad():
        for block in model.blocks:
            block.attn.b_Q.copy_(20 * u)
    keys = scale * u + 0.1 * torch.randn(4, 2, 8, generator=g, dtype=torch.float64)
    prefix = [KVPrefix(keys, torch.randn(4, 2, 8, generator=g, dtype=torch.float64))] * 2
    tuned, base = records(model, tokens(), prefix=prefix)
    result = probes.check_theorem(tuned, base)
    assert result.ok, result.failures()
    for d, local in zip(result.decompositions, result.local, strict=True):
        assert d.pattern_error.max() < TOL and d.z_error.max() < TOL
        if scale == -30.0:
            assert d.alpha.max() < 1e-12
        else:
            assert d.alpha.min() > 1 - 1e-12
        n_rows = d.alpha.shape[0] * d.alpha.shape[2]
        assert (local.unobservable == (n_rows if scale == 300.0 else 0)).all()
        assert local.max_abs.max() < TOL


def test_alpha_matches_the_theorem_formula_and_first_position():
    """alpha, beta and A against the theorem written out with plain exponentials; at the first
    query the content is one key, so A = 1 and alpha = sum_p e^s_p / (sum_p e^s_p + e^s_00)."""
    model = random_model(n_layers=1)
    x = tokens(batch=2, T=5)
    (r,), _ = records(model, x, prefix=random_prefix(model, 3))
    d = probes.decompose(r)
    e_prefix = torch.einsum("bqhe,bphe->bhqp", r.q, r.prefix_k).div(math.sqrt(r.d_head)).exp()
    e_content = torch.einsum("bqhe,bkhe->bhqk", r.q, r.k).div(math.sqrt(r.d_head)).exp()
    e_content = e_content * torch.ones(5, 5, dtype=torch.float64).tril()
    alpha = e_prefix.sum(-1) / (e_prefix.sum(-1) + e_content.sum(-1))
    torch.testing.assert_close(d.alpha, alpha, rtol=1e-12, atol=0)
    torch.testing.assert_close(d.beta, e_prefix / e_prefix.sum(-1, keepdim=True))
    torch.testing.assert_close(d.A, e_content / e_content.sum(-1, keepdim=True))
    assert (d.A[:, :, 0, 0] == 1).all()
    first = e_prefix[:, :, 0].sum(-1)
    torch.testing.assert_close(d.alpha[:, :, 0], first / (first + e_content[:, :, 0, 0]))


def test_single_position():
    """T = 1: one content key; identities hold, and even changed W_Q/W_K cannot move a pattern
    with a single key (local drift 0)."""
    model = random_model()
    x = tokens(T=1)
    tuned, _ = records(model, x, prefix=random_prefix(model, 2))
    assert probes.check_theorem(tuned).ok
    moved, _ = records(model, x, tuned=perturbed(model, ("W_Q", "W_K")))
    assert all(probes.local_drift(r).max_abs.max() < TOL for r in moved)


# ---------------------------------------------------------------------------- the probes can fail


@settings(max_examples=25, deadline=None)
@given(cfg=shapes, seed=seeds, T=st.integers(4, 12), lora=st.booleans())
def test_changed_queries_keys_show_local_drift(cfg, seed, T, lora):
    assume(not degenerate(cfg))
    model = random_model(cfg, seed)
    x = tokens(4, T, seed=seed)
    tuned, base = records(model, x, tuned=perturbed(model, ("W_Q", "W_K"), lora=lora))
    result = probes.check_theorem(tuned, base)
    assert result.ok  # no prefix: no identity is expected, drift is reported
    for local, d in zip(result.local, result.decompositions, strict=True):
        assert (local.tv_max > 1e-3).all(), local.rows()
        assert (d.pattern_error > 1e-3).all()
    # where the identities are demanded, the same records fail them
    assert not probes.check_theorem(tuned, expected=[True] * len(tuned)).ok


@settings(max_examples=15, deadline=None)
@given(cfg=shapes, seed=seeds, T=st.integers(2, 12))
def test_value_output_changes_do_not_move_the_pattern(cfg, seed, T):
    """Changing W_V, W_O (and the MLP) moves no pattern given the layer input (local drift 0),
    though the head output changes and later layers' inputs do (downstream drift)."""
    assume(not degenerate(cfg))
    model = random_model(cfg, seed)
    leaves = ("W_V", "b_V", "W_O", "b_O", "W_in", "W_out")
    tuned, base = records(model, tokens(3, T, seed=seed), tuned=perturbed(model, leaves))
    result = probes.check_theorem(tuned, base)
    for r, local, down, d in zip(
        tuned, result.local, result.downstream, result.decompositions, strict=True
    ):
        assert local.max_abs.max() < TOL
        assert d.pattern_error.max() < TOL  # pattern == A exactly ...
        assert (d.z_error > 1e-3).all()  # ... but z != A @ v_frozen: V changed
        if r.layer == 0:
            assert down.max_abs.max() < TOL
    if cfg.n_layers > 1:
        assert result.downstream[-1].tv_max.max() > 1e-3


def test_prefix_drift_is_downstream_only():
    model = random_model(n_layers=3)
    tuned, base = records(model, tokens(), prefix=random_prefix(model, 4))
    result = probes.check_theorem(tuned, base)
    assert all(local.max_abs.max() < TOL for local in result.local)
    assert result.downstream[0].max_abs.max() < TOL
    assert all((down.tv_max > 1e-3).all() for down in result.downstream[1:])


def test_prefix_plus_weight_change_is_not_a_prefix():
    """A prefix on a head whose W_Q changed (prefix + LoRA): the identities fail where demanded;
    frozen_head_layers says which layers may demand them."""
    model = random_model()
    tuned_model = perturbed(model, ("W_Q",))
    tuned, _ = records(model, tokens(), tuned=tuned_model, prefix=random_prefix(model, 2))
    assert not probes.check_theorem(tuned).ok
    frozen = probes.frozen_head_layers(model, dict(tuned_model.named_parameters()))
    assert frozen == [False, False]
    assert probes.check_theorem(tuned, expected=frozen).ok
    assert probes.frozen_head_layers(model, dict(perturbed(model, ("W_O",)).named_parameters()))


# ---------------------------------------------------------------------------- check_tuned


def test_check_tuned_is_the_hand_assembled_check():
    """check_tuned(base, tuned, tokens) equals records -> frozen layers -> check_theorem done by
    hand, for a raw prefix, a fine-tuned copy and every adapter; the identities are demanded
    exactly where a prefix meets a frozen head."""
    model, x = random_model(), tokens()
    prefix = random_prefix(model, 2)
    tuned, base = records(model, x, prefix=prefix)
    by_hand = probes.check_theorem(tuned, base)
    assert probes.check_tuned(model, prefix, x).rows() == by_hand.rows()
    copy_q = perturbed(model, ("W_Q",))
    tuned, base = records(model, x, tuned=copy_q)
    by_hand = probes.check_theorem(tuned, base, expected=[False, False])
    assert probes.check_tuned(model, copy_q, x).rows() == by_hand.rows()

    expected = {
        "prefix": [True, True],
        "vt-prefix": [True, True],
        "prompt": [True, True],
        "lora": [False, False],  # W_Q, W_V changed: no prefix and no frozen head
        "full": [False, False],
        "prefix+lora": [False, False],  # a prefix, but W_Q changed
    }
    for method, want in expected.items():
        torch.manual_seed(0)
        adapter = make_adapter(method, model).double()
        with torch.no_grad():  # LoRA's B starts at zero: move every tensor
            for p in adapter.parameters():
                p.add_(0.1 * torch.randn_like(p))
        check = probes.check_tuned(model, adapter, x)
        assert check.expected == want, method
        assert check.ok, (method, check.failures())
        if method == "prefix+lora":  # demanded anyway, the identities fail: the check can fail
            forced = dataclasses.replace(check, expected=[True, True])
            assert not forced.ok


def test_a_nan_error_fails_in_the_table_and_the_exit_status(saved_base, capsys, monkeypatch):
    """One pass rule: a NaN identity error prints FAIL (not ok) and exits 1."""
    _, path = saved_base
    real = probes.decompose

    def nan_at_layer_0(record):
        d = real(record)
        if record.layer == 0:
            d.z_error = torch.full_like(d.z_error, float("nan"))
        return d

    monkeypatch.setattr(probes, "decompose", nan_at_layer_0)
    assert main(["check-theorem", "--base", str(path), "--n", "8"]) == 1
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line[:5].strip().isdigit()]
    assert [r[8] for r in rows if r[0] == "0"] == ["FAIL", "FAIL"]
    assert [r[8] for r in rows if r[0] == "1"] == ["ok", "ok"]
    assert "identity failed: layer 0 head 0: z error nan" in out


# ---------------------------------------------------------------------------- bias subspace


@settings(max_examples=20, deadline=None)
@given(cfg=shapes, seed=seeds, P=st.integers(1, 16))
def test_bias_subspace_rank_at_most_P(cfg, seed, P):
    model = random_model(cfg, seed)
    tuned, _ = records(model, tokens(8, 10, seed=seed), prefix=random_prefix(model, P))
    for r in tuned:
        s = probes.bias_subspace(r)
        assert (s.rank <= min(P, r.d_head)).all(), s.rows()


def test_bias_subspace_prefix_vs_full_fine_tuning():
    """P = 1: the prefix adds one fixed direction V W_O per head (rank 1), while full
    fine-tuning changes the head output in many (rank d_head or more). The whole change under a
    prefix is NOT rank <= P (it also rescales the base output), hence the probe's residual."""
    model = random_model(n_layers=2, n_heads=2, d_head=8)
    x = tokens(8, 10)
    prefix = random_prefix(model, 1)
    tuned, _ = records(model, x, prefix=prefix)
    full = perturbed(model, ("W_Q", "W_K", "W_V", "W_O", "b_V", "W_in", "W_out"))
    fine_tuned, _ = records(model, x, tuned=full)
    for r, f in zip(tuned, fine_tuned, strict=True):
        s, s_ft = probes.bias_subspace(r), probes.bias_subspace(f)
        assert (s.rank == 1).all() and (s.change_rank == 8).all()
        assert (s_ft.rank >= 8).all()
        # the one direction is V W_O
        d = probes.decompose(r)
        direction = torch.einsum("he,hed->hd", prefix[r.layer].values[0], r.W_O)
        for h in range(2):
            out = d.alpha[:, h].reshape(-1, 1) * d.bias_out[:, :, h].reshape(-1, 16)
            top = torch.linalg.svd(out, full_matrices=False).Vh[0]
            assert abs(top @ direction[h]) / direction[h].norm() > 1 - 1e-10


# ---------------------------------------------------------------------------- soft prompts, VT


def test_prompt_records_equal_converted_prefix_records():
    """A soft-prompt run, sliced with prompt_len, gives the records of the exact per-layer
    prefix (adapters.prompt_to_prefix), and the identities hold."""
    model = random_model(n_layers=3)
    prompt = torch.randn(3, model.cfg.d_model, dtype=torch.float64)
    x = tokens()
    from_prompt, base = records(model, x, prompt=prompt)
    from_prefix, _ = records(model, x, prefix=prompt_to_prefix(model, prompt))
    for a, b in zip(from_prompt, from_prefix, strict=True):
        for name in ("q", "k", "v", "prefix_k", "prefix_v", "pattern", "z", "q_frozen"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=1e-12)
    result = probes.check_theorem(from_prompt, base)
    assert result.ok and all(local.max_abs.max() < TOL for local in result.local)


def test_virtual_token_prefix():
    model = random_model()
    vectors = torch.randn(2, 3, model.cfg.d_model, dtype=torch.float64)
    tuned, base = records(model, tokens(), prefix=vt_to_prefix(model, vectors))
    assert probes.check_theorem(tuned, base).ok


# ---------------------------------------------------------------------------- tables, CLI


def test_rows_are_tidy():
    model = random_model(n_layers=2, n_heads=3)
    tuned, base = records(model, tokens(), prefix=random_prefix(model, 2))
    result = probes.check_theorem(tuned, base)
    rows = result.rows()
    assert len(rows) == 6 and {(r["layer"], r["head"]) for r in rows} == {
        (layer, h) for layer in range(2) for h in range(3)
    }
    assert all(isinstance(v, (int, float, bool, str)) for r in rows for v in r.values())
    assert len(probes.table(result.local + result.subspaces + result.decompositions)) == 18


@pytest.fixture
def saved_base(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layers=2, n_heads=2, d_model=16, dropout=0.0))
    return model, model.save(tmp_path / "base")


def test_cli_random_prefix_and_fine_tuned_model(saved_base, tmp_path, capsys):
    model, path = saved_base
    assert main(["check-theorem", "--base", str(path), "--n", "8"]) == 0
    out = capsys.readouterr().out
    assert "random key/value prefix" in out and out.count(" ok ") == 4
    tuned = perturbed(model, ("W_Q", "W_K")).save(tmp_path / "ft")
    argv = ["check-theorem", "--base", str(path), "--adapter", str(tuned), "--n", "8"]
    assert main([*argv, "--dtype", "float64"]) == 0
    assert "no identity applies" in capsys.readouterr().out


def test_one_phrase_names_every_tuning_and_only_probe_tuning_spells_it():
    from pathlib import Path

    from probe.tuning import tuning_phrase

    assert tuning_phrase() == "the base model alone"
    assert tuning_phrase(prefix_len=4, random=True) == "a random key/value prefix, P=4"
    assert tuning_phrase(adapter="prefix") == "a prefix adapter"
    assert tuning_phrase(adapter="PEFT PREFIX_TUNING", adapter_len=3) == (
        "a PEFT PREFIX_TUNING adapter, P=3"
    )
    assert tuning_phrase(prefix_len=2, adapter="PEFT LORA") == (
        "a key/value prefix, P=2 and a PEFT LORA adapter"
    )
    assert tuning_phrase(prefix_len=2, fine_tuned=True) == (
        "a key/value prefix, P=2 and a fine-tuned model"
    )
    root = Path(__file__).resolve().parents[1]
    spelled = [
        path.relative_to(root).as_posix()
        for package in ("probe", "tasks", "analysis")
        for path in (root / package).rglob("*.py")
        if any(words in path.read_text() for words in ("key/value prefix, P=", 'fine-tuned model"'))
    ]
    assert spelled == ["probe/tuning.py"], spelled


def test_cli_prefix_adapter_and_a_failing_identity(saved_base, tmp_path, capsys, monkeypatch):
    model, path = saved_base
    adapter = make_adapter("prefix", model, length=2).save(tmp_path / "a", model)
    argv = ["check-theorem", "--base", str(path), "--adapter", str(adapter), "--n", "8"]
    assert main(argv) == 0
    assert "prefix adapter" in capsys.readouterr().out

    real = probes.records_from_cache

    def broken(base, cache, *args, **kwargs):  # a head output off by 1e-3
        recs = real(base, cache, *args, **kwargs)
        for r in recs:
            r.z = r.z + 1e-3
        return recs

    monkeypatch.setattr(probes, "records_from_cache", broken)
    assert main(argv) == 1
    assert "identity failed: layer 0 head 0: z error" in capsys.readouterr().out
