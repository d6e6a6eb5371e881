"""probe bench at a toy size: every section runs and returns well-formed numbers (no timings
are asserted; the machine is shared)."""

import json
from dataclasses import replace

import pytest

from prefix_probe.cli import main
from probe import bench

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


def test_paper_shapes_have_paper_timings():
    row = {"preset": "01", "method": "prefix"}
    assert bench.PAPER_MS[(row["preset"], row["method"])] == 35


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="unknown bench methods"):
        bench.BenchConfig(methods=("vt-prefix",))
    with pytest.raises(ValueError, match="unknown preset"):
        bench.BenchConfig(presets=("99",))


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
