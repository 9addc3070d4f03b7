"""The source correction integrated out: the exact evidence of a lens with a pixelated source.

With a pixel correction of the VAE source (:mod:`difflens.sources.correction`) the predicted
image is linear in the correction's whitened values ``w``:

    m(theta, w) = m0(theta) + G(theta) w,      G = sigma * flux * P S(theta) U,

where ``theta`` stands for every other site (lens, latent ``z``, source placement, lens light),
``U`` smooths (optionally) and interpolates the ``n x n`` grid onto the stamp, ``S`` samples
the stamp bilinearly at the ray-traced positions, and ``P`` bins sub-pixels and convolves with
the PSF.  With Gaussian noise ``N = diag(sigma_i^2)`` and the prior ``w ~ N(0, I)``, ``w``
integrates out exactly (Woodbury; the "linear inversion" of pixelated-source lens modelling,
Suyu et al. 2006, here with a Gaussian prior of sd ``sigma * flux`` per grid value):

    log p(d, theta) = log p(theta) - 1/2 r^T N^-1 r + 1/2 b^T A^-1 b - 1/2 log det A
                      - 1/2 sum_i log(2 pi sigma_i^2),

    r = d - m0,   A = I + G^T N^-1 G,   b = G^T N^-1 r,

summed over the unmasked pixels.  ``-1/2 log det A`` is the Occam factor: a lens that lets the
correction fit many independent data pixels pays for each one the data constrain.  Because the
joint posterior in ``w`` is maximised and the marginal is not, a joint MAP over ``w`` (what
``fit_map`` does with a correction) can prefer a distant lens whose evidence is far lower
(docs/validation.md, section 3d).  ``G`` is assembled here as a sparse matrix (scipy) and
``A`` (``n^2 x n^2``, dense) is Cholesky-factored; the evidence for another ``sigma`` at the
same ``theta`` costs one more factorisation: that is how to choose ``sigma``.  Not
differentiable; about 5 s for the default 64 x 64 grid on one CPU thread (mostly forming
``G^T N^-1 G``; an eigen-decomposition, as :func:`correction_precision` does for the Laplace
approximation, takes ~25 s).

:func:`maximise_evidence` moves every other site to a maximum of this evidence (the search
on the marginal): L-BFGS on the exact value, with its gradient from the envelope theorem and a
stochastic trace of ``A^-1 dA``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import pyro
import scipy.linalg as sla
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from ..model import LensModel
from ..sources.models import PixelSource


@dataclass
class CorrectionEvidence:
    """The pixel correction of a VAE source integrated out at one set of the other sites.

    Attributes
    ----------
    log_evidence : float
        ``log p(d, theta)``, nats: the log posterior density (unnormalised, constrained space) of
        every site but the correction, with the correction integrated out, at the model's
        ``sigma``.  Compare lenses (modes) of one observation by this number.
    by_sigma : dict float -> float
        The same for other prior sds ``sigma`` of the correction (fractions of its ``flux``),
        ``theta`` held:
        the evidence for ``sigma`` (maximise it to set the correction's strength).
    log_det : float
        ``log det A``; the Occam factor is ``-log_det / 2``.
    n_constrained : float
        ``sum_k lam_k / (1 + lam_k)`` over the eigenvalues ``lam_k`` of ``G^T N^-1 G``: how many
        correction values the data determine (of ``n^2``).
    w_mean : Tensor (n^2,)
        Posterior mean of the whitened correction given ``theta`` (the joint MAP of ``w``).
    """

    log_evidence: float
    by_sigma: dict
    log_det: float
    n_constrained: float
    w_mean: torch.Tensor


def _psf_matrix(kernel: torch.Tensor, ny: int, nx: int) -> sp.csr_matrix:
    """The "valid" true convolution of :func:`difflens.instrument.convolve` with ``kernel`` as a
    sparse ``(ny nx, Hp Wp)`` matrix acting on the padded ``(ny + kh - 1, nx + kw - 1)`` image."""
    k = kernel.detach().cpu().double().numpy()[::-1, ::-1]          # convolution: flipped
    kh, kw = k.shape
    wp = nx + kw - 1
    ii, jj = np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij")
    rows = np.tile((ii * nx + jj).ravel(), kh * kw)
    cols = np.concatenate([((ii + a) * wp + jj + b).ravel() for a in range(kh)
                           for b in range(kw)])
    vals = np.repeat(k.ravel(), ny * nx)
    return sp.csr_matrix((vals, (rows, cols)), shape=(ny * nx, (ny + kh - 1) * wp))


def _binning_matrix(hp: int, wp: int, factor: int) -> sp.csr_matrix:
    """Mean over ``factor x factor`` sub-pixel blocks (:func:`difflens.instrument.bin_pixels`)
    as a sparse ``(hp wp / factor^2, hp wp)`` matrix."""
    ii, jj = np.meshgrid(np.arange(hp), np.arange(wp), indexing="ij")
    rows = ((ii // factor) * (wp // factor) + jj // factor).ravel()
    vals = np.full(hp * wp, 1.0 / factor ** 2)
    return sp.csr_matrix((vals, (rows, np.arange(hp * wp))),
                         shape=(hp * wp // factor ** 2, hp * wp))


def _sampling_matrix(bx, by, x0, y0, s, size: int) -> sp.csr_matrix:
    """Bilinear sampling of a ``size x size`` stamp spanning ``[-s, s]`` about ``(x0, y0)`` at
    the source-plane positions ``bx, by`` (arcsec; zeros outside; the convention of
    :func:`difflens.sources.image.sample_image`) as a sparse ``(n_positions, size^2)`` matrix."""
    fx = ((bx.ravel() - x0) / s + 1.0) * size / 2.0 - 0.5          # stamp pixel coordinates
    fy = ((by.ravel() - y0) / s + 1.0) * size / 2.0 - 0.5
    ix, iy = np.floor(fx).astype(np.int64), np.floor(fy).astype(np.int64)
    tx, ty = fx - ix, fy - iy
    rows, cols, vals = [], [], []
    index = np.arange(fx.size)
    for dy, wy in ((0, 1.0 - ty), (1, ty)):
        for dx, wx in ((0, 1.0 - tx), (1, tx)):
            cx, cy = ix + dx, iy + dy
            inside = (cx >= 0) & (cx < size) & (cy >= 0) & (cy < size)
            rows.append(index[inside])
            cols.append((cy * size + cx)[inside])
            vals.append((wx * wy)[inside])
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(fx.size, size * size))


def _correction_matrix(corr, size: int) -> sp.csr_matrix:
    """:meth:`PixelCorrection.image` (smoothing, interpolation and scale; it is linear) as a
    sparse ``(size^2, n^2)`` matrix, made by applying it to each unit vector; for a gradient or
    curvature prior only the interpolation and scale of the grid values (the sine synthesis
    ``T``, dense, is applied by :func:`_gram`)."""
    basis = torch.eye(corr.size, dtype=torch.float64)
    if corr.spectral:
        out = corr.upsample(basis.reshape(corr.size, corr.pixels, corr.pixels), size)
    else:
        out = corr.image(basis, size)
    return sp.csr_matrix(out.reshape(corr.size, size * size).T.numpy())


def _synthesised(G, gram, corr):
    """Grid-space ``G`` and ``gram = G^T N^-1 G`` of a gradient or curvature prior, moved to the
    whitened values: ``(G T`` as a scipy LinearOperator, ``T^T gram T)``.  ``T = (Q1 x Q1)
    diag(a)`` acts on each of the four grid axes of ``gram`` in turn (``4 * 2 n^5`` operations,
    not the ``2 * 2 n^6`` of two dense products)."""
    S, a = (x.numpy() for x in corr.sine_basis(torch.zeros((), dtype=torch.float64)))
    n = corr.pixels

    def forward(w):                               # T w = Q1 (a * W) Q1
        return (S @ (a * w.reshape(n, n)) @ S).ravel()

    def adjoint(y):                               # T^T y = a * (Q1 Y Q1)
        return (a * (S @ y.reshape(n, n) @ S)).ravel()

    gram = 0.5 * (gram + gram.T)
    g = gram.reshape(n, n, n, n)
    for axis in range(4):                         # Q1 is symmetric: Q1 along each axis
        g = np.moveaxis(np.tensordot(S, g, axes=([1], [axis])), 0, axis)
    scale = a.ravel()
    gram = scale[:, None] * g.reshape(n * n, n * n) * scale[None, :]
    op = spla.LinearOperator(
        (G.shape[0], corr.size), dtype=np.float64,
        matvec=lambda w: G @ forward(np.asarray(w).ravel()),
        rmatvec=lambda y: adjoint(G.T @ np.asarray(y).ravel()))
    return op, 0.5 * (gram + gram.T)


def _conditioned(model: LensModel, values: dict):
    """The lens dict and the source of ``model`` at site ``values`` (no likelihood)."""
    with torch.no_grad():
        return pyro.poutine.condition(model._profiles, data=values)()[:2]


class _Response:
    """``G`` at any site values of one model, with the parts that do not depend on them (the
    PSF and binning matrix, the correction's interpolation for each stamp size; ~2 s of the
    ~2.5 s it takes to assemble ``G`` at 256 x 256 with a 15 x 15 PSF) built once."""

    def __init__(self, model: LensModel):
        self.model = model
        self.blur = None
        self.interpolation = {}

    def __call__(self, values: dict) -> sp.csr_matrix:
        """``G`` at site ``values``, sparse, on the grid values (for a gradient or curvature
        prior, before the sine synthesis of :func:`_synthesised`)."""
        model = self.model
        lens, source = _conditioned(model, values)
        sim, corr = model.simulator, model.priors.source_correction
        with torch.no_grad():
            bx, by = sim.ray_trace(lens)
        if corr.frame is not None:              # a grid fixed on the source plane
            (x0, y0, s), stamp = corr.frame, corr.pixels
        else:                                   # the VAE stamp's placement
            x0, y0, s = (float(getattr(source, k)) for k in ("x0", "y0", "s"))
            stamp = source.image.shape[-1]
        sample = _sampling_matrix(bx.cpu().double().numpy(), by.cpu().double().numpy(),
                                  x0, y0, s, stamp)
        if self.blur is None:
            hp, wp = bx.shape[-2:]
            self.blur = _psf_matrix(sim.psf, *sim.npix)
            if sim.supersample > 1:
                self.blur = self.blur @ _binning_matrix(hp, wp, sim.supersample)
        if stamp not in self.interpolation:
            self.interpolation[stamp] = _correction_matrix(corr, stamp)
        return self.blur @ (sample @ self.interpolation[stamp])


def correction_response(model: LensModel, values: dict):
    """``G``, the image of each whitened correction value at site ``values``: a sparse
    ``(ny nx, n^2)`` matrix with ``image(w) - image(0) = G w`` (image units per unit ``w``;
    rows in the row-major order of the image); for a gradient or curvature prior, whose ``G``
    is dense, a scipy ``LinearOperator``."""
    return _gram(model, values)[0]


def pixel_weights(model: LensModel) -> np.ndarray:
    """``1 / sigma_i^2`` per pixel of ``model``'s observation (0 where masked), flattened
    row-major, float64: the diagonal of ``N^-1``."""
    weight = torch.ones_like(model.data) / model.noise_sigma ** 2
    if model.mask is not None:
        weight = torch.where(model.mask, weight, torch.zeros_like(weight))
    return weight.cpu().double().numpy().ravel()


def _gram(model: LensModel, values: dict, response=None):
    """``(G, weight, G^T N^-1 G)``: the response, the pixel weights and the data's precision on
    the whitened correction (dense ``(n^2, n^2)``, symmetrised) at site ``values``
    (``response``: a :class:`_Response` of ``model`` to reuse)."""
    G = (response or _Response(model))(values)
    weight = pixel_weights(model)
    gram = (G.T @ sp.diags(weight) @ G).toarray()
    corr = model.priors.source_correction
    if corr.spectral:
        G, gram = _synthesised(G, gram, corr)
        return G, weight, gram
    return G, weight, 0.5 * (gram + gram.T)


def correction_precision(model: LensModel, values: dict):
    """The data's precision on the whitened correction at site ``values``, diagonalised.

    Returns ``(G, weight, lam, vec)``: the response ``G`` (:func:`correction_response`), the
    pixel weights ``N^-1`` (:func:`pixel_weights`) and the eigen-decomposition
    ``G^T N^-1 G = vec diag(lam) vec^T`` (``lam >= 0``).  The posterior precision of ``w`` given
    the other sites is ``A = I + G^T N^-1 G = vec diag(1 + lam) vec^T``.
    """
    G, weight, gram = _gram(model, values)
    lam, vec = np.linalg.eigh(gram)
    return G, weight, np.clip(lam, 0.0, None), vec          # round-off below zero clipped


def correction_evidence(model: LensModel, values: dict, sigmas=()) -> CorrectionEvidence:
    """Integrate the pixel correction out of ``model`` at the other sites' ``values``.

    Parameters
    ----------
    model : LensModel
        One observation (not stacked), a VAE source with a correction
        (``build_model(source_correction=...)``).
    values : dict
        Site values (e.g. ``fit.map.sample_sites()``); ``src_correction`` is ignored (it is
        integrated out).
    sigmas : sequence of float
        Further prior sds of the correction (fractions of its ``flux``) at which to report
        the evidence.

    Returns
    -------
    CorrectionEvidence

    Examples
    --------
    >>> ev = correction_evidence(fit.model, fit.map.sample_sites(),
    ...                          sigmas=(0.01, 0.02, 0.05))          # doctest: +SKIP
    >>> ev.log_evidence, max(ev.by_sigma, key=ev.by_sigma.get)   # doctest: +SKIP
    """
    return _integrate(model, values, sigmas)[0]


def _integrate(model: LensModel, values: dict, sigmas=(), *, response=None, inverse=True):
    """:func:`correction_evidence`, also returning ``S = L^-T`` (``A = L L^T``, Cholesky), a
    square root of the posterior covariance of ``w``: ``S S^T = A^-1``.  Cholesky factors and
    triangular inverses, ~(n^2)^3 / 3 operations each, instead of an eigen-decomposition
    (~9 (n^2)^3), plus one factorisation per further ``sigma``.  With ``inverse=False`` the
    triangular inverse is skipped: the second value is ``L`` itself and ``n_constrained`` is
    NaN (``response``: a :class:`_Response` of ``model`` to reuse)."""
    corr = model.priors.source_correction
    if corr is None:
        raise ValueError("the model has no source correction to integrate out "
                         "(build_model(source_correction=...))")
    if model.data.ndim != 2:
        raise ValueError("correction_evidence takes one observation, not a stacked model")
    sigmas = [float(s) for s in sigmas]
    if any(not (math.isfinite(s) and s > 0) for s in sigmas):
        raise ValueError(f"sigmas must be positive numbers (fractions of the flux), got {sigmas}")
    values = {k: model.tensor(v).detach() for k, v in values.items()}
    values["src_correction"] = model.tensor(torch.zeros(corr.size))
    if any(v.ndim > (1 if k in ("z", "src_correction") else 0) for k, v in values.items()):
        raise ValueError("correction_evidence takes one set of site values, no batch")

    # one pass: the image without correction, m0, and log p(theta), every site's prior but the
    # correction's (model.predict samples every site and has no likelihood)
    with torch.no_grad():
        trace = pyro.poutine.trace(pyro.poutine.condition(model.predict, data=values)).get_trace()
        trace.compute_log_prob()
    m0 = trace.nodes["_RETURN"]["value"]
    log_prior = sum(float(site["log_prob_sum"]) for name, site in trace.nodes.items()
                    if site["type"] == "sample" and name != "src_correction")
    r = (model.data - m0).cpu().double().numpy().ravel()
    G, weight, gram = _gram(model, values, response)
    b = G.T @ (weight * r)

    used = weight > 0
    norm = -0.5 * float(np.log(2.0 * math.pi / weight[used]).sum())
    chi2 = float((weight * r * r).sum())

    def solve(c):
        """At ``sigma = c * corr.sigma`` (G -> c G, so A -> I + c^2 gram and b -> c b): the log
        evidence, log det A and the Cholesky factor L of A."""
        L = sla.cholesky(np.eye(len(b)) + c * c * gram, lower=True)
        y = sla.solve_triangular(L, c * b, lower=True)           # b^T A^-1 b = |L^-1 b|^2
        log_det = 2.0 * float(np.log(np.diag(L)).sum())
        value = log_prior + norm - 0.5 * chi2 + 0.5 * float(y @ y) - 0.5 * log_det
        return value, log_det, L, y

    value, log_det, L, y = solve(1.0)
    by_sigma = {s: value if s == corr.sigma else solve(s / corr.sigma)[0] for s in sigmas}
    if not inverse:
        w_mean = model.tensor(torch.from_numpy(sla.solve_triangular(L, y, lower=True,
                                                                    trans="T")))
        return CorrectionEvidence(log_evidence=value, by_sigma=by_sigma, log_det=log_det,
                                  n_constrained=math.nan, w_mean=w_mean), L
    inverse, info = sla.lapack.dtrtri(L, lower=1)                 # L^-1
    if info != 0:
        raise np.linalg.LinAlgError(f"the correction's precision is singular (dtrtri {info})")
    root = np.ascontiguousarray(inverse.T)                         # S = L^-T, S S^T = A^-1
    w_mean = model.tensor(torch.from_numpy(root @ y))              # A^-1 b = L^-T L^-1 b
    ev = CorrectionEvidence(log_evidence=value, by_sigma=by_sigma, log_det=log_det,
                            n_constrained=float(len(b) - np.square(inverse).sum()),
                            w_mean=w_mean)
    return ev, root


def correction_images(model: LensModel, values: dict, w: torch.Tensor) -> torch.Tensor:
    """``G(theta) w``: the observed image of whitened corrections ``w`` alone, through the lens
    and source placement of site ``values`` (one set, or a leading batch of 1), differentiable
    in ``values``.

    Parameters
    ----------
    model : LensModel
        A VAE source with a correction.
    values : dict
        Site values (lens, ``src_x0, src_y0, src_s``; the latent and the correction site are
        not used).
    w : Tensor (K, n^2)
        Whitened correction values, one set per row.

    Returns
    -------
    Tensor (K, ny, nx)
        Image units (PSF-convolved, binned): row ``k`` is ``G w_k``.
    """
    lens, source = pyro.poutine.condition(model._profiles, data=values)()[:2]
    alone = model.correction_source(w, source if isinstance(source, PixelSource) else None)
    return model.simulator.image(lens, alone).reshape(w.shape[0], *model.data.shape)


@dataclass
class EvidenceMaximum:
    """Outcome of :func:`maximise_evidence`.

    Attributes
    ----------
    values : dict
        Every site at the maximum: the lens, source and lens-light sites maximise the evidence
        (the correction integrated out); ``src_correction`` is the posterior mean of the
        correction given them.
    log_evidence : float
        ``log p(d, theta)`` at ``values``, nats (as :attr:`CorrectionEvidence.log_evidence`).
    history : list of float
        The exact log evidence at every point the search evaluated, the start first.
    restarts : int
        How many times L-BFGS was restarted (with fresh curvature and fresh probes).
    evidence : CorrectionEvidence
        The correction integrated out at ``values``.
    seconds : float
        Wall time.
    """

    values: dict
    log_evidence: float
    history: list
    restarts: int
    evidence: CorrectionEvidence
    seconds: float


class _Marginal:
    """Minus the log evidence over the flat unconstrained sites of ``model`` without the
    correction (rows ``theta`` of shape (1, D - n^2)), with its gradient.

    The value is exact (:func:`_integrate`).  The gradient follows from the two terms of
    ``log p(d, theta) = max_w log p(d, theta, w) - 1/2 log det A(theta) + const``: the first
    differentiates at ``w`` held at its optimum, the posterior mean ``w*`` (envelope theorem),
    and ``d log det A = tr(A^-1 dA)``, where ``tr(A^-1 G^T N^-1 G) = E ||N^-1/2 G v||^2`` for
    ``v ~ N(0, A^-1)`` (Hutchinson): ``v = S eps`` with ``probes`` fixed draws ``eps`` and ``S``
    the square root at ``theta``, differentiated with ``v`` held.  So ``-grad`` is the
    autograd gradient of ``-log p(d, theta, w*) + 1/2 c sum_k ||N^-1/2 G(theta) v_k||^2``,
    unbiased, and exact with ``probes=None`` (every column of ``S``)."""

    def __init__(self, model, probes, generator):
        from .hmc import FlatSites

        self.model, self.probes, self.generator = model, probes, generator
        self.space = FlatSites(model)
        self.potential = self.space.potential(model, jacobian=False)
        self.weight = model.tensor(torch.from_numpy(pixel_weights(model))).reshape(
            model.data.shape)
        where = self.space.names.index("src_correction")
        self.first = sum(self.space.sizes[:where])
        self.n = self.space.sizes[where]
        self.eps = None
        self.response = _Response(model)

    def split(self, values):
        """Site ``values`` -> the row ``theta`` (1, D - n^2)."""
        u = self.space.flatten({k: self.model.tensor(v).detach() for k, v in values.items()
                                if k != "src_correction"}
                               | {"src_correction": self.model.tensor(torch.zeros(self.n))})[None]
        return torch.cat([u[:, :self.first], u[:, self.first + self.n:]], 1)

    def join(self, theta, w):
        """Row ``theta`` and whitened correction ``w`` (n^2,) -> a full row (1, D)."""
        return torch.cat([theta[:, :self.first], w[None], theta[:, self.first:]], 1)

    def values(self, theta):
        """Row ``theta`` -> its constrained site values (the correction at zero: unused)."""
        from .map import _row_values

        zeros = self.model.tensor(torch.zeros(self.n))
        return _row_values(self.space, self.join(theta.detach(), zeros)[0])

    def whitening(self, theta):
        """``F`` (K, K) with ``F F^T`` the inverse Hessian of the joint potential at ``theta``
        and ``w*``, the correction integrated out of the Gaussian (Schur complement, as
        :func:`difflens.infer.sample_laplace` does; the curvature of ``log det A`` left out):
        the search runs in ``eta`` with ``theta = theta_0 + F eta``, where the Hessian is ~I
        (in ``theta`` the data pin the lens to ~1e-3 while the latent keeps its prior width:
        condition numbers ~1e7, on which L-BFGS crawls).  ``2 K`` gradients of the model."""
        from .mcmc import _grad_fn, _laplace_factor

        ev, L = _integrate(self.model, self.values(theta), response=self.response,
                           inverse=False)
        u0 = self.join(theta.detach(), ev.w_mean)[0]
        block = torch.zeros_like(u0, dtype=torch.bool)
        block[self.first:self.first + self.n] = True

        def solve(v):                          # A^-1 v, A = L L^T
            x = sla.cho_solve((L, True), v.detach().cpu().double().numpy())
            return torch.as_tensor(x, dtype=v.dtype, device=v.device)

        return _laplace_factor(_grad_fn(self.potential), u0, passes=0,
                               integrate_out=(block, solve))[0]

    def redraw(self):
        """Fresh probe directions ``eps`` (kept until the next redraw)."""
        if self.probes is not None:
            self.eps = torch.randn(self.n, self.probes, generator=self.generator,
                                   dtype=torch.float64).numpy()

    def __call__(self, theta):
        """(minus the log evidence, its gradient, the site values, the CorrectionEvidence)."""
        values = self.values(theta)
        if self.probes is None:
            (ev, P), c = _integrate(self.model, values, response=self.response), 1.0
        else:                                  # S eps = L^-T eps: one triangular solve
            ev, L = _integrate(self.model, values, response=self.response, inverse=False)
            P = sla.solve_triangular(L, self.eps, lower=True, trans="T")
            c = 1.0 / self.probes
        P = self.model.tensor(torch.from_numpy(np.ascontiguousarray(P.T)))      # (K, n^2)
        x = theta.detach().clone().requires_grad_(True)
        u = self.join(x, ev.w_mean.detach())
        Gv = correction_images(self.model, self.space.constrained(u), P)
        surrogate = self.potential(u).sum() + 0.5 * c * (self.weight * Gv * Gv).sum()
        (grad,) = torch.autograd.grad(surrogate, x)
        return -ev.log_evidence, grad, dict(values, src_correction=ev.w_mean), ev


def maximise_evidence(model: LensModel, values: dict, *, probes=32, max_eval=200, tol=0.1,
                      seed=0, progress=True) -> EvidenceMaximum:
    """Maximise the evidence of a corrected VAE source over every site but the correction.

    The correction ``w`` integrated out (:func:`correction_evidence`), the log posterior of
    the other sites ``theta`` (lens, latent, source placement and amplitude, lens light),

        log p(d, theta) = max_w log p(d, theta, w) - 1/2 log det A(theta) + const,
        A = I + G^T N^-1 G,

    ranks the modes of a lens (docs/validation.md, section 3d), while the joint MAP maximises
    only the first term.  This runs L-BFGS (strong Wolfe line search) on it directly, in
    coordinates whitened by the Laplace curvature of the joint at the start, the correction
    integrated out (``2 K`` gradients for ``K`` other unconstrained values): every
    evaluation computes the exact evidence (a Cholesky factor of ``A``, ~2.5 s for a 256 x 256
    image and 64 x 64 values on one CPU thread) and its gradient -- the joint posterior's at ``w``
    held at its posterior mean ``w*(theta)`` (envelope theorem) plus ``-1/2 d log det A =
    -1/2 tr(A^-1 dA)``, estimated with ``probes`` draws ``v ~ N(0, A^-1)`` imaged through
    the lens (``tr(A^-1 G^T N^-1 G) = E ||N^-1/2 G v||^2``; cheap next to the factorisation).
    When a line search makes no progress, L-BFGS restarts with a fresh curvature history and
    fresh probes, while the last run gained more than ``tol`` and evaluations remain.

    Parameters
    ----------
    model : LensModel
        One observation with a corrected VAE source (``build_model(source_correction=)``).
    values : dict
        Start (e.g. a MAP's ``sample_sites()``, which maximises the joint posterior).
    probes : int or None
        Draws for the trace term of the gradient; None uses every column of a square root of
        ``A^-1`` (exact; ``n^2`` images per evaluation, for small grids).
    max_eval : int
        Most evaluations of the evidence (each one factorisation).
    tol : float
        Stop once an L-BFGS run gains less than this (nats).
    seed : int
        Seeds the probes.
    progress : bool
        Show a progress bar (evaluations, log evidence).

    Returns
    -------
    EvidenceMaximum

    Examples
    --------
    >>> fit = fit_lens(obs, source_correction=0.1, samples=0)                  # doctest: +SKIP
    >>> best = maximise_evidence(fit.model, fit.map.sample_sites())            # doctest: +SKIP
    >>> best.log_evidence - best.history[0], best.values["r_ein"]             # doctest: +SKIP
    """
    if not (isinstance(max_eval, int) and max_eval >= 1):
        raise ValueError(f"max_eval must be an integer >= 1, got {max_eval!r}")
    if probes is not None and not (isinstance(probes, int) and probes >= 1):
        raise ValueError(f"probes must be an integer >= 1 or None (exact), got {probes!r}")
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a number >= 0 (nats), got {tol!r}")
    clock = time.perf_counter()
    marginal = _Marginal(model, probes, torch.Generator().manual_seed(seed))
    origin = marginal.split(values)
    F = marginal.whitening(origin)
    eta = torch.zeros_like(origin).requires_grad_(True)      # theta = origin + eta F^T
    history, best = [], None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_eval, desc="evidence", leave=False)

    def closure():
        nonlocal best
        opt.zero_grad()
        try:
            value, grad, point, ev = marginal(origin + eta.detach() @ F.T)
        except np.linalg.LinAlgError:          # a lens so wild that A is not numerically SPD
            value, grad, point, ev = math.inf, torch.zeros_like(origin), None, None
        eta.grad = grad @ F
        history.append(-value)
        if ev is not None and (best is None or ev.log_evidence > best[1].log_evidence):
            best = (point, ev)
        if bar is not None:
            bar.update()
            bar.set_postfix(log_evidence=f"{best[1].log_evidence:.1f}")
        return torch.tensor(value, dtype=torch.float64)

    restarts = -1
    while len(history) < max_eval:
        done = len(history)
        last = max(history, default=-math.inf)
        marginal.redraw()
        opt = torch.optim.LBFGS([eta], max_iter=max_eval, max_eval=max_eval - done,
                                line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                                tolerance_change=1e-12, history_size=50)
        opt.step(closure)
        restarts += 1
        if best is None:
            raise ValueError("the correction's precision is singular at the start values")
        origin = marginal.split(best[0])      # restart from the best point seen
        with torch.no_grad():
            eta.zero_()
        if not max(history[done:], default=-math.inf) - last > tol:
            break
    if bar is not None:
        bar.close()
    evidence = _integrate(model, best[0], response=marginal.response)[0]    # n_constrained too
    return EvidenceMaximum(values=best[0], log_evidence=evidence.log_evidence, history=history,
                           restarts=max(restarts, 0), evidence=evidence,
                           seconds=time.perf_counter() - clock)
