"""Posterior sampling with NUTS (Pyro's ``pyro.infer.mcmc``), started at the MAP (paper Sec. 5.3).

NUTS runs in coordinates whitened by the Laplace approximation at the MAP (``theta = theta_MAP +
L u`` in Pyro's unconstrained space, ``L L^T`` the inverse Hessian there), where the posterior is
close to N(0, I): step sizes are O(1) and trees shallow.  Chains run one after another, each
started from an overdispersed point around the MAP, with their own step-size and mass-matrix
adaptation during ``warmup``.  Samples
are returned as ArviZ ``InferenceData`` (chains x draws), with the derived lens ``q`` and ``phi``
added, and R-hat / bulk ESS computed for every lens parameter.  A warning is issued when
R-hat > 1.01 or ESS < 100 (Vehtari et al. 2021).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

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
    """

    idata: object
    rhat: dict
    ess: dict

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


def laplace_whitening(potential, flat0, rel_step=1e-5, min_curvature=1e-2):
    """Cholesky-like factor L of the inverse Hessian of ``potential`` at ``flat0``.

    The Hessian comes from central differences of autograd gradients (2 D evaluations; no second
    derivatives needed), is symmetrised, and its eigenvalues are replaced by their absolute values
    (a MAP slightly off the optimum can leave small negative ones) floored at ``min_curvature``
    (scale <= 10 in unconstrained units).  Returns ``L`` with ``L L^T = |H|^{-1}``.
    """
    d = flat0.numel()

    def grad(v):
        v = v.detach().requires_grad_(True)
        return torch.autograd.grad(potential(v), v)[0]

    h = rel_step * flat0.abs().clamp_min(1.0)
    cols = []
    for i in range(d):
        e = torch.zeros_like(flat0)
        e[i] = h[i]
        cols.append((grad(flat0 + e) - grad(flat0 - e)) / (2 * h[i]))
    hess = torch.stack(cols, 1)
    hess = 0.5 * (hess + hess.T)
    evals, evecs = torch.linalg.eigh(hess)
    # negative curvature (a MAP slightly off the optimum) still measures the scale: use |lambda|
    # (Betancourt's SoftAbs idea); proper priors keep widths O(1), so no scale exceeds 10
    evals = evals.abs().clamp_min(max(float(1e-8 * evals.abs().max()), min_curvature))
    return evecs / evals.sqrt()


def sample_posterior(model: LensModel, init: dict, *, num_samples=500, warmup=300, chains=2,
                     seed=0, target_accept=0.8, max_tree_depth=8, whiten=True, full_mass=False,
                     adapt_mass_matrix=None, start_spread=0.5, progress=True) -> Posterior:
    """Run NUTS from ``init`` (normally ``MAPResult.sample_sites()``).

    Parameters
    ----------
    model : LensModel
    init : dict
        Values of every sampled site (the MAP).
    num_samples, warmup : int
        Draws kept and adaptation steps, per chain (the paper: 500 and 50).
    chains : int
        Number of chains (>= 2 for R-hat).
    seed : int
        Chain c uses seed + c.
    whiten : bool
        Sample ``u`` with ``theta = theta_MAP + L u``, ``L L^T`` the inverse Hessian at the MAP in
        Pyro's unconstrained space (Laplace preconditioning).  Lens posteriors are narrow (widths
        1e-4 in some unconstrained coordinates) and strongly correlated; unwhitened, Pyro's
        regularised mass-matrix adaptation cannot reach their scale and NUTS random-walks.
    full_mass : bool
        Adapt a dense (rather than diagonal) mass matrix, if mass adaptation is on.
    adapt_mass_matrix : bool, optional
        Default: only without whitening.  Whitened coordinates already have unit scale, and each
        of Pyro's adaptation windows restarts the step-size search (measured: warmup slowed from
        ~1 to ~5 s per iteration on a 256^2 VAE-source fit).
    start_spread : float
        Chains start at u ~ N(0, start_spread^2): overdispersed around the MAP so R-hat means
        something.

    Returns
    -------
    Posterior
    """
    import arviz as az
    from pyro.infer.mcmc.util import initialize_model

    if chains < 1 or num_samples < 1:
        raise ValueError("chains and num_samples must be >= 1")
    init_params, potential_fn, transforms, _ = initialize_model(
        model, init_strategy=init_to_value(values=init))
    names = list(init_params)
    shapes = [init_params[n].shape for n in names]
    sizes = [int(init_params[n].numel()) for n in names]
    flat0 = torch.cat([init_params[n].detach().reshape(-1) for n in names])

    def unflatten(v):
        return {n: t[0] for n, t in unflatten_batch(v[None], names, sizes, shapes).items()}

    def potential(v):
        return potential_fn(unflatten(v))

    factor = laplace_whitening(potential, flat0) if whiten else torch.eye(flat0.numel(),
                                                                         dtype=flat0.dtype)

    def whitened_potential(p):
        try:
            return potential(flat0 + factor @ p["u"])
        except ValueError:
            # parameters the physics refuses (e.g. a width underflowing to 0 far out in a
            # trajectory): a NaN potential, which NUTS treats as a divergence
            return (p["u"] * 0.0).sum() + float("nan")

    per_chain = []
    for c in range(chains):
        pyro.set_rng_seed(seed + c)
        u0 = start_spread * torch.randn_like(flat0) if c else torch.zeros_like(flat0)
        kernel = NUTS(potential_fn=whitened_potential, target_accept_prob=target_accept,
                      max_tree_depth=max_tree_depth, full_mass=full_mass,
                      adapt_mass_matrix=(not whiten) if adapt_mass_matrix is None
                      else adapt_mass_matrix)
        mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup, num_chains=1,
                    initial_params={"u": u0}, disable_progbar=not progress)
        mcmc.run()
        u = mcmc.get_samples()["u"]
        unc = flat0 + u @ factor.T
        sites = unflatten_batch(unc, names, sizes, shapes)
        # initialize_model's transforms map constrained -> unconstrained: invert them
        per_chain.append({n: transforms[n].inv(v).detach().cpu().numpy() if n in transforms else
                          v.detach().cpu().numpy() for n, v in sites.items()})
    posterior = {k: np.stack([pc[k] for pc in per_chain]) for k in per_chain[0]}
    shape = posterior[next(iter(posterior))].shape[:2]
    for k, v in model.fixed_values().items():
        posterior[k] = np.full(shape, v)
    q, phi = ellipticity_to_q_phi(torch.as_tensor(posterior["e1"]), torch.as_tensor(posterior["e2"]))
    # phi has period pi: summarise it on the branch centred on the starting point (the MAP)
    e0 = {k: torch.as_tensor(init[k] if k in init else model.fixed_values()[k]) for k in ("e1", "e2")}
    phi0 = float(ellipticity_to_q_phi(e0["e1"], e0["e2"])[1])
    posterior["q"], posterior["phi"] = q.numpy(), unwrap_angle(phi, phi0).numpy()
    # lenstronomy's Einstein radius (the number papers quote), see difflens.lensing.conventions
    posterior["theta_E"] = np.sqrt(posterior["q"]) * posterior["r_ein"]
    idata = az.from_dict(posterior=posterior)
    rhat, ess = {}, {}
    for k in SUMMARISED:
        x = posterior[k]
        if np.ptp(x) == 0:                         # a fixed parameter
            rhat[k], ess[k] = float("nan"), float("nan")
            continue
        rhat[k] = float(az.rhat(x)) if chains > 1 else float("nan")
        ess[k] = float(az.ess(x))
    bad = [k for k in SUMMARISED if (chains > 1 and rhat[k] > 1.01) or ess[k] < 100]
    if bad:
        warnings.warn("poor convergence for " + ", ".join(
            f"{k} (R-hat {rhat[k]:.3f}, ESS {ess[k]:.0f})" for k in bad)
            + "; run longer chains or more warmup", RuntimeWarning, stacklevel=2)
    return Posterior(idata=idata, rhat=rhat, ess=ess)


def unflatten_batch(flat, names, sizes, shapes):
    """Split (N, D) unconstrained draws into per-site tensors of shape (N, *site_shape)."""
    return {n: c.reshape(flat.shape[0], *sh)
            for n, c, sh in zip(names, torch.split(flat, sizes, dim=1), shapes)}
