"""The training loop, evaluation and the ``probe pretrain`` command."""

import json

import pytest
import torch

from probe.cli import main
from probe.model import Transformer, preset
from probe.train import (
    TrainConfig,
    TrainingDiverged,
    check_fits,
    evaluate,
    generate,
    output_logits,
    pretrain,
    train,
)
from tasks import Task, get_task, test_set

QUICK = TrainConfig(steps=150, lr=1e-2, batch_size=64, eval_every=50, eval_size=256, progress=False)


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    return Transformer(preset("tiny", **overrides))


@pytest.fixture(scope="module")
def half_trained():
    """A tiny model part-way through learning sort_asc: some rows right, some wrong."""
    model = tiny()
    pretrain(get_task("sort_asc"), model, QUICK)
    return model.eval()


def test_training_is_deterministic_given_seeds():
    results, weights = [], []
    for _ in range(2):
        model = tiny()
        results.append(pretrain(get_task("copy"), model, QUICK))
        weights.append(model.fingerprint())
    assert weights[0] == weights[1]
    untimed = [[{k: v for k, v in h.items() if k != "seconds"} for h in r.history] for r in results]
    assert untimed[0] == untimed[1]
    assert [h["sequences"] for h in results[0].history] == [50 * 64, 100 * 64, 150 * 64]


def test_training_learns(half_trained):
    acc = evaluate(half_trained, get_task("sort_asc"), n=512)
    assert 0.05 < acc < 1.0  # learned something, and the evaluation below has both outcomes


def test_fast_evaluation_equals_generate(half_trained):
    task = get_task("sort_asc")
    batch = test_set(task, 512)
    generated = generate(half_trained, batch.inputs, task.output_len)
    slow = (generated == batch.targets).all(-1)
    fast = (output_logits(half_trained, batch.tokens, task).argmax(-1) == batch.targets).all(-1)
    assert torch.equal(fast, slow)
    assert 0 < slow.sum() < len(slow)
    assert evaluate(half_trained, task, n=512) == pytest.approx(slow.float().mean().item())


def test_only_given_parameters_move():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, [model.W_U], get_task("copy"), TrainConfig(steps=5, progress=False), [model])
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"W_U"}


def test_early_stop_at_target_accuracy():
    model = tiny()
    cfg = TrainConfig(
        steps=2000, lr=1e-2, eval_every=25, eval_size=256, target_accuracy=0.2, progress=False
    )
    result = pretrain(get_task("copy"), model, cfg)
    assert result.steps < 2000 and result.accuracy >= 0.2


def test_non_finite_loss_raises_and_cli_saves_nothing(tmp_path, capsys):
    model = tiny()
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        train(
            lambda t, positions: model(t, positions=positions) * float("nan"),
            model.parameters(),
            get_task("copy"),
            TrainConfig(steps=3, progress=False),
        )
    out = tmp_path / "diverged"
    code = main(
        [
            "pretrain",
            "--task",
            "copy",
            "--preset",
            "tiny",
            "--out",
            str(out),
            "--steps",
            "3",
            "--lr",
            "1e30",
            "--no-progress",
        ]
    )
    assert code != 0 and not out.exists()
    assert "loss is" in capsys.readouterr().err


def test_pretrain_cli_trains_saves_and_reports(tmp_path, capsys):
    out = tmp_path / "base"
    code = main(
        [
            "pretrain",
            "--task",
            "copy",
            "--preset",
            "tiny",
            "--out",
            str(out),
            "--steps",
            "20",
            "--threads",
            "1",
            "--no-progress",
        ]
    )
    assert code == 0 and torch.get_num_threads() == 1
    report = capsys.readouterr().out
    assert "held-out exact match" in report and "parameters" in report
    assert Transformer.load(out).cfg == preset("tiny")
    # The weights depend on the thread count (0 = one per core), so the save records it.
    assert json.loads((out / "config.json").read_text())["environment"]["threads"] == 1


def test_task_that_does_not_fit_the_model_is_refused(capsys):
    small = Transformer(preset("tiny", d_vocab=8))
    with pytest.raises(ValueError, match="d_vocab >= 10"):
        check_fits(small, get_task("add2"))
    long_task = Task("long_copy", lambda x: x, vocab_size=8, input_len=15, output_len=15)
    with pytest.raises(ValueError, match="n_ctx >= 29"):
        check_fits(small, long_task)
    assert main(["pretrain", "--task", "nope", "--out", "x", "--steps", "1"]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["pretrain", "--task", "copy", "--out", "x", "--threads", "-1"]) == 2
    assert "--threads must be >= 0" in capsys.readouterr().err


def test_train_config_validation():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="target_accuracy"):
        TrainConfig(target_accuracy=90)
    with pytest.raises(ValueError, match="schedule must be 'cosine' or 'constant'"):
        TrainConfig(schedule="linear")
    with pytest.raises(ValueError, match="betas must be two numbers"):
        TrainConfig(betas=(0.9, 1.0))


def test_learning_rate_warms_up_then_decays_or_holds():
    cosine = TrainConfig(steps=100, lr=1.0, warmup=10)
    constant = TrainConfig(steps=100, lr=1.0, warmup=10, schedule="constant")
    for cfg in (cosine, constant):
        assert [cfg.lr_at(s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert cosine.lr_at(10) == 1.0 and cosine.lr_at(55) == pytest.approx(0.55)
    assert cosine.lr_at(100) == pytest.approx(0.1)
    assert {constant.lr_at(s) for s in range(10, 100)} == {1.0}


def test_evaluate_given_scores_only_the_tokens_after_those_given():
    """An oracle forward that is wrong only at the first output token: 0% exact match, but 100%
    once that token is given; given outside [0, output_len) is refused."""
    task = get_task("sort_asc")

    def oracle_wrong_first(tokens, positions=slice(None)):
        targets = task.fn(tokens[:, : task.input_len])
        logits = torch.nn.functional.one_hot(targets, 11).float()
        logits[:, 0] = torch.nn.functional.one_hot((targets[:, 0] + 1) % 11, 11).float()
        return logits

    assert evaluate(oracle_wrong_first, task, n=64) == 0.0
    assert evaluate(oracle_wrong_first, task, n=64, given=1) == 1.0
    with pytest.raises(ValueError, match="given"):
        evaluate(oracle_wrong_first, task, n=64, given=10)


def test_probe_submodules_are_modules_not_shadowed_by_functions():
    """``probe`` re-exports functions, never one named like a submodule: ``import probe.train``
    must give the module (re-exporting the function ``train`` used to shadow it)."""
    import importlib
    import inspect

    import probe

    for name in ("adapters", "io", "model", "probes", "train"):
        module = importlib.import_module(f"probe.{name}")
        assert inspect.ismodule(getattr(probe, name)) and getattr(probe, name) is module
    assert probe.tune.__module__ == "probe.train" and probe.pretrain.__module__ == "probe.train"
