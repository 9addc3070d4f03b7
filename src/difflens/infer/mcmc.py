"""Posterior sampling with NUTS (Pyro's ``pyro.infer.mcmc``), started at the MAP (paper Sec. 5.3).

Chains run one after another from the MAP point (each slightly jittered in the unconstrained
space), each with its own step-size and diagonal mass-matrix adaptation during ``warmup``.  Samples
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

from ..model import LensModel, ellipticity_to_q_phi

LENS_KEYS = ("r_ein", "q", "phi", "gamma", "x0", "y0", "g1", "g2")


@dataclass
class Posterior:
    """Posterior samples and diagnostics.

    Attributes
    ----------
    idata : arviz.InferenceData
        ``posterior`` group with every sampled site plus ``q`` and ``phi``.
    rhat, ess : dict of str -> float
        Per lens parameter.
    """

    idata: object
    rhat: dict
    ess: dict

    def summary(self, hdi_prob=0.94) -> dict:
        """Mean, sd and HDI of each lens parameter, with R-hat and ESS."""
        import arviz as az

        out = {}
        for k in LENS_KEYS:
            x = self.idata.posterior[k].values
            lo, hi = az.hdi(x.reshape(-1), hdi_prob=hdi_prob)
            out[k] = dict(mean=float(x.mean()), sd=float(x.std()), hdi_low=float(lo),
                          hdi_high=float(hi), r_hat=self.rhat[k], ess_bulk=self.ess[k])
        return out

    def interval(self, name, prob=0.95):
        """Central credible interval of one parameter."""
        x = self.idata.posterior[name].values.reshape(-1)
        return tuple(np.quantile(x, [(1 - prob) / 2, (1 + prob) / 2]))


def sample_posterior(model: LensModel, init: dict, *, num_samples=500, warmup=300, chains=2,
                     seed=0, target_accept=0.8, max_tree_depth=8, jitter=1e-3,
                     progress=True) -> Posterior:
    """Run NUTS from ``init`` (normally ``MAPResult.sample_sites()``).

    Parameters
    ----------
    model : LensModel
    init : dict
        Values of every sampled site.
    num_samples, warmup : int
        Draws kept and adaptation steps, per chain (the paper: 500 and 50).
    chains : int
        Number of chains (>= 2 for R-hat).
    seed : int
        Chain c uses seed + c.

    Returns
    -------
    Posterior
    """
    import arviz as az

    if chains < 1 or num_samples < 1:
        raise ValueError("chains and num_samples must be >= 1")
    per_chain = []
    for c in range(chains):
        pyro.set_rng_seed(seed + c)
        start = {k: v + jitter * torch.randn_like(v) * v.abs().clamp_min(0.1) if c else v
                 for k, v in init.items()}
        kernel = NUTS(model, init_strategy=init_to_value(values=start),
                      target_accept_prob=target_accept, max_tree_depth=max_tree_depth,
                      adapt_mass_matrix=True, full_mass=False)
        mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup, num_chains=1,
                    disable_progbar=not progress)
        mcmc.run()
        per_chain.append({k: v.detach().cpu().numpy() for k, v in mcmc.get_samples().items()})
    posterior = {k: np.stack([pc[k] for pc in per_chain]) for k in per_chain[0]}
    q, phi = ellipticity_to_q_phi(torch.as_tensor(posterior["e1"]), torch.as_tensor(posterior["e2"]))
    posterior["q"], posterior["phi"] = q.numpy(), phi.numpy()
    idata = az.from_dict(posterior=posterior)
    rhat, ess = {}, {}
    for k in LENS_KEYS:
        x = posterior[k]
        rhat[k] = float(az.rhat(x)) if chains > 1 else float("nan")
        ess[k] = float(az.ess(x))
    bad = [k for k in LENS_KEYS if (chains > 1 and rhat[k] > 1.01) or ess[k] < 100]
    if bad:
        warnings.warn("poor convergence for " + ", ".join(
            f"{k} (R-hat {rhat[k]:.3f}, ESS {ess[k]:.0f})" for k in bad)
            + "; run longer chains or more warmup", RuntimeWarning, stacklevel=2)
    return Posterior(idata=idata, rhat=rhat, ess=ess)
