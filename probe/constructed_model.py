r"""The small explicit functional model the Section 3 constructions (:mod:`probe.constructions`)
run on, and greedy generation through it.

**Why the constructions are not** :class:`probe.model.Transformer` **s.** They have no
residual stream, no LayerNorm and no output projection W_O (a layer's heads are summed), and
their MLP reads ReLU(h - 1), which a residual or a LayerNorm would break. So they run on a
small explicit functional model, :class:`ConstructedModel`, kept in float64, with
TransformerLens hook names so that ``model.run_with_cache(x)`` shows what each head attends to:

    hook_input                                      [batch, pos, d_model]  prefix + embedded tokens
    blocks.{l}.attn.hook_q / hook_k                 [batch, pos, head, d_head]
    blocks.{l}.attn.hook_v / hook_z                 [batch, pos, head, d_out]
    blocks.{l}.attn.hook_attn_scores / hook_pattern [batch, head, query_pos, key_pos]
    blocks.{l}.hook_attn_out                        [batch, pos, d_out]   (heads summed)
    blocks.{l}.mlp.layers.{k}.hook_out              [batch, pos, width]   (each affine layer)
    blocks.{l}.hook_mlp_out                         [batch, pos, width]   (last block: logits)

**Inputs.** A token t at position i is the vector [W_E[t] | onehot(i)] (content, then a one-hot
position among the model's n_ctx); virtual tokens are free vectors of the same width, placed
first. Attention is over ALL positions (no causal mask) with scores T q.k / sqrt(n), n the
current number of positions and T the softmax inverse temperature. :func:`generate` decodes
greedily, reading only the last position, which attends to every position either way: a causal
mask would change nothing that is generated.

Shapes: b batch, n positions, h heads, e d_head, o a head's output width, d d_model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from einops import einsum
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import ActivationCache, HookedRootModule
from transformer_lens.hook_points import HookPoint


class Attention(nn.Module):
    """Several heads over all positions (no mask), summed: no output projection.

    W_Q, W_K: [head, d_in, d_head]; W_V: [head, d_in, d_out]. Scores are T q.k / sqrt(n), n the
    number of positions. Heads with fewer query/key dimensions are zero-padded to d_head, which
    adds nothing to any score.
    """

    def __init__(self, W_Q: Tensor, W_K: Tensor, W_V: Tensor, T: float, names: Sequence[str]):
        super().__init__()
        self.register_buffer("W_Q", W_Q)
        self.register_buffer("W_K", W_K)
        self.register_buffer("W_V", W_V)
        self.T = float(T)
        self.head_names = tuple(names)  # what each head does, for readers of the pattern
        for name in ("q", "k", "v", "attn_scores", "pattern", "z"):
            setattr(self, f"hook_{name}", HookPoint())

    def project(self, x: Float[Tensor, "b n d"], which: str) -> Float[Tensor, "b n h e"]:
        """Per-head x W_Q, x W_K or x W_V (``which`` = "Q", "K", "V") as one matmul."""
        W = getattr(self, f"W_{which}")
        return (x @ W.transpose(0, 1).flatten(1)).unflatten(-1, (W.shape[0], W.shape[2]))

    def attend(
        self, q: Float[Tensor, "b m h e"], k: Float[Tensor, "b n h e"], v: Float[Tensor, "b n h o"]
    ) -> Float[Tensor, "b m o"]:
        """The heads' outputs, summed, for queries q over all n keys and values."""
        scores = einsum(q, k, "b q h e, b k h e -> b h q k") * (self.T / math.sqrt(k.shape[1]))
        pattern = self.hook_pattern(self.hook_attn_scores(scores).softmax(dim=-1))
        z = self.hook_z(einsum(pattern, v, "b h q k, b k h o -> b q h o"))
        return z.sum(dim=2)

    def forward(self, x: Float[Tensor, "b n d"]) -> Float[Tensor, "b n o"]:
        q = self.hook_q(self.project(x, "Q"))
        k = self.hook_k(self.project(x, "K"))
        v = self.hook_v(self.project(x, "V"))
        return self.attend(q, k, v)


class Affine(nn.Module):
    """x W + b, then ReLU if ``relu``. W: [d_in, d_out], b: [d_out]."""

    def __init__(self, W: Tensor, b: Tensor, relu: bool = True):
        super().__init__()
        self.register_buffer("W", W)
        self.register_buffer("b", b)
        self.relu = relu
        self.hook_out = HookPoint()

    def forward(self, x: Float[Tensor, "b n d_in"]) -> Float[Tensor, "b n d_out"]:
        y = x @ self.W + self.b
        return self.hook_out(y.relu() if self.relu else y)


class MLP(nn.Module):
    """A stack of :class:`Affine` layers applied at every position."""

    def __init__(self, layers: Sequence[Affine]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Float[Tensor, "b n d"]) -> Float[Tensor, "b n w"]:
        for layer in self.layers:
            x = layer(x)
        return x


class Block(nn.Module):
    """Attention, then an MLP on its output: no residual stream, no LayerNorm."""

    def __init__(self, attn: Attention, mlp: MLP):
        super().__init__()
        self.attn = attn
        self.mlp = mlp
        self.hook_attn_out = HookPoint()
        self.hook_mlp_out = HookPoint()

    def forward(self, x: Float[Tensor, "b n d"]) -> Float[Tensor, "b n w"]:
        return self.hook_mlp_out(self.mlp(self.hook_attn_out(self.attn(x))))


class ConstructedModel(HookedRootModule):
    """A hand-built transformer (see the module docstring): ``model(x)`` maps input vectors
    [b, n, d_model] (virtual tokens, then :meth:`embed`-ded tokens) to logits [b, n, V].

    ``config`` is the construction that built it; ``n_virtual`` the number of virtual tokens
    it expects first, ``input_length`` the number of user tokens after them and
    ``response_length`` the number of tokens it is built to generate (the default of
    :func:`generate`).
    """

    def __init__(
        self,
        config,
        W_E: Float[Tensor, "V d_content"],
        n_ctx: int,
        blocks: Sequence[Block],
        n_virtual: int,
        input_length: int,
        response_length: int,
    ):
        super().__init__()
        self.config = config
        self.register_buffer("W_E", W_E)
        self.n_ctx = n_ctx
        self.n_virtual = n_virtual
        self.input_length = input_length
        self.response_length = response_length
        self.blocks = nn.ModuleList(blocks)
        self.hook_input = HookPoint()
        self.setup()

    @property
    def d_vocab(self) -> int:
        return self.W_E.shape[0]

    @property
    def d_model(self) -> int:
        return self.W_E.shape[1] + self.n_ctx

    @property
    def device(self) -> torch.device:
        return self.W_E.device

    def embed(self, tokens: Int[Tensor, "b t"], start: int = 0) -> Float[Tensor, "b t d_model"]:
        """[W_E[token] | onehot(position)] for tokens at positions start, start + 1, ..."""
        tokens = torch.as_tensor(tokens, device=self.device)
        if tokens.ndim != 2 or tokens.dtype.is_floating_point:
            raise ValueError(f"tokens must be an integer tensor [batch, t]; got {tokens.shape}")
        if tokens.numel() and not 0 <= int(tokens.min()) <= int(tokens.max()) < self.d_vocab:
            raise ValueError(
                f"token ids must be in [0, V={self.d_vocab}); got range "
                f"[{int(tokens.min())}, {int(tokens.max())}]"
            )
        stop = start + tokens.shape[1]
        if start < 0 or stop > self.n_ctx:
            raise ValueError(
                f"positions {start}..{stop - 1} do not fit the model's n_ctx={self.n_ctx} "
                "positions; give fewer tokens"
            )
        positions = torch.eye(self.n_ctx, dtype=self.W_E.dtype, device=self.device)[start:stop]
        return torch.cat([self.W_E[tokens], positions.expand(tokens.shape[0], -1, -1)], dim=-1)

    def run_with_cache(self, *args, **kwargs) -> tuple[Tensor, ActivationCache]:
        """Like TransformerLens: logits and an :class:`ActivationCache` of every hook
        (``cache["pattern", 0]`` is layer 0's attention [b, head, query, key])."""
        logits, cache = super().run_with_cache(*args, **kwargs)
        return logits, ActivationCache(cache, self)

    def forward(self, x: Float[Tensor, "b n d_model"]) -> Float[Tensor, "b n V"]:
        if x.ndim != 3 or x.shape[-1] != self.d_model or x.shape[1] > self.n_ctx:
            raise ValueError(
                f"input has shape {tuple(x.shape)}; expected [batch, n <= {self.n_ctx}, "
                f"d_model={self.d_model}]"
            )
        x = self.hook_input(x)
        for block in self.blocks:
            x = block(x)
        return x


@torch.no_grad()
def generate(
    model: ConstructedModel,
    prefix: Float[Tensor, "... P d_model"],
    tokens: Int[Tensor, "b t"] | Sequence[int] | None = None,
    steps: int | None = None,
) -> Int[Tensor, "b steps"]:
    """Greedy generation after the virtual tokens ``prefix`` ([P, d] or [b, P, d]) and the user
    ``tokens`` ([b, t], a list for one input, or None): each step runs the whole sequence and
    appends the argmax of the last position's logits. ``steps`` defaults to the model's
    ``response_length``. Returns the generated ids [b, steps]."""
    steps = model.response_length if steps is None else steps
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    prefix = torch.as_tensor(prefix, dtype=model.W_E.dtype, device=model.device)
    prefix = prefix[None] if prefix.ndim == 2 else prefix
    if prefix.ndim != 3 or prefix.shape[-1] != model.d_model:
        raise ValueError(
            f"prefix has shape {tuple(prefix.shape)}; expected [P, d_model={model.d_model}] or "
            "[batch, P, d_model]"
        )
    if tokens is None:
        tokens = torch.zeros(prefix.shape[0], 0, dtype=torch.long)
    tokens = torch.as_tensor(tokens, dtype=torch.long, device=model.device)
    tokens = tokens[None] if tokens.ndim == 1 else tokens
    if prefix.shape[0] != tokens.shape[0] and 1 not in (prefix.shape[0], tokens.shape[0]):
        raise ValueError(
            f"prefix batch {prefix.shape[0]} and tokens batch {tokens.shape[0]} differ; give "
            "one prefix per input or a single one"
        )
    batch, P = max(prefix.shape[0], tokens.shape[0]), prefix.shape[1]
    if P + tokens.shape[1] + steps - 1 > model.n_ctx:
        raise ValueError(
            f"{P} virtual + {tokens.shape[1]} user tokens and {steps} steps need "
            f"{P + tokens.shape[1] + steps - 1} positions; the model has n_ctx={model.n_ctx}"
        )
    x = torch.cat(
        [prefix.expand(batch, -1, -1), model.embed(tokens.expand(batch, -1), start=P)], dim=1
    )
    if len(model.blocks) == 1:
        return _generate_one_layer(model, x, steps)
    out = []
    for step in range(steps):
        out.append(model(x)[:, -1].argmax(dim=-1))
        if step < steps - 1:
            x = torch.cat([x, model.embed(out[-1][:, None], start=x.shape[1])], dim=1)
    return torch.stack(out, dim=1)


def _generate_one_layer(
    model: ConstructedModel, x: Float[Tensor, "b n d"], steps: int
) -> Int[Tensor, "b steps"]:
    """:func:`generate` for a one-layer model, the same tokens at a fraction of the cost: there a
    position's key and value depend on its own input only, so each is computed once (into
    buffers [b, head, position, e]), and only the last position's query and decoder are needed.
    The attention is the same as :meth:`Attention.attend`: over every position, scaled by the
    current n."""
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    batch, n = x.shape[:2]
    k = x.new_zeros(batch, attn.W_K.shape[0], n + steps - 1, attn.W_K.shape[2])
    v = x.new_zeros(batch, attn.W_V.shape[0], n + steps - 1, attn.W_V.shape[2])
    k[:, :, :n] = attn.project(x, "K").transpose(1, 2)
    v[:, :, :n] = attn.project(x, "V").transpose(1, 2)
    last = x[:, -1:]
    out = []
    for step in range(steps):
        m = n + step
        q = attn.project(last, "Q").transpose(1, 2)  # [b, h, 1, e]
        scores = q @ k[:, :, :m].transpose(-1, -2) * (attn.T / math.sqrt(m))
        z = scores.softmax(dim=-1) @ v[:, :, :m]  # [b, h, 1, o]
        out.append(mlp(z.sum(dim=1))[:, -1].argmax(dim=-1))
        if step < steps - 1:
            last = model.embed(out[-1][:, None], start=m)
            k[:, :, m] = attn.project(last, "K")[:, 0]
            v[:, :, m] = attn.project(last, "V")[:, 0]
    return torch.stack(out, dim=1)


def realised_map(model: ConstructedModel, prefix: Float[Tensor, "... P d_model"]) -> Tensor:
    """What the model does after ``prefix`` ([P, d], or [b, P, d] for b prompts, giving a
    leading b dimension): the generated string [response_length] of an unconditional model,
    the response to every input token [V, response_length] of a one-token-input model, or to
    every pair [V, V, response_length] of a two-token-input model."""
    V, t = model.d_vocab, model.input_length
    prefix = torch.as_tensor(prefix, dtype=model.W_E.dtype)
    batched = prefix.ndim == 3
    prefixes = prefix if batched else prefix[None]
    if t == 0:
        out = generate(model, prefixes)
        return out if batched else out[0]
    inputs = torch.cartesian_prod(*[torch.arange(V)] * t).reshape(V**t, t)
    b = prefixes.shape[0]
    out = generate(model, prefixes.repeat_interleave(V**t, dim=0), inputs.repeat(b, 1))
    maps = out.reshape(b, *[V] * t, -1)
    return maps if batched else maps[0]
