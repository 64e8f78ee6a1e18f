"""Least-squares inverses of affine maps (METHOD.md §4): damped CGLS, matrix-free, on torch
JVP/VJP; closed forms where they exist; a dense reference for small maps.

All solve  Delta = argmin ||J Delta - delta||^2 + (t sigma)^2 ||Delta||^2,  sigma = ||J||_2 estimated
by power iteration so the damping t is scale-free. t = 0 is the Moore-Penrose inverse; t = inf
gives Delta = 0.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch.func import jvp, vjp

from ..errors import NAFlowError


DEFAULT_DAMP = 1.0   # chosen by the evaluation benchmark (docs/method.md "Damping default")


@dataclass
class SolverOptions:
    damp: float = DEFAULT_DAMP
    tol: float = 1e-4          # normal-equation residual to stop at
    max_iter: int = 2000
    power_iter: int = 8
    conv_inverse: str = "lsq"  # or "paper"
    # the unoptimised path (torch.func JVP/VJP of whole joint segments, one CG for all channels
    # of a depthwise conv), kept to check the fast path against
    reference: bool = False
    dense_limit_bytes: int = 512 * 1024**2
    # per-model memo of point-independent quantities (sigma of a conv, pinv of a 1x1 conv)
    cache: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass
class SolveRecord:
    kind: str                  # exact | closed-form | cgls | dense | paper | zero
    iterations: int = 0
    convergence: float = 0.0   # ||J^T(J D - d) + l^2 D|| / ||J^T d||
    misfit: float = 0.0        # ||J D - d|| / ||d||
    damp: float = 0.0
    sigma: float | None = None
    converged: bool = True

    def as_dict(self) -> dict:
        d = asdict(self)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


class LinearMap:
    """J of f at x0, applied matrix-free (JVP forward, VJP backward)."""

    def __init__(self, f: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor):
        self.f, self.x0 = f, x0.detach()
        self.y0, self._vjp = vjp(f, self.x0)
        self.y0 = self.y0.detach()

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return jvp(self.f, (self.x0,), (v,))[1]

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        return self._vjp(u)[0]


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.double()))


def spectral_norm(J: LinearMap, iterations: int, seed: int = 0) -> float:
    """Largest singular value of J by power iteration on J^T J (seeded: deterministic)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(J.x0.shape, generator=g, dtype=J.x0.dtype).to(J.x0.device)
    v /= torch.linalg.vector_norm(v)
    sigma2 = 0.0
    for _ in range(iterations):
        w = J.rmatvec(J.matvec(v))
        n = float(torch.linalg.vector_norm(w))
        if n == 0.0:
            return 0.0
        sigma2, v = n, w / n
    return math.sqrt(sigma2)


def _dot(a: torch.Tensor, b: torch.Tensor, dims) -> torch.Tensor:
    """<a, b> over everything (a 0-d tensor), or per block: summed over ``dims`` only."""
    if dims is None:
        return torch.dot(a.reshape(-1), b.reshape(-1))
    return (a * b).sum(dim=dims, keepdim=True)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where den == 0 (a block that has converged exactly, or has nothing to do)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)),
                       torch.zeros_like(num))


def cgls(J: LinearMap, delta: torch.Tensor, lam: float, tol: float, max_iter: int,
         block_dims=None):
    """CGLS for min ||J x - delta||^2 + lam^2 ||x||^2 (Bjorck), i.e. CG on the normal equations
    (J^T J + lam^2 I) x = J^T delta. Returns (x, iterations, convergence, misfit): convergence is
    the normal-equation residual ||J^T(delta - J x) - lam^2 x|| / ||J^T delta|| of the iterate
    (the stopping test, METHOD.md §4), misfit ||J x - delta|| / ||delta||, both from the recurred
    vectors s and r.

    ``block_dims``: J is block-diagonal over the remaining dimensions (a depthwise convolution:
    one block per image and channel). Every block then runs its own CG, with its own step
    lengths, in the same loop; the problem and the stopping test (on the whole residual) are
    unchanged. Step lengths stay tensors, so on a GPU an iteration synchronises once (the test).
    Updates are in place: one J·p, one Jᵀ·r and four vector updates per iteration.
    """
    x = torch.zeros_like(J.x0)
    r = delta.clone()
    s = J.rmatvec(r)
    ref = _norm(s)
    dnorm = _norm(delta)
    if ref == 0.0:
        return x, 0, 0.0, 1.0
    p = s.clone()
    gamma = _dot(s, s, block_dims)
    lam2 = lam * lam
    conv = 1.0
    it = 0
    for it in range(1, max_iter + 1):
        q = J.matvec(p)
        denom = _dot(q, q, block_dims)
        if lam2:
            denom = denom + lam2 * _dot(p, p, block_dims)
        alpha = _ratio(gamma, denom)
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, q, value=-1.0)
        s = J.rmatvec(r)
        if s.data_ptr() == r.data_ptr():   # a map that hands its argument back (a pure copy)
            s = s.clone()
        if lam2:
            s.sub_(x, alpha=lam2)
        gamma_new = _dot(s, s, block_dims)
        conv = math.sqrt(float(gamma_new.sum() if block_dims is not None else gamma_new)) / ref
        if conv <= tol or not math.isfinite(conv):   # converged, or broke down (NaN/inf)
            break
        p.mul_(_ratio(gamma_new, gamma)).add_(s)
        gamma = gamma_new
    return x, it, conv, _norm(r) / dnorm


def solve_affine(f: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, y_target: torch.Tensor,
                 opts: SolverOptions, where: str = "", J: LinearMap | None = None,
                 sigma_key=None) -> tuple[torch.Tensor, SolveRecord]:
    """Anchored least squares: x_hat = x0 + argmin ||J D - (y_target - f(x0))||^2 + damping.

    ``J`` may be given (a map cheaper than autograd's); ``sigma_key`` memoises ||J|| where J does
    not depend on the point (a convolution)."""
    x0 = x0.detach()
    J = J or LinearMap(f, x0)
    delta = (y_target - J.y0).detach()
    dnorm = _norm(delta)
    if math.isinf(opts.damp) or dnorm == 0.0:
        return x0.clone(), SolveRecord(kind="zero", damp=opts.damp, misfit=1.0 if dnorm else 0.0)
    if opts.conv_inverse == "paper":
        return paper_inverse(J, delta, opts, where)
    sigma = None
    if opts.damp > 0:
        sigma = opts.cache.get(("sigma", sigma_key)) if sigma_key is not None else None
        if sigma is None:
            sigma = spectral_norm(J, opts.power_iter)
            if sigma_key is not None:
                opts.cache[("sigma", sigma_key)] = sigma
    lam = opts.damp * sigma if sigma else 0.0
    blocks = None if opts.reference else getattr(J, "block_dims", None)
    dx, iters, conv, misfit = cgls(J, delta, lam, opts.tol, opts.max_iter, blocks)
    if blocks is not None and not math.isfinite(conv):
        # per-channel CG broke down in float32 (seen on EfficientNet-Lite0: a near-empty channel
        # block gave a non-finite step): solve the same problem with one CG for all channels
        dx, more, conv, misfit = cgls(J, delta, lam, opts.tol, opts.max_iter, None)
        iters += more
    rec = SolveRecord(kind="cgls", iterations=iters, convergence=conv, misfit=misfit,
                      damp=opts.damp, sigma=sigma, converged=conv <= opts.tol)
    return x0 + dx, rec


def dense_jacobian(J: LinearMap, limit_bytes: int, where: str = "") -> torch.Tensor:
    """The explicit Jacobian (q x p) column by column; refuses above ``limit_bytes``."""
    p, q = J.x0.numel(), J.y0.numel()
    need = p * q * 8
    if need > limit_bytes:
        raise NAFlowError(f"{where}: the dense Jacobian would take {need / 1024**2:.0f} MiB "
                          f"({q}x{p}), over the limit of {limit_bytes / 1024**2:.0f} MiB; "
                          "use the default --conv-inverse lsq for this model")
    eye = torch.eye(q, dtype=J.y0.dtype, device=J.y0.device)
    rows = [J.rmatvec(eye[i].reshape(J.y0.shape)).reshape(-1) for i in range(q)]
    return torch.stack(rows).double()


def damped_pinv_factors(M: torch.Tensor, damp: float, sigma: float | None = None):
    """The damped pseudo-inverse of a matrix as SVD factors: ``(Vh.T * inv) @ U.T`` is
    ``(M^T M + lambda^2 I)^-1 M^T`` with ``lambda = damp * sigma`` (default sigma: the largest
    singular value), singular values below ``s_max * max(shape) * eps(float32)`` dropped.
    Returns ``(U, inv, Vh, s_max)``; the one home of the damped pinv (dense reference solves,
    the 1x1-conv closed form)."""
    U, S, Vh = torch.linalg.svd(M, full_matrices=False)
    lam = damp * (sigma if sigma is not None else float(S[0])) if damp > 0 else 0.0
    cutoff = float(S[0]) * max(M.shape) * torch.finfo(torch.float32).eps
    inv = torch.where(S > cutoff, S / (S * S + lam * lam), torch.zeros_like(S))
    return U, inv, Vh, float(S[0])


def dense_solve(J: LinearMap, delta: torch.Tensor, damp: float, limit_bytes: int,
                where: str = "", sigma: float | None = None) -> torch.Tensor:
    """Reference: the damped pseudo-inverse from the explicit Jacobian (small maps only).
    ``sigma`` (default: the exact largest singular value) scales the damping as in the solver."""
    U, inv, Vh, _ = damped_pinv_factors(dense_jacobian(J, limit_bytes, where), damp, sigma)
    dx = Vh.T @ (inv * (U.T @ delta.reshape(-1).double()))
    return dx.reshape(J.x0.shape).to(J.x0.dtype)


def paper_inverse(J: LinearMap, delta: torch.Tensor, opts: SolverOptions,
                  where: str = "") -> tuple[torch.Tensor, SolveRecord]:
    """Eq. 6/8 literally: the square system of the first p output rows (Condition 1, q >= p).

    Condition 2 (q < p) chaining over following layers is not implemented: refused clearly.
    """
    p, q = J.x0.numel(), J.y0.numel()
    if q < p:
        raise NAFlowError(f"{where}: --conv-inverse paper needs q >= p (outputs {q} < inputs {p}); "
                          "Condition 2 chaining is not implemented, use --conv-inverse lsq")
    M = dense_jacobian(J, opts.dense_limit_bytes, where)[:p]
    rhs = delta.reshape(-1)[:p].double()
    sol = torch.linalg.lstsq(M, rhs.unsqueeze(1)).solution.squeeze(1)
    dx = sol.reshape(J.x0.shape).to(J.x0.dtype)
    misfit = _norm(J.matvec(dx) - delta) / max(_norm(delta), 1e-30)
    return J.x0 + dx, SolveRecord(kind="paper", misfit=misfit, damp=0.0)
