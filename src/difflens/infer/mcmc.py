"""Posterior sampling started at the MAP (paper Sec. 5.3): vectorised HMC or Pyro's NUTS.

Both run in coordinates whitened by the Laplace approximation at the MAP (``theta = theta_MAP +
L u`` in Pyro's unconstrained space, ``L L^T`` the inverse Hessian there), where the posterior is
close to N(0, I): step sizes are O(1) and trajectories short.  Chains start slightly overdispersed
around the MAP.  The default sampler (:func:`difflens.infer.hmc.hmc`) moves all chains at once
through one batched likelihood; ``method="nuts"`` runs Pyro's NUTS chain after chain.  Samples are
returned as ArviZ ``InferenceData`` (chains x draws), with the derived lens ``q``, ``phi`` and
``theta_E`` added, and R-hat / bulk ESS computed for every lens parameter.  A warning is issued when
R-hat > 1.01 or ESS < 100 (Vehtari et al. 2021).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide.initialization import init_to_value

from ..model import LensModel, ellipticity_to_q_phi, unwrap_angle
from ..simulate import LENS_PARAMS

#: Parameters summarised and diagnosed: the lens, plus lenstronomy's theta_E = sqrt(q) r_ein.
SUMMARISED = LENS_PARAMS + ("theta_E",)


@dataclass
class Posterior:
    """Posterior samples and diagnostics.

    Attributes
    ----------
    idata : arviz.InferenceData
        ``posterior`` group with every sampled site plus ``q`` and ``phi``.
    rhat, ess : dict of str -> float
        Per lens parameter (and ``theta_E``).
    seconds : dict
        Wall time of the sampler's ``warmup`` and ``sampling`` phases (HMC; for a batch of
        lenses the batch's times, shared by all of them).
    tempering : dict
        After parallel tempering (``sample_posterior(tempering=)``): ``betas`` (the inverse
        temperatures), ``swap_accept`` (mean acceptance of the exchanges between levels k and
        k + 1, one per pair) and ``round_trips`` (walkers' journeys cold -> hottest -> cold,
        all ladders together; few means the hot levels' crossings do not reach the posterior).
        Empty otherwise.

    Examples
    --------
    >>> post = sample_posterior(model, result.sample_sites())              # doctest: +SKIP
    >>> post.rhat["r_ein"], post.ess["r_ein"], post.interval("r_ein", 0.68)   # doctest: +SKIP
    >>> post.idata.to_netcdf("posterior.nc")                                # doctest: +SKIP
    """

    idata: object
    rhat: dict
    ess: dict
    seconds: dict = field(default_factory=dict)
    tempering: dict = field(default_factory=dict)

    def summary(self, hdi_prob=0.94) -> dict:
        """Mean, sd and HDI of each lens parameter and ``theta_E`` (arcsec), with R-hat and ESS."""
        import arviz as az

        out = {}
        for k in SUMMARISED:
            x = self.idata.posterior[k].values
            lo, hi = az.hdi(x.reshape(-1), hdi_prob=hdi_prob)
            out[k] = dict(mean=float(x.mean()), sd=float(x.std()), hdi_low=float(lo),
                          hdi_high=float(hi), r_hat=self.rhat[k], ess_bulk=self.ess[k])
        return out

    def interval(self, name, prob=0.95):
        """Central credible interval of one parameter."""
        x = self.idata.posterior[name].values.reshape(-1)
        return tuple(np.quantile(x, [(1 - prob) / 2, (1 + prob) / 2]))


def laplace_whitening(grad_fn, flat0, rel_step=1e-5, min_curvature=1e-2, chunk=16, passes=2,
                      secant_step=0.5, integrate_out=None):
    """A square root L (``L L^T = H^-1``) of the inverse Hessian of the potential at ``flat0``.

    First the Hessian from central differences of autograd gradients with a tiny step (2 D
    evaluations, ``chunk`` of them per batched call; no second derivatives needed), symmetrised,
    its eigenvalues replaced by their absolute values (a MAP slightly off the optimum can leave
    negative ones) floored at ``min_curvature``.  That is the curvature at one point; with
    bilinear source pixels and a ReLU decoder the gradient has kinks, and on real lenses the
    curvature also varies within one posterior width, so the point curvature can be wrong by
    factors of 30 in either direction.  So ``passes`` more
    rounds re-measure it as a secant over ``secant_step`` posterior standard deviations along
    each axis of the current whitening, ``H_w = (g(x + d L e_i) - g(x - d L e_i)) L / 2d``, and
    update ``L <- L V |Lambda|^{-1/2} V^T`` from the eigen-decomposition ``H_w = V Lambda V^T``:
    the curvature a sampler meets over its step, not at a point.  The symmetric root makes ``L``
    a function of the Hessian alone (not of the signs eigh gives its eigenvectors), so a run
    that recomputes it, e.g. to resume, gets the same coordinates.

    With ``integrate_out`` a block ``e`` of the coordinates (e.g. the 4,096 values of a source
    correction) is integrated out of the Gaussian instead of whitened: the steps move only the
    kept coordinates ``k``, the same gradient differences give the cross block ``H_ek``, and the
    kept coordinates' marginal precision is the Schur complement

        H_marg = H_kk - H_ek^T H_ee^-1 H_ek

    with ``H_ee`` supplied (it is the exact, constant precision of a block the image is linear
    in).  ``L L^T = H_marg^-1`` is then the kept block of the full inverse Hessian.

    Parameters
    ----------
    grad_fn : callable
        ``(N, D) -> (N, D)`` gradients of the potential at N points.
    flat0 : Tensor (D,)
        The MAP in Pyro's unconstrained space.
    passes : int
        Secant refinements (0: the point Hessian only).
    secant_step : float
        Their half-width, in posterior standard deviations of the current whitening.
    integrate_out : tuple (mask, solve), optional
        ``mask``: bool Tensor (D,), True for the coordinates integrated out; ``solve``: callable
        ``(n_e, m) -> (n_e, m)`` applying ``H_ee^-1``.

    Returns
    -------
    Tensor (K, K)
        ``L`` with ``L L^T = |H|^{-1}`` (``K = D``), or ``|H_marg|^{-1}`` over the ``K`` kept
        coordinates with ``integrate_out``.

    Examples
    --------
    >>> import torch
    >>> prec = torch.tensor([[4.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    >>> L = laplace_whitening(lambda x: x @ prec, torch.zeros(2, dtype=torch.float64))
    >>> torch.allclose(L @ L.T, torch.linalg.inv(prec))
    True
    >>> second_out = (torch.tensor([False, True]), lambda v: v / prec[1, 1])
    >>> L = laplace_whitening(lambda x: x @ prec, torch.zeros(2, dtype=torch.float64),
    ...                       integrate_out=second_out)
    >>> torch.allclose(L @ L.T, torch.linalg.inv(prec)[:1, :1])
    True
    """
    return _laplace_factor(grad_fn, flat0, rel_step, min_curvature, chunk, passes, secant_step,
                           integrate_out)[0]


def _laplace_factor(grad_fn, flat0, rel_step=1e-5, min_curvature=1e-2, chunk=16, passes=2,
                    secant_step=0.5, integrate_out=None):
    """:func:`laplace_whitening`, also returning the last measured cross block ``H_ek``
    (``(n_e, K)``; None without ``integrate_out``) for a Newton step of the full vector."""
    if integrate_out is None:
        out = torch.zeros_like(flat0, dtype=torch.bool)
        solve = None
    else:
        out, solve = integrate_out
        out = torch.as_tensor(out, dtype=torch.bool, device=flat0.device)
    keep = ~out
    d = int(keep.sum())

    def hessian(steps):
        """Symmetrised central-difference (marginal) Hessian along the kept columns of
        ``steps`` (K, K), and the cross block H_ek."""
        moves = flat0.new_zeros(d, flat0.numel())
        moves[:, keep] = steps.T
        points = torch.cat([flat0 + moves, flat0 - moves])               # (2K, D)
        grads = torch.cat([grad_fn(p) for p in torch.split(points, chunk)])
        inv = torch.linalg.inv(2 * steps)
        diff = grads[:d] - grads[d:]                                     # (K, D)
        hess = diff[:, keep].T @ inv
        cross = None
        if solve is not None:
            cross = diff[:, out].T @ inv                                 # (n_e, K)
            hess = hess - cross.T @ solve(cross)
        return 0.5 * (hess + hess.T), cross

    def inverse_sqrt(hess, base):
        evals, evecs = torch.linalg.eigh(hess)
        # negative curvature still measures the scale: use |lambda| (Betancourt's SoftAbs idea);
        # proper priors keep widths O(1), so no scale exceeds 1 / sqrt(min_curvature)
        evals = evals.abs().clamp_min(max(float(1e-8 * evals.abs().max()), min_curvature))
        # the symmetric root V |Lambda|^-1/2 V^T, not V |Lambda|^-1/2: eigenvectors are fixed
        # only up to sign (and to rotation where eigenvalues coincide, e.g. at the floor), so
        # rounding-level changes of the Hessian may change them: a float32 run recomputing its
        # whitening to resume met the same start in other coordinates (u0 apart by 85)
        return base @ ((evecs / evals.sqrt()) @ evecs.T)

    h = rel_step * flat0[keep].abs().clamp_min(1.0)
    hess, cross = hessian(torch.diag(h))
    factor = inverse_sqrt(hess, torch.eye(d, dtype=flat0.dtype, device=flat0.device))
    for _ in range(passes):
        # Hessian in whitened coordinates w (x = flat0 + L w) = L^T H L, measured over +-step
        hess_x, cross = hessian(secant_step * factor)
        factor = inverse_sqrt(factor.T @ hess_x @ factor, factor)
    return factor, cross


def sample_posterior(model: LensModel, init: dict, *, num_samples=500, warmup=300, chains=4,
                     method="hmc", seed=0, target_accept=0.8, path_length=2.2, max_tree_depth=8,
                     whiten=True, full_mass=False, adapt_mass_matrix=None, start_spread=0.3,
                     per_chain_metric=False, pilot=None, pilot_flow=False, modes=None,
                     tempering=None, progress=True, checkpoint=None) -> Posterior:
    """Sample the posterior of ``model`` from ``init`` (normally ``MAPResult.sample_sites()``).

    Parameters
    ----------
    model : LensModel
    init : dict
        Values of every sampled site (the MAP).
    num_samples, warmup : int
        Draws kept and adaptation steps, per chain (the paper: 500 and 50).
    chains : int
        Number of chains (>= 2 for R-hat).
    method : "hmc" or "nuts"
        ``"hmc"`` (default): all chains at once through one batched likelihood
        (:func:`difflens.infer.hmc.hmc`: jittered trajectory length ``path_length``, step size and
        a dense metric adapted in warm-up; many lenses at once with
        :func:`sample_posterior_batch`).  ``"nuts"``: Pyro's NUTS, chains one after another.
    seed : int
        Chain c uses seed + c.
    target_accept : float
        Acceptance probability the step-size adaptation aims for.
    path_length : float
        HMC trajectory length in whitened units (jittered x U(0.5, 1)).
    max_tree_depth : int
        NUTS only.
    whiten : bool
        Sample ``u`` with ``theta = theta_MAP + L u``, ``L L^T`` the inverse Hessian at the MAP in
        Pyro's unconstrained space (Laplace preconditioning).  Lens posteriors are narrow (widths
        1e-4 in some unconstrained coordinates) and strongly correlated; unwhitened, Pyro's
        regularised mass-matrix adaptation cannot reach their scale and NUTS random-walks.
    full_mass, adapt_mass_matrix : bool
        NUTS only: dense mass matrix; mass adaptation (default: only without whitening, because
        each of Pyro's adaptation windows restarts the step-size search).
    start_spread : float
        Chains start at u ~ N(0, start_spread^2) around the MAP (whitened units): overdispersed
        so that R-hat means something, close enough not to land in another mode of the latent
        space.
    per_chain_metric : bool
        HMC only: every chain adapts its own dense metric from its own warm-up draws (default:
        a lens's chains pool theirs; step sizes are adapted per chain either way).  For
        posteriors whose curvature changes from region to region (funnels, slow source
        directions), where a metric pooled over chains in different regions suits none of
        them.  Valid like the pooled version: the kernel of each chain is fixed once warm-up
        ends.  Each chain's metric then rests on one chain's draws, so give warm-up more
        iterations.
    pilot : Posterior, arviz.InferenceData or path to a ``posterior.nc``, optional
        HMC only: draws of an earlier run of the same model (e.g. an unconverged one).  Their
        covariance in Pyro's unconstrained space, pooled over chains, replaces the Laplace
        whitening, warm-up adapts only the step size, and chain c starts at a random draw of
        the second half of pilot chain ``c mod C_pilot`` (:func:`pilot_whitening`).  For
        posteriors whose warm-up metric comes out too narrow: chains that mix slowly in warm-up
        see only part of a curved ridge, so the adapted widths are too small along it (lens 3
        of docs/real_data_studies.md: up to 17x), trajectories cover a fraction of the ridge and the
        chains random-walk along it.  The pilot's draws measure the whole ridge.
    pilot_flow : bool
        With ``pilot``: also fit a normalising flow to the pilot's whitened draws and run HMC in
        its latent space (NeuTra; :func:`pilot_flow_fit`), for ridges that are curved as well as
        long (lens 3's ellipticity-shear ridge), which a covariance cannot make round.  The fit
        takes a minute or two on a CPU for ~10^4 draws of ~100 parameters.
    modes : list of dict, optional
        HMC only: site values at the posterior's other modes (MAPs found from starts in other
        basins; ``init`` is the first mode).  Each gets a Laplace Gaussian, and after warm-up
        every iteration adds a mode-jumping Metropolis move between them
        (:func:`difflens.infer.hmc.hmc`, ``jumps``), so that chains weigh basins they would
        cross only every thousand draws or so.  The posterior's ``idata.sample_stats`` then
        holds each draw's ``basin`` (0: ``init``'s) and the moves' ``jump_accept``.
    tempering : int or sequence of float, optional
        HMC only: parallel tempering (:func:`difflens.infer.hmc.hmc`).  Each of the ``chains``
        chains becomes a ladder of K chains at inverse temperatures ``1 = beta_0 > ... >
        beta_{K-1}``, sampling ``p^beta``, that exchange positions; the posterior keeps the
        ``beta = 1`` chains, so it costs K times the chains of a plain run (one batch on a
        GPU).  An int K spaces the ladder for exchanges accepted ~40% of the time in a Gaussian
        of this dimension (:func:`difflens.infer.hmc.temperature_ladder`); or give the betas.
        For modes, or ends of a ridge, that chains cross too rarely; the hot levels must cross
        them, so ``beta_{K-1}`` must flatten the barrier.  ``Posterior.tempering`` reports the
        exchange rates and round trips.  Not combined with ``modes``.
    checkpoint : str or Path, optional
        HMC only: a file where the sampler's state is saved as it runs; rerunning the same call
        resumes an interrupted run from it, with the same draws, and rerunning it with more
        ``num_samples`` extends the chains (:func:`difflens.infer.hmc.hmc`).

    Returns
    -------
    Posterior

    Examples
    --------
    >>> post = sample_posterior(model, result.sample_sites(), num_samples=200, chains=4)  # doctest: +SKIP
    >>> post.summary()["r_ein"], post.interval("gamma", 0.95)                           # doctest: +SKIP
    """
    from .hmc import FlatSites

    if chains < 1 or num_samples < 1:
        raise ValueError("chains and num_samples must be >= 1")
    if method not in ("hmc", "nuts"):
        raise ValueError(f"method must be 'hmc' or 'nuts', got {method!r}")
    if method == "hmc":
        return sample_posterior_batch(
            [model], [init], num_samples=num_samples, warmup=warmup, chains=chains, seed=seed,
            target_accept=target_accept, path_length=path_length, whiten=whiten,
            start_spread=start_spread, per_chain_metric=per_chain_metric,
            pilots=None if pilot is None else [pilot], pilot_flow=pilot_flow,
            modes=modes, tempering=tempering, progress=progress, checkpoint=checkpoint)[0]
    if pilot is not None or pilot_flow or modes or tempering is not None:
        raise ValueError("pilot, pilot_flow, modes and tempering are options of method='hmc'")
    if per_chain_metric:
        raise ValueError("per_chain_metric is an option of method='hmc'; Pyro's NUTS adapts "
                         "each chain on its own already")
    if checkpoint is not None:
        raise ValueError("checkpoints are kept by method='hmc' only, not by Pyro's NUTS")
    space = FlatSites(model, init_strategy=init_to_value(values=init))
    flat0 = space.start
    batched = space.potential(model)
    d = flat0.numel()
    factor = (laplace_whitening(_grad_fn(batched), flat0) if whiten
              else torch.eye(d, dtype=flat0.dtype, device=flat0.device))
    u0 = _starting_points(chains, d, start_spread, seed, flat0)
    u = torch.stack([_nuts_chain(lambda v: batched((flat0 + factor @ v)[None])[0], u0[c],
                                 num_samples, warmup, seed + c, target_accept,
                                 max_tree_depth, full_mass,
                                 (not whiten) if adapt_mass_matrix is None
                                 else adapt_mass_matrix, progress)
                     for c in range(chains)])
    sites = space.constrained(flat0 + u.reshape(-1, d) @ factor.T)
    posterior = {n: v.detach().cpu().numpy().reshape(chains, num_samples, *v.shape[1:])
                 for n, v in sites.items()}
    return _posterior_from_draws(model, init, posterior, seed)


def sample_laplace(model: LensModel, init: dict, *, num_samples=2000, seed=0,
                   newton_step=True) -> Posterior:
    """Independent draws from the Laplace approximation of the posterior at the MAP.

    The posterior in Pyro's unconstrained space (e.g. ``logit`` of a bounded ``r_ein``, with
    the log-Jacobian of the transform) is approximated by the Gaussian ``N(theta_0, L L^T)``,
    ``L L^T`` the inverse Hessian of the potential (:func:`laplace_whitening`, with its secant
    refinement over half a posterior width) and ``theta_0`` the MAP moved by one Newton step
    ``-L L^T grad U`` to the mode of the unconstrained density (the MAP maximises the density
    of the constrained parameters; the two differ by the Jacobian).  The draws are mapped back
    through the transforms, so bounded parameters stay in their bounds and ``q``, ``phi``,
    ``theta_E`` follow as for HMC.

    It costs ``6 D`` gradients (D unconstrained dimensions: ~90 for the VAE source), about
    what 10 HMC iterations cost, and no sampling: error bars for many lenses at once.  It is
    exact for a Gaussian posterior and wrong where the posterior is not one: curved
    degeneracies (the r_ein-q-gamma ridge a single arc leaves), bounds the posterior presses
    against, several modes.  Check it against :func:`sample_posterior` on representative lenses.

    With a pixelated source correction (``build_model(source_correction=...)``, thousands of
    values ``w``) the correction is integrated out of the Gaussian instead of sampled: the image
    is linear in ``w``, so its block of the Hessian is exactly ``I + G^T N^-1 G``
    (:func:`difflens.infer.evidence.correction_precision`, one eigen-decomposition, ~25 s for
    64 x 64 on one CPU thread), the cross block comes from the same gradient differences as the
    rest, and the other sites' covariance is the inverse of the Schur complement
    (``laplace_whitening(integrate_out=...)``).  The draws then hold every site but
    ``src_correction``.  This is the Laplace approximation of the joint posterior at its mode,
    marginalised; the curvature of ``log det A`` in the correction's evidence
    (:func:`difflens.infer.evidence.correction_evidence`) is left out.

    Parameters
    ----------
    model : LensModel
    init : dict
        Values of every sampled site (``MAPResult.sample_sites()``).
    num_samples : int
        Independent draws (one "chain"; R-hat is undefined and reported as NaN).
    seed : int
    newton_step : bool
        Move to the unconstrained mode first (kept only if it lowers the potential).

    Returns
    -------
    Posterior
        ``idata`` with one chain of ``num_samples`` independent draws.

    Examples
    --------
    >>> result = fit_map(model)                                        # doctest: +SKIP
    >>> post = sample_laplace(model, result.sample_sites())           # doctest: +SKIP
    >>> post.summary()["r_ein"]["sd"], post.interval("gamma", 0.68)    # doctest: +SKIP
    """
    from .hmc import FlatSites

    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    space = FlatSites(model, init_strategy=init_to_value(values=init))
    potential = space.potential(model)
    block = _correction_block(model, init, space)
    flat0, factor, keep = _laplace_mode(potential, space.start, block, newton_step)
    gen = torch.Generator(device=flat0.device).manual_seed(seed)
    u = torch.randn((num_samples, factor.shape[0]), generator=gen, dtype=flat0.dtype,
                    device=flat0.device)
    draws = flat0.repeat(num_samples, 1)
    draws[:, keep] += u @ factor.T
    with torch.no_grad():
        sites = space.constrained(draws)
    posterior = {n: v.detach().cpu().numpy().reshape(1, num_samples, *v.shape[1:])
                 for n, v in sites.items() if n != "src_correction"}
    return _posterior_from_draws(model, init, posterior, seed)


def _laplace_mode(potential, flat0, block=None, newton_step=True):
    """The Laplace Gaussian of a batched ``potential`` near ``flat0`` (Pyro's unconstrained
    space): its centre, ``flat0`` moved by one Newton step ``-L L^T grad U`` when that lowers
    the potential, the factor ``L`` of :func:`laplace_whitening` and the mask of the
    coordinates it covers (all but a ``block`` integrated out, see :func:`_correction_block`).
    """
    grad_fn = _grad_fn(potential)
    factor, cross = _laplace_factor(grad_fn, flat0, integrate_out=block)
    out = block[0] if block else torch.zeros_like(flat0, dtype=torch.bool)
    keep = ~out
    if newton_step:
        # one Newton step of the full vector; with a block integrated out, solved by blocks:
        # dk = -H_marg^-1 (g_k - H_ek^T H_ee^-1 g_e),  de = -H_ee^-1 (g_e + H_ek dk)
        grad = grad_fn(flat0[None])[0]
        step = torch.zeros_like(flat0)
        g_k = grad[keep]
        if block:
            solve = block[1]
            g_k = g_k - cross.T @ solve(grad[out][:, None])[:, 0]
        step[keep] = -factor @ (factor.T @ g_k)
        if block:
            step[out] = -solve((grad[out] + cross @ step[keep])[:, None])[:, 0]
        with torch.no_grad():
            if float(potential((flat0 + step)[None])[0]) < float(potential(flat0[None])[0]):
                flat0 = flat0 + step
    return flat0, factor, keep


def _correction_block(model: LensModel, init: dict, space):
    """``integrate_out`` for :func:`laplace_whitening` when ``model`` has a source correction:
    the mask of ``src_correction`` in ``space``'s flat vector and ``H_ee^-1`` applied to
    columns, ``H_ee = I + G^T N^-1 G`` (exact: the image is linear in the whitened correction,
    whose prior is N(0, I); :func:`difflens.infer.evidence.correction_precision`).  None
    without a correction."""
    if model.priors.source_correction is None:
        return None
    from .evidence import correction_precision

    if model.data.ndim != 2:
        raise ValueError("a Laplace posterior with the source correction integrated out takes "
                         "one observation, not a stacked model")
    values = {k: model.tensor(v) for k, v in init.items()}
    _, _, lam, vec = correction_precision(model, values)
    vec = torch.as_tensor(vec, dtype=space.start.dtype, device=space.start.device)
    inv = torch.as_tensor(1.0 / (1.0 + lam), dtype=vec.dtype, device=vec.device)
    mask = torch.zeros_like(space.start, dtype=torch.bool)
    offset = 0
    for name, size in zip(space.names, space.sizes):
        if name == "src_correction":
            mask[offset:offset + size] = True
        offset += size
    return mask, lambda v: vec @ (inv[:, None] * (vec.T @ v))

def sample_posterior_batch(models, inits, *, num_samples=500, warmup=300, chains=4, seed=0,
                           target_accept=0.8, path_length=2.2, whiten=True, start_spread=0.3,
                           per_chain_metric=False, pilots=None, pilot_flow=False,
                           modes=None, tempering=None, progress=True, checkpoint=None) -> list:
    """HMC posteriors of many lenses at once: ``len(models) x chains`` chains in one batch.

    Every leapfrog step is one batched likelihood call over all lenses and chains (on a GPU,
    64 lenses x 4 chains cost about what one chain does).  Each lens keeps its own Laplace
    whitening at its MAP and its own adapted preconditioner (:func:`difflens.infer.hmc.hmc`
    with ``groups``), so lenses of very different posterior widths sample equally well.

    Parameters
    ----------
    models : sequence of LensModel
        One per lens, all sharing one grid, PSF, source kind and ``Priors`` object (as
        :meth:`LensModel.with_data` makes them; see :meth:`LensModel.stack`).
    inits : sequence of dict
        The MAP of each lens (``MAPResult.sample_sites()``).
    num_samples, warmup, chains, seed, target_accept, path_length, whiten, start_spread, progress
        As in :func:`sample_posterior` (HMC).
    per_chain_metric : bool
        As in :func:`sample_posterior`: one metric per chain instead of one per lens.
    pilots : sequence, optional
        One ``pilot`` (as in :func:`sample_posterior`) per lens: each lens is whitened by its
        pilot's covariance and its chains start at pilot draws; no metric is adapted.
    pilot_flow : bool
        As in :func:`sample_posterior`: one flow per lens, fitted to that lens's pilot.
    modes : list of dict, optional
        One lens only: site values at the other modes of its posterior, for mode-jumping moves
        (as in :func:`sample_posterior`).
    tempering : int or sequence of float, optional
        As in :func:`sample_posterior`: every lens's chains become ladders of K chains.
    checkpoint : str or Path, optional
        As in :func:`sample_posterior`: the sampler's state file, for resuming.  With
        ``pilot_flow`` the flows' weights are kept beside it (``<checkpoint>.flow<i>.pt``).

    Returns
    -------
    list of Posterior
        One per lens, in order, each with its own R-hat / ESS.

    Examples
    --------
    >>> maps = fit_map_batch(models)                                           # doctest: +SKIP
    >>> posts = sample_posterior_batch(models, [m.sample_sites() for m in maps])  # doctest: +SKIP
    >>> [p.interval("r_ein", 0.95) for p in posts]                             # doctest: +SKIP
    """
    from .hmc import FlatSites, hmc, temperature_ladder

    models, inits = list(models), list(inits)
    if not models or len(models) != len(inits):
        raise ValueError(f"need one init per model, got {len(models)} models and "
                         f"{len(inits)} inits")
    if chains < 1 or num_samples < 1:
        raise ValueError("chains and num_samples must be >= 1")
    if pilot_flow and pilots is None:
        raise ValueError("pilot_flow fits a flow to a pilot's draws: pass pilot(s) too")
    if modes and (len(models) != 1 or pilot_flow):
        raise ValueError("modes (mode-jumping moves) take one lens and no pilot_flow")
    if modes and tempering is not None:
        raise ValueError("tempering and modes (mode-jumping moves) are not combined; use one")
    n_lens = len(models)
    space = FlatSites(models[0], init_strategy=init_to_value(values=inits[0]))
    missing = [sorted(set(space.names) - set(init)) for init in inits]
    if any(missing):
        raise ValueError(f"inits lack sampled sites {next(m for m in missing if m)}; pass "
                         "MAPResult.sample_sites()")
    flat0 = torch.stack([space.flatten(init) for init in inits])
    d = flat0.shape[1]
    betas = None
    if tempering is not None:
        betas = (temperature_ladder(int(tempering), d) if np.ndim(tempering) == 0
                 else list(tempering))
    # with tempering each chain is a ladder of len(betas) chains in the sampler, the beta = 1
    # one first: chains_run per lens
    levels = 1 if betas is None else len(betas)
    chains_run = chains * levels
    lens_of_chain = torch.arange(n_lens, device=flat0.device).repeat_interleave(chains_run)
    groups = (torch.arange(n_lens * chains_run, device=flat0.device) if per_chain_metric
              else lens_of_chain)
    if pilots is None:
        eye = torch.eye(d, dtype=flat0.dtype, device=flat0.device)
        factor = torch.stack([laplace_whitening(_grad_fn(space.potential(m)), x0) if whiten
                              else eye for m, x0 in zip(models, flat0)])       # (N, D, D)
        u0 = torch.cat([_starting_points(chains_run, d, start_spread, seed + i, flat0[i])
                        for i in range(n_lens)])
    else:
        pilots = list(pilots)
        if len(pilots) != n_lens:
            raise ValueError(f"need one pilot per model, got {len(pilots)} pilots and "
                             f"{n_lens} models")
        if per_chain_metric:
            raise ValueError("per_chain_metric adapts metrics in warm-up; with a pilot the "
                             "metric is the pilot's covariance and is not adapted")
        if pilot_flow:
            whitened = [pilot_flow_fit(space, p, x0, chains_run, seed + i, progress=progress,
                                       flow_file=None if checkpoint is None
                                       else f"{checkpoint}.flow{i}.pt")[:3]
                        for i, (p, x0) in enumerate(zip(pilots, flat0))]
            flows = [f for _, f, _ in whitened]
        else:
            whitened = [pilot_whitening(space, p, x0, chains_run, seed + i)
                        for i, (p, x0) in enumerate(zip(pilots, flat0))]
        factor = torch.stack([w[0] for w in whitened])
        u0 = torch.cat([w[-1] for w in whitened])
    stacked = space.potential(LensModel.stack(models, repeat=chains_run))

    def to_theta(u):
        return flat0[lens_of_chain] + torch.einsum("cij,cj->ci", factor[lens_of_chain], u)

    def through_flows(z):
        """``(f(z), log |det df/dz|)`` of every chain, each through its lens's flow."""
        parts = [f(zi) for f, zi in zip(flows, z.reshape(n_lens, chains_run, -1, d).unbind(0))]
        return (torch.cat([w for w, _ in parts]).reshape(z.shape),
                torch.cat([ld for _, ld in parts]).reshape(z.shape[:-1]))

    def potential(v):
        if not pilot_flow:
            return stacked(to_theta(v))
        w, logdet = through_flows(v)
        return stacked(to_theta(w)) - logdet

    jumps = None
    if modes:
        # each mode's Laplace Gaussian (the MAP's included), in the whitened coordinates u
        pot = space.potential(models[0])
        gaussians = [_laplace_mode(pot, x)[:2]
                     for x in [flat0[0]] + [space.flatten(m) for m in modes]]
        jumps = (torch.stack([torch.linalg.solve(factor[0], c - flat0[0]) for c, _ in gaussians]),
                 torch.stack([torch.linalg.solve(factor[0], f) for _, f in gaussians]))
    u, stats = hmc(potential, u0, num_samples=num_samples, warmup=warmup,
               target_accept=target_accept, path_length=path_length, groups=groups, seed=seed,
               jumps=jumps, tempering=betas, adapt_metric=pilots is None, progress=progress,
               desc="HMC" if n_lens == 1 else f"HMC ({n_lens} lenses)", checkpoint=checkpoint)
    if pilot_flow:
        with torch.no_grad():
            u = through_flows(u)[0]
    if betas is not None:                   # the posterior is the beta = 1 chains'
        u = u.reshape(n_lens * chains, levels, *u.shape[1:])[:, 0]
        lens_of_chain = lens_of_chain[::levels]
    theta = (flat0[lens_of_chain][:, None]
             + torch.einsum("cij,csj->csi", factor[lens_of_chain], u))
    sites = space.constrained(theta.reshape(-1, d))               # chain-major, then draw
    out = []
    for i, (m, init) in enumerate(zip(models, inits)):
        posterior = {n: v.reshape(n_lens, chains, num_samples, *v.shape[1:])[i]
                     .detach().cpu().numpy() for n, v in sites.items()}
        out.append(_posterior_from_draws(m, init, posterior, seed + i))
        out[-1].seconds = dict(stats["seconds"])
        if jumps is not None:
            out[-1].idata.add_groups(sample_stats={
                k: stats[k].cpu().numpy() for k in ("basin", "jump_accept")})
        if betas is not None:
            out[-1].tempering = _tempering_report(stats, betas, i, chains)
    return out


def _tempering_report(stats, betas, lens, chains):
    """``Posterior.tempering`` of lens ``lens`` from :func:`hmc`'s statistics."""
    from .hmc import round_trips

    k = len(betas)
    swaps = stats["swap_accept"][lens * chains:(lens + 1) * chains]     # its ladders
    replica = stats["replica"][lens * chains * k:(lens + 1) * chains * k] - lens * chains * k
    return dict(betas=[round(float(b), 6) for b in betas],
                swap_accept=[round(float(a), 4) for a in swaps.nanmean((0, 1))],
                round_trips=round_trips(replica.cpu(), k))


def read_pilot(pilot, what="pilot"):
    """A posterior run (a pilot, :func:`pilot_whitening`) as an InferenceData held in memory: a
    ``Posterior`` or InferenceData as it is, a ``posterior.nc`` path read with ArviZ and loaded
    at once (so the file may be replaced afterwards).  ``what`` names it in errors."""
    if isinstance(pilot, (str, Path)):
        import arviz as az

        if not Path(pilot).is_file():
            raise ValueError(f"{what} posterior {pilot} does not exist")
        pilot = az.from_netcdf(str(pilot))
        pilot.posterior.load()
    idata = getattr(pilot, "idata", pilot)
    if not hasattr(idata, "posterior"):
        raise ValueError(f"{what} must be a Posterior, an arviz InferenceData or a posterior.nc "
                         f"path, got {type(pilot).__name__}")
    return idata


def pilot_whitening(space, pilot, flat0, chains, seed=0, min_draws_per_dim=2):
    """Whitening and starting points for HMC from the draws of an earlier (pilot) run.

    The pilot's draws of every sampled site are mapped to Pyro's unconstrained space (the
    layout of ``space``) and pooled over chains; their covariance ``S`` (between-chain spread
    included, so an unmixed pilot's chains together measure the ridge they wander along) gives
    ``L = chol(S)``, and the sampler runs in ``u`` with ``theta = flat0 + L u``, where the
    posterior is close to unit width in every direction the pilot explored.  Chain c starts at
    a random draw of the second half of pilot chain ``c mod C_pilot``.

    Parameters
    ----------
    space : FlatSites
        The layout of the model to be sampled.
    pilot : Posterior, arviz.InferenceData or str or Path
        The pilot run (a ``posterior.nc`` path is read with ArviZ).  It must hold every site
        ``space`` samples, with the same shapes.
    flat0 : Tensor (D,)
        The origin of ``u`` (the MAP, unconstrained).
    chains : int
        Chains of the new run.
    seed : int
    min_draws_per_dim : int
        Refuse pilots with fewer than this many draws per unconstrained dimension (too few to
        estimate a ``D x D`` covariance).

    Returns
    -------
    factor : Tensor (D, D)
        ``L``, lower triangular, ``L L^T = S``.
    u0 : Tensor (chains, D)
        Starting points in ``u``.
    """
    pooled = _pilot_draws(space, pilot, min_draws_per_dim)          # (C_pilot, N_pilot, D)
    factor, u0 = _whitening_from_draws(pooled, flat0, chains, seed)
    like = dict(dtype=flat0.dtype, device=flat0.device)
    return factor.to(**like), u0.to(**like)


def _whitening_from_draws(pooled, flat0, chains, seed):
    """:func:`pilot_whitening` from the pilot's unconstrained draws ``(C, N, D)``: ``L`` and
    the starts ``u0``, float64 on the CPU."""
    c_pilot, n_pilot, d = pooled.shape
    flat = pooled.reshape(-1, d)
    cov = torch.cov(flat.T)
    cov = cov + 1e-9 * torch.diag(cov.diagonal())                   # round-off, not a prior
    try:
        factor = torch.linalg.cholesky(cov)
    except RuntimeError as exc:
        raise ValueError("pilot draws do not span every unconstrained dimension (a site held "
                         "fixed or never moved?)") from exc
    gen = torch.Generator().manual_seed(seed)
    half = n_pilot // 2
    picks = [pooled[c % c_pilot, half + int(torch.randint(n_pilot - half, (), generator=gen))]
             for c in range(chains)]
    origin = flat0.detach().to(torch.float64).cpu()
    u0 = torch.linalg.solve_triangular(factor, (torch.stack(picks) - origin).T, upper=False).T
    return factor, u0


def pilot_flow_fit(space, pilot, flat0, chains, seed=0, flow_file=None, progress=False,
                   **flow_kw):
    """:func:`pilot_whitening` followed by a normalising flow fitted to the whitened draws.

    The sampler then runs in the flow's latent ``z``, with ``theta = flat0 + L f(z)`` and
    potential ``U(theta) - log |det df/dz|`` (NeuTra, Hoffman et al. 2019;
    :mod:`difflens.infer.flow`): where the pilot's draws lie on a curved ridge that a
    covariance alone cannot round off, ``f`` bends it straight.  The flow is fitted to the
    first 80% of each pilot chain and scored on the rest (early stopping); an untrained or
    unhelpful flow is the identity, i.e. the linear whitening.

    Parameters
    ----------
    space, pilot, flat0, chains, seed
        As in :func:`pilot_whitening`.
    flow_file : str or Path, optional
        Where the fitted flow's weights are kept: read if the file exists (a resumed run gets
        the same flow), written otherwise.
    progress : bool
        Progress bar of the fit.
    **flow_kw
        Passed to :func:`difflens.infer.flow.fit_flow` (``layers``, ``hidden``, ``steps`` ...).

    Returns
    -------
    factor : Tensor (D, D)
        ``L`` of :func:`pilot_whitening`.
    flow : CouplingFlow
        ``w = f(z)``, in ``flat0``'s dtype and on its device.
    z0 : Tensor (chains, D)
        The starting points of :func:`pilot_whitening`, mapped to ``z``.
    info : dict
        Held-out mean log density (nats per draw) of the pilot's last fifths under the linear
        whitening alone (``holdout_logp_identity``) and under the flow (``holdout_logp``);
        empty when the flow was read from ``flow_file``.
    """
    from .flow import CouplingFlow, fit_flow

    pooled = _pilot_draws(space, pilot)
    factor, u0 = _whitening_from_draws(pooled, flat0, chains, seed)
    c_pilot, n_pilot, d = pooled.shape
    origin = flat0.detach().to(torch.float64).cpu()
    w = torch.linalg.solve_triangular(factor, (pooled.reshape(-1, d) - origin).T, upper=False).T
    w = w.reshape(c_pilot, n_pilot, d)
    cut = max(1, (4 * n_pilot) // 5)
    info = {}
    if flow_file is not None and Path(flow_file).is_file():
        saved = torch.load(flow_file, map_location="cpu", weights_only=False)
        flow = CouplingFlow(d, **saved["shape"]).to(torch.float64)
        flow.load_state_dict(saved["state"])
        flow.eval().requires_grad_(False)
    else:
        flow, info = fit_flow(w[:, :cut].reshape(-1, d),
                              holdout=w[:, cut:].reshape(-1, d) if cut < n_pilot else None,
                              seed=seed, progress=progress, **flow_kw)
        if flow_file is not None:
            shape = {k: flow_kw[k] for k in ("layers", "hidden") if k in flow_kw}
            tmp = Path(f"{flow_file}.tmp")
            torch.save({"shape": dict(shape, seed=seed), "state": flow.state_dict()}, tmp)
            tmp.replace(flow_file)
    if progress and info:
        gain = info["holdout_logp"] - info["holdout_logp_identity"]
        print(f"pilot flow: held-out log density {gain:+.2f} nats per draw over the pilot's "
              f"covariance alone (best at step {info['best_step']})", flush=True)
    with torch.no_grad():
        z0, _ = flow.inverse(u0)
    like = dict(dtype=flat0.dtype, device=flat0.device)
    return factor.to(**like), flow.to(**like), z0.to(**like), info


def _pilot_draws(space, pilot, min_draws_per_dim=2):
    """The pilot's draws of every site ``space`` samples, unconstrained: ``(C, N, D)`` float64
    on the CPU, checked for missing sites, shapes, finiteness and count."""
    draws = read_pilot(pilot).posterior
    missing = [n for n in space.names if n not in draws]
    if missing:
        raise ValueError(f"pilot lacks the sampled sites {missing}: it must come from a run of "
                         "the same model")
    for name, shape in zip(space.names, space.shapes):
        if tuple(draws[name].shape[2:]) != tuple(shape):
            raise ValueError(f"pilot site {name!r} has shape {tuple(draws[name].shape[2:])} per "
                             f"draw, the model samples {tuple(shape)}")
    with torch.no_grad():
        pooled = space.flatten({n: np.asarray(draws[n].values) for n in space.names},
                               batch_ndim=2).to(torch.float64).cpu()  # (C_pilot, N_pilot, D)
    c_pilot, n_pilot, d = pooled.shape
    if not torch.isfinite(pooled).all():
        raise ValueError("pilot draws are not finite in the unconstrained space (NaNs, or "
                         "values on a prior's bound)")
    if c_pilot * n_pilot < min_draws_per_dim * d:
        raise ValueError(f"pilot holds {c_pilot * n_pilot} draws, too few for the covariance of "
                         f"{d} unconstrained dimensions (need >= {min_draws_per_dim * d})")
    return pooled


def _grad_fn(batched):
    """``(N, D) -> (N, D)`` gradients of a batched potential (for :func:`laplace_whitening`)."""
    def grad_fn(v):
        v = v.detach().requires_grad_(True)
        return torch.autograd.grad(batched(v).sum(), v)[0]
    return grad_fn


def _starting_points(chains, d, spread, seed, like):
    """Whitened starts ``u ~ N(0, spread^2)``, the first chain exactly at the MAP (u = 0)."""
    gen = torch.Generator(device=like.device).manual_seed(seed)
    u0 = spread * torch.randn((chains, d), generator=gen, dtype=like.dtype, device=like.device)
    u0[0] = 0.0
    return u0


def _nuts_chain(potential, u0, num_samples, warmup, seed, target_accept, max_tree_depth,
                full_mass, adapt_mass_matrix, progress):
    """One Pyro NUTS chain on a flat potential; returns draws (num_samples, D)."""
    def site_potential(p):
        try:
            return potential(p["u"])
        except ValueError:
            # parameters the physics refuses (e.g. a width underflowing to 0 far out in a
            # trajectory): a NaN potential, which NUTS treats as a divergence
            return (p["u"] * 0.0).sum() + float("nan")

    pyro.set_rng_seed(seed)
    kernel = NUTS(potential_fn=site_potential, target_accept_prob=target_accept,
                  max_tree_depth=max_tree_depth, full_mass=full_mass,
                  adapt_mass_matrix=adapt_mass_matrix)
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup, num_chains=1,
                initial_params={"u": u0}, disable_progbar=not progress)
    mcmc.run()
    return mcmc.get_samples()["u"]


def amplitude_draws(model: LensModel, posterior: dict, seed=0, chunk=32) -> dict:
    """One draw of each amplitude integrated out (``model.linear_sites``) per posterior draw.

    Given the other parameters the amplitudes are Gaussian
    (:meth:`difflens.model.LensModel.amplitude_posterior`), so a draw from that Gaussian at each
    posterior draw gives samples of the joint posterior, as if they had been sampled.

    Parameters
    ----------
    posterior : dict of str -> ndarray (chains, draws, ...)
        The sampled sites.
    seed : int
    chunk : int
        Draws evaluated per batched model call.

    Returns
    -------
    dict of str -> ndarray (chains, draws); empty when the model integrates out no amplitude.
    """
    names = model.linear_sites
    if not names:
        return {}
    dtype, device = model.simulator.x.dtype, model.simulator.x.device
    shape = posterior[next(iter(posterior))].shape[:2]
    flat = {k: torch.as_tensor(v, dtype=dtype, device=device).reshape(-1, *v.shape[2:])
            for k, v in posterior.items()}
    gen = torch.Generator(device=device).manual_seed(seed)
    draws = []
    for i in range(0, shape[0] * shape[1], chunk):
        mean, cov = model.amplitude_posterior({k: v[i:i + chunk] for k, v in flat.items()})
        noise = torch.randn(mean.shape, generator=gen, dtype=cov.dtype, device=device)
        draws.append(mean.to(cov.dtype) + (torch.linalg.cholesky(cov) @ noise[..., None])[..., 0])
    out = torch.cat(draws).cpu().numpy().reshape(*shape, len(names))
    return {name: out[..., k] for k, name in enumerate(names)}


def _posterior_from_draws(model, init, posterior, seed=0) -> Posterior:
    """Add fixed and derived parameters (q, phi, theta_E; amplitudes integrated out), compute R-hat / ESS, warn if poor."""
    import arviz as az

    shape = posterior[next(iter(posterior))].shape[:2]
    posterior.update(amplitude_draws(model, posterior, seed))
    for k, v in model.fixed_values().items():
        posterior[k] = np.full(shape, v)
    # the draws are numpy arrays on the host: q and phi are derived there, whatever the device
    q, phi = ellipticity_to_q_phi(*(torch.as_tensor(posterior[k], device="cpu") for k in ("e1", "e2")))
    # phi has period pi: summarise it on the branch centred on the starting point (the MAP)
    e0 = {k: torch.tensor(float(init[k] if k in init else model.fixed_values()[k]),
                          dtype=torch.float64, device="cpu") for k in ("e1", "e2")}
    phi0 = float(ellipticity_to_q_phi(e0["e1"], e0["e2"])[1])
    posterior["q"], posterior["phi"] = q.numpy(), unwrap_angle(phi, phi0).numpy()
    # lenstronomy's Einstein radius theta_E = sqrt(q) r_ein (the number papers quote), see
    # difflens.lensing.conventions; whichever of the two is sampled, the other is derived
    if "theta_E" in posterior:
        posterior["r_ein"] = posterior["theta_E"] / np.sqrt(posterior["q"])
    else:
        posterior["theta_E"] = np.sqrt(posterior["q"]) * posterior["r_ein"]
    return _diagnosed(az.from_dict(posterior=posterior), stacklevel=4)


def _diagnosed(idata, stacklevel=3) -> Posterior:
    """A :class:`Posterior` of ``idata`` with R-hat and bulk ESS of every lens parameter and
    theta_E (NaN for a parameter held fixed, and R-hat for a single chain), warning where
    R-hat > 1.01 or ESS < 100."""
    import arviz as az

    rhat, ess = {}, {}
    for k in SUMMARISED:
        x = np.asarray(idata.posterior[k].values)
        if np.ptp(x) == 0:                         # a fixed parameter
            rhat[k], ess[k] = float("nan"), float("nan")
            continue
        rhat[k] = float(az.rhat(x)) if x.shape[0] > 1 else float("nan")
        ess[k] = float(az.ess(x))
    bad = [k for k in SUMMARISED if rhat[k] > 1.01 or ess[k] < 100]   # NaN compares False
    if bad:
        warnings.warn("poor convergence for " + ", ".join(
            f"{k} (R-hat {rhat[k]:.3f}, ESS {ess[k]:.0f})" for k in bad)
            + "; run longer chains or more warmup", RuntimeWarning, stacklevel=stacklevel)
    return Posterior(idata=idata, rhat=rhat, ess=ess)


def combine_posteriors(posteriors, draws=None) -> Posterior:
    """Chains of several runs of one posterior joined into one, with R-hat and ESS over all.

    For runs of the same model and data with other seeds (other starting points), or a run
    resumed under another name: R-hat over every chain of every run is the check that they
    found the same posterior.  The chains are joined as they are (no re-weighting); runs
    whose lens light was held at different MAPs sample slightly different posteriors.

    Parameters
    ----------
    posteriors : sequence of Posterior, arviz.InferenceData or str / Path of ``posterior.nc``
        At least one run; each must hold the same parameters with the same shapes per draw.
    draws : int, optional
        Keep the last ``draws`` draws of every chain (the later, better mixed part): needed
        when the runs have different lengths.  Default: all draws (lengths must agree).

    Returns
    -------
    Posterior
        Chains in the order given (no ``seconds``: runs may have run side by side).

    Examples
    --------
    >>> joined = combine_posteriors(["run_seed1/posterior.nc", "run_seed2/posterior.nc"],
    ...                             draws=1000)                           # doctest: +SKIP
    >>> joined.rhat["theta_E"], joined.summary()["theta_E"]["sd"]         # doctest: +SKIP
    """
    import arviz as az

    runs = [read_pilot(p, f"posterior {i}") for i, p in enumerate(posteriors)]
    if not runs:
        raise ValueError("combine_posteriors needs at least one posterior")
    names = sorted(runs[0].posterior.data_vars)
    for i, run in enumerate(runs[1:], 1):
        other = sorted(run.posterior.data_vars)
        if other != names:
            raise ValueError(f"posterior {i} holds {other}, posterior 0 {names}: combine runs "
                             "of the same model")
        for k in names:
            if run.posterior[k].shape[2:] != runs[0].posterior[k].shape[2:]:
                raise ValueError(f"posterior {i}'s {k!r} has shape {run.posterior[k].shape[2:]} "
                                 f"per draw, posterior 0's {runs[0].posterior[k].shape[2:]}")
    lengths = [run.posterior.sizes["draw"] for run in runs]
    if draws is None:
        if len(set(lengths)) > 1:
            raise ValueError(f"the runs have {lengths} draws per chain: pass draws=N to keep the "
                             "last N of every chain")
        draws = lengths[0]
    if not 1 <= draws <= min(lengths):
        raise ValueError(f"draws must lie in [1, {min(lengths)}] (the shortest run), got {draws}")
    joined = {k: np.concatenate([np.asarray(run.posterior[k].values)[:, -draws:]
                                 for run in runs]) for k in names}
    return _diagnosed(az.from_dict(posterior=joined))
