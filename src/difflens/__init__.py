"""difflens: differentiable strong-lens modelling (Chianese et al. 2019) in PyTorch and Pyro."""
__version__ = "0.1.0"
