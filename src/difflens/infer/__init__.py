"""Inference on a :class:`difflens.model.LensModel`: MAP (Adam) and posterior sampling (HMC/NUTS,
the Laplace approximation, or importance sampling over several modes), one lens or many lenses in one batch."""
from .importance import ModeMixture, sample_modes
from .map import MAPResult, fit_map, fit_map_batch
from .mcmc import (Posterior, combine_posteriors, sample_laplace, sample_posterior,
                   sample_posterior_batch)

__all__ = ["fit_map", "fit_map_batch", "MAPResult", "sample_posterior", "sample_posterior_batch",
           "sample_laplace", "sample_modes", "ModeMixture", "Posterior", "combine_posteriors"]
