"""A pixelated correction to the VAE source: what the decoder cannot draw.

The shipped VAE reconstructs held-out galaxies smoothly (model card: clumps and compact cores are
missed), and a lens fit absorbs that mismatch into the lens: on mocks with real galaxies the
posterior mode sits several per cent from the true lens (docs/validation.md, section 3b).  The
correction adds a small free-form image to the decoded stamp,

    stamp(z, w) = mu_d(z) + sigma * B[w],        w ~ N(0, I_{n^2}),

where ``B`` interpolates the ``n x n`` grid of whitened values ``w`` bilinearly onto the decoder's
64 x 64 stamp and ``sigma`` (stamp units: the decoded galaxies peak near 1) sets how far the
source may leave what the VAE can draw.  The prior on ``w`` is the regularisation: ``sigma``
small keeps the fit close to the VAE, ``n`` sets the finest structure the correction can add.
It is sampled as the Pyro site ``src_correction`` (shape ``(..., n^2)``) beside the latent ``z``.
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
        Prior sd of the correction on its ``n x n`` grid, in stamp units (the decoded galaxy peaks
        near 1; the source amplitude multiplies both).  Default 0.05.
    pixels : int
        Side ``n`` of the correction grid (>= 2); the default 64 corrects every decoder pixel,
        32 every 2 x 2 block (a coarser correction left the lens further from the truth on
        mocks with real galaxies: docs/validation.md, section 3c).

    Examples
    --------
    >>> import torch
    >>> corr = PixelCorrection(sigma=0.05, pixels=32)
    >>> corr.image(torch.zeros(3, corr.size), 64).shape
    torch.Size([3, 64, 64])
    """

    sigma: float = 0.05
    pixels: int = 64

    def __post_init__(self):
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma)
                and self.sigma > 0):
            raise ValueError(f"source correction sigma must be a positive number (stamp units), "
                             f"got {self.sigma!r}")
        if not (isinstance(self.pixels, int) and self.pixels >= 2):
            raise ValueError(f"source correction pixels must be an integer >= 2, "
                             f"got {self.pixels!r}")

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
        """The correction ``sigma * B[w]`` on a ``size x size`` stamp, for whitened ``w`` of shape
        ``(..., n^2)``: returns ``(..., size, size)``, stamp units."""
        if w.shape[-1] != self.size:
            raise ValueError(f"the source correction needs {self.size} values in its last axis "
                             f"({self.pixels} x {self.pixels}), got shape {tuple(w.shape)}")
        lead = w.shape[:-1]
        grid = w.reshape(-1, 1, self.pixels, self.pixels)
        up = F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
        return self.sigma * up.reshape(*lead, size, size)
