"""A small hooked decoder-only transformer with an exact key/value prefix path.

Readable in one sitting (after nanoGPT), with TransformerLens's hook names and weight layout so
``run_with_cache`` and ``ActivationCache`` work as TransformerLens users expect:

    hook_embed, hook_pos_embed
    blocks.{l}.hook_resid_pre / hook_attn_out / hook_resid_mid / hook_mlp_out / hook_resid_post
    blocks.{l}.ln1.hook_scale / hook_normalized, blocks.{l}.ln2.*, ln_final.*
    blocks.{l}.attn.hook_q / hook_k / hook_v          [batch, pos, head, d_head]   (content only)
    blocks.{l}.attn.hook_prefix_k / hook_prefix_v     [batch, P, head, d_head]     (with a prefix)
    blocks.{l}.attn.hook_attn_scores / hook_pattern   [batch, head, query_pos, P + key_pos]
    blocks.{l}.attn.hook_z                            [batch, pos, head, d_head]
    blocks.{l}.mlp.hook_pre / hook_post               [batch, pos, d_mlp]

The one mechanism every prefix-like tuning method reduces to is the per-layer prefix: P extra
key/value positions per head, placed before the content keys (the other way in is ``gated=``,
an adaption prompt's separately-softmaxed, gated attention: :class:`GatedPrompt`). Prefix
positions take no positional slot, so content positions stay 0..T-1 and layer 0's content
queries, keys and values are identical with and without a prefix; from layer 1 on they differ,
since the prefix changed the layers below.

Modes: a model is built and loaded in eval mode (no dropout), ready to be probed; the training
loop (:func:`probe.train.train`) puts what it trains in training mode while it steps and back in
eval mode after. Dropout acts after ``hook_pattern`` and on the residual stream, so a cache
recorded in training mode does not satisfy ``hook_z == hook_pattern @ v``:
``run_with_cache`` warns once per model when asked to do that (:class:`DropoutActiveWarning`).
Conversions that run the model (``adapters.prompt_to_prefix``) do so under :func:`eval_mode`,
which restores the caller's modes; ``vt_to_prefix`` and the probes (``probe.probes``, which read
recorded caches) apply no dropout in either mode.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import einsum
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.hook_points import HookPoint

from probe import io
from probe.config import (  # noqa: F401 (re-exported)
    PRESETS,
    GatedPrompt,
    KVPrefix,
    ModelConfig,
    eval_mode,
    preset,
)


class DropoutActiveWarning(UserWarning):
    """A cache was recorded with dropout active: it does not hold the attention identities."""


class LayerNorm(nn.Module):
    """LayerNorm with TransformerLens's hooks (``hook_scale`` [..., 1], ``hook_normalized``)."""

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.w = nn.Parameter(torch.ones(d_model))
        self.b = nn.Parameter(torch.zeros(d_model))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        if not (self.hook_scale.has_hooks() or self.hook_normalized.has_hooks()):
            return F.layer_norm(x, x.shape[-1:], self.w, self.b, self.eps)  # same maths, fused
        x = x - x.mean(-1, keepdim=True)
        scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        return self.hook_normalized(x / scale) * self.w + self.b


class Attention(nn.Module):
    """Multi-head causal attention with an optional key/value prefix (TransformerLens layout)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, d, e = cfg.n_heads, cfg.d_model, cfg.d_head
        self.W_Q = nn.Parameter(torch.empty(h, d, e))
        self.W_K = nn.Parameter(torch.empty(h, d, e))
        self.W_V = nn.Parameter(torch.empty(h, d, e))
        self.W_O = nn.Parameter(torch.empty(h, e, d))
        self.b_Q = nn.Parameter(torch.zeros(h, e))
        self.b_K = nn.Parameter(torch.zeros(h, e))
        self.b_V = nn.Parameter(torch.zeros(h, e))
        self.b_O = nn.Parameter(torch.zeros(d))
        for name in ("q", "k", "v", "prefix_k", "prefix_v", "attn_scores", "pattern", "z"):
            setattr(self, f"hook_{name}", HookPoint())

    def project(self, x: Float[Tensor, "... pos d_model"], parts: str = "qkv") -> list[Tensor]:
        """Queries, keys and/or values of (already normalised) residual vectors ``x``, one
        [..., pos, head, d_head] tensor per letter of ``parts`` ("qkv", "kv", "k", ...), computed
        in one matmul over the chosen weights (TransformerLens layout [head, d_model, d_head])."""
        W = [getattr(self, f"W_{p.upper()}") for p in parts]
        b = [getattr(self, f"b_{p.upper()}") for p in parts]
        return list(_project(x, torch.cat(W), torch.cat(b)).chunk(len(parts), dim=-2))

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        prefix: KVPrefix | None = None,
        queries: slice = slice(None),
        gated: GatedPrompt | None = None,
    ) -> Float[Tensor, "batch query d_model"]:
        """Attention output at the ``queries`` positions of ``x`` (default: all of them); a
        ``gated`` prompt adds its gated mix to each head's output before W_O (in ``hook_z``)."""
        batch, T, _ = x.shape
        q, k, v = self.project(x)
        q, k, v = self.hook_q(q[:, queries]), self.hook_k(k), self.hook_v(v)
        P = 0
        if prefix is not None:
            P = prefix.length
            shape = (batch, P, self.cfg.n_heads, self.cfg.d_head)
            k = torch.cat([self.hook_prefix_k(prefix.keys.expand(shape)), k], dim=1)
            v = torch.cat([self.hook_prefix_v(prefix.values.expand(shape)), v], dim=1)
        # Query t sees every prefix column and content columns 0..t.
        allowed = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(diagonal=P)[queries]
        p_drop = self.cfg.dropout if self.training else 0.0

        if self.hook_attn_scores.has_hooks() or self.hook_pattern.has_hooks():
            scores = einsum(q, k, "b q h e, b k h e -> b h q k") / math.sqrt(self.cfg.d_head)
            scores = self.hook_attn_scores(scores.masked_fill(~allowed, float("-inf")))
            pattern = self.hook_pattern(scores.softmax(dim=-1))
            pattern = F.dropout(pattern, p_drop, self.training)
            z = einsum(pattern, v, "b h q k, b k h e -> b q h e")
        else:  # Fused kernel: same maths, used when nobody is looking at the pattern.
            z = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), allowed, p_drop
            ).transpose(1, 2)
        if gated is not None:
            z = z + gated_mix(q, gated)
        z = self.hook_z(z)
        return _linear(z.flatten(-2), self.W_O.flatten(0, 1), self.b_O)  # sum over h and e


def gated_mix(q: Float[Tensor, "b q h e"], gated: GatedPrompt) -> Float[Tensor, "b q h e"]:
    """An adaption prompt's contribution to each head's output: gate_h softmax_p(q . K_a,p /
    sqrt(e)) V_a,p, a softmax over the prompt alone (``probe.adapters.AdaptionPrompt``)."""
    s = einsum(q, gated.keys, "b q h e, p h e -> b h q p") / math.sqrt(q.shape[-1])
    mix = einsum(s.softmax(dim=-1), gated.values, "b h q p, p h e -> b q h e")
    return gated.gate[:, None] * mix


def _linear(x: Float[Tensor, "... d_in"], W: Float[Tensor, "d_in d_out"], b: Tensor) -> Tensor:
    """x @ W + b, with the bias added inside the matmul kernel (one pass over the output)."""
    return F.linear(x, W.T, b)


def _project(
    x: Float[Tensor, "... pos d_model"], W: Float[Tensor, "head d_model d_head"], b: Tensor
) -> Float[Tensor, "... pos head d_head"]:
    """Per-head x W + b: einsum "... p d, h d e -> ... p h e" as one matmul."""
    return _linear(x, W.transpose(0, 1).flatten(1), b.flatten()).unflatten(-1, b.shape)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.W_in = nn.Parameter(torch.empty(cfg.d_model, cfg.d_mlp))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_mlp))
        self.W_out = nn.Parameter(torch.empty(cfg.d_mlp, cfg.d_model))
        self.b_out = nn.Parameter(torch.zeros(cfg.d_model))
        self.hook_pre = HookPoint()
        self.hook_post = HookPoint()

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        pre = self.hook_pre(_linear(x, self.W_in, self.b_in))
        return _linear(self.hook_post(F.gelu(pre, approximate="tanh")), self.W_out, self.b_out)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = LayerNorm(cfg.d_model) if cfg.attn_ln else nn.Identity()
        self.attn = Attention(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.ln2 = LayerNorm(cfg.d_model) if cfg.d_mlp else None
        self.mlp = MLP(cfg) if cfg.d_mlp else None
        for name in ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post"):
            setattr(self, f"hook_{name}", HookPoint())

    def forward(
        self,
        x: Float[Tensor, "batch pos d_model"],
        prefix: KVPrefix | None = None,
        queries: slice = slice(None),
        gated: GatedPrompt | None = None,
    ) -> Float[Tensor, "batch query d_model"]:
        """The residual stream after this block at the ``queries`` positions (default: all)."""
        x = self.hook_resid_pre(x)
        attn_out = self.hook_attn_out(self.drop(self.attn(self.ln1(x), prefix, queries, gated)))
        x = self.hook_resid_mid(x[:, queries] + attn_out)
        if self.mlp is not None:
            x = x + self.hook_mlp_out(self.drop(self.mlp(self.ln2(x))))
        return self.hook_resid_post(x)


class Transformer(HookedRootModule):
    """Decoder-only transformer: embed + learned positions, blocks, final LayerNorm, unembed.

    ``model(tokens, prefix=..., prompt=...)`` returns logits [batch, T, d_vocab] for the content
    tokens. ``prefix`` is a per-layer list of :class:`KVPrefix` (or None for a layer without one);
    ``prompt`` is a soft prompt [P, d_model] (or [batch, P, d_model]) prepended to the embedded
    content at the input only, taking no positional slot; with a prompt, residual-stream hooks
    have P + T positions, prompt first, and only the content's logits are returned. ``gated``
    is a per-layer list of :class:`GatedPrompt` (or None), an adaption prompt's gated attention.
    ``positions=slice(a, b)`` returns only content positions a..b-1 and skips the last layer's
    work elsewhere (that layer's hooks after its keys and values then see only those positions).

    Built in eval mode (no dropout), like :meth:`load`; ``probe.train.train`` sets training mode
    while it steps. Call ``.train()`` yourself only for a training loop of your own.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.W_E = nn.Parameter(torch.empty(cfg.d_vocab, cfg.d_model))
        self.W_pos = nn.Parameter(torch.empty(cfg.n_ctx, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_final = LayerNorm(cfg.d_model)
        self.W_U = nn.Parameter(torch.empty(cfg.d_model, cfg.d_vocab))
        self.hook_embed = HookPoint()
        self.hook_pos_embed = HookPoint()
        self.init_weights()
        self.setup()
        self.eval()  # ready for analysis; training code sets training mode itself
        self._warned_dropout = False

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None):
        """GPT-2 initialisation: N(0, 0.02), output projections scaled by 1/sqrt(2 n_layers)."""
        for name, p in self.named_parameters():
            if name.endswith(("W_O", "W_out")):
                p.normal_(0.0, 0.02 / math.sqrt(2 * self.cfg.n_layers), generator=generator)
            elif name.split(".")[-1].startswith("W_"):
                p.normal_(0.0, 0.02, generator=generator)

    def forward(
        self,
        tokens: Int[Tensor, "batch pos"],
        prefix: Sequence[KVPrefix | None] | None = None,
        prompt: Float[Tensor, "... P d_model"] | None = None,
        positions: slice = slice(None),
        gated: Sequence[GatedPrompt | None] | None = None,
    ) -> Float[Tensor, "batch position d_vocab"]:
        self.check_inputs(tokens, prefix, prompt, positions, gated)
        batch, T = tokens.shape
        x = self.hook_embed(F.embedding(tokens, self.W_E)) + self.hook_pos_embed(self.W_pos[:T])
        P = 0
        if prompt is not None:
            P = prompt.shape[-2]
            x = torch.cat([prompt.expand(batch, P, self.cfg.d_model), x], dim=1)
        x = self.drop(x)
        # Every position is a key to the layer above, but the last layer only needs queries at
        # the positions whose logits are asked for (a training step: the output positions).
        # By default every position, the prompt's included, goes through (hooks see them all).
        start, stop, _ = positions.indices(T)
        cut = slice(None) if positions == slice(None) else slice(P + start, P + stop)
        last = len(self.blocks) - 1
        for layer, block in enumerate(self.blocks):
            queries = cut if layer == last else slice(None)
            g = gated[layer] if gated is not None else None
            x = block(x, prefix[layer] if prefix is not None else None, queries, g)
        return self.ln_final(x if cut != slice(None) else x[:, P:]) @ self.W_U

    def check_inputs(self, tokens, prefix, prompt, positions=slice(None), gated=None):
        """Raise a ValueError naming the field and the fix for any input the model cannot take."""
        cfg = self.cfg
        if not isinstance(tokens, Tensor) or tokens.ndim != 2 or tokens.dtype.is_floating_point:
            got = tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be an integer tensor [batch, pos]; got {got}")
        if tokens.shape[1] > cfg.n_ctx:
            raise ValueError(
                f"sequence length {tokens.shape[1]} exceeds the model's context n_ctx={cfg.n_ctx}; "
                "shorten the sequence or build the model with a larger n_ctx"
            )
        if tokens.numel() and (int(tokens.max()) >= cfg.d_vocab or int(tokens.min()) < 0):
            raise ValueError(
                f"token ids must be in [0, d_vocab={cfg.d_vocab}); got range "
                f"[{int(tokens.min())}, {int(tokens.max())}]; use a model with a larger d_vocab"
            )
        if prefix is not None:
            if len(prefix) != cfg.n_layers:
                raise ValueError(
                    f"prefix must have one entry per layer ({cfg.n_layers}), got {len(prefix)}; "
                    "use None for layers without a prefix"
                )
            want = (cfg.n_heads, cfg.d_head)
            for layer, p in enumerate(prefix):
                if p is None:
                    continue
                for part in (p.keys, p.values):
                    if part.ndim not in (3, 4) or tuple(part.shape[-2:]) != want:
                        raise ValueError(
                            f"prefix[{layer}] has shape {tuple(part.shape)}; expected "
                            f"[P, n_heads={want[0]}, d_head={want[1]}] or [batch, P, ...]"
                        )
                if p.keys.shape != p.values.shape:
                    raise ValueError(
                        f"prefix[{layer}]: keys {tuple(p.keys.shape)} and values "
                        f"{tuple(p.values.shape)} must have the same shape"
                    )
                if p.length > cfg.max_prefix:
                    raise ValueError(
                        f"prefix[{layer}] has P={p.length} positions, more than "
                        f"max_prefix={cfg.max_prefix}; use a shorter prefix or raise max_prefix"
                    )
        if gated is not None:
            self._check_gated(gated)
        if not isinstance(positions, slice) or positions.step not in (None, 1):
            raise ValueError(
                f"positions must be a contiguous slice such as slice(9, None); got {positions!r}"
            )
        if prompt is not None:
            if prompt.ndim not in (2, 3) or prompt.shape[-1] != cfg.d_model:
                raise ValueError(
                    f"prompt has shape {tuple(prompt.shape)}; expected "
                    f"[P, d_model={cfg.d_model}] or [batch, P, d_model]"
                )
            if prompt.shape[-2] > cfg.max_prefix:
                raise ValueError(
                    f"prompt has P={prompt.shape[-2]} positions, more than "
                    f"max_prefix={cfg.max_prefix}; shorten it or raise max_prefix"
                )

    def _check_gated(self, gated: Sequence[GatedPrompt | None]) -> None:
        cfg = self.cfg
        if len(gated) != cfg.n_layers:
            raise ValueError(
                f"gated must have one entry per layer ({cfg.n_layers}), got {len(gated)}; "
                "use None for layers without an adaption prompt"
            )
        want = (cfg.n_heads, cfg.d_head)
        for layer, g in enumerate(gated):
            if g is None:
                continue
            if (
                g.keys.ndim != 3
                or tuple(g.keys.shape[1:]) != want
                or g.values.shape != g.keys.shape
            ):
                raise ValueError(
                    f"gated[{layer}]: keys {tuple(g.keys.shape)} and values "
                    f"{tuple(g.values.shape)} must both be [P_a, n_heads={want[0]}, "
                    f"d_head={want[1]}]"
                )
            if tuple(g.gate.shape) != (cfg.n_heads,):
                raise ValueError(
                    f"gated[{layer}]: gate has shape {tuple(g.gate.shape)}; expected one gate "
                    f"per head, [n_heads={cfg.n_heads}]"
                )

    def run_with_cache(self, *args, **kwargs) -> tuple[Tensor, ActivationCache]:
        """Like TransformerLens: logits and an :class:`ActivationCache` of every hook.

        In training mode with dropout > 0 this warns once per model (:class:`DropoutActiveWarning`):
        dropout then acts after ``hook_pattern``, so the recorded pattern is not the one z was
        computed with, and every call draws new noise.
        """
        self.warn_if_dropout(stacklevel=3)
        logits, cache = super().run_with_cache(*args, **kwargs)
        return logits, ActivationCache(cache, self)

    def warn_if_dropout(self, stacklevel: int = 2) -> None:
        """Warn, once per model, if a forward now would apply dropout (see run_with_cache)."""
        if self.cfg.dropout == 0 or self._warned_dropout:
            return
        if any(m.training for m in self.modules()):
            self._warned_dropout = True
            warnings.warn(
                f"recording a cache in training mode with dropout {self.cfg.dropout}: the pattern "
                "is taken before dropout, so hook_z != hook_pattern @ v and each call differs; "
                "call model.eval() first (probe's training loop sets training mode itself)",
                DropoutActiveWarning,
                stacklevel=stacklevel,
            )

    @property
    def device(self) -> torch.device:
        return self.W_E.device

    @property
    def n_params(self) -> int:
        """Number of weights (every parameter, trainable or not)."""
        return sum(p.numel() for p in self.parameters())

    def fingerprint(self) -> str:
        """Short hash of the weights; adapters record it and refuse another base model."""
        return io.fingerprint(self.state_dict())

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write ``path/model.safetensors`` and ``path/config.json`` with :func:`io.save_dir`
        (never half-written); an existing model or adapter at ``path`` is replaced only with
        ``overwrite``.

        config.json also records :func:`environment` (thread count, device, torch version):
        trained weights depend on them, so two saves can be compared knowingly.
        """
        meta = {
            "format": io.MODEL_FORMAT,
            "config": self.cfg.to_dict(),
            "fingerprint": self.fingerprint(),
            "environment": environment(self.device),
        }
        return io.save_dir(
            path, {"model.safetensors": self.state_dict()}, {"config.json": meta}, overwrite
        )

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Transformer:
        """Load a model saved by :meth:`save`; verifies the weights against the fingerprint."""
        path = Path(path)
        meta = io.read_json(
            path / "config.json", io.MODEL_FORMAT, required={"config": dict, "fingerprint": str}
        )
        state = io.load_tensors(path / "model.safetensors")
        if io.fingerprint(state) != meta["fingerprint"]:
            raise io.CorruptFileError(
                f"{path}: weights do not match the fingerprint in config.json; the files are "
                "corrupt or from different saves. Re-save the model."
            )
        try:
            cfg = ModelConfig.from_dict(meta["config"])
        except (TypeError, ValueError) as e:
            raise io.CorruptFileError(f"{path / 'config.json'}: bad model config ({e})") from None
        model = cls(cfg).to(state["W_E"].dtype)
        io.load_state(model, state, path / "model.safetensors")
        return model.to(device).eval()  # ready for analysis, like a freshly built model


def environment(device: torch.device | str) -> dict:
    """What besides the seed decides trained weights, recorded beside them when saved.

    ``threads`` is torch's intra-op thread count in the saving process (``probe pretrain`` and
    ``probe tune`` train and save in one process; ``--threads 0`` means one per core), since
    the order of floating-point reductions, and so the weights, depends on it on CPU.
    """
    return {"threads": torch.get_num_threads(), "device": str(device), "torch": torch.__version__}
