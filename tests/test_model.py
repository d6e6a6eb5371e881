"""The hooked transformer: hook names and shapes, the prefix path, validation, save/load."""

import json
import os
import stat

import pytest
import torch
from helpers import random_prefix, tokens

from probe import io
from probe.model import KVPrefix, ModelConfig, Transformer, preset


def make(name="tiny", seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset(name, dropout=0.0, **overrides)).double().eval()


def test_hook_names_and_shapes():
    model = make()
    c = model.cfg
    B, T, P = 3, 9, 4
    _, cache = model.run_with_cache(tokens(B, T), prefix=random_prefix(model, P))
    expect = {
        "hook_embed": (B, T, c.d_model),
        "hook_pos_embed": (T, c.d_model),
        "ln_final.hook_normalized": (B, T, c.d_model),
    }
    for layer in range(c.n_layers):
        for name in (
            "hook_resid_pre",
            "hook_attn_out",
            "hook_resid_mid",
            "hook_mlp_out",
            "hook_resid_post",
        ):
            expect[f"blocks.{layer}.{name}"] = (B, T, c.d_model)
        for name in ("q", "k", "v", "z"):
            expect[f"blocks.{layer}.attn.hook_{name}"] = (B, T, c.n_heads, c.d_head)
        for name in ("prefix_k", "prefix_v"):
            expect[f"blocks.{layer}.attn.hook_{name}"] = (B, P, c.n_heads, c.d_head)
        for name in ("attn_scores", "pattern"):
            expect[f"blocks.{layer}.attn.hook_{name}"] = (B, c.n_heads, T, P + T)
        expect[f"blocks.{layer}.mlp.hook_pre"] = (B, T, c.d_mlp)
        expect[f"blocks.{layer}.ln1.hook_scale"] = (B, T, 1)
    for name, shape in expect.items():
        assert tuple(cache[name].shape) == shape, name
    # TransformerLens's ActivationCache conveniences work on our cache.
    assert cache["pattern", 0].shape == (B, c.n_heads, T, P + T)


def test_fused_attention_equals_explicit_path():
    model = make()
    x, pre = tokens(), random_prefix(model, 3)
    fused = model(x, prefix=pre)  # no hooks -> scaled_dot_product_attention
    explicit, _ = model.run_with_cache(x, prefix=pre)  # hooks on the pattern -> explicit
    torch.testing.assert_close(fused, explicit, rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_layers", [1, 3])
@pytest.mark.parametrize("positions", [slice(4, None), slice(0, 1), slice(-1, None), slice(2, 6)])
def test_positions_return_exactly_those_logits(n_layers, positions):
    # The last layer computes queries only at the asked positions; nothing else may change,
    # with a prefix, with a prompt, and on the hooked (explicit) path.
    model = make(n_layers=n_layers)
    x, pre = tokens(), random_prefix(model, 3)
    prompt = torch.randn(2, model.cfg.d_model, dtype=torch.float64)
    for kwargs in ({}, {"prefix": pre}, {"prompt": prompt}):
        full = model(x, **kwargs)[:, positions]
        torch.testing.assert_close(
            model(x, positions=positions, **kwargs), full, atol=1e-12, rtol=0
        )
        hooked, _ = model.run_with_cache(x, positions=positions, **kwargs)
        torch.testing.assert_close(hooked, full, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="contiguous slice"):
        model(x, positions=slice(0, None, 2))


def test_empty_prefix_changes_nothing():
    model = make()
    x = tokens()
    empty = random_prefix(model, 0)
    torch.testing.assert_close(model(x, prefix=empty), model(x), rtol=0, atol=0)
    _, cache = model.run_with_cache(x, prefix=empty)
    _, base = model.run_with_cache(x)
    torch.testing.assert_close(cache["pattern", 1], base["pattern", 1], rtol=0, atol=0)


@pytest.mark.parametrize("scale", [1.0, 30.0, -30.0])  # typical, dominating, vanishing prefix
def test_prefix_only_rescales_content_attention(scale):
    """Content columns of every layer's pattern == prefix-free pattern x (1 - alpha)."""
    model = make()
    c = model.cfg
    P = 5
    _, cache = model.run_with_cache(tokens(), prefix=random_prefix(model, P, scale=scale))
    for layer in range(c.n_layers):
        pattern = cache["pattern", layer]
        q, k = cache["q", layer], cache["k", layer]  # same layer input as the prefixed run
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / c.d_head**0.5
        T = q.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        A = scores.masked_fill(~causal, float("-inf")).softmax(-1)
        alpha = pattern[..., :P].sum(-1, keepdim=True)
        torch.testing.assert_close(pattern[..., P:], (1 - alpha) * A, rtol=0, atol=1e-12)
    # and the prefix did change something, so the check above is not vacuous
    _, base = model.run_with_cache(tokens())
    assert (cache["attn_out", 0] - base["attn_out", 0]).abs().max() > 1e-3


def test_content_queries_keys_unchanged_by_prefix_at_first_layer():
    model = make()
    _, with_prefix = model.run_with_cache(tokens(), prefix=random_prefix(model, 2))
    _, without = model.run_with_cache(tokens())
    for name in ("q", "k", "v"):
        torch.testing.assert_close(with_prefix[name, 0], without[name, 0], rtol=0, atol=0)


def test_soft_prompt_takes_no_positional_slot():
    model = make()
    x = tokens(T=6)
    prompt = torch.randn(3, model.cfg.d_model, dtype=torch.float64)
    logits, cache = model.run_with_cache(x, prompt=prompt)
    assert logits.shape == (3, 6, model.cfg.d_vocab)
    assert cache["resid_pre", 0].shape[1] == 3 + 6
    # the prompt positions carry no positional embedding
    torch.testing.assert_close(cache["resid_pre", 0][0, :3], prompt, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(n_layers=1, n_heads=3, d_model=32), "divisible by n_heads"),
        (dict(n_layers=0, n_heads=1, d_model=8), "n_layers"),
        (dict(n_layers=1, n_heads=1, d_model=8, dropout=1.5), "dropout"),
        (dict(n_layers=1, n_heads=1, d_model=8, d_mlp=-1), "d_mlp"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_unknown_preset_names_choices():
    with pytest.raises(ValueError, match="choose one of"):
        preset("gpt5")


def test_bad_inputs_name_the_field_and_fix():
    model = make()
    c = model.cfg
    with pytest.raises(ValueError, match="n_ctx"):
        model(tokens(T=c.n_ctx + 1))
    with pytest.raises(ValueError, match="d_vocab"):
        model(torch.full((1, 3), c.d_vocab))
    with pytest.raises(ValueError, match=r"\[batch, pos\]"):
        model(torch.zeros(3))
    bad = [
        KVPrefix(torch.zeros(2, c.n_heads + 1, c.d_head), torch.zeros(2, c.n_heads + 1, c.d_head))
    ]
    with pytest.raises(ValueError, match="one entry per layer"):
        model(tokens(), prefix=bad)
    with pytest.raises(ValueError, match="n_heads"):
        model(tokens(), prefix=bad * c.n_layers)
    too_long = random_prefix(model, c.max_prefix + 1)
    with pytest.raises(ValueError, match="max_prefix"):
        model(tokens(), prefix=too_long)


def test_save_load_round_trip(tmp_path):
    model = make("01")
    x = tokens()
    model.save(tmp_path / "m")
    loaded = Transformer.load(tmp_path / "m").double().eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert loaded.fingerprint() == model.fingerprint()
    assert sorted(p.name for p in (tmp_path).iterdir()) == ["m"]  # no temporary left behind


def test_saves_follow_the_umask(tmp_path):
    """A shared results folder stays readable as the user's umask says (mkdtemp's 0700 and
    safetensors' 0600 used to leak through, while the JSON files followed the umask)."""
    from probe.adapters import make_adapter

    model = make()
    for mask, dir_mode, file_mode in ((0o022, 0o755, 0o644), (0o027, 0o750, 0o640)):
        old = os.umask(mask)
        try:
            saved = [
                model.save(tmp_path / f"m{mask:o}"),
                model.save(tmp_path / f"m{mask:o}", overwrite=True),  # over an existing one
                make_adapter("prefix", model).save(tmp_path / f"a{mask:o}", model),
            ]
        finally:
            os.umask(old)
        for path in saved:
            assert stat.S_IMODE(path.stat().st_mode) == dir_mode, path
            for f in path.iterdir():
                assert stat.S_IMODE(f.stat().st_mode) == file_mode, f
    old = os.umask(0o027)
    try:
        assert io.umask() == 0o027 and os.umask(0o027) == 0o027  # read, and left unchanged
    finally:
        os.umask(old)


def test_saves_record_the_environment(tmp_path):
    """Trained weights depend on the thread count: config.json records it (and device, torch)."""
    from probe.adapters import make_adapter

    model = make()
    environment = json.loads((model.save(tmp_path / "m") / "config.json").read_text())[
        "environment"
    ]
    assert environment == {
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "torch": torch.__version__,
    }
    adapter = make_adapter("prefix", model).save(tmp_path / "a", model)
    assert json.loads((adapter / "adapter_config.json").read_text())["environment"] == environment
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)
    try:
        threads = json.loads((model.save(tmp_path / "t") / "config.json").read_text())
    finally:
        torch.set_num_threads(before)
    assert threads["environment"]["threads"] == before + 1


def test_corrupt_or_truncated_files_fail_clearly(tmp_path):
    model = make()
    path = model.save(tmp_path / "m")
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(io.CorruptFileError, match="truncated or corrupt"):
        Transformer.load(path)
    flipped = bytearray(data)
    flipped[-5] ^= 0xFF  # a flipped bit in the last tensor's data still parses
    weights.write_bytes(bytes(flipped))
    with pytest.raises(io.CorruptFileError, match="fingerprint"):
        Transformer.load(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(io.CorruptFileError, match="not valid JSON"):
        Transformer.load(path)
    with pytest.raises(FileNotFoundError):
        Transformer.load(tmp_path / "nowhere")
