"""Tuning methods as adapters: counts, save/load, switching, freezing, exact conversions."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import model_configs
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from probe import io
from probe.adapters import (
    METHODS,
    LoRA,
    LoRAConfig,
    PrefixConfig,
    Tuned,
    adapter_config,
    load_adapter,
    make_adapter,
    prompt_to_prefix,
    vt_to_prefix,
)
from probe.model import ModelConfig, Transformer, preset
from probe.train import TrainConfig, tune
from tasks import get_task

OPTIONS = {
    "prefix": dict(length=3),
    "vt-prefix": dict(length=3),
    "prompt": dict(length=3),
    "lora": dict(rank=2, targets=["W_Q", "W_K", "W_V", "W_O", "W_in", "W_out"]),
    "full": {},
    "prefix+lora": dict(length=3, rank=2, targets=["W_Q", "W_V"]),
    "ia3": dict(targets=["W_Q", "W_K", "W_V", "W_out"]),
    "adaption_prompt": dict(length=3, layers=1),
}


def make_base(seed=0, name="tiny", **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(preset(name, dropout=0.0, **overrides)).double().eval()


def make(method, base, seed=1):
    torch.manual_seed(seed)
    adapter = make_adapter(method, base, **OPTIONS[method])
    with torch.no_grad():  # LoRA's B starts at zero; move it so the adapter does something
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return adapter


def tokens(batch=4, T=12, seed=3):
    return torch.randint(0, 8, (batch, T), generator=torch.Generator().manual_seed(seed))


def expected_count(method, cfg: ModelConfig) -> int:
    L, d, h, e, m = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp
    P, r = 3, 2
    lora_shapes = {
        "W_Q": (d, h * e),
        "W_K": (d, h * e),
        "W_V": (d, h * e),
        "W_O": (h * e, d),
        "W_in": (d, m),
        "W_out": (m, d),
    }
    lora = lambda targets: L * sum(r * sum(lora_shapes[t]) for t in targets)  # noqa: E731
    base_total = (
        cfg.d_vocab * d
        + cfg.n_ctx * d
        + d * cfg.d_vocab
        + 2 * d
        + L * (4 * h * d * e + 3 * h * e + d + 2 * d + 2 * d * m + m + d + 2 * d)
    )
    return {
        "prefix": L * 2 * P * h * e,
        "vt-prefix": L * P * d,
        "prompt": P * d,
        "lora": lora(OPTIONS["lora"]["targets"]),
        "full": base_total,
        "prefix+lora": L * 2 * P * h * e + lora(["W_Q", "W_V"]),
        "ia3": L * (3 * h * e + m),
        "adaption_prompt": 1 * (P * d + h),  # the top layer only
    }[method]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_parameter_counts_match_formulas(method):
    base = make_base()
    adapter = make(method, base)
    assert adapter.n_params == expected_count(method, base.cfg)
    assert adapter.share(base) == adapter.n_params / sum(p.numel() for p in base.parameters())


def test_prefix_mlp_reparameterisation_is_folded_on_save(tmp_path):
    base = make_base()
    torch.manual_seed(0)
    adapter = make_adapter("prefix", base, length=2, reparam_hidden=16)
    assert adapter.n_params == 2 * 16 + (16 * 16 + 16) + (16 * 2 * 2 * 2 * 16 + 2 * 2 * 2 * 16)
    adapter.save(tmp_path / "a", base)
    loaded = load_adapter(tmp_path / "a", base)
    assert loaded.n_params == 2 * 2 * 2 * 2 * 16  # plain keys and values now
    assert loaded.config == PrefixConfig(length=2, reparam_hidden=0)
    torch.testing.assert_close(loaded(base, tokens()), adapter(base, tokens()), rtol=0, atol=0)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_save_load_gives_identical_logits(method, tmp_path):
    base = make_base()
    adapter = make(method, base)
    adapter.save(tmp_path / method, base)
    loaded = load_adapter(tmp_path / method, base)
    torch.testing.assert_close(loaded(base, tokens()), adapter(base, tokens()), rtol=0, atol=0)


# adapter_config.json as the first saved format wrote it: the constructor's keyword arguments
# under "hparams" (a prefix's MLP already folded), beside the usual provenance fields.
OLD_HPARAMS = {
    "prefix": {"length": 3, "reparam_hidden": 0, "init_scale": 1.0},
    "vt-prefix": {"length": 3},
    "prompt": {"length": 3, "init": "random"},
    "lora": {"rank": 2, "targets": OPTIONS["lora"]["targets"], "alpha": 2.0},
    "full": {},
    "prefix+lora": {"length": 3, "rank": 2, "targets": ["W_Q", "W_V"], "alpha": 2.0},
    "ia3": {"targets": OPTIONS["ia3"]["targets"]},
    "adaption_prompt": {"length": 3, "layers": 1},
}


def write_old_adapter_dir(path, method, base, tensors):
    """An adapter directory exactly as the first saved format laid it out, written by hand."""
    path.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()}, path / "adapter.safetensors")
    meta = {
        "format": "prefix-probe-adapter/1",
        "method": method,
        "hparams": OLD_HPARAMS[method],
        "base_fingerprint": base.fingerprint(),
        "base_config": base.cfg.to_dict(),
        "n_params": sum(t.numel() for t in tensors.values()),
        "environment": {"threads": 1, "device": "cpu", "torch": torch.__version__},
        "checksum": io.fingerprint(tensors),
    }
    (path / "adapter_config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_adapter_directories_in_the_first_format_still_load(method, tmp_path):
    base = make_base()
    adapter = make(method, base)
    tensors = {k: v.detach().clone() for k, v in adapter.state_dict().items()}
    write_old_adapter_dir(tmp_path / "old", method, base, tensors)
    loaded = load_adapter(tmp_path / "old", base)
    assert loaded.method == method and loaded.config == adapter.config
    torch.testing.assert_close(loaded(base, tokens()), adapter(base, tokens()), rtol=0, atol=0)
    loaded.save(tmp_path / "new", base)  # rewritten in the current format, same config
    meta = json.loads((tmp_path / "new" / "adapter_config.json").read_text())
    # The old fields as they were, plus any field added since at its default.
    assert meta["format"] == io.ADAPTER_FORMAT
    assert OLD_HPARAMS[method].items() <= meta["config"].items()
    assert meta["config"] == adapter.config.to_dict()
    assert load_adapter(tmp_path / "new", base).config == adapter.config


def test_loading_onto_another_base_or_a_corrupt_file_fails_and_changes_nothing(tmp_path):
    base, other = make_base(seed=0), make_base(seed=1)
    path = make("prefix", base).save(tmp_path / "a", base)
    before = other.fingerprint()
    with pytest.raises(ValueError, match="different base model"):
        load_adapter(path, other)
    assert other.fingerprint() == before
    data = (path / "adapter.safetensors").read_bytes()
    (path / "adapter.safetensors").write_bytes(data[:40])
    with pytest.raises(io.CorruptFileError, match="truncated or corrupt"):
        load_adapter(path, base)
    (path / "adapter_config.json").write_text('{"format": "something else"}')
    with pytest.raises(io.CorruptFileError, match="format"):
        load_adapter(path, base)
    assert base.fingerprint() == make_base(seed=0).fingerprint()


def test_switching_adapters_on_one_base_gives_each_its_own_logits():
    base = make_base()
    x = tokens()
    tuned = Tuned(base)
    expected = {}
    for i, method in enumerate(sorted(METHODS)):
        adapter = make(method, base, seed=i)
        expected[method] = adapter(base, x)
        tuned.add(method, adapter)
    for method in reversed(sorted(METHODS)):
        torch.testing.assert_close(tuned(x, adapter=method), expected[method], rtol=0, atol=0)
        tuned.use(method)
        torch.testing.assert_close(tuned(x), expected[method], rtol=0, atol=0)
    torch.testing.assert_close(tuned(x, adapter=None), base(x), rtol=0, atol=0)
    assert len({round(v.sum().item(), 6) for v in expected.values()}) == len(expected)
    with pytest.raises(KeyError, match="no adapter"):
        tuned.use("nope")


def test_run_with_cache_sees_the_adapter():
    base = make_base()
    adapter = make("prefix", base)
    tuned = Tuned(base).add("p", adapter)
    logits, cache = tuned.run_with_cache(tokens())  # explicit attention path, not the fused one
    torch.testing.assert_close(logits, adapter(base, tokens()), rtol=0, atol=1e-12)
    assert cache["pattern", 0].shape[-1] == 3 + tokens().shape[1]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_tuning_trains_only_the_adapter(method):
    base = Transformer(preset("tiny"))  # float32, dropout on: the real training set-up
    before = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = TrainConfig(steps=3, lr=1e-2, batch_size=16, eval_size=64, progress=False)
    adapter, _ = tune(base, get_task("copy"), adapter_config(method, **OPTIONS[method]), cfg)
    after = base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "base weights changed"
    assert all(p.grad is None for p in base.parameters())
    grads = {n: p.grad for n, p in adapter.named_parameters()}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), grads.keys()


def test_lora_merge_equals_unmerged_forward():
    base = make_base()
    lora = make("lora", base)
    assert isinstance(lora, LoRA)
    torch.testing.assert_close(lora.merge(base).double()(tokens()), lora(base, tokens()))


def test_pissa_lora_starts_at_the_base_with_the_top_singular_part_trainable(tmp_path):
    base = make_base()
    torch.manual_seed(1)
    lora = make_adapter("lora", base, rank=2, targets=["W_Q", "W_out"], alpha=4.0, init="pissa")
    plain = make_adapter("lora", base, rank=2, targets=["W_Q", "W_out"])
    assert lora.n_params == plain.n_params  # the frozen singular part is a buffer
    torch.testing.assert_close(lora(base, tokens()), base(tokens()), rtol=0, atol=1e-12)
    W = base.blocks[0].mlp.W_out.detach()
    U, S, Vh = torch.linalg.svd(W)
    top = (U[:, :2] * S[:2]) @ Vh[:2]
    torch.testing.assert_close(
        2.0 * lora.A["blocks__0__mlp__W_out"] @ lora.B["blocks__0__mlp__W_out"], top
    )
    with torch.no_grad():
        lora.B["blocks__0__mlp__W_out"].mul_(0.5)  # halve the top singular part
    assert (lora(base, tokens()) - base(tokens())).abs().max() > 1e-3
    lora.save(tmp_path / "pissa", base)
    loaded = load_adapter(tmp_path / "pissa", base)
    torch.testing.assert_close(loaded(base, tokens()), lora(base, tokens()), rtol=0, atol=0)
    with pytest.raises(ValueError, match="init must be 'random' or 'pissa'"):
        make_adapter("lora", base, init="svd")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_configs_are_the_constructor_argument_and_the_saved_json(method, tmp_path):
    base = make_base()
    config = adapter_config(method, **OPTIONS[method])
    assert type(config) is METHODS[method].Config and config.method == method
    assert type(config).from_dict(config.to_dict()) == config  # JSON round trip
    torch.manual_seed(1)
    built = METHODS[method](base, config)
    torch.manual_seed(1)
    by_name = make_adapter(method, base, **OPTIONS[method])
    assert built.config == by_name.config == config
    assert all(
        torch.equal(a, b)
        for a, b in zip(built.state_dict().values(), by_name.state_dict().values(), strict=True)
    )
    built.save(tmp_path / "a", base)
    meta = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert meta["config"] == config.to_dict() and "hparams" not in meta


def test_configs_are_validated_when_built_and_resolve_their_defaults():
    assert LoRAConfig(rank=4).alpha == 4.0 and LoRAConfig(targets=["W_Q"]).targets == ("W_Q",)
    assert adapter_config("prefix+lora", rank=2).lora == LoRAConfig(rank=2, alpha=2.0)
    for bad in (dict(length=0), dict(length=1.5), dict(reparam_hidden=-1)):
        with pytest.raises(ValueError):
            PrefixConfig(**bad)
    with pytest.raises(ValueError, match="choose from"):
        LoRAConfig(targets=("W_X",))
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="init"):
        adapter_config("prompt", init="zeros")
    with pytest.raises(TypeError, match="PrefixConfig"):
        METHODS["prefix"](make_base(), LoRAConfig())


def test_bad_options_name_the_problem():
    base = make_base()
    with pytest.raises(ValueError, match="unknown method"):
        make_adapter("adapterhub", base)
    with pytest.raises(ValueError, match="max_prefix"):
        make_adapter("prefix", base, length=base.cfg.max_prefix + 1)
    with pytest.raises(ValueError, match="choose from"):
        make_adapter("lora", base, targets=["W_X"])
    with pytest.raises(ValueError, match="does not take"):
        make_adapter("prompt", base, rank=3)
    with pytest.raises(ValueError, match="attention-only"):
        make_adapter("lora", make_base(d_mlp=0), targets=["W_in"])


configs = model_configs()


@given(cfg=configs, P=st.integers(1, 8), T=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_soft_prompt_converts_exactly_to_a_kv_prefix(cfg, P, T, seed):
    torch.manual_seed(seed)
    base = Transformer(cfg).double().eval()
    prompt = torch.randn(P, cfg.d_model, dtype=torch.float64)
    x = torch.randint(0, cfg.d_vocab, (3, T))
    torch.testing.assert_close(
        base(x, prefix=prompt_to_prefix(base, prompt)), base(x, prompt=prompt), rtol=0, atol=1e-10
    )


@settings(max_examples=25, deadline=None)
@given(cfg=configs, P=st.integers(1, 8), T=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_virtual_tokens_convert_exactly_to_a_kv_prefix(cfg, P, T, seed):
    """Against the paper's definition written out with plain ops: ln1, then W_K / W_V."""
    torch.manual_seed(seed)
    base = Transformer(cfg).double().eval()
    with torch.no_grad():  # non-trivial LayerNorm weights and attention biases
        for p in base.parameters():
            p.add_(0.1 * torch.randn_like(p))
    vectors = torch.randn(cfg.n_layers, P, cfg.d_model, dtype=torch.float64)
    prefix = vt_to_prefix(base, vectors)
    for layer, block in enumerate(base.blocks):
        s = vectors[layer]
        if cfg.attn_ln:
            s = F.layer_norm(s, (cfg.d_model,), block.ln1.w, block.ln1.b, eps=1e-5)
        a = block.attn
        keys = torch.einsum("pd,hde->phe", s, a.W_K) + a.b_K
        values = torch.einsum("pd,hde->phe", s, a.W_V) + a.b_V
        torch.testing.assert_close(prefix[layer].keys, keys, rtol=0, atol=1e-10)
        torch.testing.assert_close(prefix[layer].values, values, rtol=0, atol=1e-10)
    x = torch.randint(0, cfg.d_vocab, (2, T))
    adapter = make_adapter("vt-prefix", base, length=P)
    with torch.no_grad():
        adapter.vectors.copy_(vectors)
    torch.testing.assert_close(adapter(base, x), base(x, prefix=prefix), rtol=0, atol=0)
