"""Inference on a :class:`difflens.model.LensModel`: MAP (Adam) and posterior sampling (HMC/NUTS,
or the Laplace approximation), one lens or many lenses in one batch."""
from .map import MAPResult, fit_map, fit_map_batch
from .mcmc import (Posterior, combine_posteriors, sample_laplace, sample_posterior,
                   sample_posterior_batch)

__all__ = ["fit_map", "fit_map_batch", "MAPResult", "sample_posterior", "sample_posterior_batch",
           "sample_laplace", "Posterior", "combine_posteriors"]
