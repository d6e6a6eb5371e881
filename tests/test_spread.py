"""The Appendix B measurements (``probe.spread``) in float64: the percentile gap of renormalised
prefix attention on patterns whose gap is known, ranks of known spectra, the bias rank of
prefixes whose biases are known, the same numbers through an HF GPT-2 with a PEFT prefix
(checked against HF's own attention output), and the experiment end to end."""

import copy

import numpy as np
import pytest
import torch
from helpers import model_config, random_prefix, tokens
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.experiments import prefix_spread as E
from analysis.reproduce import reproduce
from probe import Transformer
from probe.config import KVPrefix
from probe.probes import decompose, records_from_cache
from probe.spread import (
    bias_effective_rank,
    energy_rank,
    numerical_rank,
    participation_ratio,
    prefix_attention,
    prefix_attention_spread,
)

FEW = settings(max_examples=20, deadline=None, derandomize=True)


def pattern_from(beta: torch.Tensor, alpha: torch.Tensor, T: int) -> torch.Tensor:
    """A pattern [b, h, T, P + T] whose prefix block is alpha * beta at every query (beta
    [b, h, P], alpha [b, h]) and whose content block spreads 1 - alpha evenly over T keys."""
    b, h, P = beta.shape
    prefix = (alpha[..., None] * beta)[:, :, None].expand(b, h, T, P)
    content = ((1 - alpha) / T)[..., None, None].expand(b, h, T, T)
    return torch.cat([prefix, content], -1).double()


def records(model, prefix, batch=48, T=7, seed=3):
    x = tokens(batch, T, seed=seed, vocab=model.cfg.d_vocab)
    _, cache = model.run_with_cache(x, prefix=prefix)
    return records_from_cache(model, cache)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(model_config(n_layers=3, n_heads=2, d_head=8)).double()


# ---------------------------------------------------------------------------- the spread


def test_attention_constant_across_inputs_gives_gap_zero_whatever_the_prefix_mass():
    beta = torch.tensor([0.5, 0.25, 0.125, 0.125]).double().expand(6, 2, 4)
    alpha = torch.tensor([1.0, 0.5, 0.25, 0.125, 0.0625, 0.75]).double()[:, None].expand(6, 2)
    spread = prefix_attention_spread([pattern_from(beta, alpha, T=5)], P=4)
    assert torch.equal(spread.gap, torch.zeros(1, 2, 4, dtype=torch.float64))
    assert torch.equal(spread.mean[0, 0], beta[0, 0])  # dyadic: renormalised exactly
    assert spread.n_inputs.tolist() == [[6, 6]]


def test_known_gap_is_the_interpolated_1st_to_99th_percentile():
    # 101 inputs, beta_0 = i / 100: the 1st and 99th percentiles are 0.01 and 0.99 exactly.
    w = torch.arange(101, dtype=torch.float64) / 100
    beta = torch.stack([w, 1 - w], -1)[:, None]  # [101, 1, 2]
    spread = prefix_attention_spread([pattern_from(beta, torch.full((101, 1), 0.3), T=3)], P=2)
    assert torch.allclose(spread.gap, torch.full((1, 1, 2), 0.98, dtype=torch.float64))
    # A random spread against numpy's percentiles, for other bounds too.
    g = torch.Generator().manual_seed(0)
    beta = torch.rand(37, 3, 5, generator=g, dtype=torch.float64).softmax(-1)
    alpha = torch.rand(37, 3, generator=g, dtype=torch.float64)
    spread = prefix_attention_spread([pattern_from(beta, alpha, T=4)], P=5, low=0.05, high=0.9)
    expected = np.percentile(beta.numpy(), 90, axis=0) - np.percentile(beta.numpy(), 5, axis=0)
    assert np.allclose(spread.gap[0].numpy(), expected, atol=1e-15)


def test_renormalisation_divides_by_the_prefix_mass_and_flags_underflow():
    pattern = torch.tensor([[0.2, 0.1, 0.7], [0.0, 0.0, 1.0]], dtype=torch.float64)
    beta, observable = prefix_attention(pattern, 2)
    assert torch.allclose(beta[0], torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    assert observable.tolist() == [True, False]
    assert torch.equal(beta[1], torch.zeros(2, dtype=torch.float64))


def test_only_the_chosen_queries_count():
    beta = torch.tensor([0.5, 0.5]).double().expand(8, 1, 2)
    pattern = pattern_from(beta, torch.full((8, 1), 0.5), T=4)
    g = torch.Generator().manual_seed(1)
    pattern[:, :, 0, :2] = 0.5 * torch.rand(8, 1, 2, generator=g, dtype=torch.float64)
    assert prefix_attention_spread([pattern], P=2).gap.abs().max() == 0  # last query: constant
    assert prefix_attention_spread([pattern], P=2, queries=0).gap.min() > 0


def test_head_equals_layer_reads_head_l_mod_h_of_layer_l():
    g = torch.Generator().manual_seed(2)
    scales = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]], dtype=torch.float64)
    patterns = []
    for layer in range(3):  # head h of layer l moves by scales[l, h]: gap grows with it
        s = torch.randn(50, 2, 3, generator=g, dtype=torch.float64) * scales[layer, :, None]
        patterns.append(pattern_from(s.softmax(-1), torch.full((50, 2), 0.5), T=3))
    spread = prefix_attention_spread(patterns, P=3)
    expected = torch.stack([spread.gap[0, 0], spread.gap[1, 1], spread.gap[2, 0]]).mean(-1)
    assert torch.equal(spread.head_equals_layer, expected)
    assert spread.head_equals_layer[0] == 0 and spread.head_equals_layer[1] > 0
    assert torch.equal(spread.per_layer, spread.gap.mean((1, 2)))
    assert len(spread.rows()) == 6 and spread.rows()[0]["gap_max"] == 0


@FEW
@given(st.integers(2, 40), st.integers(1, 6), st.floats(0.0, 0.45), st.integers(0, 2**16))
def test_gap_lies_in_0_1_and_grows_as_the_percentiles_widen(b, P, low, seed):
    g = torch.Generator().manual_seed(seed)
    beta = (3 * torch.randn(b, 2, P, generator=g, dtype=torch.float64)).softmax(-1)
    pattern = pattern_from(beta, torch.rand(b, 2, generator=g, dtype=torch.float64) + 0.01, 2)
    wide = prefix_attention_spread([pattern], P=P, low=low, high=1 - low).gap
    inner = low + (0.5 - low) / 2  # a strictly narrower interval inside [low, 1 - low]
    narrow = prefix_attention_spread([pattern], P=P, low=inner, high=1 - inner).gap
    assert (wide >= 0).all() and (wide <= 1).all()
    assert (narrow <= wide + 1e-15).all()


def test_bad_input_is_refused_with_the_fix():
    pattern = pattern_from(torch.full((4, 1, 2), 0.5), torch.full((4, 1), 0.5), T=3)
    with pytest.raises(ValueError, match="pass P"):
        prefix_attention_spread([pattern])
    with pytest.raises(ValueError, match="P >= 1"):
        prefix_attention_spread([pattern], P=0)
    with pytest.raises(ValueError, match="low < high"):
        prefix_attention_spread([pattern], P=2, low=0.9, high=0.1)
    with pytest.raises(ValueError, match="outside the 3 content"):
        prefix_attention_spread([pattern], P=2, queries=3)
    with pytest.raises(ValueError, match="fewer than 2 inputs"):
        prefix_attention_spread([pattern[:1]], P=2)
    with pytest.raises(ValueError, match="one record"):
        prefix_attention_spread([])


# ---------------------------------------------------------------------------- ranks


def test_participation_ratio_and_energy_rank_of_known_spectra():
    s = torch.tensor
    assert participation_ratio(s([1.0, 1.0, 1.0, 1.0])) == 4
    assert participation_ratio(s([3.0, 0.0, 0.0])) == 1
    assert torch.isclose(participation_ratio(s([2.0, 1.0])), s(25 / 17, dtype=torch.float64))
    assert participation_ratio(s([0.0, 0.0])) == 0
    assert energy_rank(s([1.0, 1.0, 1.0, 1.0])) == 4
    assert energy_rank(s([1.0, 1.0, 1.0, 1.0]), 0.5) == 2
    assert energy_rank(s([1.0, 1.0]), 0.5) == 1  # exactly half is reached by the first
    assert energy_rank(s([10.0, 1.0, 0.1])) == 1  # 100 of 101.01 is 99.0%
    assert energy_rank(s([10.0, 1.0, 0.1]), 0.995) == 2
    assert energy_rank(s([0.0, 0.0])) == 0
    assert numerical_rank(s([1.0, 1e-20, 0.0]), 3, 3) == 1
    with pytest.raises(ValueError, match="energy share"):
        energy_rank(s([1.0]), 0.0)


@FEW
@given(st.lists(st.floats(1e-3, 1e3), min_size=1, max_size=12), st.floats(1e-3, 1e3))
def test_participation_ratio_is_between_1_and_the_rank_and_scale_free(values, c):
    s = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    pr = participation_ratio(s)
    assert 1 - 1e-12 <= pr <= len(values) + 1e-12
    assert torch.isclose(participation_ratio(c * s), pr, rtol=1e-12)
    assert 1 <= energy_rank(s) <= len(values)


def test_zero_keys_make_one_fixed_bias_of_rank_1_in_a_span_of_rank_P(model):
    # Prefix keys 0 score 0 against every query: beta = 1/P for every input, b = mean V_p.
    values = random_prefix(model, 4, seed=5)
    prefix = [KVPrefix(torch.zeros_like(p.values), p.values) for p in values]
    recs = records(model, prefix)
    ranks = bias_effective_rank(recs)
    assert (ranks.span_rank == 4).all()  # 4 random vectors in d_head 8
    assert (ranks.bias_rank == 1).all() and (ranks.energy_rank == 1).all()
    assert torch.allclose(ranks.participation, torch.ones(3, 2, dtype=torch.float64))
    assert torch.allclose(ranks.fixed_share, torch.ones(3, 2, dtype=torch.float64))
    assert prefix_attention_spread(recs).gap.abs().max() < 1e-15


def test_bias_singular_values_are_those_of_the_theorems_bias_term(model):
    prefix = random_prefix(model, 3, scale=4.0, seed=6)  # large keys: beta moves per input
    recs = records(model, prefix)
    ranks = bias_effective_rank(recs, queries=[-1, 2])
    for layer, record in enumerate(recs):
        bias = decompose(record).bias[:, [-1, 2]]  # [b, 2, h, e]
        for head in range(2):
            sv = torch.linalg.svdvals(bias[:, :, head].flatten(0, 1))
            assert torch.allclose(ranks.singular_values[layer, head, : len(sv)], sv, atol=1e-12)
    assert (ranks.bias_rank == 3).all() and (ranks.span_rank == 3).all()
    assert (ranks.participation > 1).all() and (ranks.participation < 3).all()
    assert prefix_attention_spread(recs).gap.min() > 0


def test_bias_rank_refuses_records_without_one_shared_prefix(model):
    with pytest.raises(ValueError, match="no prefix"):
        bias_effective_rank(records(model, None))
    per_input = random_prefix(model, 2, batch=48, seed=7)
    with pytest.raises(ValueError, match="differ between inputs"):
        bias_effective_rank(records(model, per_input))


# ---------------------------------------------------------------------------- HF + PEFT


def test_hf_gpt2_with_a_peft_prefix_matches_hfs_own_attention():
    pytest.importorskip("peft")
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from probe import hf

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50, n_positions=64,
                        bos_token_id=0, eos_token_id=0, attn_implementation="eager")  # fmt: skip
    base = GPT2LMHeadModel(config).eval().double()
    pm = get_peft_model(
        copy.deepcopy(base), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10)
    ).eval()
    with torch.no_grad():  # larger prefix keys, so beta moves with the input
        pm.prompt_encoder["default"].embedding.weight.mul_(5.0)
    x = torch.randint(1, 50, (40, 6), generator=torch.Generator().manual_seed(1))
    recs = hf.hf_records(base, x, prefix=pm)
    spread = prefix_attention_spread(recs)
    ranks = bias_effective_rank(recs)
    with torch.no_grad():
        attentions = pm(input_ids=x, output_attentions=True).attentions  # HF's own eager path
    reference = prefix_attention_spread(list(attentions), P=10)
    assert spread.gap.shape == (2, 2, 10) and spread.gap.min() > 0
    assert torch.allclose(spread.gap, reference.gap, atol=1e-12)
    values = hf.hf_prefix(base, pm, 1)  # PEFT's own prefix values [1, P, h, e]
    for layer, a in enumerate(attentions):
        beta = a[:, :, -1, :10] / a[:, :, -1, :10].sum(-1, keepdim=True)  # [b, h, P]
        bias = torch.einsum("bhp,phe->hbe", beta.double(), values[layer].values[0].double())
        pr = participation_ratio(torch.linalg.svdvals(bias))
        assert torch.allclose(ranks.participation[layer], pr, atol=1e-10)
    assert (ranks.span_rank == 10).all()  # 10 random values in d_head 16


# ---------------------------------------------------------------------------- the experiment


def synthetic(gap: float, participation: float, accuracy: float = 1.0) -> E.Measured:
    n, L, h, P = 3, 2, 2, 10
    return E.Measured(
        labels=[f"p{i}" for i in range(n)],
        accuracy=[accuracy] * n,
        gap=np.full((n, L, h, P), gap),
        gap_outputs=np.full((n, L), gap),
        span_rank=np.full((n, L, h), 10),
        bias_rank=np.full((n, L, h), 10),
        energy_rank=np.full((n, L, h), 2),
        participation=np.full((n, L, h), participation),
        fixed_share=np.full((n, L, h), 0.99),
        n_inputs=64,
        d_head=16,
    )


def test_verdicts_follow_the_bars_fixed_before_the_results():
    assert E.verdict_spread(synthetic(0.1, 1.5)) == "supported"
    assert E.verdict_spread(synthetic(0.6, 1.5)) == "refuted"
    assert E.verdict_spread(synthetic(0.3, 1.5)).startswith("depends: prefix p0 spreads 0.300")
    assert E.verdict_rank(synthetic(0.1, 1.5)) == "supported"
    assert E.verdict_rank(synthetic(0.1, 9.0)) == "refuted"
    assert E.verdict_rank(synthetic(0.1, 6.0)).startswith("depends: prefix p0")
    for verdict in (E.verdict_spread, E.verdict_rank):
        assert "p0 reaches only 50.0%" in verdict(synthetic(0.1, 1.5, accuracy=0.5))


def test_the_worst_prefix_decides_not_the_mean():
    m = synthetic(0.1, 1.5)
    m.gap[2, 1] = 0.4  # the mean of layer 1 is 0.2 < 0.25, prefix p2 is not
    m.participation[1, 0] = 7.0  # the mean ratio of layer 0 is 0.33 <= 0.5, prefix p1's 0.7
    assert E.verdict_spread(m) == "depends: prefix p2 spreads 0.400 in layer 1 (>= 0.25)"
    assert E.verdict_rank(m).startswith("depends: prefix p1 has effective rank 7.00")
    m.accuracy[1] = 0.8  # the mean accuracy 93% clears 90%, p1 does not
    assert E.verdict_spread(m).startswith("depends: prefix p1 reaches only 80.0%")


def test_quick_profile_has_at_least_5_prefixes_and_trains_only_the_extra_seeds():
    from analysis.experiments import paper03
    from analysis.report import PROFILES

    quick = PROFILES["quick"]
    runs = E.runs(quick)
    assert len(runs) >= 5 and all(dict(r.options)["length"] == 10 for r in runs)
    new = {r.key for r in runs} - {r.key for r in paper03.runs(quick)}
    assert len(new) == len(E.extra_seeds(quick)) == 4


def test_smoke_profile_end_to_end(tmp_path):
    index = reproduce(["prefix_spread"], "smoke", 1, "cpu", tmp_path / "runs", tmp_path / "fig")
    text = index.read_text()
    assert (tmp_path / "fig" / "prefix_spread.png").stat().st_size > 1000
    assert "| paper (Appendix B) |" in text and "0.016, 0.102, 0.174" in text
    assert text.count("| prefix_spread: paper03 P=10 prefixes |") == 2
