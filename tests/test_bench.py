"""probe bench at a toy size: every section runs and returns well-formed numbers (no timings
are asserted; the machine is shared)."""

import json
from dataclasses import replace
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from prefix_probe.cli import main
from probe import bench
from probe.adapters import make_adapter
from probe.model import Transformer, preset
from probe.train import output_logits
from tasks import get_task

TOY = bench.BenchConfig(
    presets=("tiny",),
    methods=("pretrain", "prefix"),
    steps=2,
    repeats=1,
    eval_size=64,
    time_to_accuracy=False,
    peer=False,
    compare_threads=False,
    threads=1,
)


def test_bench_rows_are_well_formed():
    result = bench.run_bench(TOY, log=lambda line: None)
    assert result.meta["threads"] == 1 and result.meta["matmul_peak_gflops"] > 0
    assert [(r["preset"], r["method"]) for r in result.train] == [
        ("tiny", "pretrain"),
        ("tiny", "prefix"),
    ]
    for row in result.train:
        assert row["seq_per_s"] > 0 and row["cpu_ms_per_step"] > 0 and row["peak_mib"] > 0
        assert row["gflop_per_step"] > 0 and 0 < row["mfu"]
    pretrain, prefix = result.train
    assert prefix["gflop_per_step"] < pretrain["gflop_per_step"]  # no weight gradients
    assert result.eval[0]["seq_per_s"] > 0
    assert json.loads(result.to_json())["train"][0]["method"] == "pretrain"
    assert "pretrain" in bench.format_table(result)


def test_runs_per_pass_are_timed_per_run():
    result = bench.run_bench(replace(TOY, methods=("prefix",), runs_per_pass=(1, 3)), log=print)
    (row,) = result.runs_per_pass
    assert set(row["ms_per_run_step"]) == {1, 3} and row["gain"][1] == 1.0
    assert all(ms > 0 for ms in row["ms_per_run_step"].values())
    assert "K=3" in bench.format_table(result)


def test_batched_runs_get_only_their_own_gradient():
    """The pass time_runs_per_pass times trains each prefix on its own rows: a run's gradient
    from the batched loss equals its gradient from its rows alone (to rounding)."""
    torch.manual_seed(0)
    base = Transformer(preset("tiny", dropout=0.0)).requires_grad_(False)
    task, B = get_task("sort_desc"), 8
    adapters = [make_adapter("prefix", base) for _ in range(3)]
    for a in adapters:
        torch.nn.init.normal_(a.kv)
    batch = task.batch(3 * B, "train", torch.Generator().manual_seed(0))
    bench.batched_prefix_loss(base, adapters, batch.tokens, batch.targets, task).backward()
    for i, a in enumerate(adapters):
        rows = slice(i * B, (i + 1) * B)
        alone = output_logits(partial(a, base), batch.tokens[rows], task)
        loss = F.cross_entropy(alone.flatten(0, 1), batch.targets[rows].flatten())
        (grad,) = torch.autograd.grad(loss, a.kv)
        torch.testing.assert_close(a.kv.grad, grad, rtol=1e-5, atol=1e-7)
        assert grad.abs().sum() > 0


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="unknown bench methods"):
        bench.BenchConfig(methods=("vt-prefix",))
    with pytest.raises(ValueError, match="unknown preset"):
        bench.BenchConfig(presets=("99",))
    with pytest.raises(ValueError, match="runs_per_pass must be >= 1"):
        bench.BenchConfig(runs_per_pass=(0,))


def test_peer_is_measured_or_skipped_with_a_reason():
    row = bench.peer_prefix("tiny", replace(TOY, peer=True))
    if "skipped" in row:
        assert "peft" in row["skipped"]
    else:
        assert row["ours_seq_per_s"] > 0 and row["peer_seq_per_s"] > 0 and row["ratio"] > 0


def test_cli_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["bench", "--quick", "--preset", "tiny", "--method", "lora", "--steps", "1"]
    assert main([*argv, "--no-peer", "--no-tta", "--out", str(out)]) == 0
    assert "lora" in capsys.readouterr().out
    assert json.loads(out.read_text())["train"][0]["method"] == "lora"


def test_compiled_row_counts_compile_time():
    # dynamo's "eager" backend: the same tracing and timing path, without inductor's minutes
    row = bench.time_compiled("tiny", replace(TOY, steps=2, repeats=1), backend="eager")
    assert row["eager_ms_per_step"] > 0 and row["compiled_ms_per_step"] > 0
    assert row["compile_s"] > 0  # the first compiled run pays for compiling
    assert "compiled" in bench.format_compiled_row(row)
