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
    # images in the batch (dim 0 of every data tensor): every solve is per image, each image
    # with its own damping scale, step lengths and stopping test (Analyzer.backproject_many)
    images: int = 1
    # per-model memo of point-independent quantities (sigma of a conv, pinv of a 1x1 conv)
    cache: dict = field(default_factory=dict, repr=False, compare=False)
    # per-point memo of sigma where J depends on the forward point (a joint segment, a fan-in
    # or fan-out): a second back-projection of the same point (another damping) reuses it
    point_memo: dict | None = field(default=None, repr=False, compare=False)


class PerImage(list):
    """A solver-record field with one value per image of a batch (``BackProjection`` hands
    each image its own)."""


def per_image(values, images: int):
    """One value for one image, a ``PerImage`` list for several."""
    values = [v.item() if isinstance(v, torch.Tensor) else v for v in values]
    return values[0] if images == 1 else PerImage(values)


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
        def clean(v):
            if isinstance(v, PerImage):
                return PerImage(clean(x) for x in v)
            return None if isinstance(v, float) and not math.isfinite(v) else v
        return {k: clean(getattr(self, k)) for k in self.__dataclass_fields__}


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

    def restrict(self, index: torch.Tensor) -> "LinearMap | None":
        """The same map on the images ``index`` of the batch only (dim 0), or None where it
        cannot be cut (an autograd closure): the solver then keeps those images in, frozen."""
        return None


# ------------------------------------------------------------------------------------------------
# per-image vectors: dim 0 of a solver vector is the image (one "image" when a tensor's dim 0 is
# not the batch, e.g. a lone image whose segment reshapes its batch dimension away)

def flatten(tensors, images: int = 1) -> torch.Tensor:
    """Several tensors as one (images × n) matrix of per-image rows (a fan-in's unknowns, a
    fan-out's readers, a segment's several outputs)."""
    return torch.cat([t.reshape(images, -1) for t in tensors], dim=1)


def unflatten(v: torch.Tensor, shapes) -> list[torch.Tensor]:
    """``flatten``'s inverse: the rows of ``v`` cut into tensors of ``shapes`` (whose dim 0 is
    the number of rows, or any dim 0 for one row)."""
    rows = v.shape[0]
    parts = torch.split(v, [math.prod(s) // rows for s in shapes], dim=1)
    return [p.reshape(s) for p, s in zip(parts, shapes)]


def batch_shape(shape, rows: int) -> tuple:
    """``shape`` with its dim 0 (the images) set to ``rows``."""
    return (rows,) + tuple(shape[1:])


def _rows(t: torch.Tensor, images: int) -> torch.Tensor:
    return t.reshape(images, -1)


def image_norms(t: torch.Tensor, images: int = 1) -> torch.Tensor:
    """||t|| of each image (shape (images,), float64; summed in ``t``'s own precision: a float64
    copy of a whole tensor costs more than the solve step it measures)."""
    return torch.linalg.vector_norm(_rows(t, images), dim=1).double()


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.double()))


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-image (or per-block) quantity shaped to broadcast over ``like``."""
    if v.dim() == like.dim():
        return v
    return v.reshape((v.shape[0],) + (1,) * (like.dim() - 1))


def spectral_norm(J: LinearMap, iterations: int, seed: int = 0, images: int = 1) -> torch.Tensor:
    """Largest singular value of J (of each image's block of J) by power iteration on JᵀJ,
    seeded: every image starts from the same vector, so an image gets the value it gets alone.
    Returns float64 (images,)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = tuple(J.x0.shape)
    if images > 1:
        v = torch.randn((1,) + shape[1:], generator=g, dtype=J.x0.dtype)
        v = v.to(J.x0.device).expand(shape).clone()
    else:
        v = torch.randn(shape, generator=g, dtype=J.x0.dtype).to(J.x0.device)
    v /= _bcast(torch.linalg.vector_norm(_rows(v, images), dim=1), v)
    sigma2 = torch.zeros(images, dtype=torch.float64, device=v.device)
    for _ in range(iterations):
        w = J.rmatvec(J.matvec(v))
        n = torch.linalg.vector_norm(_rows(w, images), dim=1)
        if not bool((n > 0).any()):
            break
        sigma2 = torch.where(n > 0, n.double(), torch.zeros_like(sigma2))
        v = w / _bcast(torch.where(n > 0, n, torch.ones_like(n)), w)
        v = v * _bcast((n > 0).to(v.dtype), v)
    return sigma2.sqrt().cpu()


def _dot(a: torch.Tensor, b: torch.Tensor, images: int, dims) -> torch.Tensor:
    """<a, b> per image (shape (images,)), or per block: summed over ``dims`` only."""
    if dims is None:
        if images == 1:
            return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(1)
        return torch.linalg.vecdot(_rows(a, images), _rows(b, images))
    if tuple(dims) == tuple(range(a.dim() - len(dims), a.dim())):   # trailing dims: one row each
        lead = a.shape[:a.dim() - len(dims)]
        d = torch.linalg.vecdot(a.reshape(math.prod(lead), -1), b.reshape(math.prod(lead), -1))
        return d.reshape(tuple(lead) + (1,) * len(dims))
    return (a * b).sum(dim=dims, keepdim=True)


def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, 0 where den == 0 (a block that has converged exactly, or has nothing to do)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)),
                       torch.zeros_like(num))


def _image_totals(gamma: torch.Tensor, images: int) -> torch.Tensor:
    return gamma.reshape(images, -1).sum(dim=1)


def cgls_images(J: LinearMap, delta: torch.Tensor, lam, tol: float, max_iter: int,
                block_dims=None, images: int = 1):
    """CGLS for min ||J x - delta||^2 + lam^2 ||x||^2 (Bjorck), i.e. CG on the normal equations
    (J^T J + lam^2 I) x = J^T delta, for every image of a batch at once (dim 0; ``lam`` one
    value or one per image). Each image has its own step lengths and its own stopping test, the
    normal-equation residual ||J^T(delta - J x) - lam^2 x|| / ||J^T delta|| (METHOD.md §4): it
    takes exactly the steps it takes alone. An image that has converged leaves the batch: the
    map is cut to the images still iterating (``LinearMap.restrict``), or, where it cannot be
    cut, the image is held fixed. Returns (x, iterations, convergence, misfit), the last three
    per image (tensors (images,)); misfit ||J x - delta|| / ||delta||.

    ``block_dims``: J is block-diagonal over the remaining dimensions (a depthwise convolution:
    one block per image and channel). Every block then runs its own CG, with its own step
    lengths, in the same loop; the stopping test stays per image. Step lengths stay tensors,
    so on a GPU an iteration synchronises once (the test). Updates are in place: one J·p, one
    Jᵀ·r and four vector updates per iteration.
    """
    n = images
    x_all = torch.zeros_like(J.x0)
    r_all = delta.clone()
    s = J.rmatvec(r_all)
    ref = image_norms(s, n).cpu()
    dnorm = image_norms(delta, n).cpu()
    iters = torch.zeros(n, dtype=torch.long)
    conv = torch.zeros(n, dtype=torch.float64)
    lam = torch.as_tensor(lam, dtype=torch.float64).reshape(-1).expand(n).cpu()
    live = ref > 0
    if not bool(live.any()):
        return x_all, iters, conv, torch.where(dnorm > 0, 1.0, 0.0).double()
    lam2 = (lam * lam).to(dtype=J.x0.dtype, device=J.x0.device)
    damped = bool((lam2 != 0).any())
    w = _Working(J, x_all, r_all, n, ref)
    s = w.keep(live, (s,))[0] if not bool(live.all()) else s
    p = s.clone()
    gamma = _dot(s, s, w.rows, block_dims)
    l2 = None
    for it in range(1, max_iter + 1):
        m, x, r = w.rows, w.x, w.r
        if l2 is None or l2.shape[0] != m:           # this working set's damping, shaped once
            l2 = lam2[w.idx.to(lam2.device)]
            l2x = float(l2[0]) if n == 1 else _bcast(l2, x)
            l2d = None
        q = w.J.matvec(p)
        denom = _dot(q, q, m, block_dims)
        if damped:
            if l2d is None:
                l2d = _bcast(l2, denom)
            denom = denom + l2d * _dot(p, p, m, block_dims)
        alpha = ratio(gamma, denom)
        if w.frozen is not None:
            alpha = alpha * _bcast((~w.frozen).to(alpha), alpha)
        x.addcmul_(_bcast(alpha, x), p)
        r.addcmul_(_bcast(alpha, r), q, value=-1.0)
        s = w.J.rmatvec(r)
        if s.data_ptr() == r.data_ptr():   # a map that hands its argument back (a pure copy)
            s = s.clone()
        if damped:
            if n == 1:
                s.sub_(x, alpha=l2x)
            else:
                s.addcmul_(x, l2x, value=-1.0)
        gamma_new = _dot(s, s, m, block_dims)
        c = _image_totals(gamma_new, m).double().sqrt().cpu() / w.ref
        if n == 1:
            cv = float(c[0])
            iters[0], conv[0] = it, cv
            if cv <= tol or not math.isfinite(cv):   # converged, or broke down (NaN/inf)
                break
            done = None
        else:
            moving = torch.ones(m, dtype=torch.bool) if w.frozen is None else ~w.frozen
            iters[w.idx[moving]] = it
            conv[w.idx[moving]] = c[moving]
            done = (c <= tol) | ~torch.isfinite(c) | ~moving   # converged, or broke down
            if bool(done.all()):
                break
        if block_dims is not None:
            # a block whose own residual is far below the image's tolerance has converged: its
            # steps stop (they would divide round-off by round-off and blow up)
            floor = _bcast(((0.01 * tol) * w.ref).pow(2).to(gamma_new), gamma_new)
            gamma_new = torch.where(gamma_new <= floor, torch.zeros_like(gamma_new), gamma_new)
        p.mul_(_bcast(ratio(gamma_new, gamma), p)).add_(s)
        gamma = gamma_new
        if done is not None and bool((done & moving).any()):
            s, p, gamma = w.keep(~done, (s, p, gamma))
    x_all, r_all = w.store()
    return x_all, iters, conv, ratio(image_norms(r_all, n).cpu(), dnorm)


class _Working:
    """The rows of a batched CGLS still iterating: the map cut to them (``LinearMap.restrict``)
    with the iterates of those rows, or, where the map cannot be cut, every row with the
    finished ones frozen."""

    def __init__(self, J, x_all, r_all, n, ref):
        self.J0, self.J, self.x_all, self.r_all = J, J, x_all, r_all
        self.x, self.r = x_all, r_all
        self.idx = torch.arange(n)
        self.frozen = None
        self.ref = ref

    @property
    def rows(self) -> int:
        return len(self.idx)

    def store(self):
        if self.x is not self.x_all:
            at = self.idx.to(self.x_all.device)
            self.x_all[at] = self.x
            self.r_all[at] = self.r
        return self.x_all, self.r_all

    def keep(self, keep: torch.Tensor, vectors):
        """Carry on with the working rows ``keep``; ``vectors`` cut the same way."""
        full = self.idx[keep]
        cut = self.J0.restrict(full.to(self.J0.x0.device)) if self.frozen is None else None
        if cut is None:
            self.frozen = ~keep if self.frozen is None else (self.frozen | ~keep)
            return vectors
        self.store()
        k = keep.to(self.x.device)
        rows = len(keep)
        self.x, self.r = self.x[k], self.r[k]
        self.ref = self.ref[keep]
        self.idx, self.J = full, cut
        return tuple(v[k] if v.dim() and v.shape[0] == rows else v for v in vectors)


def cgls(J: LinearMap, delta: torch.Tensor, lam: float, tol: float, max_iter: int,
         block_dims=None):
    """CGLS of one image (``cgls_images`` with one image): (x, iterations, convergence, misfit)."""
    x, it, conv, misfit = cgls_images(J, delta, lam, tol, max_iter, block_dims, 1)
    return x, int(it[0]), float(conv[0]), float(misfit[0])


def solve_affine(f: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, y_target: torch.Tensor,
                 opts: SolverOptions, where: str = "", J: LinearMap | None = None,
                 sigma_key=None, point_key=None) -> tuple[torch.Tensor, SolveRecord]:
    """Anchored least squares: x_hat = x0 + argmin ||J D - (y_target - f(x0))||^2 + damping,
    for each image of the batch (``opts.images``) on its own.

    ``J`` may be given (a map cheaper than autograd's); ``sigma_key`` memoises ||J|| where J does
    not depend on the point (a convolution: the same for every image), ``point_key`` where it
    does, for this point only (``opts.point_memo``)."""
    x0 = x0.detach()
    J = J or LinearMap(f, x0)
    n = opts.images if x0.shape[0] == opts.images else 1
    delta = (y_target - J.y0).detach()
    dnorm = image_norms(delta, n)
    if math.isinf(opts.damp) or not bool((dnorm > 0).any()):
        return x0.clone(), SolveRecord(kind="zero", damp=opts.damp, misfit=per_image(
            [1.0 if d > 0 else 0.0 for d in dnorm.tolist()], n))
    if opts.conv_inverse == "paper":
        if n > 1:
            raise NAFlowError(f"{where}: --conv-inverse paper solves one image at a time")
        return paper_inverse(J, delta, opts, where)
    sigma = None
    points = opts.point_memo if point_key is not None and sigma_key is None else None
    if opts.damp > 0 and points is not None and point_key in points:
        sigma = points[point_key]
    elif opts.damp > 0:
        memo = opts.cache.get(("sigma", sigma_key)) if sigma_key is not None else None
        if memo is not None:
            sigma = torch.full((n,), memo, dtype=torch.float64)
        else:
            one = None
            if sigma_key is not None and n > 1:
                # the same map for every image: one power iteration on one image, the very
                # computation a lone image makes (a memo or cache entry must not depend on the
                # batch it was first computed in)
                one = J.restrict(torch.tensor([0], device=x0.device))
                if one is None and f is not None:
                    one = LinearMap(f, x0[:1])
            if one is not None:
                sigma = spectral_norm(one, opts.power_iter).expand(n).clone()
            else:
                sigma = spectral_norm(J, opts.power_iter, images=n)
            if sigma_key is not None:
                opts.cache[("sigma", sigma_key)] = float(sigma[0])
            elif points is not None:
                points[point_key] = sigma
    lam = opts.damp * sigma if sigma is not None else torch.zeros(n, dtype=torch.float64)
    blocks = None if opts.reference else getattr(J, "block_dims", None)
    dx, iters, conv, misfit = cgls_images(J, delta, lam, opts.tol, opts.max_iter, blocks, n)
    bad = ~torch.isfinite(conv)
    if blocks is not None and bool(bad.any()):
        # per-channel CG broke down in float32 (seen on EfficientNet-Lite0: a near-empty channel
        # block gave a non-finite step): solve the same problem with one CG for all channels,
        # for the images where it broke down
        rows = bad.nonzero().flatten()
        sub = J if n == 1 else J.restrict(rows.to(x0.device))
        if sub is None:
            sub, rows = J, torch.arange(n)
        dx2, more, conv2, mis2 = cgls_images(sub, delta[rows.to(delta.device)] if sub is not J
                                             else delta, lam[rows], opts.tol, opts.max_iter,
                                             None, len(rows))
        dx[rows.to(dx.device)] = dx2
        iters[rows] += more
        conv[rows], misfit[rows] = conv2, mis2
    kinds = ["cgls" if d > 0 else "zero" for d in dnorm.tolist()]
    sig = None if sigma is None else per_image(sigma.tolist(), n)
    rec = SolveRecord(kind=per_image(kinds, n), iterations=per_image(iters.tolist(), n),
                      convergence=per_image(conv.tolist(), n), misfit=per_image(misfit.tolist(), n),
                      damp=opts.damp, sigma=sig,
                      converged=per_image([c <= opts.tol for c in conv.tolist()], n))
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
