"""Tuning methods as adapters on a frozen base model.

Every adapter changes a base model's forward in at most three ways, all through
:meth:`Transformer.forward` (run under ``torch.func.functional_call`` for weight changes):

    prefix   per-layer key/value positions            -> ``prefix=[KVPrefix, ...]``
    prompt   soft tokens before the content (input)   -> ``prompt=[P, d_model]``
    weights  replaced base weights (LoRA, full FT)    -> ``functional_call(base, weights, ...)``

| method       | trains                                            | reaches attention as      |
|--------------|---------------------------------------------------|---------------------------|
| prefix       | keys, values [layer, P, head, d_head]             | K/V prefix                |
|              | (optional Li & Liang MLP, folded when saved)      |                           |
| vt-prefix    | vectors [layer, P, d_model] -> that layer's       | K/V prefix                |
|              | ln1, W_K, W_V (the paper's virtual tokens)        |                           |
| prompt       | soft tokens [P, d_model] at the input only        | K/V prefix at every layer |
|              |                                                   | (exactly: prompt_to_prefix)|
| lora         | A [d_in, r], B [r, d_out] per chosen matrix       | changed W_Q/K/V/O, MLP    |
| full         | a copy of every base weight                       | changed everything        |
| prefix+lora  | both                                              |                           |

Adapters save as ``adapter_config.json`` + ``adapter.safetensors`` (PEFT-style) and record the
base model's fingerprint; loading onto another base model fails with a clear error.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.func import functional_call
from transformer_lens import ActivationCache

from probe import io
from probe.model import KVPrefix, Transformer, environment, eval_mode
from probe.train import TrainConfig, TrainResult, check_fits, train
from tasks import Task

ADAPTER_FORMAT = io.ADAPTER_FORMAT
LORA_TARGETS = ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_out")


class Adapter(nn.Module):
    """Base class: a set of trainable tensors and how they change the base model's forward."""

    method: ClassVar[str]

    def __init__(self, base: Transformer):
        super().__init__()
        self.base_cfg = base.cfg

    # What the adapter feeds the base model; subclasses override the parts they use.
    def prefix(self, base: Transformer) -> list[KVPrefix | None] | None:
        return None

    def prompt(self, base: Transformer) -> Tensor | None:
        return None

    def weights(self, base: Transformer) -> dict[str, Tensor]:
        return {}

    def hparams(self) -> dict:
        """The constructor's keyword arguments, saved beside the tensors."""
        return {}

    def forward(
        self, base: Transformer, tokens: Int[Tensor, "batch pos"], positions: slice = slice(None)
    ) -> Float[Tensor, "batch position d_vocab"]:
        kwargs = {"prefix": self.prefix(base), "prompt": self.prompt(base), "positions": positions}
        weights = self.weights(base)
        if weights:
            return functional_call(base, weights, (tokens,), kwargs, strict=False)
        return base(tokens, **kwargs)

    @property
    def n_params(self) -> int:
        """Trainable parameters, as saved (an MLP reparameterisation counts its MLP)."""
        return sum(p.numel() for p in self.parameters())

    def share(self, base: Transformer) -> float:
        """n_params as a fraction of the base model's parameters."""
        return self.n_params / sum(p.numel() for p in base.parameters())

    def tensors(self, base: Transformer) -> dict[str, Tensor]:
        """What :meth:`save` writes; subclasses may fold a reparameterisation here."""
        return self.state_dict()

    def save(self, path: str | Path, base: Transformer, overwrite: bool = False) -> Path:
        """Write ``path/adapter_config.json`` and ``path/adapter.safetensors`` atomically; the
        config records the base's fingerprint and a checksum of the adapter's own tensors."""
        tensors = self.tensors(base)
        meta = {
            "format": ADAPTER_FORMAT,
            "method": self.method,
            "hparams": self.saved_hparams(),
            "base_fingerprint": base.fingerprint(),
            "base_config": base.cfg.to_dict(),
            "n_params": self.n_params,
            "environment": environment(base.device),  # threads etc.: see model.environment
            "checksum": io.fingerprint(tensors),
        }
        return io.save_dir(
            path, {"adapter.safetensors": tensors}, {"adapter_config.json": meta}, overwrite
        )

    def saved_hparams(self) -> dict:
        return self.hparams()


class Prefix(Adapter):
    """Key/value prefix per layer and head (Li & Liang; PEFT's prefix-tuning).

    With ``reparam_hidden=H`` the prefix is produced by embedding [P, H] -> Linear -> tanh ->
    Linear (Li & Liang's MLP reparameterisation), which trains more stably; ``save`` folds it
    into plain keys and values, so a loaded adapter is a plain prefix.
    """

    method = "prefix"

    def __init__(
        self, base: Transformer, length: int = 1, reparam_hidden: int = 0, init_scale: float = 1.0
    ):
        super().__init__(base)
        c = base.cfg
        _check_length(length, c.max_prefix)
        self.length, self.reparam_hidden, self.init_scale = length, reparam_hidden, init_scale
        self.shape = (c.n_layers, 2, length, c.n_heads, c.d_head)  # 2: keys, values
        like = base.W_E
        if reparam_hidden:
            n_out = math.prod(self.shape) // length
            self.embedding = nn.Parameter(torch.randn(length, reparam_hidden).to(like))
            self.mlp = nn.Sequential(
                nn.Linear(reparam_hidden, reparam_hidden),
                nn.Tanh(),
                nn.Linear(reparam_hidden, n_out),
            ).to(like)
        else:
            self.kv = nn.Parameter(init_scale * torch.randn(self.shape).to(like))

    def kv_tensor(self) -> Float[Tensor, "layer 2 P head d_head"]:
        if self.reparam_hidden:
            out = self.mlp(self.embedding)  # [P, layer * 2 * head * d_head]
            n_layers, two, P, h, e = self.shape
            return out.view(P, n_layers, two, h, e).permute(1, 2, 0, 3, 4)
        return self.kv

    def prefix(self, base):
        return [KVPrefix(kv[0], kv[1]) for kv in self.kv_tensor()]

    def hparams(self):
        return {
            "length": self.length,
            "reparam_hidden": self.reparam_hidden,
            "init_scale": self.init_scale,
        }

    def saved_hparams(self):
        return {**self.hparams(), "reparam_hidden": 0}

    def tensors(self, base):
        return {"kv": self.kv_tensor().detach()}


class VirtualTokenPrefix(Adapter):
    """The paper's virtual tokens: per-layer vectors through that layer's ln1, W_K and W_V.

    They start as N(0, std of the token embeddings), the scale of the residual stream they join.
    (Unit-variance vectors swamp it where there is no ln1: at the 02 shape a P=1 prefix reached
    20% on add1 in 200 steps from N(0, 1), and 99% in 100 steps from this scale.)
    """

    method = "vt-prefix"

    def __init__(self, base: Transformer, length: int = 1):
        super().__init__(base)
        c = base.cfg
        _check_length(length, c.max_prefix)
        self.length = length
        scale = base.W_E.detach().std()
        self.vectors = nn.Parameter(scale * torch.randn(c.n_layers, length, c.d_model).to(base.W_E))

    def prefix(self, base):
        return vt_to_prefix(base, self.vectors)

    def hparams(self):
        return {"length": self.length}


class Prompt(Adapter):
    """Soft prompt: P vectors before the content at the input only, no positional slot.

    ``init="random"`` draws N(0, std of the token embeddings); ``init="vocab"`` copies the
    embeddings of P tokens sampled from the vocabulary (Lester et al.).
    """

    method = "prompt"

    def __init__(self, base: Transformer, length: int = 1, init: str = "random"):
        super().__init__(base)
        c = base.cfg
        _check_length(length, c.max_prefix)
        if init == "random":
            tokens = base.W_E.detach().std() * torch.randn(length, c.d_model).to(base.W_E)
        elif init == "vocab":
            tokens = base.W_E.detach()[torch.randint(0, c.d_vocab, (length,))].clone()
        else:
            raise ValueError(f"prompt init must be 'random' or 'vocab', got {init!r}")
        self.length, self.init = length, init
        self.tokens = nn.Parameter(tokens)

    def prompt(self, base):
        return self.tokens

    def hparams(self):
        return {"length": self.length, "init": self.init}


class LoRA(Adapter):
    """Low-rank updates W + (alpha / r) A B on chosen matrices of every layer.

    Each attention weight [head, d_model, d_head] is treated as one d_model x (head*d_head)
    matrix (W_O as (head*d_head) x d_model), so rank r means rank r across heads, as in PEFT.
    A starts random and B at zero, so training starts at the base model.
    """

    method = "lora"

    def __init__(
        self, base: Transformer, rank: int = 1, targets=("W_Q", "W_V"), alpha: float | None = None
    ):
        super().__init__(base)
        targets = tuple(targets)
        bad = [t for t in targets if t not in LORA_TARGETS]
        if bad or not targets:
            raise ValueError(f"LoRA targets {bad or targets} unknown; choose from {LORA_TARGETS}")
        if base.cfg.d_mlp == 0 and {"W_in", "W_out"} & set(targets):
            raise ValueError("LoRA on W_in/W_out needs an MLP; this base model is attention-only")
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank, self.targets = rank, targets
        self.alpha = float(alpha if alpha is not None else rank)
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        for name, W in self._targeted(base):
            d_in, d_out = _as_matrix(name, W).shape
            key = name.replace(".", "__")
            self.A[key] = nn.Parameter(torch.randn(d_in, rank).to(W) / math.sqrt(d_in))
            self.B[key] = nn.Parameter(torch.zeros(rank, d_out).to(W))

    def _targeted(self, base):
        return [(n, p) for n, p in base.named_parameters() if n.split(".")[-1] in self.targets]

    def weights(self, base):
        scale = self.alpha / self.rank
        out = {}
        for name, W in self._targeted(base):
            key = name.replace(".", "__")
            delta = scale * (self.A[key] @ self.B[key])
            out[name] = W + _from_matrix(name, delta, W.shape)
        return out

    @torch.no_grad()
    def merge(self, base: Transformer) -> Transformer:
        """A new model with the low-rank updates added to its weights."""
        merged = Transformer(base.cfg).to(base.W_E)
        merged.load_state_dict({**base.state_dict(), **self.weights(base)})
        return merged

    def hparams(self):
        return {"rank": self.rank, "targets": list(self.targets), "alpha": self.alpha}


class Full(Adapter):
    """Full fine-tuning of a copy of the base weights (the base itself stays frozen)."""

    method = "full"

    def __init__(self, base: Transformer):
        super().__init__(base)
        self.params = nn.ParameterDict(
            {
                n.replace(".", "__"): nn.Parameter(p.detach().clone())
                for n, p in base.named_parameters()
            }
        )

    def weights(self, base):
        return {k.replace("__", "."): v for k, v in self.params.items()}


class PrefixLoRA(Adapter):
    """A key/value prefix and LoRA trained together."""

    method = "prefix+lora"

    def __init__(
        self,
        base: Transformer,
        length: int = 1,
        rank: int = 1,
        targets=("W_Q", "W_V"),
        alpha: float | None = None,
    ):
        super().__init__(base)
        self.kv_prefix = Prefix(base, length=length)
        self.lora = LoRA(base, rank=rank, targets=targets, alpha=alpha)

    def prefix(self, base):
        return self.kv_prefix.prefix(base)

    def weights(self, base):
        return self.lora.weights(base)

    def hparams(self):
        return {"length": self.kv_prefix.length, **self.lora.hparams()}


METHODS: dict[str, type[Adapter]] = {
    cls.method: cls for cls in (Prefix, VirtualTokenPrefix, Prompt, LoRA, Full, PrefixLoRA)
}


def make_adapter(method: str, base: Transformer, **hparams) -> Adapter:
    """Build an adapter by method name (``"prefix"``, ``"lora"``, ...) for ``base``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    try:
        return METHODS[method](base, **hparams)
    except TypeError as e:
        raise ValueError(f"method {method!r} does not take these options: {e}") from None


def load_adapter(path: str | Path, base: Transformer) -> Adapter:
    """Load an adapter saved by :meth:`Adapter.save` onto ``base``, which must be its base."""
    path = Path(path)
    meta = io.read_json(
        path / "adapter_config.json",
        ADAPTER_FORMAT,
        required={"method": str, "hparams": dict, "base_fingerprint": str},
    )
    if meta["base_fingerprint"] != base.fingerprint():
        raise ValueError(
            f"adapter {path} was trained on a different base model (fingerprint "
            f"{meta['base_fingerprint']}, this base is {base.fingerprint()}); load it onto the "
            "model it was tuned from"
        )
    state = io.load_tensors(path / "adapter.safetensors")
    # Adapters saved before checksums existed have none; every newer one is verified.
    if "checksum" in meta and io.fingerprint(state) != meta["checksum"]:
        raise io.CorruptFileError(
            f"{path / 'adapter.safetensors'} does not match the checksum in adapter_config.json; "
            "the file is corrupt or from another save: re-save or retrain the adapter"
        )
    adapter = make_adapter(meta["method"], base, **meta["hparams"])
    io.load_state(adapter, state, path / "adapter.safetensors")
    return adapter.to(base.device)


def prompt_to_prefix(
    base: Transformer, prompt: Float[Tensor, "P d_model"] | Float[Tensor, "batch P d_model"]
) -> list[KVPrefix]:
    """The exact per-layer K/V prefix equivalent to a soft prompt.

    Under causal masking the prompt positions never see the content, so their residual streams,
    and hence their keys and values at every layer, are the same for every input: run the prompt
    alone once and read them off. Runs without dropout whatever ``base``'s mode (restored after).

    prompt: [P, d_model], or [batch, P, d_model] for a prompt per example.
    Returns one KVPrefix per layer: keys/values [P, head, d_head], or [batch, P, head, d_head].
    """
    d = base.cfg.d_model
    if not isinstance(prompt, Tensor) or prompt.ndim not in (2, 3) or prompt.shape[-1] != d:
        got = tuple(prompt.shape) if isinstance(prompt, Tensor) else type(prompt).__name__
        raise ValueError(
            f"prompt_to_prefix takes a prompt [P, d_model={d}] or [batch, P, d_model]; got {got}"
        )
    names = [f"blocks.{layer}.attn.hook_{kv}" for layer in range(base.cfg.n_layers) for kv in "kv"]
    batch = prompt.shape[0] if prompt.ndim == 3 else 1
    empty = torch.zeros(batch, 0, dtype=torch.long, device=prompt.device)
    with eval_mode(base):  # dropout on the prompt would make the prefix random
        _, cache = base.run_with_cache(empty, prompt=prompt, names_filter=names)
    pick = (lambda t: t) if prompt.ndim == 3 else (lambda t: t[0])
    return [
        KVPrefix(pick(cache["k", layer]), pick(cache["v", layer]))
        for layer in range(base.cfg.n_layers)
    ]


def vt_to_prefix(base: Transformer, vectors: Float[Tensor, "layer P d_model"]) -> list[KVPrefix]:
    """The K/V prefix of the paper's virtual tokens: each layer's own ln1, W_K and W_V.

    Returns one KVPrefix per layer, keys/values [P, head, d_head]. No dropout on this path, so
    it is exact in either mode (and differentiable: the vt-prefix adapter trains through it).
    """
    prefix = []
    for block, v in zip(base.blocks, vectors, strict=True):
        x = block.ln1(v)
        # Keys and values projected one at a time, as this adapter has always trained: one
        # fused [K; V] matmul gives the same forward but rounds the gradient differently.
        (keys,), (values,) = block.attn.project(x, "k"), block.attn.project(x, "v")
        prefix.append(KVPrefix(keys, values))
    return prefix


class Tuned(nn.Module):
    """A frozen base model holding several named adapters, switched per call (PEFT-style).

    >>> tuned = Tuned(base); tuned.add("desc", make_adapter("prefix", base))
    >>> tuned(tokens, adapter="desc"); tuned(tokens, adapter=None)  # the base model
    """

    def __init__(self, base: Transformer):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.adapters = nn.ModuleDict()
        self.active: str | None = None

    def add(self, name: str, adapter: Adapter, activate: bool = True) -> Tuned:
        if adapter.base_cfg != self.base.cfg:
            raise ValueError(f"adapter {name!r} was built for another model shape")
        self.adapters[name] = adapter
        if activate:
            self.active = name
        return self

    def use(self, name: str | None) -> Tuned:
        if name is not None and name not in self.adapters:
            raise KeyError(f"no adapter {name!r}; have {sorted(self.adapters)}")
        self.active = name
        return self

    def remove(self, name: str) -> Adapter:
        adapter = self.adapters.pop(name)
        if self.active == name:
            self.active = None
        return adapter

    def forward(
        self,
        tokens: Int[Tensor, "batch pos"],
        adapter: str | None = "active",
        positions: slice = slice(None),
    ) -> Float[Tensor, "batch position d_vocab"]:
        name = self.active if adapter == "active" else adapter
        if name is None:
            return self.base(tokens, positions=positions)
        return self.adapters[name](self.base, tokens, positions)

    def run_with_cache(self, tokens, adapter: str | None = "active", **cache_kwargs):
        """Logits and an ActivationCache of the base model's hooks, run with the adapter.

        Warns once, like :meth:`Transformer.run_with_cache`, if the base is in training mode.
        """
        self.base.warn_if_dropout(stacklevel=3)
        cache, fwd, _ = self.base.get_caching_hooks(**cache_kwargs)
        with self.base.hooks(fwd_hooks=fwd):
            logits = self(tokens, adapter)
        return logits, ActivationCache(cache, self.base)


# Measured, not chosen, except where said. Prefix-like methods: on the quick profile (mix4
# base -> add1, P=1, 3 seeds) prefix reached 37 / 87 / 99% at lr 1e-3 / 1e-2 / 1e-1, and 1e-1
# freed two paper-02 prefixes that stalled at 1e-2; on the composition sort_asc_add1 (P=10)
# 1e-1 is the fastest of 1e-2..3e-1 (figures/recipes.md). LoRA: B starts at zero, so its
# updates start small; on sort_asc -> reverse, rank 4 on W_Q/K/V/O reached 0 / 14 / 93% in 300
# steps at 3e-3 / 1e-2 / 3e-2 (figures/recipes.md). prefix+lora takes LoRA's rate (chosen).
# Full fine-tuning's 1e-3 is chosen (the sweeps show 1e-4..1e-2 all reach 100% on add1).
DEFAULT_LR = {
    "prefix": 1e-1,
    "vt-prefix": 1e-1,
    "prompt": 1e-1,
    "lora": 3e-2,
    "full": 1e-3,
    "prefix+lora": 3e-2,
}


def tune(
    base: Transformer, task: Task, method: str, cfg: TrainConfig, **hparams
) -> tuple[Adapter, TrainResult]:
    """Build an adapter for ``method`` and train it on ``task``; the base stays bit-identical."""
    check_fits(base, task)
    base.to(cfg.device).requires_grad_(False)
    torch.manual_seed(cfg.seed)
    adapter = make_adapter(method, base, **hparams).to(cfg.device)
    result = train(partial(adapter, base), adapter.parameters(), task, cfg, modules=[base, adapter])
    return adapter, result


def _check_length(length: int, max_prefix: int):
    if not isinstance(length, int) or not 1 <= length <= max_prefix:
        raise ValueError(
            f"prefix/prompt length must be an int in [1, max_prefix={max_prefix}], got {length!r}"
        )


def _as_matrix(name: str, W: Tensor) -> Tensor:
    """A weight as the 2-D matrix LoRA updates: [d_in, d_out]."""
    leaf = name.split(".")[-1]
    if leaf in ("W_Q", "W_K", "W_V"):  # [head, d_model, d_head] -> [d_model, head*d_head]
        return W.permute(1, 0, 2).flatten(1)
    if leaf == "W_O":  # [head, d_head, d_model] -> [head*d_head, d_model]
        return W.flatten(0, 1)
    return W


def _from_matrix(name: str, delta: Tensor, shape: torch.Size) -> Tensor:
    leaf = name.split(".")[-1]
    if leaf in ("W_Q", "W_K", "W_V"):
        h, d, e = shape
        return delta.view(d, h, e).permute(1, 0, 2)
    return delta.view(shape)
