"""Multi-bit-aware GPTQ for one integer master: pure tensor math on one weight matrix and its Hessian.

For a Linear weight ``W`` (out, in) with calibration inputs ``X`` (N, in), ``H = 2 X^T X / N``. The master ``q``
(integers in the ``h``-bit range) and the per-group scale ``s`` give, at every candidate width ``b`` (``d = h - b``),
``W_b = clamp(round(q / 2^d), -2^(b-1), 2^(b-1) - 1) * s * 2^d`` (Double Rounding, :func:`abs_llm.core.derive`). The
layer objective is the output error summed over the widths,

    J(q, s) = sum_b lam_b * tr((W - W_b) H (W - W_b)^T),

which is separable over rows. ``lam_b`` are the per-width weights, by default divided by the layer's error under plain
Double Rounding of the abs-max master (``normalize=True``): the objective then counts relative errors, so the 2-bit
error, thousands of times larger in absolute terms, does not decide every 8-bit integer.

Solver (GPTQ's column-by-column error feedback, Frantar et al. 2022, with act-order, relative damping and lazy batch
updates in blocks of columns): with ``U`` the upper Cholesky factor of ``H^-1`` (``d_j = U_jj``), the error of any
quantized matrix decomposes exactly as ``tr(E H E^T) = sum_j |t_j - w_hat_j|^2 / d_j^2``, where ``t_j`` is column
``j`` of the weight after the feedback updates of the columns before it. Each width therefore keeps its own running
target ``t_b`` (``feedback="per_width"``), every width's error is fed back into its own target, and the one master
integer of column ``j`` is the candidate minimising ``sum_b lam_b |t_bj - W_b(q)_j|^2``: a greedy choice on an exact
decomposition of ``J``. ``feedback="mean"`` keeps one shared target (as MatGPTQ does), feeds back the lam-weighted mean
error ``e_bar`` and scores a candidate by the exact cost of that choice, ``Lam e_bar^2 / d_j^2 + H_jj sum_b lam_b
(e_b - e_bar)^2`` (the spread between widths cannot be compensated by one shared target).

Candidates per column (``candidates="local"``): the rounding ``c`` of the top width's target to the master grid,
and for each lower width the master integers nearest ``c`` whose derived level is one below / one above the level
``c`` derives to (``1 + 2 * (B - 1)`` candidates). Within one level of a width the top width's error is smallest
nearest ``c``, so this holds the best master for every one-level move of each width taken alone;
``candidates="all"`` scores every master integer (exact per column; used for 4-bit masters and as a check).

Scales: ``s = alpha * max|W_g| / (2^(h-1) - 1)`` per group, ``alpha`` from ``clip_grid`` chosen per (row, group) by the
same lam-weighted error with ``diag(H)`` weights and the master rounded to nearest. Finally, per row, the result is
kept only if its ``J`` is no larger than that of the plain abs-max Double Rounding master (``rtn``): never worse than
rounding on the calibration data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .. import core

FEEDBACK = ("per_width", "mean")
CANDIDATES = ("local", "all")


@dataclass
class SolverOptions:
    damp: float = 0.01  # added to diag(H): damp * mean(diag(H))
    act_order: bool = True  # columns in decreasing diag(H); scales are then fixed before the column loop
    block_size: int = 128  # columns per lazy batch update
    feedback: str = "per_width"
    candidates: str = "local"
    # alpha > 1 is often chosen: the Double Rounding grid of a low width clips the positive extreme (the 4-bit top
    # level is 7 * 16 / 127 = 0.88 of the abs-max), and a wider master step gives it back.
    clip_grid: tuple[float, ...] = (0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2)
    normalize: bool = True
    keep_best_of_rtn: bool = True

    def check(self) -> None:
        if not (isinstance(self.damp, (int, float)) and self.damp > 0 and math.isfinite(self.damp)):
            raise ValueError(f"damp must be a positive number (fraction of mean diag(H)), got {self.damp!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        if self.feedback not in FEEDBACK:
            raise ValueError(f"feedback must be one of {FEEDBACK}, got {self.feedback!r}")
        if self.candidates not in CANDIDATES:
            raise ValueError(f"candidates must be one of {CANDIDATES}, got {self.candidates!r}")
        grid = tuple(self.clip_grid or (1.0,))
        if not all(isinstance(a, (int, float)) and 0 < a <= 2 for a in grid):
            raise ValueError(f"clip_grid entries must be numbers in (0, 2], got {self.clip_grid!r}")


class _Widths:
    """Broadcastable constants of the candidate widths: ``2^d``, level range, master range."""

    def __init__(self, master_bits: int, bits, device):
        self.master_bits, self.bits = master_bits, list(bits)
        self.lo, self.hi = core.qrange(master_bits)
        self.step = torch.tensor([2.0 ** (master_bits - b) for b in self.bits], device=device)
        self.lev_lo = torch.tensor([float(core.qrange(b)[0]) for b in self.bits], device=device)
        self.lev_hi = torch.tensor([float(core.qrange(b)[1]) for b in self.bits], device=device)
        self.low = [i for i, b in enumerate(self.bits) if b < master_bits]  # widths that round a second time
        self.low_step = self.step[self.low].view(-1, 1)
        self.low_lo = self.lev_lo[self.low].view(-1, 1)
        self.low_hi = self.lev_hi[self.low].view(-1, 1)

    def derive(self, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Float weights of master ``q`` (float, ``(..., m)``) at every width: ``(..., B, m)``; ``s`` broadcasts to
        ``(..., 1, m)``. Same rounding (half to even) as :func:`abs_llm.core.derive`."""
        shape = (-1, 1)
        q = q.unsqueeze(-2)
        lev = torch.round(q / self.step.view(shape)).clamp_(self.lev_lo.view(shape), self.lev_hi.view(shape))
        return lev * (self.step.view(shape) * s.unsqueeze(-2))


def rtn_master(w: torch.Tensor, scale: torch.Tensor, master_bits: int, group_size: int | None) -> torch.Tensor:
    return core.quantize_master(w, scale, master_bits, group_size).float()


def width_errors(w, q, scale, H, master_bits, bits, group_size) -> torch.Tensor:
    """Per-row output error at every width: ``(B, out)`` with ``[b, r] = (W - W_b)_r H (W - W_b)_r^T``. ``w`` is
    ``(out, in)``, or ``(B, out, in)``: one target per width (see :func:`solve`'s ``targets``)."""
    wd = _Widths(master_bits, bits, w.device)
    s = core.expand_scale(scale.float(), w.shape[-1], group_size)
    e = (w.float() if w.dim() == 3 else w.float().unsqueeze(0)) - wd.derive(
        q.float().transpose(0, 1), s.transpose(0, 1)).permute(1, 2, 0)
    return ((e @ H) * e).sum(-1)


def _candidates(t, s, wd: _Widths, top: int, mode: str) -> torch.Tensor:
    """Master integers to score, ``(K, m)`` float, for targets ``t`` (B, m) and scales ``s`` (m,)."""
    if mode == "all":
        return torch.arange(wd.lo, wd.hi + 1, device=t.device, dtype=t.dtype).unsqueeze(1).expand(-1, t.shape[1])
    c = torch.round(t[top] / s).clamp_(wd.lo, wd.hi)
    if not wd.low:
        return c.unsqueeze(0)
    step, half = wd.low_step, wd.low_step / 2
    own = torch.round(c / step).clamp_(wd.low_lo, wd.low_hi)  # (B', m): the level c derives to at each lower width
    # Move one level down or up at each lower width, staying as close to c as that allows: the widths' targets
    # drift apart under their own error feedback, and the best compromise is c or one level away at some width.
    # (Checked against scoring all 256 masters on SmolLM2 layers: the same joint error to 4 digits.)
    lev = torch.stack([own - 1, own + 1]).clamp_(wd.low_lo, wd.low_hi)
    odd = torch.remainder(lev, 2)  # a tie q = lev * step +- half rounds (half to even) into `lev` iff lev is even
    a = lev * step - half + odd  # the master interval that derives to `lev` ...
    z = torch.where(lev >= wd.low_hi, wd.hi, lev * step + half - odd)  # ... the top level takes everything above
    near = torch.minimum(torch.maximum(c, a), z).clamp_(wd.lo, wd.hi)  # the master nearest c with that level
    return torch.cat([c.unsqueeze(0), near.flatten(0, 1)])


def _choose(t, s, lam, wd: _Widths, top: int, mode: str, mean_terms=None):
    """Best master per element: ``q`` (m,) and its derived weights ``(B, m)``."""
    cand = _candidates(t, s, wd, top, mode)  # (K, m)
    g = wd.derive(cand, s)  # (K, B, m)
    if mean_terms is None:
        cost = (lam * (t - g).square_()).sum(1)
    else:  # shared target: exact cost of feeding back the lam-weighted mean error
        inv_d2, h_jj = mean_terms
        lam_sum = lam.sum(0)
        gbar = (lam * g).sum(1) / lam_sum
        cost = lam_sum * (t[0] - gbar).square() * inv_d2 + h_jj * (lam * (g - gbar.unsqueeze(1)).square_()).sum(1)
    idx = cost.argmin(0, keepdim=True)
    q = cand.gather(0, idx).squeeze(0)
    return q, g.gather(0, idx.unsqueeze(1).expand(1, g.shape[1], -1)).squeeze(0)


def search_scale(w, hdiag, lam, wd: _Widths, group_size, grid) -> torch.Tensor:
    """Per (row, group) scale ``alpha * absmax / qmax`` minimising ``sum_j H_jj sum_b lam_b (w_j - W_b(q)_j)^2`` with
    ``q`` rounded to nearest at each ``alpha`` in ``grid``. ``w`` (out, in); ``lam`` (B, out)."""
    base = core.init_scale(w, wd.master_bits, group_size)
    if tuple(grid) == (1.0,):
        return base
    wg = core._grouped(w.float(), group_size)  # (out, G, g)
    hg = core._grouped(hdiag.unsqueeze(0), group_size)  # (1, G, g), zero on padding
    best, best_err = None, None
    for a in grid:
        s = base * a
        q = torch.round(wg / s.unsqueeze(-1)).clamp_(wd.lo, wd.hi)
        g = wd.derive(q, s.unsqueeze(-1))  # (out, G, B, g)
        err = ((wg.unsqueeze(2) - g).square_() * hg.unsqueeze(2)).sum(-1)  # (out, G, B)
        err = (err * lam.t().unsqueeze(1)).sum(-1)
        if best_err is None:
            best, best_err = s, err
        else:
            better = err < best_err
            best = torch.where(better, s, best)
            best_err = torch.where(better, err, best_err)
    return best


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``; retries with 10x the damping if needed."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    mean_diag = H.diagonal().mean().clamp(min=1e-12)
    for k in range(6):
        L, info = torch.linalg.cholesky_ex(H + eye * (damp * 10**k * mean_diag))
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
    raise ValueError("the layer Hessian is not positive definite even with 1e5x damping; check the calibration data")


def asymmetric_target(w, C, H_q, damp: float) -> torch.Tensor:
    """The weight ``W*`` to quantize towards when the inputs carry the error of earlier quantized layers (GPTAQ, Li et
    al. 2025, "asymmetric calibration"). With ``X`` the float model's inputs of a layer and ``X_q`` those of the model
    quantized at one width (rows = tokens), ``C = X^T X_q`` and ``H_q = X_q^T X_q``: ``W*`` minimises
    ``|X W^T - X_q W*^T|^2 + lam |W* - W|^2``, i.e. ``W* = W (C + lam I)(H_q + lam I)^-1 = W + W (C - H_q)(H_q +
    lam I)^-1`` with ``lam = damp * mean(diag H_q)``; then ``|X W^T - X_q Q^T|^2 = const + tr((W* - Q) H_q (W* -
    Q)^T)`` (exact for ``lam -> 0``). The ridge pulls towards ``W``, not 0: with unchanged inputs ``W* = W``."""
    h = H_q.double()
    Hd = h + torch.eye(h.shape[0], dtype=h.dtype, device=h.device) * (damp * h.diagonal().mean().clamp(min=1e-12))
    w64 = w.double()
    delta = torch.linalg.solve(Hd, (w64 @ (C.double() - h)).t()).t()  # Hd symmetric: (W (C - H_q) Hd^-1)
    return (w64 + delta).to(w.dtype)


def layer_weights(rtn_err, bit_weights, rows, normalize) -> torch.Tensor:
    """``lam`` (B, out): the per-width weights, divided by each row block's (= one original layer's) error under the
    abs-max Double Rounding master (``rtn_err``, (B, out)) when ``normalize``."""
    lam = torch.tensor(bit_weights, dtype=torch.float32, device=rtn_err.device).unsqueeze(1).repeat(1, rtn_err.shape[1])
    if normalize:
        err = rtn_err
        for r0, r1 in rows:
            tot = err[:, r0:r1].sum(1, keepdim=True)
            lam[:, r0:r1] /= torch.where(tot > 0, tot, torch.ones_like(tot))
    return lam


def solve(w, H, master_bits, bits, bit_weights, group_size, opts: SolverOptions | None = None, rows=None,
          targets=None):
    """One master for ``w`` (out, in) given its Hessian ``H`` (in, in). ``rows``: ``[(r0, r1), ...]`` row blocks that
    are separate layers sharing these inputs (q/k/v, gate/up), normalised separately. ``targets`` (B, out, in): what
    each width's weights should approach instead of ``w`` (``feedback="per_width"`` only; scales still fit ``w``),
    e.g. the least-squares correction for the error of the inputs at that width (:func:`asymmetric_target`).
    Returns ``(q int8 (out, in), scale float32 (out, n_groups), info)``; ``info`` holds per-width errors ``J_b`` of
    the result and of rounding (against ``targets`` when given)."""
    opts = opts or SolverOptions()
    opts.check()
    if targets is not None and (opts.feedback != "per_width" or targets.shape != (len(bits), *w.shape)):
        raise ValueError(f"targets must be (widths, out, in) = {(len(bits), *w.shape)} with feedback='per_width'")
    w = w.detach().float()
    goal = w if targets is None else targets.detach().float()
    out, n = w.shape
    H = H.detach().float()
    rows = rows or [(0, out)]
    wd = _Widths(master_bits, bits, w.device)
    top = max(range(len(wd.bits)), key=lambda i: wd.bits[i])
    Hd = H.clone()
    dead = Hd.diagonal() <= 0
    Hd[dead, dead] = 1.0  # inputs never seen in calibration: no correlation, plain rounding there
    Hd.diagonal().add_(opts.damp * Hd.diagonal().mean())
    scale0 = core.init_scale(w, master_bits, group_size)
    rtn_q = rtn_master(w, scale0, master_bits, group_size)
    rtn_err = width_errors(w, rtn_q, scale0, H, master_bits, bits, group_size)  # J's own H: undamped
    # normalised by rounding's error against the float weights even with targets: against a target, rounding's error
    # also holds the target's distance from w, which would shrink that width's weight
    lam = layer_weights(rtn_err, bit_weights, rows, opts.normalize)
    info = {"rtn": rtn_err if targets is None else width_errors(goal, rtn_q, scale0, H, master_bits, bits, group_size)}
    scale = search_scale(w, Hd.diagonal(), lam, wd, group_size, opts.clip_grid)

    perm = torch.argsort(Hd.diagonal(), descending=True) if opts.act_order else torch.arange(n)
    Hp = Hd[perm][:, perm]
    U = _inverse_cholesky(Hp, 0.0)  # damping already applied; the retry adds more only if needed
    s_cols = core.expand_scale(scale, n, group_size)[:, perm].t().contiguous()  # (n, out)
    per_width = opts.feedback == "per_width"
    if targets is not None:
        target = goal[:, :, perm].transpose(1, 2).contiguous()  # (B, n, out)
    else:
        target = w[:, perm].t().contiguous()  # (n, out): column j is contiguous
        target = target.unsqueeze(0).repeat(len(bits), 1, 1) if per_width else target.unsqueeze(0)
    lam_sum = lam.sum(0)
    hdiag = Hp.diagonal()
    mode = "all" if opts.candidates == "all" or master_bits <= 4 else "local"
    dynamic = group_size is not None and not opts.act_order
    q = torch.empty(n, out)
    threads = torch.get_num_threads()
    for c1 in range(0, n, opts.block_size):
        c2 = min(c1 + opts.block_size, n)
        errs = torch.empty(target.shape[0], c2 - c1, out)
        # The column loop runs thousands of small ops: one thread avoids the OpenMP hand-off per op, which costs more
        # than the op (and 10x more on a busy machine); the lazy batch matmul below gets every thread again.
        if threads > 1:
            torch.set_num_threads(1)
        for j in range(c1, c2):
            if dynamic and j % group_size == 0:  # GPTQ's groups: scales from the already-updated columns
                cols = slice(j, min(j + group_size, n))
                blk = target[:, cols].mean(0) if per_width else target[0, cols]
                gs = search_scale(blk.t(), hdiag[cols], lam, wd, None, opts.clip_grid)
                scale[:, j // group_size] = gs[:, 0]
                s_cols[cols] = gs[:, 0]
            t = target[:, j] if per_width else target[0, j].expand(len(bits), -1)
            d = U[j, j]
            mean_terms = None if per_width else (1.0 / (d * d), hdiag[j])
            qj, g = _choose(t, s_cols[j], lam, wd, top, mode, mean_terms)
            q[j] = qj
            e = (t - g) / d if per_width else ((t[0] - (lam * g).sum(0) / lam_sum) / d).unsqueeze(0)
            errs[:, j - c1] = e
            target[:, j + 1 : c2] -= U[j, j + 1 : c2].view(1, -1, 1) * e.unsqueeze(1)
        if threads > 1:
            torch.set_num_threads(threads)
        if c2 < n:
            target[:, c2:] -= torch.matmul(U[c1:c2, c2:].t(), errs)
    q_out = torch.empty(out, n)
    q_out[:, perm] = q.t()

    info["gptq"] = width_errors(goal, q_out, scale, H, master_bits, bits, group_size)
    worse = (lam * info["gptq"]).sum(0) > (lam * info["rtn"]).sum(0)
    if not opts.keep_best_of_rtn:
        worse.zero_()
    if worse.any():
        q_out[worse] = rtn_q[worse]
        scale[worse] = scale0[worse]
        info["gptq"][:, worse] = info["rtn"][:, worse]
    info["kept_rtn"] = worse  # rows where rounding's master was kept
    info["lam"] = lam
    return q_out.to(torch.int8), scale, info
