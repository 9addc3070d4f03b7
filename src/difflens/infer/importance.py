"""Posteriors with several modes: importance sampling from Laplace approximations at each mode.

HMC chains cross between separated modes rarely, so the share of draws in each mode -- and every
posterior moment depending on it -- converges slowly (lens 3 of docs/real_data_studies.md: a second
basin entered and left every ~1000 draws).  Importance sampling does not need to cross:

* At each mode ``k`` (a MAP found from a start in that basin) the Laplace approximation
  ``N(m_k, L_k L_k^T)`` in Pyro's unconstrained space (:func:`~difflens.infer.mcmc.
  laplace_whitening`, one Newton step to the unconstrained mode, as
  :func:`~difflens.infer.sample_laplace`), widened to a multivariate Student-t with ``df``
  degrees of freedom and scale ``scale * L_k`` so its tails cover the posterior's.
* Proposal: the equal mixture ``g(x) = (1/K) sum_k g_k(x)``, ``N / K`` draws from each component
  (the deterministic-mixture estimator, Owen & Zhou 2000).
* Weights ``w = p(x) / g(x)``, ``p = exp(-U)`` the unnormalised posterior (the HMC potential,
  Jacobians included), Pareto-smoothed (PSIS, Vehtari et al. 2024): ``pareto_k`` < 0.7 says the
  estimates are reliable, above it the proposal misses part of the posterior and they are not.

Then ``Z = E_g[w]`` is the evidence (up to the likelihood's constant), and with each draw labelled
by the component most likely to have proposed it, ``Z_k = E_g[w 1_k]`` is the mass of basin
``k`` and ``Z_k / Z`` its posterior weight.  The Laplace evidence of each mode,
``-U(m_k) + D/2 log 2 pi + log |det L_k|``, is returned beside it as a cross-check.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from pyro.infer.autoguide.initialization import init_to_value

from .mcmc import Posterior, _laplace_mode, _posterior_from_draws


@dataclass
class ModeMixture:
    """Outcome of :func:`sample_modes`.

    Attributes
    ----------
    posterior : Posterior
        ``num_samples`` draws resampled by their smoothed weights (one "chain"; duplicates
        possible).  Its ``ess`` holds the importance-sampling effective sample size
        ``1 / sum w_i^2`` (normalised weights) for every parameter, its ``rhat`` NaN.
    pareto_k : float
        PSIS shape diagnostic of the weights: < 0.7 reliable, < 0.5 good.
    ess : float
        Importance-sampling effective sample size.
    log_evidence : float
        ``log Z``, the log of the posterior's normalisation (the model's log joint integrated
        over every sampled site), from the raw weights.
    mode_weights : ndarray (K,)
        Posterior mass of each mode's basin (sums to 1).
    mode_log_evidence : ndarray (K,)
        ``log Z_k`` of each basin (importance sampling).
    laplace_log_evidence : ndarray (K,)
        ``log Z_k`` of each basin from its Laplace approximation alone.
    mode_draws : ndarray (K,)
        Proposal draws labelled to each basin.
    labels : ndarray (N,)
        Basin of each resampled draw of ``posterior`` (same order).
    maps : list of dict
        Lens parameters at each mode, where the caller supplies them
        (:meth:`difflens.fitting.LensFit.sample_modes` does).
    """

    posterior: Posterior
    pareto_k: float
    ess: float
    log_evidence: float
    mode_weights: np.ndarray
    mode_log_evidence: np.ndarray
    laplace_log_evidence: np.ndarray
    mode_draws: np.ndarray
    labels: np.ndarray
    maps: list = field(default_factory=list)

    def summary(self) -> dict:
        """JSON-ready: diagnostics, evidence, and per mode its weight, evidences (importance
        sampling and Laplace), proposal draws and (where known) lens parameters at the mode."""
        modes = []
        for i in range(len(self.mode_weights)):
            mode = {"weight": float(self.mode_weights[i]),
                    "log_evidence": float(self.mode_log_evidence[i]),
                    "laplace_log_evidence": float(self.laplace_log_evidence[i]),
                    "proposal_draws": int(self.mode_draws[i])}
            if i < len(self.maps):
                mode["map"] = self.maps[i]
            modes.append(mode)
        return {"pareto_k": self.pareto_k, "ess": self.ess, "log_evidence": self.log_evidence,
                "reliable": bool(self.pareto_k < 0.7), "modes": modes}


def student_t_log_density(x, centre, factor, df=None):
    """Log density of a multivariate Student-t (or, with ``df=None``, a normal) at rows ``x``.

    ``x = centre + factor @ y``: ``log g = log c(df, D) - log |det factor| - (df + D)/2
    log(1 + |y|^2 / df)`` with ``log c = lgamma((df + D)/2) - lgamma(df/2) - D/2 log(df pi)``;
    the normal limit is ``-D/2 log(2 pi) - log |det factor| - |y|^2 / 2``.

    Parameters
    ----------
    x : Tensor (N, D)
    centre : Tensor (D,)
    factor : Tensor (D, D)
        Lower-triangular or not; any ``L`` with covariance (normal) or scale matrix (t)
        ``L L^T``.
    df : float or None

    Returns
    -------
    Tensor (N,)

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    >>> L = torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64))
    >>> ref = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64),
    ...                                              scale_tril=L).log_prob(x)
    >>> torch.allclose(student_t_log_density(x, torch.zeros(2, dtype=torch.float64), L), ref)
    True
    """
    d = x.shape[-1]
    y = torch.linalg.solve(factor, (x - centre).T).T
    r2 = (y * y).sum(-1)
    logdet = torch.linalg.slogdet(factor)[1]
    if df is None:
        return -0.5 * d * math.log(2 * math.pi) - logdet - 0.5 * r2
    const = math.lgamma(0.5 * (df + d)) - math.lgamma(0.5 * df) - 0.5 * d * math.log(df * math.pi)
    return const - logdet - 0.5 * (df + d) * torch.log1p(r2 / df)


def mixture_importance(potential, centres, factors, num_samples=4000, *, df=5.0, scale=1.0,
                       seed=0, chunk=64):
    """Importance sampling of ``exp(-potential)`` from an equal mixture of Student-t components.

    Parameters
    ----------
    potential : callable
        ``(N, D) -> (N,)``, the negative log of the unnormalised density (batched).
    centres : list of Tensor (D,)
        One per mode.
    factors : list of Tensor (D, D)
        Scale factors ``L_k`` (e.g. the Laplace ``L`` with ``L L^T`` the inverse Hessian).
    num_samples : int
        Proposal draws in all, split evenly over the components.
    df : float or None
        Degrees of freedom of the components (None: normal components).
    scale : float
        Each component's scale matrix is ``(scale L_k)(scale L_k)^T``.
    seed : int
    chunk : int
        Rows per ``potential`` call.

    Returns
    -------
    draws : Tensor (N, D)
    log_w : ndarray (N,)
        Raw log weights ``-U(x) - log g(x)`` (-inf where the potential is not finite).
    labels : ndarray (N,)
        Index of the component with the highest density at each draw.
    """
    k = len(centres)
    if k < 1 or len(factors) != k:
        raise ValueError(f"need one factor per centre, got {len(centres)} centres and "
                         f"{len(factors)} factors")
    if num_samples < 2 * k:
        raise ValueError(f"num_samples must be >= 2 per mode, got {num_samples} for {k} modes")
    if not scale > 0 or (df is not None and not df > 0):
        raise ValueError(f"scale and df must be > 0, got scale={scale}, df={df}")
    c0 = centres[0]
    gen = torch.Generator(device=c0.device).manual_seed(seed)
    counts = [num_samples // k + (i < num_samples % k) for i in range(k)]
    draws = []
    for centre, factor, n in zip(centres, factors, counts):
        y = torch.randn((n, c0.numel()), generator=gen, dtype=c0.dtype, device=c0.device)
        if df is not None:
            chi2 = 2.0 * torch._standard_gamma(torch.full((n, 1), 0.5 * df, dtype=c0.dtype,
                                                          device=c0.device), generator=gen)
            y = y / torch.sqrt(chi2 / df)
        draws.append(centre + (y @ (scale * factor).T))
    draws = torch.cat(draws)
    log_g = torch.stack([student_t_log_density(draws, c, scale * f, df)
                         for c, f in zip(centres, factors)])               # (K, N)
    labels = log_g.argmax(0).cpu().numpy()
    log_g = torch.logsumexp(log_g, 0) - math.log(k)
    with torch.no_grad():
        u = torch.cat([potential(rows) for rows in torch.split(draws, chunk)])
    log_p = torch.where(torch.isfinite(u), -u, torch.full_like(u, -math.inf))
    return draws, (log_p - log_g).double().cpu().numpy(), labels


def sample_modes(model, inits, *, num_samples=4000, df=5.0, scale=1.2, seed=0,
                 chunk=64) -> ModeMixture:
    """Posterior of ``model`` with several modes, by importance sampling (module doc).

    Parameters
    ----------
    model : LensModel
        Without a pixelated source correction (its thousands of values are not importance
        sampled).
    inits : list of dict
        Site values at each mode (``MAPResult.sample_sites()`` of MAP fits started in each
        basin), at least one.
    num_samples : int
        Proposal draws in all (split evenly over the modes); the resampled posterior has as many.
    df, scale : float
        Student-t degrees of freedom (None: normal) and widening of each Laplace component.
    seed : int
    chunk : int
        Parameter sets per batched likelihood call.

    Returns
    -------
    ModeMixture
        ``pareto_k`` says whether to trust it (< 0.7).

    Examples
    --------
    >>> mix = sample_modes(model, [fit_a.sample_sites(), fit_b.sample_sites()])  # doctest: +SKIP
    >>> mix.pareto_k, mix.mode_weights, mix.posterior.summary()["theta_E"]       # doctest: +SKIP
    """
    import arviz as az

    from .hmc import FlatSites

    if not inits:
        raise ValueError("sample_modes needs the site values of at least one mode")
    if model.priors.source_correction is not None:
        raise ValueError("sample_modes does not take a model with a pixelated source "
                         "correction; use sample_laplace, which integrates it out")
    spaces = [FlatSites(model, init_strategy=init_to_value(values=init)) for init in inits]
    space = spaces[0]
    if any(s.names != space.names for s in spaces[1:]):
        raise ValueError("every init must give the same sites")
    potential = space.potential(model)
    centres, factors, laplace = [], [], []
    for s in spaces:
        centre, factor, _ = _laplace_mode(potential, s.start)
        with torch.no_grad():
            u0 = float(potential(centre[None])[0])
        centres.append(centre)
        factors.append(factor)
        laplace.append(-u0 + 0.5 * centre.numel() * math.log(2 * math.pi)
                       + float(torch.linalg.slogdet(factor)[1]))
    draws, log_w, labels = mixture_importance(potential, centres, factors, num_samples, df=df,
                                              scale=scale, seed=seed, chunk=chunk)
    if not np.isfinite(log_w).any():
        raise RuntimeError("no proposal draw has a finite posterior density; check the inits")
    smoothed, pareto_k = az.psislw(log_w.copy())
    w = np.exp(smoothed)
    w /= w.sum()
    ess = float(1.0 / np.sum(w ** 2))
    log_z = float(np.logaddexp.reduce(log_w) - math.log(len(log_w)))
    # basin masses from the raw weights (PSIS smooths only the largest, which shifts little)
    mode_log_z = np.array([np.logaddexp.reduce(log_w[labels == i]) - math.log(len(log_w))
                           if (labels == i).any() else -np.inf for i in range(len(inits))])
    rng = np.random.default_rng(seed)
    pick = _systematic_resample(w, num_samples, rng)
    with torch.no_grad():
        sites = space.constrained(draws[torch.as_tensor(pick, device=draws.device)])
    posterior = {n: v.detach().cpu().numpy().reshape(1, num_samples, *v.shape[1:])
                 for n, v in sites.items()}
    with warnings.catch_warnings():     # chain diagnostics mean nothing for resampled draws
        warnings.simplefilter("ignore", RuntimeWarning)
        post = _posterior_from_draws(model, inits[0], posterior, seed)
    post.ess = {k: ess for k in post.ess}
    post.rhat = {k: float("nan") for k in post.rhat}
    return ModeMixture(post, float(pareto_k), ess, log_z, np.exp(mode_log_z - log_z),
                       mode_log_z, np.array(laplace), np.bincount(labels, minlength=len(inits)),
                       labels[pick])


def _systematic_resample(w, n, rng):
    """Indices of ``n`` draws resampled with probabilities ``w`` (systematic resampling: one
    uniform offset, so each index appears floor or ceil of ``n w_i`` times)."""
    positions = (rng.uniform() + np.arange(n)) / n
    return np.minimum(np.searchsorted(np.cumsum(w), positions), len(w) - 1)


def basin_log_ratios(potential, draws, labels, centres, factors, *, chunk=64, tol=1e-10,
                     max_iter=500):
    """Posterior mass of each basin relative to basin 0, from MCMC draws labelled by basin:
    warp bridge sampling (Meng & Schilling 2002) with the affine map between Gaussians.

    For chains that rarely cross between basins the share of draws in each basin is a poor
    estimate of its mass, but draws *within* each basin can still be used.  With ``T`` the map
    ``x -> c_j + F_j F_0^-1 (x - c_0)`` from basin 0 onto basin ``j``, the warped density
    ``q_j(x) = p(T x) |det F_j / det F_0|`` (restricted to ``T x`` in basin ``j``) has
    normalisation ``Z_j`` and overlaps basin 0's posterior wherever the Gaussians describe the
    basins alike.  The optimal bridge estimator of Meng & Wong (1996, eq. 4.1),

        r <- [mean_i l_i / (s_j l_i + s_0 r)] / [mean_k 1 / (s_j m_k + s_0 r)],

    with ``l_i = q_j(x_i) / p(x_i)`` at basin 0's draws and ``m_k = q_j(x'_k) / p(x'_k)`` at
    basin ``j``'s draws mapped back, ``x'_k = T^-1 y_k``, ``s`` the two basins' fractions of
    the draws, iterated to convergence, gives ``r = Z_j / Z_0``.  It is consistent for any
    map (better Gaussians only lower its variance) and is the quantity a mode-jumping chain
    (:func:`difflens.infer.hmc.hmc`, ``jumps``) would estimate through its jumps, without
    having to wait for them.  Its error comes from how well each basin's draws represent that
    basin: autocorrelated or unconverged chains give a biased ratio, so compare runs.

    Parameters
    ----------
    potential : callable
        ``(N, D) -> (N,)`` negative log posterior (batched), e.g. ``FlatSites.potential``.
    draws : Tensor (N, D)
        Posterior draws (all chains), in the coordinates of ``potential``.
    labels : Tensor or ndarray (N,)
        Basin of each draw, 0 .. K-1; every basin needs draws.
    centres, factors : Tensor (K, D), (K, D, D)
        A Gaussian per basin (e.g. the mean and Cholesky factor of its draws' covariance); a
        mapped point counts only if :func:`difflens.infer.hmc.basin_labels` puts it in the
        target basin.
    chunk : int
        Rows per ``potential`` call.

    Returns
    -------
    ndarray (K,)
        ``log(Z_k / Z_0)`` (0 for basin 0); ``softmax`` of it gives the basins' weights.

    Examples
    --------
    >>> log_r = basin_log_ratios(pot, x, labels, centres, factors)    # doctest: +SKIP
    >>> weights = np.exp(log_r - np.logaddexp.reduce(log_r))           # doctest: +SKIP
    """
    from .hmc import basin_labels, map_between_basins

    labels = torch.as_tensor(labels, device=draws.device)
    k = centres.shape[0]
    if draws.ndim != 2 or labels.shape != draws.shape[:1]:
        raise ValueError(f"draws must be (N, D) with one label each, got {tuple(draws.shape)} "
                         f"and {tuple(labels.shape)}")
    counts = [int((labels == b).sum()) for b in range(k)]
    if min(counts) == 0:
        raise ValueError(f"every basin needs draws; draws per basin: {counts}")
    logdet = torch.linalg.slogdet(factors)[1]

    def energies(x):
        with torch.no_grad():
            return torch.cat([potential(rows) for rows in torch.split(x, chunk)])

    out = np.zeros(k)
    x0 = draws[labels == 0]
    u0 = energies(x0)
    for j in range(1, k):
        xj = draws[labels == j]
        fwd = map_between_basins(x0, centres, factors, 0, j)
        back = map_between_basins(xj, centres, factors, j, 0)
        jac = float(logdet[j] - logdet[0])
        log_l = u0 - energies(fwd) + jac
        log_l = torch.where(basin_labels(fwd, centres, factors) == j, log_l,
                            torch.full_like(log_l, -math.inf))
        log_m = energies(back) - energies(xj) + jac
        log_m = torch.where(basin_labels(back, centres, factors) == 0, log_m,
                            torch.full_like(log_m, math.inf))
        log_l, log_m = (torch.nan_to_num(t.double(), nan=-math.inf).cpu() for t in (log_l, log_m))
        log_s0 = math.log(counts[0] / (counts[0] + counts[j]))
        log_sj = math.log(counts[j] / (counts[0] + counts[j]))
        log_r = 0.0
        for _ in range(max_iter):
            den_r = log_s0 + log_r
            num = torch.logsumexp(log_l - torch.logaddexp(log_sj + log_l,
                                                          torch.tensor(den_r)), 0)
            den = torch.logsumexp(-torch.logaddexp(log_sj + log_m, torch.tensor(den_r)), 0)
            new = float(num - den) - math.log(len(log_l)) + math.log(len(log_m))
            if not math.isfinite(new):
                raise RuntimeError(f"basins 0 and {j}: no mapped draw lands where the other "
                                   "basin's posterior is; give better Gaussians")
            done = abs(new - log_r) < tol
            log_r = new
            if done:
                break
        out[j] = log_r
    return out
