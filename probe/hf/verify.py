"""The recording run checked against the model itself: its own forward and ``generate``."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn

from probe.config import eval_mode
from probe.hf.run import _forward, _prepared, _run, _Setup


@torch.no_grad()
def verify_hf(
    base_model: nn.Module,
    tokens: Int[Tensor, "batch pos"],
    prefix: Any = None,
    tuned_model: nn.Module | None = None,
    *,
    position_offset: int | None = None,
    rows: int = 2,
    steps: int = 3,
) -> float:
    """Check the recording run against the real thing; -> the max content-logit difference.

    Arguments as for :func:`~probe.hf.hf_records` (which runs this check by default). On the
    first ``rows`` inputs the recording run's content logits [rows, T, vocab] must equal the
    tuned model's own forward (its configured attention, e.g. sdpa; a PEFT model's own positions
    and cache) to ``100 eps (1 + max|logit|)``; for a PEFT or plain run (no raw prefix, content
    at position 0 or after PEFT's prefix), ``steps`` greedy steps from the first input must match
    ``generate`` token for token. Raises RuntimeError otherwise.
    """
    s, offset = _prepared(base_model, prefix, tuned_model, tokens, position_offset)
    return _verify(s, tokens, offset, rows, steps)


def _verify(s: _Setup, tokens: Tensor, offset: int, rows: int = 2, steps: int = 3) -> float:
    """:func:`verify_hf` of a prepared run setup (:func:`~probe.hf.run._prepared`)."""
    sub = slice(0, min(rows, tokens.shape[0]))
    ours = _run(s, tokens, offset, sub, None, keep=0)
    with eval_mode(s.runner):
        ref = _forward(s, tokens, offset, sub, 0)
    err = (ours - ref).abs().max().item()
    tol = 100 * torch.finfo(ref.dtype).eps * (1.0 + ref.abs().max().item())
    if not err <= tol:
        raise RuntimeError(
            f"the recording run does not reproduce {type(s.tuned).__name__}'s own forward (max "
            f"content-logit difference {err:.3g} > {tol:.3g}); something in this config is not "
            "supported"
        )
    if s.kind == "kv" or (s.kind == "none" and offset != 0) or steps <= 0:
        return err  # generate cannot take a raw prefix or shifted positions
    seq = tokens[:1]
    for _ in range(steps):
        nxt = _run(s, seq, offset, slice(None), None, keep=1)[:, -1].argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gen = s.runner.generate(  # the mask given: inferred from pad_token_id, it would hide
            input_ids=tokens[:1],  # every content token that happens to be 0
            attention_mask=torch.ones_like(tokens[:1]),
            max_new_tokens=steps,
            do_sample=False,
            pad_token_id=0,
        )
    new_gen, new_ours = gen[0, tokens.shape[1] :], seq[0, tokens.shape[1] :]
    if not torch.equal(new_gen, new_ours[: len(new_gen)]):
        raise RuntimeError(
            f"greedy steps through the recording run ({new_ours.tolist()}) differ from "
            f"{type(s.runner).__name__}.generate ({new_gen.tolist()}): the positions or the "
            "prefix are not the model's own"
        )
    return err
