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
(docs/validation.md, section 3d).  ``G`` is assembled here as a sparse matrix (scipy) and the
``n^2 x n^2`` matrix ``G^T N^-1 G`` is diagonalised once, so the evidence for any ``sigma`` at
the same ``theta`` costs nothing more: that is how to choose ``sigma``.  Not differentiable;
about 25 s for the default 64 x 64 grid on one CPU thread (the eigendecomposition), 1-2 s for
32 x 32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyro
import scipy.sparse as sp
import torch

from ..model import LensModel


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
    sparse ``(size^2, n^2)`` matrix, made by applying it to each unit vector."""
    basis = torch.eye(corr.size, dtype=torch.float64)
    return sp.csr_matrix(corr.image(basis, size).reshape(corr.size, size * size).T.numpy())


def _conditioned(model: LensModel, values: dict):
    """The lens dict and the source of ``model`` at site ``values`` (no likelihood)."""
    with torch.no_grad():
        return pyro.poutine.condition(model._profiles, data=values)()[:2]


def correction_response(model: LensModel, values: dict) -> sp.csr_matrix:
    """``G``, the image of each whitened correction value at site ``values``: a sparse
    ``(ny nx, n^2)`` matrix with ``image(w) - image(0) = G w`` (image units per unit ``w``;
    rows in the row-major order of the image)."""
    lens, source = _conditioned(model, values)
    sim, corr = model.simulator, model.priors.source_correction
    with torch.no_grad():
        bx, by = sim.ray_trace(lens)
        stamp = model.source_stamp(values).shape[-1]
    p = {k: float(getattr(source, k)) for k in ("x0", "y0", "s")}
    sample = _sampling_matrix(bx.cpu().double().numpy(), by.cpu().double().numpy(),
                              p["x0"], p["y0"], p["s"], stamp)
    hp, wp = bx.shape[-2:]
    ny, nx = sim.npix
    blur = _psf_matrix(sim.psf, ny, nx)
    if sim.supersample > 1:
        blur = blur @ _binning_matrix(hp, wp, sim.supersample)
    return blur @ sample @ _correction_matrix(corr, stamp)


def pixel_weights(model: LensModel) -> np.ndarray:
    """``1 / sigma_i^2`` per pixel of ``model``'s observation (0 where masked), flattened
    row-major, float64: the diagonal of ``N^-1``."""
    weight = torch.ones_like(model.data) / model.noise_sigma ** 2
    if model.mask is not None:
        weight = torch.where(model.mask, weight, torch.zeros_like(weight))
    return weight.cpu().double().numpy().ravel()


def correction_precision(model: LensModel, values: dict):
    """The data's precision on the whitened correction at site ``values``, diagonalised.

    Returns ``(G, weight, lam, vec)``: the response ``G`` (:func:`correction_response`), the
    pixel weights ``N^-1`` (:func:`pixel_weights`) and the eigen-decomposition
    ``G^T N^-1 G = vec diag(lam) vec^T`` (``lam >= 0``).  The posterior precision of ``w`` given
    the other sites is ``A = I + G^T N^-1 G = vec diag(1 + lam) vec^T``.
    """
    G = correction_response(model, values)
    weight = pixel_weights(model)
    gram = (G.T @ sp.diags(weight) @ G).toarray()
    lam, vec = np.linalg.eigh(0.5 * (gram + gram.T))
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
    corr = model.priors.source_correction
    if corr is None:
        raise ValueError("the model has no source correction to integrate out "
                         "(build_model(source_correction=...))")
    if model.data.ndim != 2:
        raise ValueError("correction_evidence takes one observation, not a stacked model")
    sigmas = [float(s) for s in sigmas]
    if any(not (math.isfinite(s) and s > 0) for s in sigmas):
        raise ValueError(f"sigmas must be positive numbers (fractions of the flux), got {sigmas}")
    values = {k: model.tensor(v) for k, v in values.items()}
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
    G, weight, lam, vec = correction_precision(model, values)
    bt = vec.T @ (G.T @ (weight * r))

    used = weight > 0
    norm = -0.5 * float(np.log(2.0 * math.pi / weight[used]).sum())
    chi2 = float((weight * r * r).sum())

    def log_evidence(c):
        """At ``sigma = c * corr.sigma``: G -> c G, so A -> I + c^2 gram and b -> c b."""
        fitted = float((c * c * bt * bt / (1.0 + c * c * lam)).sum())
        return (log_prior + norm - 0.5 * chi2 + 0.5 * fitted
                - 0.5 * float(np.log1p(c * c * lam).sum()))

    by_sigma = {s: log_evidence(s / corr.sigma) for s in sigmas}
    w_mean = model.tensor(torch.from_numpy(vec @ (bt / (1.0 + lam))))
    return CorrectionEvidence(log_evidence=log_evidence(1.0), by_sigma=by_sigma,
                              log_det=float(np.log1p(lam).sum()),
                              n_constrained=float((lam / (1.0 + lam)).sum()), w_mean=w_mean)
