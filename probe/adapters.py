"""Tuning methods as adapters on a frozen base model.

Every adapter changes a base model's forward in at most four ways, all through
:meth:`Transformer.forward` (run under ``torch.func.functional_call`` for weight changes):

    prefix   per-layer key/value positions            -> ``prefix=[KVPrefix, ...]``
    prompt   soft tokens before the content (input)   -> ``prompt=[P, d_model]``
    gated    per-layer gated, separately-softmaxed    -> ``gated=[GatedPrompt, ...]``
             attention to a prompt (adaption prompt)
    weights  replaced base weights (LoRA, IA3, full)  -> ``functional_call(base, weights, ...)``

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
| ia3          | per-channel scales of keys, values [head, d_head] | scaled W_K, W_V (and b_K, |
|              | and MLP hidden units [d_mlp], per layer           | b_V), W_out rows          |
| adaption_    | prompt [L, P, d_model] + gate [L, head], top L    | gated prompt attention    |
| prompt       | layers                                            | (GatedPrompt)             |

Each method's options are a frozen, validated config dataclass (:class:`PrefixConfig`,
:class:`LoRAConfig`, ...), the adapter's constructor argument: ``LoRA(base, LoRAConfig(rank=4))``,
or by name, ``make_adapter("lora", base, rank=4)``. Adapters save as ``adapter_config.json``
(the config under ``"config"``, the base model's fingerprint, a ``format`` of our own, so that
PEFT's loaders and ours never take one for the other) + ``adapter.safetensors``; loading onto
another base model fails with a clear error. Training them: :func:`probe.train.tune`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from torch.func import functional_call

from probe import io
from probe.model import GatedPrompt, KVPrefix, Transformer, environment, eval_mode
from probe.tuned import Tuned  # noqa: F401 (re-exported: it was defined here)

LORA_TARGETS = ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_out")
IA3_TARGETS = ("W_Q", "W_K", "W_V", "W_out")


# ---------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class AdapterConfig:
    """An adapter's options: its constructor argument and, as :meth:`to_dict`, the ``config``
    of its saved ``adapter_config.json``. Subclasses are frozen dataclasses validated when built;
    ``method`` names the adapter they configure."""

    method: ClassVar[str]

    def to_dict(self) -> dict:
        """JSON-ready fields (tuples as lists)."""
        return {
            f.name: list(v) if isinstance(v, tuple) else v
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }

    @classmethod
    def from_dict(cls, options: Mapping[str, Any]) -> AdapterConfig:
        """The config from keyword options (a saved ``config``, a run's options, CLI flags);
        an option this method does not take is named in a ValueError."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(
                f"method {cls.method!r} does not take the options {unknown}; its options are "
                f"{sorted(known) or 'none'}"
            )
        return cls(**options)

    def build(self, base: Transformer) -> Adapter:
        """A fresh adapter of this config on ``base`` (random init from torch's global RNG)."""
        return METHODS[self.method](base, self)


def _check_length(length: Any) -> None:
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"prefix/prompt length must be a positive int, got {length!r}")


@dataclass(frozen=True)
class PrefixConfig(AdapterConfig):
    """``length`` P key/value positions per layer and head. ``reparam_hidden=H`` trains them
    through Li & Liang's MLP (embedding [P, H] -> Linear -> tanh -> Linear), folded into plain
    keys and values when saved; ``init_scale`` scales the plain keys' and values' N(0, 1) init."""

    method: ClassVar[str] = "prefix"
    length: int = 1
    reparam_hidden: int = 0
    init_scale: float = 1.0

    def __post_init__(self):
        _check_length(self.length)
        if not isinstance(self.reparam_hidden, int) or self.reparam_hidden < 0:
            raise ValueError(f"reparam_hidden must be an int >= 0, got {self.reparam_hidden!r}")


@dataclass(frozen=True)
class VirtualTokenConfig(AdapterConfig):
    """``length`` P virtual-token vectors per layer (the paper's prefix)."""

    method: ClassVar[str] = "vt-prefix"
    length: int = 1

    def __post_init__(self):
        _check_length(self.length)


@dataclass(frozen=True)
class PromptConfig(AdapterConfig):
    """``length`` P soft tokens; ``init`` "random" (N(0, std of the token embeddings)) or
    "vocab" (the embeddings of P tokens sampled from the vocabulary, Lester et al.)."""

    method: ClassVar[str] = "prompt"
    length: int = 1
    init: str = "random"

    def __post_init__(self):
        _check_length(self.length)
        if self.init not in ("random", "vocab"):
            raise ValueError(f"prompt init must be 'random' or 'vocab', got {self.init!r}")


@dataclass(frozen=True)
class LoRAConfig(AdapterConfig):
    """Rank-``rank`` updates (alpha / rank) A B of the ``targets`` matrices of every layer;
    ``alpha`` defaults to ``rank`` (a scale of 1) and is stored resolved. ``init`` "random"
    (A random, B zero) or "pissa" (A B starts as the matrix's top-``rank`` singular part, which
    the frozen weight gives up, so training still starts at the base model)."""

    method: ClassVar[str] = "lora"
    rank: int = 1
    targets: tuple[str, ...] = ("W_Q", "W_V")
    alpha: float | None = None
    init: str = "random"

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            raise ValueError(
                f"LoRA targets {bad or list(self.targets)} unknown; choose from {LORA_TARGETS}"
            )
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an int >= 1, got {self.rank!r}")
        if self.init not in ("random", "pissa"):
            raise ValueError(f"LoRA init must be 'random' or 'pissa', got {self.init!r}")
        object.__setattr__(self, "alpha", float(self.rank if self.alpha is None else self.alpha))


@dataclass(frozen=True)
class FullConfig(AdapterConfig):
    """Full fine-tuning takes no options."""

    method: ClassVar[str] = "full"


@dataclass(frozen=True)
class PrefixLoRAConfig(AdapterConfig):
    """A plain key/value prefix of ``length`` and LoRA (``rank``, ``targets``, ``alpha``)."""

    method: ClassVar[str] = "prefix+lora"
    length: int = 1
    rank: int = 1
    targets: tuple[str, ...] = ("W_Q", "W_V")
    alpha: float | None = None

    def __post_init__(self):
        lora = LoRAConfig(self.rank, self.targets, self.alpha)  # validates and resolves
        _check_length(self.length)
        object.__setattr__(self, "targets", lora.targets)
        object.__setattr__(self, "alpha", lora.alpha)

    @property
    def prefix(self) -> PrefixConfig:
        return PrefixConfig(length=self.length)

    @property
    def lora(self) -> LoRAConfig:
        return LoRAConfig(self.rank, self.targets, self.alpha)


@dataclass(frozen=True)
class IA3Config(AdapterConfig):
    """IA3's learned scales, each starting at 1: of the output channels of the ``targets`` among
    W_Q, W_K, W_V ([head, d_head] per layer; their biases scale alike) and of the MLP's hidden
    units, the input of ``W_out`` ([d_mlp] per layer). The default is IA3's own: keys, values
    and the MLP."""

    method: ClassVar[str] = "ia3"
    targets: tuple[str, ...] = ("W_K", "W_V", "W_out")

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        bad = [t for t in self.targets if t not in IA3_TARGETS]
        if bad or not self.targets:
            raise ValueError(
                f"IA3 targets {bad or list(self.targets)} unknown; choose from {IA3_TARGETS}"
            )


@dataclass(frozen=True)
class AdaptionPromptConfig(AdapterConfig):
    """An adaption prompt (LLaMA-Adapter) of ``length`` P_a vectors in each of the top
    ``layers`` layers (None: every layer), with one zero-initialised gate per head."""

    method: ClassVar[str] = "adaption_prompt"
    length: int = 1
    layers: int | None = None

    def __post_init__(self):
        _check_length(self.length)
        L = self.layers
        if L is not None and (isinstance(L, bool) or not isinstance(L, int) or L < 1):
            raise ValueError(f"adaption prompt layers must be an int >= 1 or None, got {L!r}")


# ---------------------------------------------------------------------------- adapters


class Adapter(nn.Module):
    """Base class: a set of trainable tensors and how they change the base model's forward.
    Built from ``(base, config)``; ``Config`` is the config class, ``method`` its name."""

    Config: ClassVar[type[AdapterConfig]]

    def __init__(self, base: Transformer, config: AdapterConfig):
        super().__init__()
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} takes a {self.Config.__name__}, got {config!r}")
        self.base_cfg = base.cfg
        self.config = config

    @property
    def method(self) -> str:
        return self.config.method

    # What the adapter feeds the base model; subclasses override the parts they use.
    def prefix(self, base: Transformer) -> list[KVPrefix | None] | None:
        return None

    def prompt(self, base: Transformer) -> Tensor | None:
        return None

    def weights(self, base: Transformer) -> dict[str, Tensor]:
        return {}

    def gated(self, base: Transformer) -> list[GatedPrompt | None] | None:
        return None

    def forward(
        self, base: Transformer, tokens: Int[Tensor, "batch pos"], positions: slice = slice(None)
    ) -> Float[Tensor, "batch position d_vocab"]:
        kwargs = {"prefix": self.prefix(base), "prompt": self.prompt(base), "positions": positions}
        kwargs["gated"] = self.gated(base)
        weights = self.weights(base)
        if weights:
            return functional_call(base, weights, (tokens,), kwargs, strict=False)
        return base(tokens, **kwargs)

    @property
    def n_params(self) -> int:
        """Trainable parameters, as trained (an MLP reparameterisation counts its MLP)."""
        return sum(p.numel() for p in self.parameters())

    def share(self, base: Transformer) -> float:
        """n_params as a fraction of the base model's parameters."""
        return self.n_params / base.n_params

    def saved(self, base: Transformer) -> tuple[AdapterConfig, dict[str, Tensor]]:
        """The config and tensors :meth:`save` writes; a subclass may fold a
        reparameterisation here (loading them gives the same forward)."""
        return self.config, self.state_dict()

    def save(self, path: str | Path, base: Transformer, overwrite: bool = False) -> Path:
        """Write ``path/adapter_config.json`` and ``path/adapter.safetensors`` with
        :func:`io.save_dir` (never half-written); the JSON records the base's fingerprint and a
        checksum of the adapter's own tensors."""
        config, tensors = self.saved(base)
        meta = {
            "format": io.ADAPTER_FORMAT,
            "method": self.method,
            "config": config.to_dict(),
            "base_fingerprint": base.fingerprint(),
            "base_config": base.cfg.to_dict(),
            "n_params": self.n_params,
            "environment": environment(base.device),  # threads etc.: see model.environment
            "checksum": io.fingerprint(tensors),
        }
        return io.save_dir(
            path, {"adapter.safetensors": tensors}, {"adapter_config.json": meta}, overwrite
        )


def _fits(length: int, max_prefix: int) -> None:
    if length > max_prefix:
        raise ValueError(
            f"prefix/prompt length {length} exceeds the base model's max_prefix={max_prefix}; "
            "use a shorter one or a base model built with a larger max_prefix"
        )


class Prefix(Adapter):
    """Key/value prefix per layer and head (Li & Liang; PEFT's prefix-tuning). With
    ``reparam_hidden`` the prefix comes from an MLP (:class:`PrefixConfig`), which trains more
    stably; ``save`` folds it into plain keys and values, so a loaded adapter is a plain prefix.
    """

    Config = PrefixConfig

    def __init__(self, base: Transformer, config: PrefixConfig = PrefixConfig()):
        super().__init__(base, config)
        c, P, H = base.cfg, config.length, config.reparam_hidden
        _fits(P, c.max_prefix)
        self.shape = (c.n_layers, 2, P, c.n_heads, c.d_head)  # 2: keys, values
        like = base.W_E
        if H:
            n_out = math.prod(self.shape) // P
            self.embedding = nn.Parameter(torch.randn(P, H).to(like))
            self.mlp = nn.Sequential(nn.Linear(H, H), nn.Tanh(), nn.Linear(H, n_out)).to(like)
        else:
            self.kv = nn.Parameter(config.init_scale * torch.randn(self.shape).to(like))

    def kv_tensor(self) -> Float[Tensor, "layer 2 P head d_head"]:
        if self.config.reparam_hidden:
            out = self.mlp(self.embedding)  # [P, layer * 2 * head * d_head]
            n_layers, two, P, h, e = self.shape
            return out.view(P, n_layers, two, h, e).permute(1, 2, 0, 3, 4)
        return self.kv

    def prefix(self, base):
        return [KVPrefix(kv[0], kv[1]) for kv in self.kv_tensor()]

    def saved(self, base):
        return replace(self.config, reparam_hidden=0), {"kv": self.kv_tensor().detach()}


class VirtualTokenPrefix(Adapter):
    """The paper's virtual tokens: per-layer vectors through that layer's ln1, W_K and W_V.

    They start as N(0, std of the token embeddings), the scale of the residual stream they join.
    (Unit-variance vectors swamp it where there is no ln1: at the 02 shape a P=1 prefix reached
    20% on add1 in 200 steps from N(0, 1), and 99% in 100 steps from this scale.)
    """

    Config = VirtualTokenConfig

    def __init__(self, base: Transformer, config: VirtualTokenConfig = VirtualTokenConfig()):
        super().__init__(base, config)
        c = base.cfg
        _fits(config.length, c.max_prefix)
        scale = base.W_E.detach().std()
        shape = (c.n_layers, config.length, c.d_model)
        self.vectors = nn.Parameter(scale * torch.randn(shape).to(base.W_E))

    def prefix(self, base):
        return vt_to_prefix(base, self.vectors)


class Prompt(Adapter):
    """Soft prompt: P vectors before the content at the input only, no positional slot."""

    Config = PromptConfig

    def __init__(self, base: Transformer, config: PromptConfig = PromptConfig()):
        super().__init__(base, config)
        c, P = base.cfg, config.length
        _fits(P, c.max_prefix)
        if config.init == "random":
            tokens = base.W_E.detach().std() * torch.randn(P, c.d_model).to(base.W_E)
        else:  # "vocab"
            tokens = base.W_E.detach()[torch.randint(0, c.d_vocab, (P,))].clone()
        self.tokens = nn.Parameter(tokens)

    def prompt(self, base):
        return self.tokens


class LoRA(Adapter):
    """Low-rank updates W + (alpha / r) A B on chosen matrices of every layer.

    Each attention weight [head, d_model, d_head] is treated as one d_model x (head*d_head)
    matrix (W_O as (head*d_head) x d_model), so rank r means rank r across heads, as in PEFT.
    A starts random and B at zero, so training starts at the base model; ``init="pissa"`` starts
    A B at the matrix's top-r singular part and subtracts that part (buffer ``start``) instead.
    """

    Config = LoRAConfig

    def __init__(self, base: Transformer, config: LoRAConfig = LoRAConfig()):
        super().__init__(base, config)
        if base.cfg.d_mlp == 0 and {"W_in", "W_out"} & set(config.targets):
            raise ValueError("LoRA on W_in/W_out needs an MLP; this base model is attention-only")
        self.A, self.B = nn.ParameterDict(), nn.ParameterDict()
        scale = config.alpha / config.rank
        for name, W in self._targeted(base):
            M = _as_matrix(name, W).detach()
            d_in, d_out = M.shape
            key = name.replace(".", "__")
            if config.init == "pissa":
                # Split each singular value between A and B, so that both start at one scale.
                U, S, Vh = torch.linalg.svd(M.double(), full_matrices=False)
                root = (S[: config.rank] / scale).sqrt()
                A, B = (U[:, : config.rank] * root).to(W), (root[:, None] * Vh[: config.rank]).to(W)
                self.register_buffer(f"start__{key}", scale * (A @ B))
            else:
                A = torch.randn(d_in, config.rank).to(W) / math.sqrt(d_in)
                B = torch.zeros(config.rank, d_out).to(W)
            self.A[key], self.B[key] = nn.Parameter(A), nn.Parameter(B)

    def _targeted(self, base):
        leaves = self.config.targets
        return [(n, p) for n, p in base.named_parameters() if n.split(".")[-1] in leaves]

    def weights(self, base):
        scale = self.config.alpha / self.config.rank
        out = {}
        for name, W in self._targeted(base):
            key = name.replace(".", "__")
            delta = scale * (self.A[key] @ self.B[key])
            if self.config.init == "pissa":
                delta = delta - getattr(self, f"start__{key}")
            out[name] = W + _from_matrix(name, delta, W.shape)
        return out

    @torch.no_grad()
    def merge(self, base: Transformer) -> Transformer:
        """A new model with the low-rank updates added to its weights."""
        merged = Transformer(base.cfg).to(base.W_E)
        merged.load_state_dict({**base.state_dict(), **self.weights(base)})
        return merged


class Full(Adapter):
    """Full fine-tuning of a copy of the base weights (the base itself stays frozen)."""

    Config = FullConfig

    def __init__(self, base: Transformer, config: FullConfig = FullConfig()):
        super().__init__(base, config)
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

    Config = PrefixLoRAConfig

    def __init__(self, base: Transformer, config: PrefixLoRAConfig = PrefixLoRAConfig()):
        super().__init__(base, config)
        self.kv_prefix = Prefix(base, config.prefix)
        self.lora = LoRA(base, config.lora)

    def prefix(self, base):
        return self.kv_prefix.prefix(base)

    def weights(self, base):
        return self.lora.weights(base)


class IA3(Adapter):
    """IA3 (Liu et al.; PEFT's ``IA3Config``): every targeted channel times a learned scale,
    applied as replaced weights.

    A key scale l [head, d_head] gives keys (x W_K + b_K) * l = x (W_K * l) + b_K * l, so scaling
    the weight and its bias is the model that scales the activations (PEFT's way); likewise
    queries and values, and the MLP: (gelu(x W_in + b_in) * l) W_out = gelu(...) (l W_out), l
    [d_mlp] scaling the rows of W_out. Every scale starts at 1: the base model exactly.

    Under the theorem: a key (or query) scale other than 1 changes the scores q . (k * l), and
    with them the relative attention, so IA3 on keys re-weights attention; with every key and
    query scale 1 each pattern is the frozen head's ("attention kept": values and the MLP change
    what a head outputs, never where it looks), and no bias is added. The same adapter in PEFT:
    :func:`probe.hf.convert.ia3_to_peft` (exact; PEFT's IA3 on GPT-2 scales c_attn's
    [q | k | v] outputs, bias included, and the input of mlp.c_proj).
    """

    Config = IA3Config

    def __init__(self, base: Transformer, config: IA3Config = IA3Config()):
        super().__init__(base, config)
        if base.cfg.d_mlp == 0 and "W_out" in config.targets:
            raise ValueError(
                "IA3 on W_out scales the MLP's hidden units; this base model is attention-only: "
                "pass targets without 'W_out'"
            )
        self.scales = nn.ParameterDict()
        for name, W in base.named_parameters():
            leaf = name.split(".")[-1]
            if leaf in config.targets:  # W_out [d_mlp, d]: its rows; W_Q/K/V: [head, d_head]
                shape = W.shape[:1] if leaf == "W_out" else (W.shape[0], W.shape[2])
                self.scales[name.replace(".", "__")] = nn.Parameter(torch.ones(shape).to(W))

    def weights(self, base):
        params = dict(base.named_parameters())
        out = {}
        for key, scale in self.scales.items():
            name = key.replace("__", ".")
            if name.endswith("W_out"):
                out[name] = scale[:, None] * params[name]
            else:  # [head, d_model, d_head] and the bias [head, d_head]: blocks.l.attn.b_K
                bias = f"{name[:-3]}b_{name[-1]}"
                out[name] = params[name] * scale[:, None, :]
                out[bias] = params[bias] * scale
        return out


class AdaptionPrompt(Adapter):
    """Adaption prompt (LLaMA-Adapter; PEFT's ``AdaptionPromptConfig``): in each of the top L
    layers, P_a learned vectors a_p [d_model] (N(0, 1), the scale of the normalised input the
    projections read) and a gate g_h per head, starting at 0.

    Derivation. Head h projects the prompt through its own frozen maps, K_a = a W_K,h + b_K,h and
    V_a = a W_V,h + b_V,h (no ln1, no position, as in PEFT), and each content query q_i attends
    to them through a softmax of its own, beside the head's unchanged attention:

        beta_ip = softmax_p(q_i . K_a,p / sqrt(e))
        z_i,h   = sum_{j<=i} A_ij v_j  +  g_h sum_p beta_ip V_a,p,   o_i = sum_h z_i,h W_O,h + b_O

    with A the head's softmax over the content alone, which no prompt key enters. Against the
    prefix's z_i = (1 - alpha_i) A v + alpha_i beta V_p (one softmax over [prefix; content]),
    given the layer's input:

    - A is exactly the frozen head's: relative and absolute content attention are unchanged
      (local drift 0), and the content term keeps weight 1, not 1 - alpha_i;
    - the added output g_h beta_i V_a,h W_O,h is a bias whose weight is a learned constant of any
      sign and size, not a query-dependent share in [0, 1]; it lies in span{V_a,p W_O,h}, rank
      <= P_a per head; g = 0 is the base model exactly.

    :func:`probe.check.check_tuned` checks it at every adapted layer: hook_attn_out - (A v W_O +
    b_O) == sum_h g_h beta_h V_a,h W_O,h (:func:`probe.classify.gated_decompose`).

    No conversion to PEFT: its adaption prompt on GPT-2 (the one of its architectures ours maps
    to) adds the mix to the residual stream without the output projection and has one gate per
    layer, so no setting of it reproduces a mix through W_O with a gate per head.
    """

    Config = AdaptionPromptConfig

    def __init__(self, base: Transformer, config: AdaptionPromptConfig = AdaptionPromptConfig()):
        super().__init__(base, config)
        c = base.cfg
        L = c.n_layers if config.layers is None else config.layers
        if L > c.n_layers:
            raise ValueError(
                f"adaption prompt layers={L} but the base model has {c.n_layers} layers; "
                f"pass layers <= {c.n_layers}"
            )
        _fits(config.length, c.max_prefix)
        self.first = c.n_layers - L  # the adapted layers are first..n_layers-1
        self.vectors = nn.Parameter(torch.randn(L, config.length, c.d_model).to(base.W_E))
        self.gate = nn.Parameter(torch.zeros(L, c.n_heads).to(base.W_E))

    def gated(self, base):
        out: list[GatedPrompt | None] = [None] * self.first
        for block, a, g in zip(base.blocks[self.first :], self.vectors, self.gate, strict=True):
            keys, values = block.attn.project(a, "kv")  # [P_a, head, d_head] each
            out.append(GatedPrompt(keys, values, g))
        return out


METHODS: dict[str, type[Adapter]] = {
    cls.Config.method: cls
    for cls in (Prefix, VirtualTokenPrefix, Prompt, LoRA, Full, PrefixLoRA, IA3, AdaptionPrompt)
}


def adapter_config(method: str, **options) -> AdapterConfig:
    """The typed config of ``method`` (``"prefix"``, ``"lora"``, ...) from keyword options."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method].Config.from_dict(options)


def make_adapter(method: str, base: Transformer, **options) -> Adapter:
    """A fresh adapter for ``base`` by method name and options (the config's fields):
    ``make_adapter("lora", base, rank=4)`` is ``LoRA(base, LoRAConfig(rank=4))``."""
    return adapter_config(method, **options).build(base)


def load_adapter(path: str | Path, base: Transformer) -> Adapter:
    """Load an adapter saved by :meth:`Adapter.save` onto ``base``, which must be its base."""
    path = Path(path)
    meta = io.read_json(
        path / "adapter_config.json",
        io.ADAPTER_FORMATS,
        required={"method": str, "base_fingerprint": str},
    )
    # The first saved format kept the same fields under "hparams".
    options = meta.get("config", meta.get("hparams"))
    if not isinstance(options, dict):
        raise io.CorruptFileError(
            f"{path / 'adapter_config.json'} has no 'config' table; the save is corrupt: re-save"
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
    adapter = adapter_config(meta["method"], **options).build(base)
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
