"""One layer's probe results merged exactly over the chunks of a batch (:func:`check_hf`)."""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import Tensor

from probe import probes
from probe.hf.resources import _small_linalg
from probe.probes import AttentionRecord, BiasSubspace, Decomposition, Drift


class _LayerResult(NamedTuple):
    """One layer's probe results merged over every chunk (:meth:`_LayerAcc.result`)."""

    decomposition: Decomposition  # alpha [1, H, N], beta [1, H, N, P]; A, z_base, bias None
    local: Drift
    downstream: Drift | None  # None without base records
    subspace: BiasSubspace


class _LayerAcc:
    """One layer's probe results accumulated over chunks of the batch.

    The bias subspace needs the singular values of matrices stacked over every row N =
    batch x T. All four of them (z W_O, z_base W_O_f, U, D; see probes.BiasSubspace) are G @ C
    for G = [z | z_base | (1 - alpha) z_base] [N, 3e] per head and a fixed C [3e, d]; with
    G = Q R (R [3e, 3e], updated chunk by chunk by a QR of [R; G_chunk]) their singular values
    are those of R @ C. Exact, [3e, 3e] of memory per head, one small SVD per matrix."""

    def __init__(self):
        self.n = 0
        self.R: Tensor | None = None
        self.alpha, self.beta, self.local, self.down = [], [], [], []
        self.p_err = self.z_err = self.a_err = None
        self.p_tol = self.z_tol = 0.0
        self.P = 0
        self.W = None

    def add(self, rec: AttentionRecord, base_rec: AttentionRecord | None, factor: float):
        d = probes.decompose(_without_bias_out(rec))
        pt, zt = probes.tolerances(rec, factor)
        self.p_tol, self.z_tol, self.P = max(self.p_tol, pt), max(self.z_tol, zt), rec.P
        mx = torch.maximum
        self.p_err = d.pattern_error if self.p_err is None else mx(self.p_err, d.pattern_error)
        self.z_err = d.z_error if self.z_err is None else mx(self.z_err, d.z_error)
        self.a_err = d.alpha_error if self.a_err is None else mx(self.a_err, d.alpha_error)
        self.alpha.append(d.alpha.transpose(0, 1).flatten(1))  # [H, b T]
        self.beta.append(d.beta.transpose(0, 1).flatten(1, 2))  # [H, b T, P]
        N = rec.q.shape[0] * rec.q.shape[1]
        self.local.append((probes.local_drift(rec), N))
        if base_rec is not None:
            self.down.append((probes.downstream_drift(rec, base_rec), N))
        keep = (1 - d.alpha).permute(1, 0, 2)[..., None]  # [H, b, T, 1]
        z, zb = (t.permute(2, 0, 1, 3) for t in (rec.z, d.z_base))  # [H, b, T, e]
        G = torch.cat([z, zb, keep * zb], -1).flatten(1, 2)  # [H, N, 3e]
        self.dtype = G.dtype
        G = G.float() if G.dtype in (torch.float16, torch.bfloat16) else G  # no half QR on CPU
        if self.R is not None:  # [R; G], laid out column-major as LAPACK takes it (no copy)
            G = torch.cat([self.R.mT, G.mT], -1).mT
        with _small_linalg():
            self.R = torch.linalg.qr(G, mode="r")[1]
        self.n += z.shape[1] * z.shape[2]
        self.W = (rec.W_O, rec.base_W_O)

    def result(self, layer: int) -> _LayerResult:
        alpha = torch.cat(self.alpha, 1)[None]  # [1, H, N]
        beta = torch.cat(self.beta, 1)[None]  # [1, H, N, P]
        dec = Decomposition(
            layer=layer,
            P=self.P,
            alpha=alpha,
            beta=beta,
            A=None,
            z_base=None,
            bias=None,
            bias_out=None,
            pattern_error=self.p_err,
            z_error=self.z_err,
            alpha_error=self.a_err,
        )
        W, Wf = (w.to(self.R.dtype) for w in self.W)
        e = W.shape[1]
        # [W_O; W_Of]^T = Q_w R_w (Q_w [d, 2e] orthonormal): any A W_O + B W_Of equals
        # (A R_w[:, :e]^T + B R_w[:, e:]^T) Q_w^T, whose singular values are those of the
        # small [3e, 2e] factor, so no SVD ever touches d_model.
        Rw = torch.linalg.qr(torch.cat([W, Wf], 1).transpose(1, 2), mode="r")[1]  # [H, 2e, 2e]
        Wr, Wfr = Rw[..., :e].transpose(1, 2), Rw[..., e:].transpose(1, 2)  # [H, e, 2e]
        R = self.R
        z_part, zb_part, kb_part = R[..., :e] @ Wr, R[..., e : 2 * e] @ Wfr, R[..., 2 * e :] @ Wfr
        svd = torch.linalg.svdvals
        out_sv, base_sv = svd(z_part), svd(zb_part)
        sv, change_sv = svd(z_part - kb_part), svd(z_part - zb_part)
        scale = torch.maximum(out_sv[:, 0], base_sv[:, 0])
        shape = (self.n, W.shape[-1])
        sub = BiasSubspace.from_spectra(layer, self.P, sv, change_sv, scale, shape, self.dtype)
        down = _merge_drift(self.down) if self.down else None
        return _LayerResult(dec, _merge_drift(self.local), down, sub)


def _without_bias_out(rec: AttentionRecord) -> AttentionRecord:
    """The record with W_O [H, e, 0]: decompose() then skips its [b, T, H, d_model] bias_out,
    which the check does not use (the subspace comes from z and z_base; see _LayerAcc)."""
    r = copy.copy(rec)
    r.W_O = rec.W_O[..., :0]
    return r


def _merge_drift(parts: list[tuple[Drift, int]]) -> Drift:
    """Drifts of several chunks (each with its N = batch x T query rows) as one."""
    tv_sum, rows, unobs = 0.0, 0, 0
    for d, N in parts:
        seen = N - d.unobservable  # [H] observable rows of this chunk
        tv_sum, rows, unobs = tv_sum + d.tv_mean * seen, rows + seen, unobs + d.unobservable
    first = parts[0][0]
    return Drift(
        layer=first.layer,
        kind=first.kind,
        max_abs=torch.stack([d.max_abs for d, _ in parts]).amax(0),
        tv_mean=tv_sum / rows.clamp_min(1),
        tv_max=torch.stack([d.tv_max for d, _ in parts]).amax(0),
        unobservable=unobs,
    )
