"""Inference on a :class:`difflens.model.LensModel`: MAP (Adam) and posterior sampling (NUTS)."""
from .map import MAPResult, fit_map, fit_map_batch
from .mcmc import Posterior, sample_posterior

__all__ = ["fit_map", "fit_map_batch", "MAPResult", "sample_posterior", "Posterior"]
