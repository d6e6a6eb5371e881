"""probe.capacity: hard vs soft first-token counts on tiny models (ours and an HF GPT-2)."""

import pytest
import torch
from helpers import model_config
from hypothesis import given, settings
from hypothesis import strategies as st

from probe import capacity as C
from probe.model import Transformer


def tiny(seed=0, vocab=7, n_ctx=8, dtype=torch.float64, scale=1.0) -> Transformer:
    """A random float64 model; ``scale`` multiplies the embedding and unembedding so that its
    greedy completions differ between first tokens."""
    torch.manual_seed(seed)
    cfg = model_config(n_layers=2, n_heads=2, d_head=8)
    model = Transformer(cfg.__class__(**{**cfg.to_dict(), "d_vocab": vocab, "n_ctx": n_ctx}))
    with torch.no_grad():
        model.W_E.mul_(scale * 50)
        model.W_pos.mul_(scale * 50)
        model.W_U.mul_(scale * 50)
    return model.to(dtype)


def brute_force(model: Transformer, first: int, n: int) -> tuple[int, ...]:
    """Greedy completion of one hard first token, straight through the model's forward."""
    tokens = torch.tensor([[first]])
    for _ in range(n):
        tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tuple(tokens[0, 1:].tolist())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hard_count_equals_brute_force(seed):
    model = tiny(seed)
    n = 5
    hard = C.hard_completions(model, n)
    expected = [brute_force(model, t, n) for t in range(model.cfg.d_vocab)]
    assert [tuple(r) for r in hard.tolist()] == expected
    assert C.distinct(hard) == len(set(expected))
    assert 1 < C.distinct(hard) <= model.cfg.d_vocab  # a real count, not a constant


@given(st.integers(0, 10_000))
@settings(max_examples=25, deadline=None)
def test_distinct_is_invariant_to_row_order(seed):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, 3, (int(torch.randint(1, 30, (1,), generator=g)), 3), generator=g)
    perm = torch.randperm(len(rows), generator=g)
    assert C.distinct(rows[perm]) == C.distinct(rows) == len({tuple(r) for r in rows.tolist()})


def test_a_soft_vector_equal_to_a_tokens_embedding_is_that_token():
    """The first slot adds W_pos[0] to the soft vector as to a token: the vector W_E[t] gives
    token t's logits exactly, and its completion. Without the position (the prompt-tuning path,
    which gives a soft prompt no positional slot) the logits would differ."""
    model = tiny(3)
    lm = C.first_slot(model)
    t = torch.arange(model.cfg.d_vocab)
    rest = torch.randint(
        0, model.cfg.d_vocab, (len(t), 4), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        soft = lm.logits(model.W_E[t], rest, False)
        hard = model(torch.cat([t[:, None], rest], dim=1))
        unpositioned = lm.logits(model.W_E[t] - model.W_pos[0], rest, False)
    assert torch.equal(soft, hard)
    assert (unpositioned - hard).abs().max() > 1e-3
    completions = C.complete(model, model.W_E[t], 6)
    assert torch.equal(completions, C.hard_completions(model, 6))
    assert "W_pos[0] added" in lm.positions


def test_soft_optimisation_hits_reachable_targets():
    """Targets that hard tokens produce are reachable by some vector (their embedding), so the
    optimiser, starting from random vectors, must find vectors that hit every one."""
    model = tiny(4, vocab=5, scale=0.2).float()
    targets = C.hard_completions(model, 3)
    g = torch.Generator().manual_seed(0)
    start = C.random_vectors(model, len(targets), g)
    vectors, losses = C.optimise(model, targets, start, steps=300, lr=0.1)
    assert torch.equal(C.complete(model, vectors, 3), targets)
    before = C.optimise(model, targets, start, steps=0, lr=0.1)[1]
    assert (losses < before).all()


def test_measure_counts_and_is_deterministic():
    model = tiny(5, vocab=6, scale=0.2).float()
    cfg = C.CapacityConfig(k=40, n=3, steps=150, lr=0.1, seed=1)
    a, b = C.measure(model, cfg), C.measure(model, cfg)
    assert a.summary() | {"seconds": 0} == b.summary() | {"seconds": 0}
    assert torch.equal(a.vectors, b.vectors)
    assert a.hard_distinct <= a.vocab == 6 and a.swept == 6
    assert a.soft_distinct == C.distinct(a.soft) and a.random_distinct == C.distinct(a.random)
    hits = (a.soft == a.targets).all(1)
    assert a.exact == hits.double().mean().item() > 0
    # Each exactly hit target is a completion of its own: at least as many distinct ones.
    assert a.soft_distinct >= C.distinct(a.targets[hits])
    assert a.loss < C.measure(model, C.CapacityConfig(k=40, n=3, steps=0, seed=1)).loss
    # The control is the optimisation's start: the same random vectors, completed.
    g = torch.Generator().manual_seed(1)
    C.random_targets(6, 40, 3, g)
    assert torch.equal(a.random, C.complete(model, C.random_vectors(model, 40, g), 3))
    c = C.measure(model, C.CapacityConfig(k=40, n=3, steps=150, lr=0.1, seed=2))
    assert not torch.equal(a.targets, c.targets)


def test_adam_step_is_torch_adam():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)
    ours, ref = x.clone(), x.clone().requires_grad_(True)
    m, v = torch.zeros_like(x), torch.zeros_like(x)
    opt = torch.optim.Adam([ref], lr=0.05)
    for step in range(1, 6):
        grad = torch.randn(4, 5, generator=g, dtype=torch.float64)
        C._adam(ours, grad, m, v, step, 0.05)
        ref.grad = grad.clone()
        opt.step()
    assert torch.allclose(ours, ref.detach(), atol=1e-12)


def test_random_vectors_match_the_embedding_scale():
    model = tiny(6, vocab=7)
    g = torch.Generator().manual_seed(0)
    v = C.random_vectors(model, 20_000, g)
    E = model.W_E.detach()
    assert v.shape == (20_000, E.shape[1]) and v.dtype == E.dtype
    assert torch.allclose(v.mean(0), E.mean(0), atol=0.05 * E.std(0).max().item())
    assert torch.allclose(v.std(0), E.std(0), rtol=0.05)


def test_chunks_do_not_change_the_optimisation():
    model = tiny(7, vocab=5, scale=0.2)
    g = torch.Generator().manual_seed(0)
    targets = C.random_targets(5, 12, 3, g)
    start = C.random_vectors(model, 12, g)
    one, _ = C.optimise(model, targets, start, steps=20, lr=0.05, batch=12)
    chunked, _ = C.optimise(model, targets, start, steps=20, lr=0.05, batch=5)
    assert torch.allclose(one, chunked, atol=1e-9)


def test_the_vocabulary_can_be_sampled():
    model = tiny(8, vocab=7)
    result = C.measure(model, C.CapacityConfig(k=3, n=2, steps=1, vocab=4))
    assert result.swept == 4 and result.hard.shape == (4, 2)


def test_weights_get_no_gradient_and_modes_are_restored():
    model = tiny(9, vocab=5)
    model.train()
    C.measure(model, C.CapacityConfig(k=4, n=2, steps=3))
    assert all(p.grad is None for p in model.parameters())
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"k": 0}, "k must be a positive int"),
        ({"n": -1}, "n must be a positive int"),
        ({"steps": -1}, "steps must be an int >= 0"),
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"lr": float("nan")}, "lr must be a finite number > 0"),
        ({"batch": 0}, "batch must be a positive int"),
        ({"vocab": 0}, "vocab must be None"),
        ({"seed": 1.5}, "seed must be an int"),
        ({"k": True}, "k must be a positive int"),
    ],
)
def test_bad_config_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        C.CapacityConfig(**fields)


def test_bad_inputs_are_refused():
    model = tiny(10, vocab=5, n_ctx=6)
    with pytest.raises(ValueError, match="n=6 need 7 positions; the model takes n_ctx=6"):
        C.measure(model, C.CapacityConfig(k=2, n=6))
    with pytest.raises(ValueError, match=r"target ids must be in \[0, V=5\)"):
        C.optimise(model, torch.full((2, 2), 5), torch.zeros(2, 16), 1, 0.1)
    with pytest.raises(ValueError, match="2 starting vectors for 3 targets"):
        C.optimise(model, torch.zeros(3, 2, dtype=torch.long), torch.zeros(2, 16), 1, 0.1)
    with pytest.raises(ValueError, match=r"expected \[batch, d_model=16\]"):
        C.complete(model, torch.zeros(2, 15), 2)
    with pytest.raises(ValueError, match="must be finite"):
        C.complete(model, torch.full((1, 16), float("nan")), 2)
    with pytest.raises(ValueError, match="probe.model.Transformer or a Hugging Face"):
        C.first_slot(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------- Hugging Face

transformers = pytest.importorskip("transformers")


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=40, n_positions=12)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    with torch.no_grad():  # HF's random init is nearly constant in the first token: widen it
        model.transformer.wte.weight.mul_(20)
    return model


def test_hf_gpt2_counts_match_its_own_forward():
    model = tiny_gpt2()
    n = 4
    hard = C.hard_completions(model, n)
    expected = []
    with torch.no_grad():
        for t in range(40):
            ids = torch.tensor([[t]])
            for _ in range(n):
                ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
            expected.append(tuple(ids[0, 1:].tolist()))
    assert [tuple(r) for r in hard.tolist()] == expected
    assert 1 < C.distinct(hard) <= 40
    lm = C.first_slot(model)
    assert "wpe[0] added" in lm.positions and lm.n_ctx == 12
    with torch.no_grad():  # the soft vector wte[t] is token t: GPT-2 adds wpe[0] to it
        soft = lm.logits(model.transformer.wte.weight[:5], torch.zeros(5, 2, dtype=torch.long), 0)
        ids = torch.cat([torch.arange(5)[:, None], torch.zeros(5, 2, dtype=torch.long)], 1)
        assert torch.allclose(soft, model(ids).logits, atol=1e-12)


def test_hf_gpt2_soft_tokens_hit_reachable_targets_and_errors():
    model = tiny_gpt2(1)
    targets = C.hard_completions(model, 3, torch.arange(0, 40, 5))
    start = C.random_vectors(model, len(targets), torch.Generator().manual_seed(0))
    vectors, losses = C.optimise(model, targets, start, steps=200, lr=0.1)
    assert torch.equal(C.complete(model, vectors, 3), targets)
    result = C.measure(model, C.CapacityConfig(k=30, n=3, steps=20, lr=0.1))
    hits = (result.soft == result.targets).all(1)
    assert result.soft_distinct >= C.distinct(result.targets[hits])
    assert result.hard_distinct <= 40 and result.random_distinct <= 30
    with pytest.raises(ValueError, match="n_ctx=12: use n <= 11"):
        C.measure(model, C.CapacityConfig(k=2, n=12))


# ---------------------------------------------------------------------------- CLI, experiment


def test_cli_prints_the_counts(tmp_path, capsys):
    from prefix_probe.cli import main

    model = tiny(11, vocab=6).float()
    model.save(tmp_path / "m")
    argv = ["capacity", "--base", str(tmp_path / "m"), "--k", "8", "--n", "3", "--steps", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    expected = C.measure(model, C.CapacityConfig(k=8, n=3, steps=2))
    assert f"hard:   {expected.hard_distinct:>7,} distinct of 6 first tokens" in out
    assert f"soft:   {expected.soft_distinct:>7,} distinct of K=8" in out
    assert main([*argv[:-2], "--n", "9"]) == 2  # n_ctx 8: one line, exit 2
    assert "use n <= 7" in capsys.readouterr().err


def test_experiment_smoke_writes_figure_and_claims(tmp_path):
    from analysis.experiments import capacity as E
    from analysis.reproduce import reproduce

    index = reproduce(["capacity"], "smoke", 1, "cpu", tmp_path / "runs", tmp_path / "fig")
    assert (tmp_path / "fig" / "capacity_counts.png").stat().st_size > 1000
    text = index.read_text()
    assert "24,426 / 32,000" in text and "46,812 / 48,218" in text
    claims = (tmp_path / "fig" / "claims.md").read_text()
    assert claims.count("| capacity |") == 2
    assert E.verdict_beyond_hard({"a": {"soft_distinct": 12, "vocab": 11}}) == "supported"
    assert E.verdict_beyond_hard({"a": {"soft_distinct": 11, "vocab": 11}}).startswith("refuted")
    mixed = {"a": {"soft_distinct": 12, "vocab": 11}, "b": {"soft_distinct": 3, "vocab": 11}}
    assert E.verdict_beyond_hard(mixed) == "depends: soft distinct <= V on b"
    assert E.verdict_control({"a": {"soft_distinct": 5, "random_distinct": 5}}).startswith("ref")
