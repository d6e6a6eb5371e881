"""One training loop for every tuning method, plus exact-match evaluation.

A method is just (a forward function, the parameters it trains). Pretraining (:func:`pretrain`)
passes the model itself; tuning (:func:`tune`) passes an adapter's forward over the frozen base
and only the adapter's parameters, at the method's :data:`DEFAULT_LR` unless told otherwise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from probe.adapters import Adapter, AdapterConfig
from probe.config import PRETRAIN_LR, PRETRAIN_WEIGHT_DECAY
from probe.model import Transformer
from tasks import Batch, Task, test_set

# One fused kernel steps every parameter (torch >= 2.4 on CPU), several times faster than the
# per-parameter loop on these small models.
FUSED_ADAMW = torch.__version__ >= "2.4"
EVAL_CHUNK = 256  # sequences per forward pass in evaluate()

# forward(tokens [batch, pos], positions=slice(a, b)) -> logits [batch, b - a, d_vocab]:
# ``model`` or ``partial(adapter, model)``. Returning every position is allowed too.
Forward = Callable[..., Float[Tensor, "batch position d_vocab"]]


class TrainingDiverged(RuntimeError):
    """The loss or the trained weights became NaN or infinite; nothing was saved."""


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (AdamW, linear warm-up, then ``schedule``: "cosine" decays to 10%
    of ``lr`` by the last step, "constant" holds ``lr``)."""

    steps: int = 1000
    lr: float = PRETRAIN_LR
    batch_size: int = 64
    warmup: int = 50
    schedule: str = "cosine"
    weight_decay: float = PRETRAIN_WEIGHT_DECAY
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_size: int = 3200
    eval_given: int = 0  # held-out curve scores outputs after the first k (evaluate's given)
    target_accuracy: float | None = None  # stop early once held-out exact match reaches it
    train_size: int | None = None  # None: fresh samples every step; n: a fixed set of n samples
    seed: int = 0
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_every", "eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.train_size is not None and self.train_size < 1:
            raise ValueError(f"TrainConfig.train_size must be >= 1 or None, got {self.train_size}")
        if self.warmup < 0:
            raise ValueError(f"TrainConfig.warmup must be >= 0, got {self.warmup}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(
                f"TrainConfig.schedule must be 'cosine' or 'constant', got {self.schedule!r}"
            )
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas}")
        if self.target_accuracy is not None and not 0 < self.target_accuracy <= 1:
            raise ValueError(
                f"TrainConfig.target_accuracy is a fraction in (0, 1], got {self.target_accuracy}"
            )

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.schedule == "constant":
            return self.lr
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@dataclass
class TrainResult:
    steps: int
    accuracy: float  # held-out exact match at the end
    seconds: float
    # One point per evaluation: {"step", "sequences", "seconds", "loss", "accuracy"}; "loss" is
    # the mean training loss since the previous point, "seconds" training time so far (no evals).
    history: list[dict] = field(default_factory=list)


def check_fits(model, task: Task) -> None:
    """Refuse a task the model cannot represent, naming the field and the fix."""
    cfg = model.cfg
    if task.vocab_size > cfg.d_vocab:
        raise ValueError(
            f"task {task.name!r} uses {task.vocab_size} token ids but the model's d_vocab is "
            f"{cfg.d_vocab}; build the model with d_vocab >= {task.vocab_size}"
        )
    if task.seq_len - 1 > cfg.n_ctx:
        raise ValueError(
            f"task {task.name!r} needs {task.seq_len - 1} positions but the model's n_ctx is "
            f"{cfg.n_ctx}; build the model with n_ctx >= {task.seq_len - 1}"
        )


def pretrain(task: Task, model, cfg: TrainConfig):
    """Train every weight of ``model`` on ``task``; returns the TrainResult."""
    check_fits(model, task)
    model.to(cfg.device)
    return train(model, model.parameters(), task, cfg, modules=[model])


# Measured, not chosen, except where said. Prefix-like methods: on the quick profile (mix4
# base -> add1, P=1, 3 seeds) prefix reached 37 / 87 / 99% at lr 1e-3 / 1e-2 / 1e-1, and 1e-1
# freed two paper-02 prefixes that stalled at 1e-2; on the composition sort_asc_add1 (P=10)
# 1e-1 is the fastest of 1e-2..3e-1 (figures/recipes.md). LoRA: B starts at zero, so its
# updates start small; on sort_asc -> reverse, rank 4 on W_Q/K/V/O reached 0 / 14 / 93% in 300
# steps at 3e-3 / 1e-2 / 3e-2 (figures/recipes.md). prefix+lora takes LoRA's rate (chosen).
# Full fine-tuning's 1e-3 is chosen (the sweeps show 1e-4..1e-2 all reach 100% on add1).
# IA3 and the adaption prompt: the lowest final training loss of 1e-2, 3e-2, 1e-1 (and 3e-1,
# no better for the prompt, barely for IA3) on the study's sort_asc -> reverse at its 400-step
# budget (docs/benchmarks.md, "IA3 and adaption prompt learning rates").
DEFAULT_LR = {
    "prefix": 1e-1,
    "vt-prefix": 1e-1,
    "prompt": 1e-1,
    "lora": 3e-2,
    "full": 1e-3,
    "prefix+lora": 3e-2,
    "ia3": 1e-1,
    "adaption_prompt": 1e-1,
}

# Adapters train without weight decay. AdamW's decoupled decay pulls every trained weight
# towards zero by lr * wd of itself per step: 1% a step for a prefix at lr 0.1, which held the
# K/V prefix on the composition sort_asc_add1 (P=10, seed 0, 1,000 steps) at 85% where it
# reaches 99% without (figures/recipes.md). LoRA was unaffected either way (73% / 74% on hist).
# Full fine-tuning keeps pretraining's (TrainConfig's default).
DEFAULT_WEIGHT_DECAY = {
    "prefix": 0.0,
    "vt-prefix": 0.0,
    "prompt": 0.0,
    "lora": 0.0,
    "full": PRETRAIN_WEIGHT_DECAY,
    "prefix+lora": 0.0,
    "ia3": 0.0,  # decay would pull the scales towards 0, not towards their start, 1
    "adaption_prompt": 0.0,
}


def tune(
    base: Transformer, task: Task, config: AdapterConfig, cfg: TrainConfig
) -> tuple[Adapter, TrainResult]:
    """Build the adapter ``config`` describes (seeded by ``cfg.seed``) and train it on ``task``;
    the base stays bit-identical."""
    check_fits(base, task)
    base.to(cfg.device).requires_grad_(False)
    torch.manual_seed(cfg.seed)
    adapter = config.build(base).to(cfg.device)
    result = train(partial(adapter, base), adapter.parameters(), task, cfg, modules=[base, adapter])
    return adapter, result


def output_logits(forward: Forward, tokens: Int[Tensor, "batch seq"], task: Task) -> Tensor:
    """Logits at the positions that predict the output tokens: [batch, output_len, d_vocab].

    The model reads tokens[:, :-1]; position input_len - 1 + i predicts output token i. Only
    those positions are asked for, so the model can skip the rest of its last layer.
    """
    logits = forward(tokens[:, :-1], positions=slice(task.input_len - 1, None))
    return logits[:, -task.output_len :]


@torch.no_grad()
def evaluate(
    forward: Forward, task: Task, n: int = 3200, seed: int = 0, device="cpu", given: int = 0
) -> float:
    """Exact-match accuracy of the greedy decode on the fixed held-out test set.

    For a deterministic target, greedy decoding is exactly right iff the argmax is right at every
    output position under teacher forcing (the first wrong token is where both diverge), so one
    forward pass replaces output_len decoding steps. ``generate`` keeps the slow path to test it.

    ``given=k`` hands the decoder the first k output tokens and scores the rest. With k=1 a mix4
    base (no task token) is told which task it is on, so this measures the skills it holds
    rather than its guess of the task.
    """
    if not 0 <= given < task.output_len:
        raise ValueError(f"given must be in [0, {task.output_len}), got {given}")
    batch = test_set(task, n, seed).to(device)
    # In chunks, so that a chunk's activations stay in cache.
    chunks = batch.tokens.split(EVAL_CHUNK)
    predictions = torch.cat([output_logits(forward, t, task).argmax(-1) for t in chunks])
    return (predictions == batch.targets)[:, given:].all(-1).float().mean().item()


@torch.no_grad()
def generate(forward: Forward, inputs: Int[Tensor, "batch in_len"], n_new: int) -> Tensor:
    """Greedy autoregressive decode: returns the n_new generated tokens [batch, n_new]."""
    tokens = inputs
    for _ in range(n_new):
        next_token = forward(tokens, positions=slice(-1, None))[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens[:, inputs.shape[1] :]


def _optimiser(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW that decays matrices only; vectors (biases, gains) get no weight decay."""
    return torch.optim.AdamW(
        [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=cfg.betas,
        fused=FUSED_ADAMW,
    )


def _train_batch(
    task: Task, cfg: TrainConfig, pool: Batch | None, data_rng: torch.Generator
) -> Batch:
    """A fresh batch, or (with ``cfg.train_size``) one drawn with replacement from ``pool``."""
    if pool is None:
        return task.batch(cfg.batch_size, "train", data_rng).to(cfg.device)
    idx = torch.randint(0, cfg.train_size, (cfg.batch_size,), generator=data_rng)
    return Batch(pool.inputs[idx], pool.targets[idx]).to(cfg.device)


def _loss_diverged(loss: Tensor, step: int, cfg: TrainConfig) -> TrainingDiverged:
    return TrainingDiverged(
        f"loss is {loss.item()} at step {step} (lr {cfg.lr_at(step):.2e}); "
        "lower the learning rate or clip gradients harder. Nothing was saved."
    )


def _check_finite(params: list[nn.Parameter], step: int, cfg: TrainConfig) -> None:
    """Raise TrainingDiverged if a trained tensor holds NaN or Inf after ``step``."""
    bad = sum(1 for p in params if not torch.isfinite(p).all())
    if bad:
        raise TrainingDiverged(
            f"{bad} of {len(params)} trained tensors hold NaN or Inf after step {step + 1} "
            f"(lr {cfg.lr_at(step):.2e}); lower the learning rate. Nothing was saved."
        )


def train(
    forward: Forward,
    params: Iterable[nn.Parameter],
    task: Task,
    cfg: TrainConfig,
    modules: Iterable[nn.Module] = (),
) -> TrainResult:
    """Train ``params`` so that ``forward`` solves ``task``; loss on output positions only.

    ``modules`` are put in train mode while stepping (dropout) and eval mode to evaluate.
    Deterministic given ``cfg.seed``. Raises :class:`TrainingDiverged` on a non-finite loss, or
    on non-finite parameters after the last step (the loss is checked before each step, so a
    blow-up in the last step shows only in the weights).
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("train() got no trainable parameters; check requires_grad")
    modules = list(modules)
    torch.manual_seed(cfg.seed)  # dropout
    data_rng = torch.Generator().manual_seed(cfg.seed)
    optimiser = _optimiser(params, cfg)

    def set_mode(training: bool):
        for m in modules:
            m.train(training)

    def held_out() -> float:
        set_mode(False)
        acc = evaluate(forward, task, cfg.eval_size, device=cfg.device, given=cfg.eval_given)
        set_mode(True)
        return acc

    pool = task.batch(cfg.train_size, "train", data_rng) if cfg.train_size else None
    history: list[dict] = []
    start = time.perf_counter()
    eval_seconds, loss_sum, loss_count = 0.0, torch.zeros(()), 0
    set_mode(True)
    bar = tqdm(range(cfg.steps), disable=not cfg.progress, desc=task.name, leave=False)
    step, accuracy = 0, None
    for step in bar:
        for group in optimiser.param_groups:
            group["lr"] = cfg.lr_at(step)
        batch = _train_batch(task, cfg, pool, data_rng)
        logits = output_logits(forward, batch.tokens, task)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten())
        if not torch.isfinite(loss):
            set_mode(False)
            raise _loss_diverged(loss, step, cfg)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimiser.step()
        loss_sum, loss_count = loss_sum + loss.detach().cpu(), loss_count + 1

        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            eval_start = time.perf_counter()
            train_seconds = eval_start - start - eval_seconds
            accuracy = held_out()
            eval_seconds += time.perf_counter() - eval_start
            mean_loss = (loss_sum / loss_count).item()
            history.append(
                {
                    "step": step + 1,
                    "sequences": (step + 1) * cfg.batch_size,
                    "seconds": round(train_seconds, 3),
                    "loss": mean_loss,
                    "accuracy": accuracy,
                }
            )
            loss_sum, loss_count = torch.zeros(()), 0
            bar.set_postfix(loss=f"{mean_loss:.3f}", acc=f"{accuracy:.1%}")
            if cfg.target_accuracy is not None and accuracy >= cfg.target_accuracy:
                break
    bar.close()
    set_mode(False)
    _check_finite(params, step, cfg)
    return TrainResult(step + 1, accuracy, time.perf_counter() - start, history)
