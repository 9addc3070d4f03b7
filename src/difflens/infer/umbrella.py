"""Umbrella sampling along one slow coordinate, reweighted by MBAR.

Some lens posteriors have one direction that HMC chains cross only by a slow random walk: lens 3
of docs/real_data_studies.md wanders along a long, curved ellipticity-shear ridge (q 0.4-0.85)
and needs thousands of draws per traversal, so no run gets a converged share of the ridge's
ends.  Umbrella sampling (Torrie & Valleau 1977) cuts that direction into windows: chain ``c``
samples the posterior times a harmonic restraint on a scalar coordinate ``xi`` (e.g. ``q``),

    p_k(theta) ∝ p(theta) exp(-b_k(xi(theta))),    b_k(xi) = kappa (xi - c_k)^2 / 2,

centred on its window's ``c_k``.  Inside one window the ridge is short and the chains mix fast.
The windows overlap, and the multistate Bennett acceptance ratio (MBAR; Shirts & Chodera 2008,
the binless form of WHAM, Kumar et al. 1992) recovers the posterior itself: with ``N_k`` draws
from window ``k`` the free energies ``f_k = -log Z_k`` solve

    f_k = -log sum_n exp(-b_k(xi_n)) / sum_j N_j exp(f_j - b_j(xi_n)),

summed over the draws ``n`` of every window, and each draw's weight under the unrestrained
posterior is ``w_n ∝ 1 / sum_j N_j exp(f_j - b_j(xi_n))``.  Any posterior expectation is then a
weighted mean over all windows' draws, and ``-log`` of the weighted histogram of ``xi`` is the
posterior's profile along the coordinate (a barrier between basins shows there).

Draws in a chain are correlated; MBAR's point estimates do not mind, and the uncertainty of a
weighted mean comes from a block bootstrap over each chain (:func:`bootstrap_sd`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from pyro.infer.autoguide.initialization import init_to_value
from scipy.special import logsumexp

from ..model import ellipticity_to_q_phi
from .mcmc import (SUMMARISED, Posterior, _grad_fn, _pilot_draws, _posterior_from_draws,
                   _starting_points, laplace_whitening)


def checked_windows(centres, kappa=None):
    """Window centres as a float64 array (strictly increasing, finite, >= 2) and the restraint
    stiffness ``kappa`` (default ``1 / spacing^2``: each window's restraint alone has the
    smallest spacing as its sd).  Stiffer restraints overlap less: on the mixture of the tests,
    with 1000 independent draws per window, the error of a tail mass grows from 0.018 to 0.036
    as kappa goes from 1 to 4 / spacing^2; wider windows cost mixing inside each window."""
    centres = np.asarray(centres, dtype=np.float64)
    if centres.ndim != 1 or centres.size < 2 or not np.isfinite(centres).all():
        raise ValueError(f"centres must be >= 2 finite numbers, got {centres!r}")
    spacing = np.diff(centres)
    if not (spacing > 0).all():
        raise ValueError(f"centres must be strictly increasing, got {centres.tolist()}")
    if kappa is None:
        kappa = 1.0 / float(spacing.min()) ** 2
    if not (np.isfinite(kappa) and kappa > 0):
        raise ValueError(f"kappa (the restraint stiffness, 1 / coordinate^2) must be > 0, "
                         f"got {kappa}")
    return centres, float(kappa)


def umbrella_weights(xi, window, centres, kappa, *, tol=1e-10, max_iter=100, f0=None):
    """MBAR weights of umbrella draws under the unrestrained posterior (module doc).

    Parameters
    ----------
    xi : array (N,)
        The coordinate at every draw of every window, pooled.
    window : int array (N,)
        The window each draw came from (0 .. K-1).
    centres : array (K,)
        Window centres ``c_k`` (units of ``xi``).
    kappa : float
        Restraint stiffness (units of ``xi^-2``).
    tol : float
        Convergence: the largest error of the self-consistent equations, relative to each
        window's draws (solved by Newton's method on MBAR's convex objective).
    max_iter : int
        Newton steps at most.
    f0 : array (K,), optional
        Starting free energies (e.g. the full sample's, for bootstrap replicates).

    Returns
    -------
    log_w : ndarray (N,)
        Log weights, normalised (``logsumexp(log_w) = 0``).
    free_energy : ndarray (K,)
        ``f_k = -log Z_k + log Z_0``, the restrained windows' normalisations relative to the
        first (nats).
    """
    xi = np.asarray(xi, dtype=np.float64).ravel()
    window = np.asarray(window).ravel()
    centres = np.asarray(centres, dtype=np.float64)
    if xi.shape != window.shape:
        raise ValueError(f"xi and window must have one entry per draw, got {xi.shape} and "
                         f"{window.shape}")
    if not np.isfinite(xi).all():
        raise ValueError("the coordinate is not finite at some draws")
    counts = np.bincount(window, minlength=len(centres)).astype(np.float64)
    if len(counts) != len(centres) or (counts == 0).any():
        raise ValueError(f"every window needs draws: counts {counts.tolist()} for "
                         f"{len(centres)} centres")
    bias = 0.5 * kappa * (xi[:, None] - centres[None, :]) ** 2          # (N, K)
    log_n = np.log(counts)
    f = np.zeros(len(centres)) if f0 is None else np.array(f0, dtype=np.float64)
    f -= f[0]

    def objective(f):
        # MBAR's convex objective (Shirts & Chodera 2008, eq. C6): its stationary point is the
        # self-consistent equation of the module doc; gradient and Hessian in closed form
        log_mix = logsumexp(log_n + f - bias, axis=1)                    # (N,)
        p = np.exp(log_n + f - bias - log_mix[:, None])                  # (N, K), rows sum to 1
        return log_mix.sum() - counts @ f, p.sum(0) - counts, p

    value, grad, p = objective(f)
    for _ in range(max_iter):
        if np.max(np.abs(grad[1:] / counts[1:])) < tol:
            break
        hess = np.diag(p.sum(0)) - p.T @ p                               # f_0 = 0 held
        step = np.linalg.solve(hess[1:, 1:] + 1e-12 * np.eye(len(f) - 1), -grad[1:])
        t = 1.0
        while True:                                        # Newton with backtracking
            trial = f.copy()
            trial[1:] += t * step
            new_value, new_grad, new_p = objective(trial)
            if new_value <= value + 1e-4 * t * (grad[1:] @ step) or t < 1e-8:
                break
            t *= 0.5
        f, value, grad, p = trial, new_value, new_grad, new_p
    else:
        warnings.warn(f"MBAR did not converge to {tol} in {max_iter} Newton steps; do the "
                      "windows overlap?", RuntimeWarning, stacklevel=2)
    log_w = -logsumexp(log_n + f - bias, axis=1)
    return log_w - logsumexp(log_w), f


def bootstrap_sd(values, xi, window, centres, kappa, *, blocks=10, n_boot=200, seed=0,
                 f0=None):
    """Standard error of the MBAR-weighted mean of ``values`` by a moving-block bootstrap.

    ``values``, ``xi``: arrays (C, S), one row per chain; ``window`` (C,) each chain's window.
    Every replicate redraws each chain as ``blocks`` blocks of ``S // blocks`` consecutive
    draws at random starts (so autocorrelation shorter than a block is kept) and recomputes the
    weights, each replicate's MBAR starting from ``f0`` (the full sample's free energies;
    computed when not given).  Returns the replicates' sd (units of ``values``).
    """
    values, xi = np.asarray(values, dtype=np.float64), np.asarray(xi, dtype=np.float64)
    c, s = xi.shape
    length = max(1, s // blocks)
    rng = np.random.default_rng(seed)
    if f0 is None:
        _, f0 = umbrella_weights(xi, np.repeat(window, s), centres, kappa)
    means = []
    for _ in range(n_boot):
        starts = rng.integers(0, s - length + 1, size=(c, blocks))
        idx = (starts[..., None] + np.arange(length)).reshape(c, -1)
        x = np.take_along_axis(xi, idx, 1)
        v = np.take_along_axis(values, idx, 1)
        lw, _ = umbrella_weights(x, np.repeat(window, x.shape[1]), centres, kappa, tol=1e-8,
                                 f0=f0)
        means.append(float(np.sum(np.exp(lw) * v.ravel())))
    return float(np.std(means, ddof=1))


def umbrella_hmc(potential, u0, coordinate, centres, kappa, *, window=None, **hmc_kwargs):
    """HMC chains each restrained to one window of ``coordinate`` (module doc).

    Parameters
    ----------
    potential : callable
        ``(C, D) -> (C,)`` negative log posterior, chains independent.
    u0 : Tensor (C, D)
        Starting points.
    coordinate : callable
        ``(C, D) -> (C,)`` the restrained scalar (differentiable).
    centres : array (K,)
        Window centres; chain ``c`` samples window ``window[c]``.
    kappa : float
        Restraint stiffness (1 / coordinate^2).
    window : int array (C,), optional
        Default ``arange(C) // (C // K)``: consecutive chains share a window (C a multiple of K).
    **hmc_kwargs
        Passed to :func:`difflens.infer.hmc.hmc` (``num_samples``, ``warmup``, ``seed``,
        ``checkpoint``, ...); every chain adapts its own metric (``groups``): the posterior's
        shape changes along the coordinate.

    Returns
    -------
    draws : Tensor (C, S, D)
    xi : ndarray (C, S)
        The coordinate at every draw.
    window : ndarray (C,)
    stats : dict
        :func:`~difflens.infer.hmc.hmc`'s.
    """
    from .hmc import hmc

    centres, kappa = checked_windows(centres, kappa)
    c, k = u0.shape[0], len(centres)
    if window is None:
        if c % k:
            raise ValueError(f"{c} chains cannot be shared evenly by {k} windows")
        window = np.arange(c) // (c // k)
    window = np.asarray(window)
    if window.shape != (c,) or window.min() < 0 or window.max() >= k:
        raise ValueError(f"window must give each of the {c} chains a window in 0..{k - 1}")
    like = dict(dtype=u0.dtype, device=u0.device)
    target = torch.as_tensor(centres[window], **like)

    def restrained(u):
        return potential(u) + 0.5 * kappa * (coordinate(u) - target) ** 2

    groups = torch.arange(c, device=u0.device)
    draws, stats = hmc(restrained, u0, groups=groups, **hmc_kwargs)
    with torch.no_grad():
        xi = coordinate(draws.reshape(-1, draws.shape[-1])).reshape(draws.shape[:2])
    return draws, xi.cpu().numpy(), window, stats


@dataclass
class Umbrella:
    """Outcome of :func:`sample_umbrella`.

    Attributes
    ----------
    posterior : Posterior
        Draws resampled by their MBAR weights (one "chain"; duplicates possible): the
        unrestrained posterior.  Its ``ess`` holds the weights' effective sample size
        ``1 / sum w^2`` (an upper bound: the draws within a chain are correlated), its ``rhat``
        NaN; per-window diagnostics are ``window_rhat`` / ``window_ess``.
    windows : Posterior
        Every chain's restrained draws as sampled (chains x draws), for traces.
    coordinate : str
        The restrained quantity.
    centres : ndarray (K,)
    kappa : float
    xi : ndarray (C, S)
        The coordinate at every draw.
    window : ndarray (C,)
        Each chain's window.
    log_weights : ndarray (C, S)
        Normalised MBAR log weights of every draw.
    free_energy : ndarray (K,)
        ``-log Z_k + log Z_0`` of each restrained window (nats).
    window_rhat, window_ess : ndarray (K,)
        Worst split R-hat and lowest bulk ESS over the lens parameters and theta_E within each
        window's chains: whether each window converged (the reweighting is no better).
    theta_E_se : float
        Block-bootstrap standard error of the posterior mean of theta_E (arcsec).
    """

    posterior: Posterior
    windows: Posterior
    coordinate: str
    centres: np.ndarray
    kappa: float
    xi: np.ndarray
    window: np.ndarray
    log_weights: np.ndarray
    free_energy: np.ndarray
    window_rhat: np.ndarray
    window_ess: np.ndarray
    theta_E_se: float

    def profile(self, bins=30):
        """The posterior's profile along the coordinate: bin centres and ``-log p(xi)`` (nats,
        minimum 0; NaN where a bin holds no weight), from the weighted histogram of all
        draws."""
        edges = np.linspace(self.xi.min(), self.xi.max(), bins + 1)
        mass, _ = np.histogram(self.xi.ravel(), edges, weights=np.exp(self.log_weights.ravel()))
        with np.errstate(divide="ignore"):
            energy = -np.log(mass / np.diff(edges))
        energy[~np.isfinite(energy)] = np.nan
        return 0.5 * (edges[1:] + edges[:-1]), energy - np.nanmin(energy)

    def summary(self) -> dict:
        """JSON-ready: the windows, their free energies and diagnostics, the weights' ESS and
        the bootstrap error of theta_E's mean."""
        w = np.exp(self.log_weights)
        return {"coordinate": self.coordinate, "kappa": self.kappa,
                "centres": self.centres.tolist(), "free_energy": self.free_energy.tolist(),
                "window_rhat": self.window_rhat.tolist(), "window_ess": self.window_ess.tolist(),
                "draws_per_window": np.bincount(np.repeat(self.window, self.xi.shape[1]),
                                                minlength=len(self.centres)).tolist(),
                "ess": float(1.0 / np.sum(w ** 2)), "theta_E_se": self.theta_E_se,
                "converged": bool(np.all(self.window_rhat < 1.05))}


def _window_diagnostics(x):
    """Rank-normalised split R-hat and bulk ESS of one window's chains ``(C, S)``; a single
    chain is split into halves for R-hat (ArviZ gives NaN for one chain)."""
    import arviz as az

    halves = x if x.shape[0] > 1 else x[:, : x.shape[1] // 2 * 2].reshape(2, -1)
    return float(az.rhat(halves)), float(az.ess(x))


def coordinate_function(space, coordinate):
    """``theta (N, D) -> (N,)``: a scalar sampled site of ``space`` or ``"q"`` (the lens axis
    ratio, from e1 and e2), in constrained units."""
    scalar = [n for n, shape in zip(space.names, space.shapes) if tuple(shape) == ()]
    if coordinate == "q":
        if not {"e1", "e2"} <= set(space.names):
            raise ValueError("coordinate 'q' needs the lens ellipticity e1, e2 sampled")
        return lambda theta: ellipticity_to_q_phi(*(space.constrained(theta)[k]
                                                    for k in ("e1", "e2")))[0]
    if coordinate not in scalar:
        raise ValueError(f"coordinate must be 'q' or a scalar sampled site ({scalar}), got "
                         f"{coordinate!r}")
    return lambda theta: space.constrained(theta)[coordinate]


def sample_umbrella(model, init, centres, *, coordinate="q", kappa=None, num_samples=1000,
                    warmup=300, chains_per_window=1, pilot=None, seed=0, target_accept=0.8,
                    path_length=2.2, start_spread=0.3, progress=True, checkpoint=None,
                    bootstrap=200) -> Umbrella:
    """Posterior of ``model`` by umbrella sampling along ``coordinate`` (module doc).

    Parameters
    ----------
    model : LensModel
    init : dict
        Values of every sampled site (the MAP).
    centres : sequence of float
        Window centres along the coordinate, increasing, spanning where the posterior has mass
        (e.g. ``numpy.linspace(0.4, 0.85, 10)`` for q).
    coordinate : str
        ``"q"`` (default: the lens axis ratio) or any scalar sampled site (``"theta_E"``,
        ``"gamma"``, ``"g1"``...), constrained units.
    kappa : float, optional
        Restraint stiffness (1 / coordinate^2); default ``1 / spacing^2`` (:func:`checked_windows`).
    num_samples, warmup : int
        Per chain.
    chains_per_window : int
        >= 2 gives each window's R-hat between chains as well as within them.
    pilot : Posterior, arviz.InferenceData or path, optional
        Draws of an earlier run (unconverged is fine): each chain starts at one of the 20 pilot
        draws whose coordinate lies nearest its window's centre.  Without it the chains start
        around ``init`` and warm-up pulls each into its window.  Either way the sampler is
        whitened by the Laplace approximation at ``init`` and each chain adapts its own dense
        metric in warm-up.
    seed, target_accept, path_length, start_spread, progress, checkpoint
        As in :func:`difflens.infer.sample_posterior`.
    bootstrap : int
        Replicates for ``theta_E_se`` (0: skip).

    Returns
    -------
    Umbrella

    Examples
    --------
    >>> u = sample_umbrella(model, fit.sample_sites(), numpy.linspace(0.4, 0.85, 10))  # doctest: +SKIP
    >>> u.posterior.summary()["theta_E"], u.theta_E_se, u.profile()                    # doctest: +SKIP
    """
    import arviz as az

    from .hmc import FlatSites
    from .importance import _systematic_resample

    centres, kappa = checked_windows(centres, kappa)
    if chains_per_window < 1 or num_samples < 2:
        raise ValueError("chains_per_window must be >= 1 and num_samples >= 2")
    space = FlatSites(model, init_strategy=init_to_value(values=init))
    missing = sorted(set(space.names) - set(init))
    if missing:
        raise ValueError(f"init lacks sampled sites {missing}; pass MAPResult.sample_sites()")
    xi_of = coordinate_function(space, coordinate)
    flat0 = space.start
    d, k = flat0.numel(), len(centres)
    chains = k * chains_per_window
    window = np.arange(chains) // chains_per_window
    potential = space.potential(model)
    # the Laplace whitening at init, every chain then adapting its own metric in warm-up: a
    # window is a short stretch of the posterior, and a pilot's covariance spans all of it (on
    # lens 3 warm-up's step fell to 0.013 whitened by the pilot, against 0.033-0.047)
    factor = laplace_whitening(_grad_fn(potential), flat0)
    if pilot is None:
        u0 = _starting_points(chains, d, start_spread, seed, flat0)
    else:
        pooled = _pilot_draws(space, pilot, min_draws_per_dim=0).reshape(-1, d).to(flat0)
        with torch.no_grad():
            xi_pilot = xi_of(pooled).cpu().numpy()
        rng = np.random.default_rng(seed)
        picks = []
        for c in range(chains):       # among the 20 nearest draws, so a window's chains differ
            near = np.argsort(np.abs(xi_pilot - centres[window[c]]))[:20]
            picks.append(int(rng.choice(near)))
        u0 = torch.linalg.solve(factor, (pooled[picks] - flat0).T).T        # L is not triangular

    def to_theta(u):
        return flat0 + u @ factor.T

    draws, xi, window, stats = umbrella_hmc(
        lambda u: potential(to_theta(u)), u0, lambda u: xi_of(to_theta(u)), centres, kappa,
        window=window, num_samples=num_samples, warmup=warmup, seed=seed,
        target_accept=target_accept, path_length=path_length, progress=progress,
        checkpoint=checkpoint)
    with torch.no_grad():
        sites = space.constrained(to_theta(draws.reshape(-1, d)))
    raw = {n: v.detach().cpu().numpy().reshape(chains, num_samples, *v.shape[1:])
           for n, v in sites.items()}
    with warnings.catch_warnings():          # a restrained chain is not the posterior
        warnings.simplefilter("ignore", RuntimeWarning)
        windows = _posterior_from_draws(model, init, raw, seed)
    windows.seconds = dict(stats.get("seconds", {}))
    log_w, free = umbrella_weights(xi, np.repeat(window, num_samples), centres, kappa)
    log_w = log_w.reshape(chains, num_samples)
    post = windows.idata.posterior
    rhat, ess = np.zeros(k), np.zeros(k)
    for j in range(k):
        mine = window == j
        per = [_window_diagnostics(post[n].values[mine])
               for n in SUMMARISED if np.ptp(post[n].values) > 0]
        rhat[j], ess[j] = max(r for r, _ in per), min(e for _, e in per)
    theta_e = post["theta_E"].values
    se = (bootstrap_sd(theta_e, xi, window, centres, kappa, n_boot=bootstrap, seed=seed,
                       f0=free)
          if bootstrap else float("nan"))
    w = np.exp(log_w.ravel())
    n = chains * num_samples
    pick = _systematic_resample(w / w.sum(), n, np.random.default_rng(seed))
    resampled = {name: np.asarray(post[name].values).reshape(n, *post[name].shape[2:])[pick][None]
                 for name in post.data_vars}
    posterior = Posterior(az.from_dict(posterior=resampled),
                          rhat={k_: float("nan") for k_ in windows.rhat},
                          ess={k_: float(1.0 / np.sum((w / w.sum()) ** 2)) for k_ in windows.ess})
    posterior.seconds = windows.seconds
    return Umbrella(posterior, windows, coordinate, centres, kappa, xi, window, log_w, free,
                    rhat, ess, se)
