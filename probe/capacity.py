"""Capacity, counted on a trained model: what ONE soft first token reaches that no hard one can.

The paper's official code runs LLaMA-7B: varying only the first token over all 32,000 of its
vocabulary gives 24,426 distinct greedy 10-token completions, while 48,218 soft first tokens,
each optimised towards its own random target completion, give 46,812 distinct completions:
more than any hard first token could, since a fixed model is a function of its prompt and V
hard first tokens select at most V completions. This module measures the same on any model
here, in three counts (:func:`measure`):

- **hard**: for every first token t of the vocabulary (or a seeded sample), the greedy
  completion of N tokens after it; the number of distinct completions is at most V;
- **soft**: K random target completions (uniform tokens), one free vector each in the first
  token's place, optimised independently in one batch (teacher-forced cross-entropy of the
  target given the vector, Adam, a fixed number of steps); then their greedy completions:
  distinct ones, and the exact-hit rate (completion == its target);
- **random**: the K vectors the optimisation started from (drawn coordinate-wise from the
  embedding matrix's per-coordinate mean and standard deviation, the scale of a token
  embedding), as a control: what leaving the token embeddings alone, unoptimised, reaches.

**Where the soft vector goes, and positions.** The soft vector replaces the first token's
*embedding*: it takes position 0 and the model adds whatever it adds to a token there. On our
:class:`~probe.model.Transformer` that is the learned position embedding ``W_pos[0]`` (the
vector is substituted at ``hook_embed``, before ``hook_pos_embed`` is added), and on an HF
GPT-2 ``wpe[0]`` (``inputs_embeds``). So the vector equal to ``W_E[t]`` IS the hard token t,
bit for bit, and the soft count ranges over a superset of the hard tokens. The official LLaMA
has no absolute positions (rotary: position 0 rotates by nothing), so there too a soft vector
is a free first-token embedding. This is not the prompt-tuning path
(``Transformer(tokens, prompt=...)``, :class:`probe.adapters.Prompt`), whose soft tokens take no
positional slot and precede content that starts at position 0.

Everything runs on the model's device and dtype, batched, deterministic given the seed: the
targets and the starting vectors come from a CPU generator seeded with ``CapacityConfig.seed``.
Adam's update of one coordinate depends only on that coordinate's gradients (:func:`_adam`), and
the loss is a sum over independent vectors, so optimising in chunks of ``batch`` vectors is the same
optimisation as one batch of K (to the floating-point order of the batched matmuls).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from probe.config import eval_mode

# The paper's counts (official code, LLaMA-7B, greedy 10-token completions).
PAPER_LLAMA = {
    "vocab": 32000,
    "hard_distinct": 24426,
    "soft_k": 48218,
    "soft_distinct": 46812,
    "n": 10,
}


@dataclass(frozen=True)
class CapacityConfig:
    """How to count.

    k: soft vectors optimised, one per random target completion (and random control vectors);
    n: completion length (the paper: 10); steps, lr: Adam's budget for the soft vectors;
    seed: the targets and the starting vectors; batch: vectors per forward (memory only: the
    result does not depend on it beyond float order); vocab: first tokens swept for the hard
    count, None for every token of the vocabulary, else a seeded sample of that many.
    """

    k: int = 512
    n: int = 10
    steps: int = 200
    lr: float = 0.1
    seed: int = 0
    batch: int = 1024
    vocab: int | None = None

    def __post_init__(self):
        for name in ("k", "n", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CapacityConfig.{name} must be a positive int, got {value!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"CapacityConfig.steps must be an int >= 0, got {self.steps!r}")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0 or self.lr == float("inf"):
            raise ValueError(f"CapacityConfig.lr must be a finite number > 0, got {self.lr!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"CapacityConfig.seed must be an int, got {self.seed!r}")
        if self.vocab is not None and (
            isinstance(self.vocab, bool) or not isinstance(self.vocab, int) or self.vocab < 1
        ):
            raise ValueError(
                f"CapacityConfig.vocab must be None (every token) or a positive int, "
                f"got {self.vocab!r}"
            )


# ---------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class FirstSlotLM:
    """A causal LM seen through its first input slot.

    ``logits(first [b, d], tokens [b, t], last)`` runs the model on the sequence whose position
    0 holds the input embedding ``first`` (a token's embedding or a soft vector; the model adds
    its position-0 embedding to it, as to a token) followed by ``tokens`` at positions 1..t,
    and returns logits [b, 1 + t, V] (``last``: [b, 1, V], the last position only).
    ``embedding``: the token embeddings [V, d]; ``n_ctx``: the positions the model takes;
    ``positions``: how positions reach the first slot, in words.
    """

    logits: Callable[[Tensor, Tensor, bool], Tensor]
    embedding: Float[Tensor, "V d"]
    n_ctx: int
    positions: str
    module: nn.Module

    @property
    def vocab(self) -> int:
        return self.embedding.shape[0]


def first_slot(model: nn.Module) -> FirstSlotLM:
    """Our :class:`~probe.model.Transformer` or an HF causal LM (GPT-2-shaped: absolute
    learned positions added to ``inputs_embeds``; others through the same ``inputs_embeds``)."""
    if hasattr(model, "get_input_embeddings") and hasattr(model, "config"):
        return _hf_slot(model)
    from probe.model import Transformer

    if not isinstance(model, Transformer):
        raise ValueError(
            f"capacity takes a probe.model.Transformer or a Hugging Face causal LM, got "
            f"{type(model).__name__}"
        )

    def logits(first, tokens, last):
        ids = torch.cat([tokens.new_zeros(len(tokens), 1), tokens], dim=1)

        def put(x, hook):  # the first token's embedding, before the position is added
            return torch.cat([first[:, None].to(x.dtype), x[:, 1:]], dim=1)

        T = ids.shape[1]
        with model.hooks(fwd_hooks=[("hook_embed", put)]):
            return model(ids, positions=slice(T - 1, T) if last else slice(None))

    return FirstSlotLM(
        logits,
        model.W_E,
        model.cfg.n_ctx,
        "learned position embedding W_pos[0] added to the soft vector (as to a token)",
        model,
    )


def _hf_slot(model: nn.Module) -> FirstSlotLM:
    cfg = model.config
    n_ctx = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    if not isinstance(n_ctx, int):
        raise ValueError(
            f"{type(model).__name__}: its config names no context length (n_positions or "
            "max_position_embeddings); capacity cannot check the completion fits"
        )
    embed = model.get_input_embeddings()
    absolute = hasattr(getattr(model, "transformer", None), "wpe")

    def logits(first, tokens, last):
        x = torch.cat([first[:, None].to(embed.weight.dtype), embed(tokens)], dim=1)
        out = model(inputs_embeds=x, use_cache=False, logits_to_keep=1 if last else 0)
        return out.logits

    where = (
        "learned position embedding wpe[0] added to the soft vector (inputs_embeds)"
        if absolute
        else "the model's own positions for inputs_embeds at position 0 (none added if rotary)"
    )
    return FirstSlotLM(logits, embed.weight, n_ctx, where, model)


def _check_fits(lm: FirstSlotLM, n: int) -> None:
    if 1 + n > lm.n_ctx:
        raise ValueError(
            f"a first token and a completion of n={n} need {1 + n} positions; the model takes "
            f"n_ctx={lm.n_ctx}: use n <= {lm.n_ctx - 1}"
        )


def _as_vectors(lm: FirstSlotLM, first: Tensor) -> Tensor:
    first = torch.as_tensor(first)
    if first.ndim != 2 or first.shape[1] != lm.embedding.shape[1]:
        raise ValueError(
            f"first-slot vectors have shape {tuple(first.shape)}; expected "
            f"[batch, d_model={lm.embedding.shape[1]}]"
        )
    if not torch.isfinite(first).all():
        raise ValueError("first-slot vectors must be finite; got NaN or inf")
    return first.to(lm.embedding.device, lm.embedding.dtype)


# ---------------------------------------------------------------------------- generation


@torch.no_grad()
def complete(
    model: nn.Module, first: Float[Tensor, "b d"], n: int, batch: int = 1024
) -> Int[Tensor, "b n"]:
    """Greedy completions [b, n] after the first-slot vectors ``first`` [b, d] (each step runs
    the whole sequence and appends the last position's argmax), ``batch`` rows at a time."""
    lm = first_slot(model)
    _check_fits(lm, n)
    first = _as_vectors(lm, first)
    out = []
    with eval_mode(lm.module):
        for chunk in first.split(batch):
            tokens = torch.zeros(len(chunk), 0, dtype=torch.long, device=chunk.device)
            for _ in range(n):
                step = lm.logits(chunk, tokens, True)[:, -1].argmax(dim=-1)
                tokens = torch.cat([tokens, step[:, None]], dim=1)
            out.append(tokens)
    return torch.cat(out) if out else torch.zeros(0, n, dtype=torch.long)


def hard_completions(
    model: nn.Module, n: int, tokens: Int[Tensor, " m"] | None = None, batch: int = 1024
) -> Int[Tensor, "m n"]:
    """The greedy completion of ``n`` tokens after each first token (default: every token of
    the vocabulary, row t for token t): [m, n]."""
    lm = first_slot(model)
    tokens = torch.arange(lm.vocab) if tokens is None else torch.as_tensor(tokens)
    if tokens.ndim != 1 or tokens.dtype.is_floating_point:
        raise ValueError(f"tokens must be a 1-D integer tensor, got {tuple(tokens.shape)}")
    if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) >= lm.vocab):
        raise ValueError(f"token ids must be in [0, V={lm.vocab})")
    return complete(model, lm.embedding.detach()[tokens.to(lm.embedding.device)], n, batch)


def distinct(completions: Int[Tensor, "m n"]) -> int:
    """How many different rows ``completions`` holds."""
    if completions.ndim != 2:
        raise ValueError(f"completions must be [m, n], got {tuple(completions.shape)}")
    return int(torch.unique(completions, dim=0).shape[0]) if len(completions) else 0


# ---------------------------------------------------------------------------- soft tokens


def random_vectors(model: nn.Module, k: int, generator: torch.Generator) -> Float[Tensor, "k d"]:
    """``k`` vectors at a token embedding's scale: coordinate j drawn from N(mean_j, sd_j), the
    mean and standard deviation of coordinate j over the V token embeddings."""
    embedding = first_slot(model).embedding.detach()
    E = embedding.double().cpu()
    z = torch.randn(k, E.shape[1], generator=generator, dtype=torch.float64)
    return (E.mean(0) + E.std(0) * z).to(embedding.device, embedding.dtype)


def random_targets(V: int, k: int, n: int, generator: torch.Generator) -> Int[Tensor, "k n"]:
    """``k`` target completions of ``n`` tokens, each token uniform in [0, V)."""
    return torch.randint(0, V, (k, n), generator=generator)


def optimise(
    model: nn.Module,
    targets: Int[Tensor, "k n"],
    start: Float[Tensor, "k d"],
    steps: int,
    lr: float,
    batch: int = 1024,
) -> tuple[Float[Tensor, "k d"], Float[Tensor, " k"]]:
    """One free first-slot vector per target, from ``start``, each minimising the teacher-forced
    cross-entropy of its target (mean over the n positions: the vector, then the target's
    first n - 1 tokens, predict the target) with Adam at ``lr`` for ``steps`` steps. The model's
    weights get no gradient. Returns the vectors [k, d] and each one's final loss [k]."""
    lm = first_slot(model)
    targets = torch.as_tensor(targets)
    if targets.ndim != 2 or targets.dtype.is_floating_point or targets.shape[1] < 1:
        raise ValueError(f"targets must be an integer tensor [k, n>=1], got {tuple(targets.shape)}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= lm.vocab):
        raise ValueError(f"target ids must be in [0, V={lm.vocab})")
    _check_fits(lm, targets.shape[1])
    start = _as_vectors(lm, start)
    if len(start) != len(targets):
        raise ValueError(f"{len(start)} starting vectors for {len(targets)} targets; give one each")
    targets = targets.to(start.device)
    vectors, losses = [], []
    with eval_mode(lm.module):
        for y, x0 in zip(targets.split(batch), start.split(batch), strict=True):
            x = x0.clone().requires_grad_(True)
            m, v = torch.zeros_like(x0), torch.zeros_like(x0)
            for step in range(1, steps + 1):
                loss = _losses(lm, x, y).sum()  # independent vectors: each gets its own gradient
                (grad,) = torch.autograd.grad(loss, [x])
                with torch.no_grad():
                    _adam(x, grad, m, v, step, lr)
            with torch.no_grad():
                losses.append(_losses(lm, x, y))
            vectors.append(x.detach())
    return torch.cat(vectors), torch.cat(losses)


def _adam(x: Tensor, grad: Tensor, m: Tensor, v: Tensor, step: int, lr: float) -> None:
    """One Adam step in place (betas 0.9, 0.999, eps 1e-8, as torch.optim.Adam's defaults),
    written out: per coordinate, so chunks of vectors optimise exactly as one batch, and free of
    the optimiser's first-use import of torch._dynamo (seconds on a loaded CPU)."""
    m.mul_(0.9).add_(grad, alpha=0.1)
    v.mul_(0.999).addcmul_(grad, grad, value=0.001)
    denom = (v / (1 - 0.999**step)).sqrt_().add_(1e-8)
    x.addcdiv_(m, denom, value=-lr / (1 - 0.9**step))


def _losses(lm: FirstSlotLM, x: Tensor, y: Tensor) -> Float[Tensor, " b"]:
    logits = lm.logits(x, y[:, :-1], False)  # [b, n, V]: position i predicts y[:, i]
    ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
    return ce.view(y.shape).mean(dim=1)


# ---------------------------------------------------------------------------- the counts


@dataclass(frozen=True)
class Capacity:
    """The three counts on one model (see the module docstring), with what produced them.

    vocab: V; swept: first tokens swept (V unless sampled); hard_distinct <= swept;
    soft_distinct, random_distinct <= k; exact: share of the k soft vectors whose completion is
    their target; token_hits: share of the k x n target tokens their completions match in place;
    loss: mean final teacher-forced loss (nats per token); seconds: wall time of each part.
    Tensors: hard [swept, n], targets / soft / random [k, n] completions, vectors [k, d].
    """

    config: CapacityConfig
    vocab: int
    swept: int
    hard_distinct: int
    soft_distinct: int
    random_distinct: int
    exact: float
    token_hits: float
    loss: float
    positions: str
    seconds: dict[str, float]
    hard: Tensor
    targets: Tensor
    soft: Tensor
    random: Tensor
    vectors: Tensor

    def summary(self) -> dict:
        """The counts as plain numbers (JSON-ready)."""
        c = self.config
        return {
            "vocab": self.vocab,
            "swept": self.swept,
            "k": c.k,
            "n": c.n,
            "steps": c.steps,
            "lr": c.lr,
            "seed": c.seed,
            "hard_distinct": self.hard_distinct,
            "soft_distinct": self.soft_distinct,
            "random_distinct": self.random_distinct,
            "exact": self.exact,
            "token_hits": self.token_hits,
            "loss": self.loss,
            "seconds": self.seconds,
        }


def measure(model: nn.Module, config: CapacityConfig = CapacityConfig()) -> Capacity:
    """The hard, soft and random counts of ``model`` under ``config``."""
    lm = first_slot(model)
    _check_fits(lm, config.n)
    g = torch.Generator().manual_seed(config.seed)
    targets = random_targets(lm.vocab, config.k, config.n, g)
    start = random_vectors(model, config.k, g)
    sweep = None
    if config.vocab is not None and config.vocab < lm.vocab:
        sweep = torch.randperm(lm.vocab, generator=g)[: config.vocab].sort().values
    seconds = {}
    t0 = time.perf_counter()
    hard = hard_completions(model, config.n, sweep, config.batch)
    t1 = time.perf_counter()
    vectors, losses = optimise(model, targets, start, config.steps, config.lr, config.batch)
    soft = complete(model, vectors, config.n, config.batch)
    t2 = time.perf_counter()
    random = complete(model, start, config.n, config.batch)
    seconds = {"hard": t1 - t0, "soft": t2 - t1, "random": time.perf_counter() - t2}
    targets = targets.to(soft.device)
    return Capacity(
        config=config,
        vocab=lm.vocab,
        swept=len(hard),
        hard_distinct=distinct(hard),
        soft_distinct=distinct(soft),
        random_distinct=distinct(random),
        exact=(soft == targets).all(dim=1).double().mean().item(),
        token_hits=(soft == targets).double().mean().item(),
        loss=losses.mean().item(),
        positions=lm.positions,
        seconds=seconds,
        hard=hard.cpu(),
        targets=targets.cpu(),
        soft=soft.cpu(),
        random=random.cpu(),
        vectors=vectors.cpu(),
    )


# ---------------------------------------------------------------------------- command line


def load_model(path: str, device: str = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """A model directory from ``probe pretrain`` or a Hugging Face model directory."""
    from probe import hf

    if hf.is_hf_model_dir(path):
        return hf.load_hf_model(path, dtype=dtype, device=device)
    from probe.model import Transformer

    model = Transformer.load(path, device)
    return model if dtype is None else model.to(dtype)


def cmd_capacity(args) -> int:
    cfg = CapacityConfig(
        k=args.k,
        n=args.n,
        steps=args.steps,
        lr=args.lr,
        seed=args.seed,
        batch=args.batch,
        vocab=args.vocab or None,
    )
    dtype = {None: None, "float32": torch.float32, "float64": torch.float64}[args.dtype]
    result = measure(load_model(args.base, args.device, dtype), cfg)
    s = result.summary()
    print(f"first slot: {result.positions}")
    swept = f"{s['swept']:,} first tokens (V={s['vocab']:,})"
    print(f"hard:   {s['hard_distinct']:>7,} distinct of {swept}")
    print(
        f"soft:   {s['soft_distinct']:>7,} distinct of K={cfg.k:,} optimised ({cfg.steps} steps, "
        f"lr {cfg.lr:g}); exact hits {100 * s['exact']:.1f}%, target tokens hit "
        f"{100 * s['token_hits']:.1f}%, mean loss {s['loss']:.3f}"
    )
    print(f"random: {s['random_distinct']:>7,} distinct of K={cfg.k:,} (the starting vectors)")
    more = "more" if s["soft_distinct"] > s["vocab"] else "not more"
    print(f"one soft first token selected {more} completions than V hard first tokens can")
    return 0


def add_command(sub) -> None:
    """Register ``probe capacity`` on the CLI's subparsers."""
    from probe.cli import positive_float, positive_int

    d = CapacityConfig()
    p = sub.add_parser(
        "capacity",
        help="count distinct completions of one hard vs one soft first token",
        description="Greedy completions selected by the first token alone: every hard first "
        "token, K optimised soft first tokens (one per random target), K random vectors.",
    )
    p.add_argument("--base", required=True, help="a model directory, ours or Hugging Face")
    p.add_argument("--k", type=positive_int, default=d.k, help=f"soft targets (default {d.k})")
    p.add_argument("--n", type=positive_int, default=d.n, help=f"completion length ({d.n})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"Adam steps ({d.steps})")
    p.add_argument("--lr", type=positive_float, default=d.lr, help=f"Adam lr ({d.lr})")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch", type=positive_int, default=d.batch, help="vectors per forward")
    p.add_argument(
        "--vocab", type=int, default=0, help="first tokens swept: 0 = every token, else a sample"
    )
    p.add_argument("--dtype", choices=["float32", "float64"], help="default: the saved dtype")
    p.add_argument("--device", default="cpu")
    p.set_defaults(run=cmd_capacity)
