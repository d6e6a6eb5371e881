r"""What ONE soft token can do: hand-built transformers whose output is set by a virtual token.

The constructions of Section 3 of "When Do Prompting and Prefix-Tuning Work? A Theory of
Capabilities and Limitations" (Petrov, Torr & Bibi, ICLR 2024). Each is a small transformer with
every weight set by hand, the same for every target, plus a virtual token (a free d_model vector
placed before the input, as soft prompting places it) computed from the target:

    Unconditional(V, N, T)      one virtual token -> any string of N tokens
    Conditional(V, N0=1, T)     one virtual token -> any map [V] -> [V] (user token -> token)
    Conditional(V, N0, T)       N0 virtual tokens -> any map [V] -> [V]^N0 (token -> response)
    TwoToken(V, T)              one virtual token (after a fixed null token) -> any map [V]^2 -> [V]

**The model** they run on is :class:`probe.constructed_model.ConstructedModel` (no residual,
no LayerNorm, attention over all positions; its docstring says why and lists the hooks); its
names are re-exported here.

**The decoder** (a 3-layer MLP on the attention output h, width w): z1 = ReLU(h - 1),
z = ReLU(sum z1), logit_k = (2k/V - 1) z + 1/4 - (k/V)^2. Since

    logit_k = (z - 1/2)^2 - (z - k/V)^2,

its argmax is the k whose k/V is nearest to z: the decoder rounds z to the grid {0, 1/V, ...,
(V-1)/V}, exactly when |z - k/V| < 1/(2V). Every token is stored as the value k/V in [0, 1), so
ReLU(h - 1) passes only the one coordinate that a weight-1 one-hot lifted above 1.

**Unconditional generation** (d_model = 2N, 1 layer, 2 heads). The virtual token is
[Y_1/V, ..., Y_N/V | onehot(0)] (the target right-padded with token 0); generated tokens embed to
content 0 (W_E = 0), so they carry only their position. Head "pos" (W_Q = W_K = W_V = position
part) makes position i attend to itself and write onehot(i); head "first" (query 1 everywhere,
key: the position-0 flag) makes every position read the virtual token's content v. At position
i both heads put weight a = e^b / (e^b + n - 1), b = T / sqrt(n), on their target and
(1 - a)/(n - 1) on each other position, so h_i = a (1 + v_i) in slot i, every other slot < 1, and

    z = ReLU(a (1 + v_i) - 1) = v_i - (1 - a)(1 + v_i)   (or 0),   v_i - (1-a)(1+v_i) <= z <= v_i.

The error is ONE-SIDED and at most (1 - a)(2V - 1)/V (v_i <= (V-1)/V). It stays below the
decoder's 1/(2V) iff 1 - a < 1/(4V - 2), i.e. e^b > (n - 1)(4V - 3), i.e.

    T > T*(V, n) = sqrt(n) ln((n - 1)(4V - 3))          (:func:`sufficient_temperature`)

T* grows with n, so the last generated token (n = N) binds: every target is generated exactly
when T > T*(V, N) (39.65 for V = 94, N = 20). The bound is tight: a target ending in token V - 1
fails at every T < T*, since its error then exceeds 1/(2V).

**One token -> one token** (``Conditional(N0=1)``, d_model = V + 2, W_E = I). The virtual token
[m(0)/V, ..., m(V-1)/V | onehot(0)] stores the map; the user token c is [onehot(c) | onehot(1)].
At position 1 head "response" puts a on position 0 and 1 - a on position 1, head "user" the
reverse, so the two leaks cancel:

    h = (a + 1 - a) r + (1 - a + a) onehot(c) = r + onehot(c)     for EVERY T,

ReLU(h - 1) keeps r_c = m(c)/V and the decoder returns m(c): exact for every map at every T.
A hard token t in the virtual token's place embeds to [onehot(t) | onehot(0)]: h = onehot(t) +
onehot(c), so the map is c = t -> V - 1, else 0. Hard tokens reach V maps; the virtual token any
of V^V (:func:`hard_token_behaviours` enumerates them).

**Longer responses** (``Conditional(N0)``, d_model = V + 2 N0). Virtual token p (position p <
N0) stores the p-th response token of every input, [m(0)_p/V, ... | onehot(p)]; the user token
sits at position N0 and the response follows. Head "response" sends position N0 + p to
position p, head "user" every position to position N0. Now the leaks do not cancel: with S the
sum of the leaked contents at coordinate u (each in [0, 1], at most 2(n - 1) of them), the error
is (1 - a)(S/(n - 1) - 1 - m(u)_p/V), TWO-sided but still at most (1 - a)(2V - 1)/V in size, and
the other coordinates stay below 1 when 1 - a < 1/(V + 1). So the same T*(V, 2 N0) is
sufficient (39.65 for V = 94, N0 = 10); for N0 = 1 the error is exactly 0, the case above.

**Two-token inputs** (``TwoToken``, 2 layers). A complete neural model, but a fragile one.
Coordinate i of the virtual token packs row i of the map as a base-V fraction x_i =
sum_j m(i, j) V^-(j+1); a null token (content 0, the same for every map) comes first, so the
prompt is [null, virtual] and only the virtual token depends on the map. Layer 1 (3 heads)
brings onehot(u1) + x to position 2 and 2 onehot(u2) to position 3; its MLP takes ReLU(h - 1)
(leaving x_{u1} alone at position 2) and then UNPACKS x_{u1} into its V digits with 3 ReLU
layers per digit: y = V r, d = floor(y) = sum_k step(y - k), r' = y - d. At digit i the true y
is an integer plus at most 1 - g, g = V^-(V-1-i), so each step ramps from 0 at k - 3g/4 to 1 at
k - g/4: min(1, max(0, (2/g)(y - k + 3g/4))) = 1 - ReLU(1 - ReLU(...)), exactly 0 or 1 with a
margin of g/4 on either side (never a rounded difference of two large numbers). Layer 2 (2
heads) brings the digits and onehot(u2) to position 3 and the decoder returns m(u1, u2). The
MLP is 3V + 3 layers deep, its steepest step has slope 2 V^(V-1), and unpacking needs the packed
value to within V^-V/4: this works in float64 for V <= :data:`TWO_TOKEN_MAX_V` only (the paper's
demonstration uses V = 10), and needs large T (default 1000) so that the attention leaks stay
below that precision. Longer inputs need more layers and exponentially finer encodings.

**Counting** (:func:`hard_prompt_behaviours`, :func:`virtual_token_behaviours`): a fixed model
is a deterministic function of its prompt, so N_S hard tokens select at most V^N_S behaviours;
one virtual token selects V^N strings (unconditional) or V^V maps: matching it with hard tokens
needs N_S = N (or V) of them.

Shapes: b batch, n positions, h heads, e d_head, o a head's output width, d d_model.
"""

from __future__ import annotations

import math
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real

import torch
from jaxtyping import Float, Int
from torch import Tensor

from probe.constructed_model import (
    MLP,
    Affine,
    Attention,
    Block,
    ConstructedModel,
    generate,
    realised_map,
)

__all__ = [
    "LETTERS",
    "PRINTABLE",
    "TWO_TOKEN_MAX_V",
    "Affine",
    "Attention",
    "Block",
    "Conditional",
    "ConstructedModel",
    "MLP",
    "TwoToken",
    "Unconditional",
    "decode",
    "encode",
    "generate",
    "hard_prompt_behaviours",
    "hard_token_behaviours",
    "realised_map",
    "response_map",
    "sufficient_temperature",
    "token_map",
    "two_token_map",
    "unconditional",
    "virtual_token_behaviours",
]

DTYPE = torch.float64

# The 94 characters from space to "}" as tokens 0..93 (c -> ord(c) - 32; "~" is left out, so
# that V = 94 as in the paper's demonstrations). Token 0, the space, is also the padding.
PRINTABLE = "".join(chr(32 + i) for i in range(94))
# The two-token construction's demonstration alphabet (V = 10).
LETTERS = string.ascii_uppercase
# Largest V for which TwoToken's unpacking is exact in float64. It needs the packed value to
# within V^-V / 4, and ReLU(1 + x - 1) rounds x to the float64 grid of [1, 2), an error of up to
# 2^-53: so V^V < 2^51, V <= 13. The tests check every V up to it, and that V + 1 fails.
TWO_TOKEN_MAX_V = max(V for V in range(2, 20) if V**V < 2**51)


# ---------------------------------------------------------------------------- text <-> tokens


def encode(text: str, alphabet: str = PRINTABLE) -> list[int]:
    """Token ids of ``text``, one per character: its index in ``alphabet`` (printable ASCII:
    ord(c) - 32)."""
    if not isinstance(text, str):
        raise ValueError(f"encode takes a str, got {type(text).__name__}")
    bad = sorted({c for c in text if c not in alphabet})
    if bad:
        raise ValueError(
            f"characters {bad} are not in the alphabet ({len(alphabet)} characters from "
            f"{alphabet[0]!r} to {alphabet[-1]!r}); use only those"
        )
    return [alphabet.index(c) for c in text]


def decode(ids: Sequence[int] | Tensor, alphabet: str = PRINTABLE) -> str:
    """The text of token ids (the inverse of :func:`encode`)."""
    ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
    bad = [i for i in ids if not 0 <= i < len(alphabet)]
    if bad:
        raise ValueError(f"token ids {bad} are outside the alphabet [0, {len(alphabet)})")
    return "".join(alphabet[i] for i in ids)


# ---------------------------------------------------------------------------- building blocks


def _check_vocab(owner: str, V) -> None:
    if isinstance(V, bool) or not isinstance(V, int) or V < 2:
        raise ValueError(f"{owner}.V (vocabulary size) must be an int >= 2, got {V!r}")


def _check_T(owner: str, T) -> None:
    if isinstance(T, bool) or not isinstance(T, Real) or not math.isfinite(T) or T <= 0:
        raise ValueError(
            f"{owner}.T (softmax inverse temperature) must be a finite number > 0, got {T!r}"
        )


def _ids(owner: str, value_name: str, value, V: int, alphabet: str) -> list[int]:
    """Token ids from a str (encoded over ``alphabet``) or a sequence of ints in [0, V)."""
    if isinstance(value, str):
        if V > len(alphabet):
            raise ValueError(f"{owner}: text needs V <= {len(alphabet)}; give token ids instead")
        ids = encode(value, alphabet[:V])
    else:
        ids = torch.as_tensor(value).tolist() if isinstance(value, Tensor) else list(value)
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < V for i in ids):
        raise ValueError(f"{owner}: {value_name} must be token ids in [0, V={V}); got {ids}")
    return ids


def _id_tensor(owner: str, ids: Tensor, V: int) -> Int[Tensor, "..."]:
    """An integer tensor of token ids in [0, V), as int64."""
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dtype.is_complex:
        raise ValueError(f"{owner}: the map must hold integer token ids, got dtype {ids.dtype}")
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < V:
        raise ValueError(
            f"{owner}: the map's token ids must be in [0, V={V}); got range "
            f"[{int(ids.min())}, {int(ids.max())}]"
        )
    return ids.long()


def _decoder(width: int, V: int) -> list[Affine]:
    """ReLU(h - 1), ReLU(sum), then logit_k = (2k/V - 1) z + 1/4 - (k/V)^2: argmax = the k
    with k/V nearest to z (module docstring)."""
    k = torch.arange(V, dtype=DTYPE) / V
    return [
        Affine(torch.eye(width, dtype=DTYPE), -torch.ones(width, dtype=DTYPE)),
        Affine(torch.ones(width, 1, dtype=DTYPE), torch.zeros(1, dtype=DTYPE)),
        Affine((2 * k - 1)[None], 0.25 - k**2, relu=False),
    ]


def _zeros(*shape: int) -> Tensor:
    return torch.zeros(*shape, dtype=DTYPE)


def sufficient_temperature(V: int, n: int) -> float:
    """T*(V, n) = sqrt(n) ln((n - 1)(4V - 3)): above it the one-layer constructions decode every
    token exactly on sequences of at most n positions; 0 for n = 1, where nothing leaks. For
    :class:`Unconditional` it is also necessary (a target ending in token V - 1 fails below
    it). Derived in the module docstring."""
    _check_vocab("sufficient_temperature", V)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"sufficient_temperature: n must be an int >= 1, got {n!r}")
    return 0.0 if n == 1 else math.sqrt(n) * math.log((n - 1) * (4 * V - 3))


# ---------------------------------------------------------------------------- the constructions


@dataclass(frozen=True)
class Unconditional:
    """One virtual token makes a 1-layer, 2-head model generate any string of N tokens.

    V: vocabulary size; N: string length (and context); T: softmax inverse temperature (every
    string is exact iff T > :attr:`sufficient_T`; the paper's demonstration uses T = 50).
    """

    V: int = 94
    N: int = 20
    T: float = 50.0

    def __post_init__(self):
        _check_vocab("Unconditional", self.V)
        if isinstance(self.N, bool) or not isinstance(self.N, int) or self.N < 1:
            raise ValueError(f"Unconditional.N (string length) must be an int >= 1, got {self.N!r}")
        _check_T("Unconditional", self.T)

    @property
    def sufficient_T(self) -> float:
        return sufficient_temperature(self.V, self.N)

    def model(self) -> ConstructedModel:
        N = self.N
        d = 2 * N  # [content (N) | position (N)]
        content, position = slice(0, N), slice(N, d)
        W_Q, W_K, W_V = _zeros(2, d, N), _zeros(2, d, N), _zeros(2, d, N)
        # Head 0, "pos": every position attends to itself and writes its own one-hot position.
        for W in (W_Q, W_K, W_V):
            W[0, position] = torch.eye(N, dtype=DTYPE)
        # Head 1, "first": query 1 at every position, key 1 at position 0 only: read the
        # virtual token's content.
        W_Q[1, position, 0] = 1.0
        W_K[1, N + 0, 0] = 1.0
        W_V[1, content] = torch.eye(N, dtype=DTYPE)
        attn = Attention(W_Q, W_K, W_V, self.T, ("pos", "first"))
        block = Block(attn, MLP(_decoder(N, self.V)))
        # Generated tokens carry their position only (content 0), so the bound is exact.
        return ConstructedModel(self, _zeros(self.V, N), N, [block], 1, 0, N)

    def virtual_token(self, target: str | Sequence[int]) -> Float[Tensor, "1 d_model"]:
        """[Y_1/V, ..., Y_N/V | onehot(0)], the target right-padded with token 0 (a space);
        ``target`` is token ids or printable-ASCII text (V = 94)."""
        ids = _ids("Unconditional", "the target", target, self.V, PRINTABLE)
        if len(ids) > self.N:
            raise ValueError(
                f"Unconditional: the target has {len(ids)} tokens, more than N={self.N}; "
                "shorten it or build with a larger N"
            )
        x = _zeros(1, 2 * self.N)
        x[0, : len(ids)] = torch.tensor(ids, dtype=DTYPE) / self.V
        x[0, self.N] = 1.0
        return x


@dataclass(frozen=True)
class Conditional:
    """N0 virtual tokens make a 1-layer, 2-head model answer every user token c with the N0
    tokens m(c): N0 = 1 is the one-token map (exact for every map at every T), larger N0 the
    longer responses (exact for every map when T > :attr:`sufficient_T`).

    V: vocabulary size; N0: response length; T: softmax inverse temperature (the paper's
    demonstrations use T = 100).
    """

    V: int = 94
    N0: int = 1
    T: float = 100.0

    def __post_init__(self):
        _check_vocab("Conditional", self.V)
        if isinstance(self.N0, bool) or not isinstance(self.N0, int) or self.N0 < 1:
            raise ValueError(
                f"Conditional.N0 (response length) must be an int >= 1, got {self.N0!r}"
            )
        _check_T("Conditional", self.T)

    @property
    def n_ctx(self) -> int:
        return 2 * self.N0  # N0 virtual tokens, the user token, N0 - 1 generated ones

    @property
    def sufficient_T(self) -> float:
        """0 for N0 = 1 (exact at every T), else T*(V, 2 N0)."""
        return 0.0 if self.N0 == 1 else sufficient_temperature(self.V, self.n_ctx)

    def model(self) -> ConstructedModel:
        V, N0 = self.V, self.N0
        d = V + self.n_ctx  # [content (V) | position (2 N0)]
        W_Q, W_K, W_V = _zeros(2, d, N0), _zeros(2, d, N0), _zeros(2, d, V)
        # Head 0, "response": position N0 + p attends to virtual token p (positions < N0 ask
        # for nothing), reading its content.
        for p in range(N0):
            W_Q[0, V + N0 + p, p] = 1.0
            W_K[0, V + p, p] = 1.0
        # Head 1, "user": every position attends to the user token at position N0.
        W_Q[1, V:, 0] = 1.0
        W_K[1, V + N0, 0] = 1.0
        W_V[:, :V] = torch.eye(V, dtype=DTYPE)
        attn = Attention(W_Q, W_K, W_V, self.T, ("response", "user"))
        block = Block(attn, MLP(_decoder(V, V)))
        return ConstructedModel(self, torch.eye(V, dtype=DTYPE), self.n_ctx, [block], N0, 1, N0)

    def responses(
        self, mapping: Mapping[str, str] | Sequence[int] | Sequence[Sequence[int]] | Tensor
    ) -> Int[Tensor, "V N0"]:
        """The map as a [V, N0] table of token ids, right-padded with token 0. ``mapping``: a
        dict of printable-ASCII text (inputs missing from it answer spaces), or one entry per
        input token: a token id (N0 = 1) or a sequence of at most N0 ids."""
        V, N0, name = self.V, self.N0, "Conditional"
        table = torch.zeros(V, N0, dtype=torch.long)
        if isinstance(mapping, Mapping):
            for key, value in mapping.items():
                if not isinstance(key, str) or len(key) != 1:
                    raise ValueError(f"{name}: map keys must be single characters, got {key!r}")
                (c,) = _ids(name, "map keys", key, V, PRINTABLE)
                ids = _ids(name, f"the response to {key!r}", value, V, PRINTABLE)
                if len(ids) > N0:
                    raise ValueError(
                        f"{name}: the response {value!r} has {len(ids)} tokens, more than "
                        f"N0={N0}; shorten it or build with a larger N0"
                    )
                table[c, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            return table
        if isinstance(mapping, Tensor):  # checked as a whole: building many maps stays cheap
            given = _id_tensor(name, mapping, V)
            given = given[:, None] if given.ndim == 1 else given
            if given.ndim != 2 or given.shape[0] != V or given.shape[1] > N0:
                raise ValueError(
                    f"{name}: the map has shape {tuple(mapping.shape)}; expected [V={V}] or "
                    f"[V={V}, at most N0={N0}] token ids"
                )
            table[:, : given.shape[1]] = given
            return table
        rows = list(mapping)
        if len(rows) != V:
            raise ValueError(
                f"{name}: the map has {len(rows)} entries; expected one per input token (V={V})"
            )
        for c, row in enumerate(rows):
            row = [row] if isinstance(row, int) else row
            ids = _ids(name, f"the response to token {c}", row, V, PRINTABLE)
            if len(ids) > N0:
                raise ValueError(
                    f"{name}: the response to token {c} has {len(ids)} tokens, more than N0={N0}"
                )
            table[c, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return table

    def virtual_tokens(self, mapping) -> Float[Tensor, "N0 d_model"]:
        """Virtual token p = [m(0)_p/V, ..., m(V-1)_p/V | onehot(p)] (see :meth:`responses`
        for the forms ``mapping`` takes)."""
        table = self.responses(mapping)
        x = _zeros(self.N0, self.V + self.n_ctx)
        x[:, : self.V] = table.T.to(DTYPE) / self.V
        x[:, self.V : self.V + self.N0] = torch.eye(self.N0, dtype=DTYPE)
        return x


@dataclass(frozen=True)
class TwoToken:
    """One virtual token (after a fixed null token) makes a 2-layer model answer every pair of
    user tokens (u1, u2) with m(u1, u2). Exact in float64 for 2 <= V <= TWO_TOKEN_MAX_V at large
    T; see the module docstring for why it is fragile. The paper's demonstration: V = 10 (the
    letters A-J), T = 1000.
    """

    V: int = 10
    T: float = 1000.0

    def __post_init__(self):
        _check_vocab("TwoToken", self.V)
        if self.V > TWO_TOKEN_MAX_V:
            raise ValueError(
                f"TwoToken.V={self.V}: the base-V packing is exact in float64 only for V <= "
                f"{TWO_TOKEN_MAX_V}; use a smaller vocabulary"
            )
        _check_T("TwoToken", self.T)

    def model(self) -> ConstructedModel:
        V = self.V
        d = V + 4  # [content (V) | position (4)]: null, virtual, user 1, user 2
        pos = [V + i for i in range(4)]
        eye = torch.eye(V, dtype=DTYPE)
        # Layer 1: 2-d queries and keys. Query (1, 0) means "attend to the null token", (0, 1)
        # "attend to my target": position 2 reads user token 1 and the virtual token into the
        # first half, position 3 reads 2 onehot(u2) into the second half.
        W_Q, W_K, W_V = _zeros(3, d, 2), _zeros(3, d, 2), _zeros(3, d, 2 * V)
        for head, (asker, target, half, scale) in enumerate(
            [(2, 2, 0, 1.0), (3, 3, 1, 2.0), (2, 1, 0, 1.0)]
        ):
            for i in range(4):
                W_Q[head, pos[i], 1 if i == asker else 0] = 1.0
            W_K[head, pos[0], 0] = 1.0
            W_K[head, pos[target], 1] = 1.0
            W_V[head, :V, half * V : (half + 1) * V] = scale * eye
        attn1 = Attention(W_Q, W_K, W_V, self.T, ("user 1", "user 2", "virtual"))
        mlp1 = MLP(self._unpacker())
        # Layer 2 on [digits (V) | onehot(u2) (V)]: head "row" lets position 3 (the only one
        # with a second half) read the digits from position 2 (the only one with digits); head
        # "user 2" lets it read its own onehot(u2).
        W_Q, W_K, W_V = _zeros(2, 2 * V, 1), _zeros(2, 2 * V, 1), _zeros(2, 2 * V, V)
        W_Q[:, V:, 0] = 1.0
        W_K[0, :V, 0] = 1.0
        W_K[1, V:, 0] = 1.0
        W_V[0, :V] = eye
        W_V[1, V:] = eye
        attn2 = Attention(W_Q, W_K, W_V, self.T, ("row", "user 2"))
        blocks = [Block(attn1, mlp1), Block(attn2, MLP(_decoder(V, V)))]
        return ConstructedModel(self, eye.clone(), 4, blocks, 2, 2, 1)

    def _unpacker(self) -> list[Affine]:
        """ReLU(h - 1) on [u1 + packed row | 2 onehot(u2)], then the base-V digits of the one
        packed value left in the first half, as [digit_j / V (V) | onehot(u2) (V)].

        The state between digits is [r, digit_0/V, ..., digit_{V-1}/V, s (V)], all >= 0 so
        that ReLU keeps it; digit i takes three layers (module docstring)."""
        V = self.V
        w = 1 + 2 * V  # state width: r, V digit slots, V for s
        r, digits, s = 0, slice(1, 1 + V), slice(1 + V, w)
        eye_w = torch.eye(w, dtype=DTYPE)
        layers = [Affine(torch.eye(2 * V, dtype=DTYPE), -torch.ones(2 * V, dtype=DTYPE))]
        W = _zeros(2 * V, w)
        W[:V, r] = 1.0  # r_0: the only non-zero coordinate of the first half
        W[V:, s] = torch.eye(V, dtype=DTYPE)
        layers.append(Affine(W, _zeros(w)))
        ks = torch.arange(1, V, dtype=DTYPE)
        for i in range(V):
            gap = float(V) ** -(V - 1 - i)  # the true y = V r stays >= gap below the next int
            slope = 2.0 / gap
            # a_k = slope (V r - k + 3 gap / 4), kept >= 0 by the ReLU: <= -1/2 when the true
            # y <= k - gap, >= 3/2 when y >= k, so a margin of gap / 4 on either side.
            W, b = torch.cat([eye_w, _zeros(w, V - 1)], 1), _zeros(w + V - 1)
            W[r, w:] = slope * V
            b[w:] = slope * (0.75 * gap - ks)
            layers.append(Affine(W, b))
            # 1 - min(1, a_k) = ReLU(1 - ReLU(a_k)): exactly 0 or 1 away from the ramp.
            W, b = torch.block_diag(eye_w, -torch.eye(V - 1, dtype=DTYPE)), _zeros(w + V - 1)
            b[w:] = 1.0
            layers.append(Affine(W, b))
            # digit d = sum_k (1 - that) = (V - 1) - sum; r' = V r - d.
            W, b = torch.cat([eye_w, _zeros(V - 1, w)], 0), _zeros(w)
            W[r, r] = V
            W[w:, r] = 1.0
            b[r] = -(V - 1)
            W[w:, 1 + i] = -1.0 / V
            b[1 + i] = (V - 1) / V
            layers.append(Affine(W, b))
        W = _zeros(w, 2 * V)
        W[digits, :V] = torch.eye(V, dtype=DTYPE)
        W[s, V:] = torch.eye(V, dtype=DTYPE)
        layers.append(Affine(W, _zeros(2 * V)))
        return layers

    def table(self, mapping: Mapping[str, str] | Sequence[Sequence[int]] | Tensor) -> Tensor:
        """The map as a [V, V] table of token ids: ``mapping`` is a [V, V] table of ids or a
        dict {"AB": "C"} over the first V capital letters (missing pairs answer token 0)."""
        V, name = self.V, "TwoToken"
        table = torch.zeros(V, V, dtype=torch.long)
        if isinstance(mapping, Mapping):
            for key, value in mapping.items():
                pair = _ids(name, "map keys", key, V, LETTERS)
                out = _ids(name, f"the answer to {key!r}", value, V, LETTERS)
                if len(pair) != 2 or len(out) != 1:
                    raise ValueError(
                        f"{name}: map entries must be two letters -> one letter, got "
                        f"{key!r} -> {value!r}"
                    )
                table[pair[0], pair[1]] = out[0]
            return table
        if isinstance(mapping, Tensor):
            if mapping.shape != (V, V):
                raise ValueError(
                    f"{name}: the map must be a [V, V] = [{V}, {V}] table of token ids"
                )
            return _id_tensor(name, mapping, V).clone()
        rows = [list(r) for r in mapping]
        if len(rows) != V or any(len(row) != V for row in rows):
            raise ValueError(f"{name}: the map must be a [V, V] = [{V}, {V}] table of token ids")
        for i, row in enumerate(rows):
            table[i] = torch.tensor(_ids(name, f"row {i} of the map", row, V, LETTERS))
        return table

    def virtual_tokens(self, mapping) -> Float[Tensor, "2 d_model"]:
        """[null token, virtual token]: the null token [0 | onehot(0)] is the same for every
        map; the virtual token [x_0, ..., x_{V-1} | onehot(1)] packs row i of the map as
        x_i = sum_j m(i, j) V^-(j+1), rounded once from the exact fraction."""
        V = self.V
        x = _zeros(2, V + 4)
        x[0, V], x[1, V + 1] = 1.0, 1.0
        for i, row in enumerate(self.table(mapping).tolist()):
            x[1, i] = sum(m * V ** (V - 1 - j) for j, m in enumerate(row)) / V**V
        return x


# ---------------------------------------------------------------------------- one-call forms


def unconditional(
    target: str | Sequence[int], V: int = 94, N: int = 20, T: float = 50.0
) -> tuple[ConstructedModel, Tensor]:
    """(model, virtual token [1, d]) generating ``target`` (padded to N with token 0)."""
    c = Unconditional(V, N, T)
    return c.model(), c.virtual_token(target)


def token_map(mapping, V: int = 94, T: float = 100.0) -> tuple[ConstructedModel, Tensor]:
    """(model, virtual token [1, d]) answering user token c with m(c): exact at every T."""
    c = Conditional(V, 1, T)
    return c.model(), c.virtual_tokens(mapping)


def response_map(
    mapping, V: int = 94, N0: int = 10, T: float = 100.0
) -> tuple[ConstructedModel, Tensor]:
    """(model, N0 virtual tokens [N0, d]) answering user token c with the N0 tokens m(c)."""
    c = Conditional(V, N0, T)
    return c.model(), c.virtual_tokens(mapping)


def two_token_map(mapping, V: int = 10, T: float = 1000.0) -> tuple[ConstructedModel, Tensor]:
    """(model, [null, virtual] tokens [2, d]) answering user tokens (u1, u2) with m(u1, u2)."""
    c = TwoToken(V, T)
    return c.model(), c.virtual_tokens(mapping)


# ---------------------------------------------------------------------------- counting


def hard_prompt_behaviours(V: int, n_tokens: int) -> int:
    """At most V^n_tokens: a fixed model is a deterministic function of its prompt, and n_tokens
    hard tokens form V^n_tokens prompts, so they select at most that many behaviours (strings,
    maps, anything the model does afterwards)."""
    return V**n_tokens


def virtual_token_behaviours(V: int, N: int | None = None) -> int:
    """What one virtual token selects on a fixed model: V^N strings of length N
    (:class:`Unconditional`, every one of them), or with N=None the V^V maps [V] -> [V]
    (:class:`Conditional` with N0 = 1). Hard tokens need N (or V) positions for as many."""
    return V**V if N is None else V**N


def hard_token_behaviours(model: ConstructedModel) -> Int[Tensor, "V ..."]:
    """What the model does with each of the V hard tokens in its one virtual token's place
    (token t embedded as the model embeds tokens, at position 0): row t is
    :func:`realised_map` of that prompt. Its distinct rows are the behaviours hard tokens
    reach, at most V (:func:`hard_prompt_behaviours`); the virtual token reaches V^N strings
    or V^V maps. For :class:`Conditional` (N0 = 1) row t is the map c = t -> V - 1, else 0."""
    if model.n_virtual != 1:
        raise ValueError(
            f"this model takes {model.n_virtual} virtual tokens; hard-token enumeration covers "
            "models with one (Unconditional, Conditional with N0=1)"
        )
    V = model.d_vocab
    return realised_map(model, model.embed(torch.arange(V)[:, None], start=0))
