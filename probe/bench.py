"""Speed benchmarks behind ``probe bench``: how fast the toolkit trains, on this machine, now.

Everything is measured in one process, with one thread setting, through the real code paths:

- **train**: training-step throughput (sequences/s) of pretraining and each tuning method at the
  paper's shapes, through :func:`probe.train.train` (data, forward, loss, backward, clipping,
  fused AdamW);
- **eval**: held-out evaluation throughput (:func:`probe.train.evaluate`, one forward pass);
- **mfu**: model FLOPs utilisation: FLOPs of a step (``torch.utils.flop_counter``) x steps/s,
  over the fp32 matmul peak timed in the same run with the same threads;
- **time to accuracy**: the paper's experiment 01 end to end with the project's defaults
  (``probe pretrain`` to >= 90% sort-ascending, then full fine-tuning and prefix-tuning on
  sort-descending with ``probe tune``'s defaults and :data:`probe.train.DEFAULT_LR`);
- **peer**: Hugging Face GPT-2 of the same shape with PEFT prefix-tuning, stepped the same way
  and timed alternately with ours (so machine load hits both alike); needs the ``hf`` extra;
- **runs per pass**: what training K prefix runs on one frozen base as one batched forward would
  gain over training them one at a time (per-run step time at K = 1, 4, 16), the measurement
  that says whether batching runs pays on a device;
- **compile** (``--compile``, off by default): pretraining under ``torch.compile`` against eager,
  timed alternately, with the compile time counted.

Every figure is measured in this run: nothing is compared with a number from another day.

Peak memory is ``ru_maxrss`` (the process's peak resident set so far; rows run small to large),
or ``torch.cuda.max_memory_allocated`` per row on a GPU. Timings on a shared machine are noisy:
each figure is the median of ``repeats`` timed runs, and the load average is recorded.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from probe.adapters import adapter_config, make_adapter
from probe.cli import build_parser, train_config  # time_to_accuracy uses the CLI's own defaults
from probe.config import PRETRAIN_WEIGHT_DECAY
from probe.model import KVPrefix, Transformer, preset
from probe.train import (
    DEFAULT_LR,
    DEFAULT_WEIGHT_DECAY,
    FUSED_ADAMW,
    TrainConfig,
    evaluate,
    output_logits,
    pretrain,
    train,
    tune,
)
from tasks import get_task

METHODS = ("pretrain", "full", "prefix", "prompt", "lora")
PRETRAIN_TASK, TUNE_TASK = "sort_asc", "sort_desc"
PEAK_SIZES = (256, 512, 1024)  # the peak is the fastest of these square fp32 products


@dataclass(frozen=True)
class BenchConfig:
    presets: tuple[str, ...] = ("01", "02", "03")
    methods: tuple[str, ...] = METHODS
    batch_size: int = 64
    steps: int = 20  # timed optimiser steps per repeat
    repeats: int = 3  # timed repeats; figures are medians
    eval_size: int = 3200
    time_to_accuracy: bool = True
    peer: bool = True
    compare_threads: bool = True  # pretraining with 1 thread vs one per CPU
    runs_per_pass: tuple[int, ...] = (1, 4, 16)  # K prefix runs batched on one base; () skips
    compile: bool = False  # also time pretraining under torch.compile
    device: str = "cpu"
    threads: int | None = None  # None: leave torch's setting
    seed: int = 0

    def __post_init__(self):
        for name in ("batch_size", "steps", "repeats", "eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"BenchConfig.{name} must be >= 1, got {getattr(self, name)}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown bench methods {bad}; choose from {METHODS}")
        for name in self.presets:
            preset(name)  # raises on an unknown preset
        if any(k < 1 for k in self.runs_per_pass):
            raise ValueError(f"BenchConfig.runs_per_pass must be >= 1, got {self.runs_per_pass}")

    def quick(self) -> BenchConfig:
        """Fewer steps and repeats (the time-to-accuracy run is unchanged: use --no-tta)."""
        return replace(self, steps=5, repeats=2, eval_size=640)


@dataclass
class BenchResult:
    meta: dict
    train: list[dict] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)
    time_to_accuracy: dict | None = None
    peer: list[dict] = field(default_factory=list)
    threads: list[dict] = field(default_factory=list)
    runs_per_pass: list[dict] = field(default_factory=list)
    compiled: list[dict] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def peak_memory_mib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _reset_peak(device: str):
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def matmul_peak(device: str = "cpu", n: int = 1024, repeats: int = 10) -> float:
    """The machine's fp32 matmul rate in FLOP/s: best of ``repeats`` n x n x n products."""
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    times = []
    for _ in range(repeats + 2):  # the first two warm up the kernels
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    best = min(times[2:])
    return 2 * n**3 / best


def _trainer(name: str, method: str, cfg: TrainConfig, seed: int) -> Callable[[], object]:
    """A fresh model and a function that trains it (or an adapter on it) with ``cfg``."""
    torch.manual_seed(seed)
    model = Transformer(preset(name)).to(cfg.device)
    if method == "pretrain":
        return lambda: pretrain(get_task(PRETRAIN_TASK), model, cfg)
    return lambda: tune(model, get_task(TUNE_TASK), adapter_config(method), cfg)[1]


def _timed_config(bench: BenchConfig, steps: int) -> TrainConfig:
    # One tiny evaluation at the last step (train() always evaluates there); no progress bar.
    return TrainConfig(
        steps=steps,
        batch_size=bench.batch_size,
        eval_every=10**9,
        eval_size=1,
        seed=bench.seed,
        device=bench.device,
        progress=False,
    )


def step_flops(name: str, method: str, bench: BenchConfig) -> int:
    """FLOPs of one training step's forward and backward (matmuls and attention; the optimiser
    and elementwise work are not counted), by torch's flop counter."""
    torch.manual_seed(bench.seed)
    model = Transformer(preset(name)).to(bench.device).train()
    forward, task = model, get_task(PRETRAIN_TASK)
    if method != "pretrain":
        adapter = make_adapter(method, model.requires_grad_(False)).to(bench.device).train()
        forward, task = partial(adapter, model), get_task(TUNE_TASK)
    batch = task.batch(bench.batch_size, generator=torch.Generator().manual_seed(0))
    batch = batch.to(bench.device)
    with FlopCounterMode(display=False) as counter:
        logits = output_logits(forward, batch.tokens, task)
        F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten()).backward()
    return counter.get_total_flops()


def time_training(name: str, method: str, bench: BenchConfig) -> dict:
    """Median throughput of ``repeats`` runs of ``steps`` steps, after one warm-up run."""
    run = _trainer(name, method, _timed_config(bench, bench.steps), bench.seed)
    _trainer(name, method, _timed_config(bench, 2), bench.seed)()  # warm-up
    _reset_peak(bench.device)
    walls, cpus = [], []
    for _ in range(bench.repeats):
        cpu = time.process_time()
        walls.append(run().seconds)
        cpus.append(time.process_time() - cpu)
    wall, cpu = statistics.median(walls), statistics.median(cpus)
    row = {
        "preset": name,
        "method": method,
        "seq_per_s": bench.steps * bench.batch_size / wall,
        "ms_per_step": 1e3 * wall / bench.steps,
        "cpu_ms_per_step": 1e3 * cpu / bench.steps,  # all threads of this process
        "ms_per_step_runs": [1e3 * w / bench.steps for w in walls],
        "peak_mib": peak_memory_mib(bench.device),
    }
    return row


def time_evaluation(name: str, bench: BenchConfig) -> dict:
    """Median throughput of :func:`probe.train.evaluate` on ``eval_size`` held-out sequences."""
    torch.manual_seed(bench.seed)
    model = Transformer(preset(name)).to(bench.device).eval()
    task = get_task(PRETRAIN_TASK)
    evaluate(model, task, bench.eval_size, device=bench.device)  # warm-up, builds the test set
    times = []
    for _ in range(bench.repeats):
        start = time.perf_counter()
        evaluate(model, task, bench.eval_size, device=bench.device)
        times.append(time.perf_counter() - start)
    wall = statistics.median(times)
    return {"preset": name, "seq_per_s": bench.eval_size / wall, "ms": 1e3 * wall}


def time_to_accuracy(bench: BenchConfig) -> dict:
    """The paper's experiment 01 with ``probe pretrain`` / ``probe tune`` defaults, timed."""

    def cli_config(
        *argv: str, lr: float | None = None, weight_decay: float = PRETRAIN_WEIGHT_DECAY
    ) -> TrainConfig:
        args = build_parser().parse_args([*argv, "--out", "-", "--no-progress"])
        cfg = train_config(args, lr, weight_decay)
        return replace(cfg, device=bench.device, seed=bench.seed)

    runs = {}
    start = time.perf_counter()
    pre_cfg = cli_config("pretrain", "--task", PRETRAIN_TASK, "--target-accuracy", "0.9")
    torch.manual_seed(bench.seed)
    model = Transformer(preset("01"))
    result = pretrain(get_task(PRETRAIN_TASK), model, pre_cfg)
    runs["pretrain"] = result
    for method in ("full", "prefix"):
        argv = ("tune", "--base", "-", "--task", TUNE_TASK, "--method", method)
        cfg = cli_config(*argv, lr=DEFAULT_LR[method], weight_decay=DEFAULT_WEIGHT_DECAY[method])
        runs[method] = tune(model, get_task(TUNE_TASK), adapter_config(method), cfg)[1]
    total = time.perf_counter() - start
    return {
        "runs": {
            name: {
                "task": PRETRAIN_TASK if name == "pretrain" else TUNE_TASK,
                "steps": r.steps,
                "accuracy": r.accuracy,
                "seconds": r.seconds,
            }
            for name, r in runs.items()
        },
        "pretrain_reached_90": runs["pretrain"].accuracy >= 0.9,
        "total_seconds": total,
    }


def peer_prefix(name: str, bench: BenchConfig) -> dict:
    """Prefix-tuning step throughput: ours vs PEFT on HF GPT-2 of the same shape (P=1).

    Both step the same way: a fresh batch, forward, cross-entropy on the output positions,
    backward, gradient clipping, AdamW. Repeats alternate ours / peer so load hits both alike.
    """
    try:
        import peft
        import transformers
    except ImportError:
        return {"preset": name, "skipped": "peft/transformers not installed (the hf extra)"}
    c = preset(name)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=c.d_vocab,
            n_positions=c.n_ctx,
            n_embd=c.d_model,
            n_layer=c.n_layers,
            n_head=c.n_heads,
            n_inner=c.d_mlp,
            activation_function="gelu_new",  # tanh GELU, as ours
            resid_pdrop=c.dropout,
            embd_pdrop=c.dropout,
            attn_pdrop=c.dropout,
            tie_word_embeddings=False,  # ours has a separate unembedding
            bos_token_id=None,
            eos_token_id=None,
        )
    )
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=1)
    with warnings.catch_warnings():  # deprecation notices between peft and transformers
        warnings.simplefilter("ignore", FutureWarning)
        model = peft.get_peft_model(gpt2, config).to(bench.device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    cfg = _timed_config(bench, bench.steps)
    optimiser = torch.optim.AdamW(params, lr=DEFAULT_LR["prefix"], betas=cfg.betas,
                                  weight_decay=cfg.weight_decay, fused=FUSED_ADAMW)  # fmt: skip
    task = get_task(TUNE_TASK)
    data = torch.Generator().manual_seed(bench.seed)

    def peer_step():
        batch = task.batch(bench.batch_size, "train", data).to(bench.device)
        logits = output_logits(lambda t, positions: model(input_ids=t).logits, batch.tokens, task)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten())
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimiser.step()

    def peer_run() -> float:
        _sync(bench.device)
        start = time.perf_counter()
        for _ in range(bench.steps):
            peer_step()
        _sync(bench.device)
        return time.perf_counter() - start

    with FlopCounterMode(display=False) as counter:
        peer_step()

    ours_run = _trainer(name, "prefix", cfg, bench.seed)
    ours_run(), peer_run()  # warm-up
    ours, peer = [], []
    for _ in range(bench.repeats):
        ours.append(ours_run().seconds)
        peer.append(peer_run())
    n = bench.steps * bench.batch_size
    ours_rate, peer_rate = n / statistics.median(ours), n / statistics.median(peer)
    return {
        "preset": name,
        "peer": f"transformers {transformers.__version__} GPT2LMHeadModel + peft "
        f"{peft.__version__} PrefixTuningConfig(num_virtual_tokens=1), "
        f"attn {gpt2.config._attn_implementation}",
        "ours_seq_per_s": ours_rate,
        "peer_seq_per_s": peer_rate,
        "ours_gflop_per_step": step_flops(name, "prefix", bench) / 1e9,
        "peer_gflop_per_step": counter.get_total_flops() / 1e9,
        "ratio": ours_rate / peer_rate,
    }


def batched_prefix(prefixes: list[list[KVPrefix]], rows: int) -> list[KVPrefix]:
    """K runs' prefixes (each a list of per-layer [P, head, d_head] KVPrefixes) as one
    per-example prefix for K x ``rows`` sequences, run i's on rows i*rows .. (i+1)*rows - 1:
    per layer keys and values [K * rows, P, head, d_head]."""
    return [
        KVPrefix(
            *(torch.stack(part).repeat_interleave(rows, 0) for part in zip(*runs, strict=True))
        )
        for runs in zip(*prefixes, strict=True)
    ]


def batched_prefix_loss(base: Transformer, adapters: list, tokens, targets, task) -> Tensor:
    """The sum of K prefix runs' mean losses on one forward of their K x rows sequences
    (tokens [K * rows, seq_len], run i's rows contiguous): each prefix's gradient is its own
    run's, as if trained alone."""
    k = len(adapters)
    prefix = batched_prefix([a.prefix(base) for a in adapters], len(tokens) // k)
    logits = output_logits(partial(base, prefix=prefix), tokens, task)
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return losses.view(k, -1).mean(1).sum()


def time_runs_per_pass(name: str, bench: BenchConfig) -> dict:
    """Per-run step time of K prefix runs trained as one pass on one frozen base.

    K K/V prefixes (the adapter's defaults) on one base in train mode: one forward of
    K x batch_size sequences (:func:`batched_prefix_loss`), backward, clipping per run, one
    fused AdamW over all of them. Returns ``{"preset", "ms_per_run_step": {K: ms},
    "gain": {K: ms at the first K / ms at K}}``.
    """
    bench = replace(bench, steps=min(bench.steps, 5), repeats=min(bench.repeats, 2))  # K x work
    torch.manual_seed(bench.seed)
    base = Transformer(preset(name)).to(bench.device).requires_grad_(False).train()
    task = get_task(TUNE_TASK)
    data = torch.Generator().manual_seed(bench.seed)

    def step(adapters: list, optimiser) -> None:
        batch = task.batch(len(adapters) * bench.batch_size, "train", data).to(bench.device)
        loss = batched_prefix_loss(base, adapters, batch.tokens, batch.targets, task)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        for a in adapters:
            torch.nn.utils.clip_grad_norm_(a.parameters(), 1.0)
        optimiser.step()

    per_run = {}
    for k in bench.runs_per_pass:
        adapters = [make_adapter("prefix", base).to(bench.device).train() for _ in range(k)]
        params = [p for a in adapters for p in a.parameters()]
        optimiser = torch.optim.AdamW(params, lr=DEFAULT_LR["prefix"], fused=FUSED_ADAMW)
        step(adapters, optimiser), step(adapters, optimiser)  # warm-up
        walls = []
        for _ in range(bench.repeats):
            _sync(bench.device)
            start = time.perf_counter()
            for _ in range(bench.steps):
                step(adapters, optimiser)
            _sync(bench.device)
            walls.append(time.perf_counter() - start)
        per_run[k] = 1e3 * statistics.median(walls) / bench.steps / k
    first = per_run[bench.runs_per_pass[0]]
    return {
        "preset": name,
        "ms_per_run_step": per_run,
        "gain": {k: first / ms for k, ms in per_run.items()},
    }


def time_compiled(name: str, bench: BenchConfig, backend: str = "inductor") -> dict:
    """Pretraining with the model under ``torch.compile(backend=backend)`` against eager, the
    same training loop, repeats alternating. ``compile_s`` is the compiled model's first run
    minus its median run: the compile time a run pays once."""
    cfg = _timed_config(bench, bench.steps)

    def trainer(compiled: bool):
        torch.manual_seed(bench.seed)
        model = Transformer(preset(name)).to(bench.device)
        forward = torch.compile(model, backend=backend) if compiled else model
        task = get_task(PRETRAIN_TASK)
        return lambda: train(forward, model.parameters(), task, cfg, modules=[model]).seconds

    eager, compiled = trainer(False), trainer(True)
    start = time.perf_counter()
    compiled()
    first = time.perf_counter() - start
    eager()  # warm-up
    walls = {"eager": [], "compiled": []}
    for _ in range(bench.repeats):
        walls["eager"].append(eager())
        walls["compiled"].append(compiled())
    ms = {k: 1e3 * statistics.median(v) / bench.steps for k, v in walls.items()}
    return {
        "preset": name,
        "eager_ms_per_step": ms["eager"],
        "compiled_ms_per_step": ms["compiled"],
        "compile_s": first - ms["compiled"] * bench.steps / 1e3,
        "speedup": ms["eager"] / ms["compiled"],
    }


def time_threads(bench: BenchConfig) -> list[dict]:
    """Pretraining throughput with 1 thread and with one per CPU, at each preset."""
    counts = sorted({1, os.cpu_count() or 1})
    bench = replace(bench, steps=min(bench.steps, 5), repeats=min(bench.repeats, 2))
    before, rows = torch.get_num_threads(), []
    try:
        for name in bench.presets:
            row = {"preset": name}
            for n in counts:
                torch.set_num_threads(n)
                row[f"seq_per_s_{n}"] = time_training(name, "pretrain", bench)["seq_per_s"]
            rows.append(row)
    finally:
        torch.set_num_threads(before)
    return rows


def run_bench(bench: BenchConfig, log: Callable[[str], None] = print) -> BenchResult:
    """Run every section of the benchmark; ``log`` gets a line as each row finishes."""
    if bench.threads is not None:
        torch.set_num_threads(bench.threads)
    result = BenchResult(
        meta={
            "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "device": bench.device,
            "loadavg_before": os.getloadavg(),
            "config": asdict(bench),
        }
    )
    rates = {n: matmul_peak(bench.device, n) for n in PEAK_SIZES}
    peak = max(rates.values())
    result.meta["matmul_gflops"] = {str(n): r / 1e9 for n, r in rates.items()}
    result.meta["matmul_peak_gflops"] = peak / 1e9
    log(format_peak(result.meta))
    for name in bench.presets:
        for method in bench.methods:
            row = time_training(name, method, bench)
            row["gflop_per_step"] = step_flops(name, method, bench) / 1e9
            row["mfu"] = row["gflop_per_step"] * 1e9 * row["seq_per_s"] / bench.batch_size / peak
            result.train.append(row)
            log(format_train_row(row))
        result.eval.append(time_evaluation(name, bench))
        log(f"eval {name}: {result.eval[-1]['seq_per_s']:,.0f} seq/s")
    if bench.compare_threads and bench.device == "cpu":
        result.threads = time_threads(bench)
        for row in result.threads:
            log(format_threads_row(row))
    if bench.peer:
        for name in bench.presets:
            result.peer.append(peer_prefix(name, bench))
            log(format_peer_row(result.peer[-1]))
    if bench.runs_per_pass:
        for name in bench.presets:
            result.runs_per_pass.append(time_runs_per_pass(name, bench))
            log(format_runs_per_pass_row(result.runs_per_pass[-1]))
    if bench.compile:
        for name in bench.presets:
            result.compiled.append(time_compiled(name, bench))
            log(format_compiled_row(result.compiled[-1]))
    if bench.time_to_accuracy:
        result.time_to_accuracy = time_to_accuracy(bench)
        log(f"time to accuracy (01): {result.time_to_accuracy['total_seconds']:.1f} s")
    result.meta["loadavg_after"] = os.getloadavg()
    result.meta["peak_mib"] = peak_memory_mib(bench.device)
    return result


def format_train_row(row: dict) -> str:
    return (
        f"{row['preset']:>6s} {row['method']:9s} {row['seq_per_s']:9,.0f} "
        f"{row['ms_per_step']:8.1f} {row['cpu_ms_per_step']:8.1f} "
        f"{row['gflop_per_step']:7.2f} {row['mfu']:6.1%} {row['peak_mib']:8.0f}"
    )


def format_runs_per_pass_row(row: dict) -> str:
    cells = [
        f"K={k}: {ms:6.1f} ms ({row['gain'][k]:.2f}x)" for k, ms in row["ms_per_run_step"].items()
    ]
    return f"{row['preset']:>6s} " + "  ".join(cells)


def format_compiled_row(row: dict) -> str:
    return (
        f"{row['preset']:>6s} eager {row['eager_ms_per_step']:7.1f} ms  compiled "
        f"{row['compiled_ms_per_step']:7.1f} ms ({row['speedup']:.2f}x)  compile "
        f"{row['compile_s']:.1f} s once"
    )


def format_threads_row(row: dict) -> str:
    cells = [f"{k.removeprefix('seq_per_s_')} thread(s) {v:7,.0f}" for k, v in row.items()
             if k.startswith("seq_per_s_")]  # fmt: skip
    return f"{row['preset']:>6s} " + "  ".join(cells)


def format_peak(meta: dict) -> str:
    sizes = ", ".join(f"{n}^3 {r:.0f}" for n, r in meta["matmul_gflops"].items())
    return (
        f"fp32 matmul peak {meta['matmul_peak_gflops']:.1f} GFLOP/s with {meta['threads']} "
        f"threads (best of {sizes}); MFU is measured against it"
    )


def format_peer_row(row: dict) -> str:
    if "skipped" in row:
        return f"{row['preset']:>6s} peer skipped: {row['skipped']}"
    return (
        f"{row['preset']:>6s} ours {row['ours_seq_per_s']:7,.0f} seq/s  peer "
        f"{row['peer_seq_per_s']:7,.0f} seq/s  ours/peer {row['ratio']:.2f}x  GFLOP/step "
        f"ours {row['ours_gflop_per_step']:.2f} peer {row['peer_gflop_per_step']:.2f}"
    )


def format_table(result: BenchResult) -> str:
    """The whole result as plain-text tables."""
    m = result.meta
    load = "/".join(f"{x:.2f}" for x in m["loadavg_before"])
    if "loadavg_after" in m:
        load += ", after " + "/".join(f"{x:.2f}" for x in m["loadavg_after"])
    lines = [
        f"probe bench: torch {m['torch']}, {m['device']}, {m['threads']} threads on "
        f"{m['cpu_count']} CPUs; load average (1/5/15 min) before {load}",
        format_peak(m),
        f"batch {m['config']['batch_size']}, sequence length 19, fp32; medians of "
        f"{m['config']['repeats']} x {m['config']['steps']} steps",
        "",
        "training step",
        f"{'preset':>6s} {'method':9s} {'seq/s':>9s} {'ms/step':>8s} {'cpu ms':>8s} "
        f"{'GFLOP':>7s} {'MFU':>6s} {'peak MiB':>8s}",
        *(format_train_row(r) for r in result.train),
    ]
    if result.eval:
        lines += ["", "evaluation (held-out exact match, one forward pass)"]
        lines += [
            f"{r['preset']:>6s} {r['seq_per_s']:9,.0f} seq/s  ({r['ms']:.0f} ms for "
            f"{m['config']['eval_size']})"
            for r in result.eval
        ]
    if result.threads:
        lines += ["", "pretraining throughput (seq/s) by intra-op threads"]
        lines += [format_threads_row(r) for r in result.threads]
    if result.peer:
        lines += ["", "prefix-tuning step vs the peer (HF GPT-2 + PEFT prefix-tuning, P=1)"]
        lines += [format_peer_row(r) for r in result.peer]
        first = next((r for r in result.peer if "peer" in r), None)
        if first:
            lines.append(f"       peer: {first['peer']}")
    if result.runs_per_pass:
        lines += ["", "prefix runs per pass: ms per run-step with K runs batched on one base "
                      "(gain over K=1)"]  # fmt: skip
        lines += [format_runs_per_pass_row(r) for r in result.runs_per_pass]
    if result.compiled:
        lines += ["", "pretraining step under torch.compile (inductor) vs eager"]
        lines += [format_compiled_row(r) for r in result.compiled]
    tta = result.time_to_accuracy
    if tta:
        lines += ["", "time to accuracy, paper 01 (probe pretrain / probe tune defaults)"]
        for name, r in tta["runs"].items():
            lines.append(
                f"{name:>9s} on {r['task']:9s} {r['steps']:5d} steps  {r['accuracy']:7.2%}  "
                f"{r['seconds']:6.1f} s"
            )
        lines.append(f"{'total':>9s} {tta['total_seconds']:.1f} s wall")
    lines.append(f"\npeak memory (ru_maxrss / CUDA max allocated): {m['peak_mib']:.0f} MiB")
    return "\n".join(lines)


def write_json(result: BenchResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(result.to_json() + "\n")
    return path


def add_command(sub) -> None:
    """Register ``probe bench`` on the CLI's subparsers."""
    p = sub.add_parser(
        "bench",
        help="speed: training/eval throughput, MFU, time to accuracy, a PEFT peer",
        description="How fast the toolkit trains here, now: training and evaluation throughput at "
        "the paper's shapes, MFU against a measured matmul peak, the paper's 01 end to end, "
        "1 vs all threads, HF GPT-2 + PEFT prefix-tuning measured side by side, what batching "
        "K prefix runs on one base would gain, and optionally torch.compile.",
    )
    p.add_argument("--preset", nargs="+", default=list(BenchConfig.presets), help="model presets")
    p.add_argument("--method", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--batch-size", type=int, default=BenchConfig.batch_size)
    p.add_argument("--steps", type=int, help=f"timed steps a repeat (default {BenchConfig.steps})")
    p.add_argument("--repeats", type=int, help=f"timed repeats (default {BenchConfig.repeats})")
    p.add_argument("--quick", action="store_true", help="fewer steps and repeats")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads (default 1: faster at these tiny shapes, and robust to load; "
        "0 = leave torch's default)",
    )
    p.add_argument("--no-peer", action="store_true", help="skip the HF GPT-2 + PEFT peer")
    p.add_argument("--no-tta", action="store_true", help="skip the 01 time-to-accuracy run")
    p.add_argument(
        "--no-thread-compare", action="store_true", help="skip pretraining with 1 vs all threads"
    )
    p.add_argument(
        "--runs-per-pass",
        type=int,
        nargs="*",
        default=list(BenchConfig.runs_per_pass),
        metavar="K",
        help="K prefix runs batched on one base, per-run step time (default 1 4 16; none skips)",
    )
    p.add_argument(
        "--compile", action="store_true", help="also time pretraining under torch.compile"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (default cpu)")
    p.add_argument("--out", help="also write the results as JSON to this file")
    p.set_defaults(run=cmd_bench)


def cmd_bench(args) -> int:
    bench = BenchConfig(
        presets=tuple(args.preset),
        methods=tuple(args.method),
        batch_size=args.batch_size,
        device=args.device,
        threads=args.threads or None,
        peer=not args.no_peer,
        time_to_accuracy=not args.no_tta,
        compare_threads=not args.no_thread_compare,
        runs_per_pass=tuple(args.runs_per_pass),
        compile=args.compile,
    )
    if args.quick:
        bench = bench.quick()
    overrides = {k: v for k, v in (("steps", args.steps), ("repeats", args.repeats)) if v}
    result = run_bench(replace(bench, **overrides), log=lambda line: print(line, flush=True))
    print("\n" + format_table(result))
    if args.out:
        print(f"-> {write_json(result, args.out)}")
    return 0
