"""A pixelated correction to the VAE source: what the decoder cannot draw.

The shipped VAE reconstructs held-out galaxies smoothly (model card: clumps and compact cores are
missed), and a lens fit absorbs that mismatch into the lens: on mocks with real galaxies the
posterior mode sits several per cent from the true lens (docs/validation.md, section 3b).  The
correction adds a small free-form image to the source's surface brightness,

    I_src(beta) = amp * mu_d(z)(beta') + sigma * flux * B[w](beta'),     w ~ N(0, I_{n^2}),

(``beta'`` the position in the stamp, eq. 17) where ``B`` interpolates the ``n x n`` grid of
whitened values ``w`` bilinearly onto the decoder's 64 x 64 stamp, ``flux`` is the typical
source amplitude (image units; by default the median of the amplitude prior, set by
:meth:`difflens.model.Priors.with_source_correction`) and ``sigma`` the correction's prior sd
as a fraction of it.  The correction's scale is fixed, not multiplied by the fitted amplitude
``amp``: scaled by ``amp`` (as before 2026-11-24) the fit could loosen the correction's prior
by raising ``amp`` and decoding a fainter galaxy, and did (amplitudes 13-156 times the true one
on validation mocks, the correction drawing most of the galaxy; docs/validation.md, section 3d).
The prior on ``w`` is the regularisation: ``sigma`` small keeps the fit close to the VAE, ``n``
sets the finest structure the correction can add.  It is sampled as the Pyro site
``src_correction`` (shape ``(..., n^2)``) beside the latent ``z``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PixelCorrection:
    """Settings of the pixelated source correction (see the module doc).

    Parameters
    ----------
    sigma : float
        Prior sd of the correction on its ``n x n`` grid, as a fraction of ``flux``.  Default
        0.1, where the evidence of validation mocks with real galaxies peaked
        (docs/validation.md, section 3d).
    pixels : int
        Side ``n`` of the correction grid (>= 2); the default 64 corrects every decoder pixel,
        32 every 2 x 2 block (a coarser correction left the lens further from the truth on
        mocks with real galaxies: docs/validation.md, section 3c).
    flux : float or None
        Surface brightness (image units) that ``sigma`` is a fraction of, the typical peak
        brightness of the source; > 0.  None (default): the median of the model's source
        amplitude prior, filled in by :meth:`difflens.model.Priors.with_source_correction`.
    smoothing : float
        Gaussian correlation of the correction: ``w`` is convolved with a Gaussian of this sd (grid
        pixels, >= 0; 0 = independent pixels, the default) normalised to unit sum of squares,
        so each grid value keeps prior sd ``sigma * flux`` away from the edges and neighbours
        within ~``2 * smoothing`` pixels move together: fewer effective degrees of freedom for
        the same resolution.

    Examples
    --------
    >>> import torch
    >>> corr = PixelCorrection(sigma=0.05, pixels=32, flux=1.0)
    >>> corr.image(torch.zeros(3, corr.size), 64).shape
    torch.Size([3, 64, 64])
    """

    sigma: float = 0.1
    pixels: int = 64
    flux: float | None = None
    smoothing: float = 0.0

    def __post_init__(self):
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma)
                and self.sigma > 0):
            raise ValueError(f"source correction sigma must be a positive number (a fraction "
                             f"of flux), got {self.sigma!r}")
        if not (isinstance(self.pixels, int) and self.pixels >= 2):
            raise ValueError(f"source correction pixels must be an integer >= 2, "
                             f"got {self.pixels!r}")
        if self.flux is not None and not (isinstance(self.flux, (int, float))
                                          and math.isfinite(self.flux) and self.flux > 0):
            raise ValueError(f"source correction flux must be a positive number (image units), "
                             f"got {self.flux!r}")
        if not (isinstance(self.smoothing, (int, float)) and math.isfinite(self.smoothing)
                and self.smoothing >= 0):
            raise ValueError(f"source correction smoothing must be a number >= 0 (grid pixels), "
                             f"got {self.smoothing!r}")

    @property
    def size(self) -> int:
        """Number of whitened values ``n^2`` (the length of the ``src_correction`` site)."""
        return self.pixels * self.pixels

    def prior(self, like: torch.Tensor):
        """The prior of the whitened values: ``N(0, I)`` of length ``n^2``, dtype and device of
        ``like``."""
        import pyro.distributions as dist

        zeros = like.new_zeros(self.size)
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def image(self, w: torch.Tensor, size: int) -> torch.Tensor:
        """The correction ``sigma * flux * B[K * w]`` on a ``size x size`` stamp (``K`` the
        smoothing kernel, none by default), for whitened ``w`` of shape ``(..., n^2)``: returns
        ``(..., size, size)``, surface brightness (image units)."""
        if w.shape[-1] != self.size:
            raise ValueError(f"the source correction needs {self.size} values in its last axis "
                             f"({self.pixels} x {self.pixels}), got shape {tuple(w.shape)}")
        if self.flux is None:
            raise ValueError("the source correction has no flux yet (image units): give "
                             "PixelCorrection(flux=...) or build it with "
                             "Priors.with_source_correction")
        lead = w.shape[:-1]
        grid = w.reshape(-1, 1, self.pixels, self.pixels)
        if self.smoothing > 0:
            kernel = self._kernel(grid)
            grid = F.conv2d(grid, kernel, padding=kernel.shape[-1] // 2)
        up = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
        return (self.sigma * self.flux) * up.reshape(*lead, size, size)

    def _kernel(self, like: torch.Tensor) -> torch.Tensor:
        """The smoothing kernel ``(1, 1, k, k)``: a Gaussian of sd ``smoothing`` grid pixels out
        to 3 sd, with unit sum of squares (so white ``w`` stays unit-variance)."""
        half = max(1, math.ceil(3 * self.smoothing))
        x = torch.arange(-half, half + 1, dtype=like.dtype, device=like.device)
        g = torch.exp(-0.5 * (x / self.smoothing) ** 2)
        k = g[:, None] * g[None, :]
        return (k / k.square().sum().sqrt())[None, None]
