"""Tests for the `tasks` package: targets against plain-Python references, sampling, the stable
split, mixtures, compositions, the registry and scoring."""

import hashlib
import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tasks
import tasks.base
import tasks.registry
from tasks import Batch, Mixture, Task, compose, exact_match, get_task, is_test, register, test_set

REPO = Path(__file__).resolve().parents[1]
PROPERTY = settings(derandomize=True, deadline=None, max_examples=50)

# Plain-Python references: one input row (list of ints) -> the expected output row.
REFERENCE = {
    "copy": lambda x: list(x),
    "reverse": lambda x: x[::-1],
    "sort_asc": lambda x: sorted(x),
    "sort_desc": lambda x: sorted(x, reverse=True),
    "add1": lambda x: [d + 1 for d in x],
    "add2": lambda x: [d + 2 for d in x],
    "hist": lambda x: [x.count(d) for d in x],
    "sort_asc_add1": lambda x: [d + 1 for d in sorted(x)],
}
VOCAB = {
    "copy": 8,
    "reverse": 8,
    "sort_asc": 8,
    "sort_desc": 8,
    "add1": 9,
    "add2": 10,
    "hist": 11,
    "sort_asc_add1": 9,
    "mix4": 10,
}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def n_distinct(row: list[int]) -> int:
    return len(set(row))


@pytest.fixture
def clean_registry():
    """Restore the registry after a test that registers tasks."""
    saved = dict(tasks.registry._REGISTRY)
    yield
    tasks.registry._REGISTRY.clear()
    tasks.registry._REGISTRY.update(saved)


# ---------------------------------------------------------------------------- targets


def test_registry_holds_the_paper_tasks():
    names = [t.name for t in tasks.list_tasks()]
    assert names == sorted(names)
    assert set(VOCAB) <= set(names)
    for name, vocab in VOCAB.items():
        task = get_task(name)
        assert task.vocab_size == vocab
        assert (task.input_len, task.output_len, task.n_digits, task.seq_len) == (10, 10, 8, 20)


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_targets_match_reference_on_sampled_batches(name):
    task = get_task(name)
    for split in tasks.SPLITS:
        batch = task.batch(500, split, gen(1))
        for x, y in zip(batch.inputs.tolist(), batch.targets.tolist(), strict=True):
            assert y == REFERENCE[name](x)
        assert 0 <= batch.targets.min() and batch.targets.max() < task.vocab_size


@PROPERTY
@given(rows=st.lists(st.lists(st.integers(0, 7), min_size=10, max_size=10), min_size=1))
def test_targets_match_reference_on_any_inputs(rows):
    inputs = torch.tensor(rows)
    for name, ref in REFERENCE.items():
        assert get_task(name).targets(inputs).tolist() == [ref(x) for x in rows]


def test_hist_extremes_fit_the_vocabulary():
    inputs = torch.tensor([[3] * 10, list(range(8)) + [0, 1]])
    assert get_task("hist").targets(inputs).tolist() == [[10] * 10, [2, 2] + [1] * 6 + [2, 2]]


# ---------------------------------------------------------------------------- batches


def test_tokens_and_loss_mask_layout():
    batch = get_task("sort_asc").batch(7, generator=gen())
    assert batch.tokens.shape == batch.loss_mask.shape == (7, 20)
    assert batch.tokens.dtype == torch.long and batch.loss_mask.dtype == torch.bool
    assert torch.equal(batch.tokens[:, :10], batch.inputs)
    assert torch.equal(batch.tokens[:, 10:], batch.targets)
    assert not batch.loss_mask[:, :10].any() and batch.loss_mask[:, 10:].all()
    moved = batch.to("cpu")
    assert isinstance(moved, Batch) and torch.equal(moved.tokens, batch.tokens)


def test_batch_rejects_bad_tensors():
    good = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="torch.long"):
        Batch(good.float(), good)
    with pytest.raises(ValueError, match="2-D"):
        Batch(good[0], good)
    with pytest.raises(ValueError, match="batch size: 2 vs 1"):
        Batch(good, good[:1])


# ---------------------------------------------------------------------------- split


def test_split_hash_is_pinned():
    # Changing the hash changes every test set: these values must never move.
    x = torch.tensor(
        [[0] * 10, [7] * 10, [i % 8 for i in range(10)], [1, 0, 7, 6, 5, 4, 3, 2, 1, 0]]
    )
    assert tasks.split_hash(x).tolist() == [394368922, 1294796148, 167335311, 1000154361]
    assert is_test(x).tolist() == [False, True, False, False]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(bytes(t.flatten().tolist())).hexdigest()


_SPLIT_SCRIPT = """
import hashlib, torch, tasks
d = lambda t: hashlib.sha256(bytes(t.flatten().tolist())).hexdigest()
x = torch.randint(0, 8, (5000, 10), generator=torch.Generator().manual_seed(7))
print(d(tasks.is_test(x).long()), d(tasks.test_set(tasks.get_task("sort_asc")).inputs))
"""


def test_split_and_test_set_identical_across_processes():
    x = torch.randint(0, 8, (5000, 10), generator=gen(7))
    here = f"{_digest(is_test(x).long())} {_digest(test_set(get_task('sort_asc')).inputs)}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _SPLIT_SCRIPT],
            env={**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(REPO)},
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        for hash_seed in ("1", "2")
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0 and out.strip() == here


def test_split_fraction_is_a_quarter():
    # Every sequence of length 6 over 8 digits (262,144 of them), and a large uniform sample.
    every = torch.tensor(list(itertools.product(range(8), repeat=6)))
    assert abs(is_test(every).float().mean().item() - 0.25) < 0.005
    sample = torch.randint(0, 8, (200_000, 10), generator=gen(3))
    assert abs(is_test(sample).float().mean().item() - 0.25) < 0.005  # about 5 sigma


@pytest.mark.parametrize("split", tasks.SPLITS)
def test_samples_land_in_the_requested_split(split):
    for name in ("sort_asc", "mix4"):
        inputs = get_task(name).batch(2000, split, gen(4)).inputs
        assert (is_test(inputs) == (split == "test")).all()


def test_unknown_split_names_the_valid_ones():
    with pytest.raises(ValueError, match="'train', 'test'"):
        get_task("copy").batch(4, "validation")


def test_test_set_is_fixed_and_safe_to_modify():
    task = get_task("reverse")
    a = test_set(task)
    assert a.inputs.shape == (3200, 10) and is_test(a.inputs).all()
    a.inputs.zero_()
    b = test_set(task)
    assert b.inputs.any() and torch.equal(b.targets, task.targets(b.inputs))
    assert torch.equal(b.inputs, task.batch(3200, "test", gen(0)).inputs)
    assert not torch.equal(test_set(task, 100, seed=1).inputs, b.inputs[:100])


# ---------------------------------------------------------------------------- sampling


def test_seeded_determinism():
    task = get_task("hist")
    a, b, c = (task.batch(300, generator=gen(s)) for s in (5, 5, 6))
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    torch.manual_seed(9)
    d = task.batch(50)
    torch.manual_seed(9)
    assert torch.equal(d.tokens, task.batch(50).tokens)


def _fraction_few_distinct_uniform(length: int, n_digits: int, at_most: int) -> float:
    """P(a uniform row has <= at_most distinct digits), via Stirling numbers of the 2nd kind."""
    stirling = [[0] * (length + 1) for _ in range(length + 1)]
    stirling[0][0] = 1
    for n in range(1, length + 1):
        for k in range(1, n + 1):
            stirling[n][k] = k * stirling[n - 1][k] + stirling[n - 1][k - 1]
    rows = sum(math.perm(n_digits, k) * stirling[length][k] for k in range(1, at_most + 1))
    return rows / n_digits**length


def test_about_half_the_samples_have_few_distinct_digits():
    # Half the samples are forced to <= 5 distinct digits; the uniform half gets there with
    # probability p ~ 0.322, so we expect 0.5 + 0.5 p ~ 0.661. Std over 20k rows ~ 0.0034.
    p = _fraction_few_distinct_uniform(10, 8, 5)
    assert 0.32 < p < 0.325
    expected = 0.5 + 0.5 * p
    for split in tasks.SPLITS:
        inputs = get_task("copy").sample_inputs(20_000, split, gen(11))
        assert 0 <= inputs.min() and inputs.max() < 8
        few = sum(n_distinct(x) <= 5 for x in inputs.tolist()) / 20_000
        assert abs(few - expected) < 0.02


@PROPERTY
@given(
    n=st.integers(1, 300),
    input_len=st.integers(6, 12),
    n_digits=st.integers(2, 10),
    split=st.sampled_from(tasks.SPLITS),
    seed=st.integers(0, 2**32),
)
def test_sampling_properties(n, input_len, n_digits, split, seed):
    x = tasks.sample_inputs(n, input_len, n_digits, split, gen(seed))
    assert x.shape == (n, input_len) and x.dtype == torch.long
    assert 0 <= x.min() and x.max() < n_digits
    assert (is_test(x) == (split == "test")).all()
    assert torch.equal(x, tasks.sample_inputs(n, input_len, n_digits, split, gen(seed)))


def test_impossible_split_fails_clearly(monkeypatch):
    monkeypatch.setattr(tasks.base, "_MAX_CANDIDATES", 2**14)
    only = torch.zeros(1, 1, dtype=torch.long)  # the one input of length 1 over one digit
    split = "train" if is_test(only).item() else "test"
    with pytest.raises(RuntimeError, match="too small"):
        tasks.sample_inputs(5, 1, 1, split, gen())


# ---------------------------------------------------------------------------- mixtures


def test_mixture_rows_use_each_component():
    mix = get_task("mix4")
    assert isinstance(mix, Mixture) and mix.vocab_size == 10 and mix.seq_len == 20
    batch, choice = mix.labelled_batch(4000, generator=gen(2))
    for i, task in enumerate(mix.tasks):
        rows = choice == i
        assert rows.sum() > 800  # expected 1000, std ~27
        assert torch.equal(batch.targets[rows], task.targets(batch.inputs[rows]))
    plain = mix.batch(500, "test", gen(2))
    every = torch.stack([t.targets(plain.inputs) for t in mix.tasks])
    assert (every == plain.targets).all(dim=2).any(dim=0).all()
    assert test_set(mix, 100).inputs.shape == (100, 10)


def test_mixture_errors():
    with pytest.raises(TypeError, match="batch"):
        get_task("mix4").targets(torch.zeros(1, 10, dtype=torch.long))
    short = Task("short", lambda x: x[:, :3], vocab_size=8, output_len=3)
    with pytest.raises(ValueError, match="disagree"):
        Mixture("bad", (get_task("copy"), short))
    with pytest.raises(TypeError, match="Task"):
        Mixture("empty", ())


# ---------------------------------------------------------------------------- compose


def test_compose_matches_the_registered_composition():
    sort_add = compose(get_task("sort_asc"), get_task("add1"))
    assert sort_add.name == "sort_asc_add1" and sort_add.vocab_size == 9
    x = get_task("copy").sample_inputs(500, generator=gen())
    assert torch.equal(sort_add.targets(x), get_task("sort_asc_add1").targets(x))
    hist_sorted = compose(get_task("hist"), get_task("sort_desc"), vocab_size=11)
    assert hist_sorted.targets(x).tolist() == [
        sorted((r.count(d) for d in r), reverse=True) for r in x.tolist()
    ]


def test_compose_vocabulary_and_errors():
    add1 = get_task("add1")
    with pytest.raises(ValueError, match="vocab_size="):
        compose(add1, add1)
    add1_twice = compose(add1, add1, vocab_size=10)
    x = torch.full((1, 10), 7)
    assert add1_twice.targets(x).tolist() == [[9] * 10]
    with pytest.raises(ValueError, match="raise vocab_size"):
        compose(add1, add1, vocab_size=9).targets(x)
    short = Task("short", lambda x: x[:, :3], vocab_size=8, output_len=3)
    with pytest.raises(ValueError, match="lengths must chain"):
        compose(short, add1)
    with pytest.raises(TypeError, match="Task"):
        compose(get_task("mix4"), add1)


# ---------------------------------------------------------------------------- registry


def test_user_defined_task(clean_registry):
    rotate = register(Task("rotate1", lambda x: x.roll(1, dims=1), vocab_size=8))
    assert get_task("rotate1") is rotate and rotate in tasks.list_tasks()
    batch = rotate.batch(100, generator=gen())
    assert batch.targets.tolist() == [x[-1:] + x[:-1] for x in batch.inputs.tolist()]
    assert is_test(test_set(rotate, 50).inputs).all()


def test_registry_errors(clean_registry):
    copy = get_task("copy")
    assert register(copy) is copy  # the same object again is a no-op
    other = Task("copy", lambda x: x, vocab_size=8)
    with pytest.raises(ValueError, match="replace=True"):
        register(other)
    assert register(other, replace=True) is get_task("copy")
    with pytest.raises(KeyError) as err:
        get_task("sort")
    message = str(err.value)
    assert "sort_asc" in message and "hist" in message and "register" in message


def test_task_validation():
    fn = lambda x: x  # noqa: E731
    with pytest.raises(ValueError, match="non-empty"):
        Task("", fn, vocab_size=8)
    with pytest.raises(ValueError, match="input_len"):
        Task("t", fn, vocab_size=8, input_len=0)
    with pytest.raises(ValueError, match="n_digits"):
        Task("t", fn, vocab_size=8, n_digits=0)
    with pytest.raises(ValueError, match="vocab_size >= n_digits"):
        Task("t", fn, vocab_size=5)
    with pytest.raises(TypeError, match="callable"):
        Task("t", 3, vocab_size=8)
    wrong_shape = Task("t", lambda x: x[:, :3], vocab_size=8)
    with pytest.raises(ValueError, match=r"shape \(2, 10\)"):
        wrong_shape.targets(torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="expects long inputs"):
        wrong_shape.targets(torch.zeros(2, 9, dtype=torch.long))


# ---------------------------------------------------------------------------- exact_match


def test_exact_match():
    targets = torch.tensor([[1, 2], [3, 4], [5, 6], [7, 0]])
    preds = torch.tensor([[1, 2], [3, 4], [5, 0], [7, 0]])
    assert exact_match(preds, targets) == 0.75
    assert exact_match(targets, targets) == 1.0
    with pytest.raises(ValueError, match=r"\(4, 1\).*\(4, 2\)"):
        exact_match(preds[:, :1], targets)


@PROPERTY
@given(rows=st.lists(st.lists(st.integers(0, 9), min_size=3, max_size=3), min_size=1), k=st.data())
def test_exact_match_counts_fully_correct_rows(rows, k):
    targets = torch.tensor(rows)
    wrong = k.draw(st.lists(st.booleans(), min_size=len(rows), max_size=len(rows)))
    preds = targets.clone()
    preds[torch.tensor(wrong), 0] += 1
    assert exact_match(preds, targets) == pytest.approx(1 - sum(wrong) / len(rows))
