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

Two options change what the grid is (both after docs/validation.md, section 3f, where the
evidence of the stamp-tied white correction preferred lenses that shrink the stamp):

- ``regularisation="gradient"`` or ``"curvature"``: the grid values ``u`` (in units of
  ``sigma * flux``) get the prior of Suyu et al. (2006, eqs. 4-5 with their gradient and
  curvature forms), ``p(u) ~ exp(-E/2)`` with ``E = sum |grad u|^2`` (first differences) or
  ``E = sum (lap u)^2`` (the 5-point Laplacian), zero beyond the grid's edge, so
  ``u ~ N(0, R^-1)`` with ``R = (-lap)^k``, ``k = 1, 2``.  ``R`` is diagonal in the orthonormal
  type-I discrete sine transform ``Q`` (eigenvalues ``mu_kl = 4 sin^2(pi k / 2(n+1)) +
  4 sin^2(pi l / 2(n+1))``), so the whitened ``w ~ N(0, I)`` map to ``u = Q (mu^(-k/2) * w)``:
  the site stays white and the evidence code unchanged.  ``sigma`` is then the prior sd of a
  first difference (gradient) or of the Laplacian (curvature) as a fraction of ``flux``; the
  evidence picks it (``correction_evidence(sigmas=...)``).
- ``frame=(x0, y0, half_width)`` (arcsec): the grid is fixed on the source plane, spanning
  ``[x0 - h, x0 + h] x [y0 - h, y0 + h]``, and is sampled bilinearly at the ray-traced positions
  as a source of its own, not through the VAE stamp, whose placement then no longer changes the
  correction's resolution or extent.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


REGULARISATIONS = ("identity", "gradient", "curvature")


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
    regularisation : {"identity", "gradient", "curvature"}
        The grid's prior (module doc): independent values (default), or the gradient or
        curvature regularisation of Suyu et al. (2006), zero beyond the edge; not with
        ``smoothing``.
    frame : (float, float, float) or None
        ``(x0, y0, half_width)``, arcsec: a grid fixed on the source plane, centred on
        ``(x0, y0)`` with half-width ``half_width > 0`` (module doc).  None (default): the grid
        spans the VAE stamp and moves and scales with it.

    Examples
    --------
    >>> import torch
    >>> corr = PixelCorrection(sigma=0.05, pixels=32, flux=1.0)
    >>> corr.image(torch.zeros(3, corr.size), 64).shape
    torch.Size([3, 64, 64])
    >>> fixed = PixelCorrection(sigma=0.01, pixels=32, flux=1.0, regularisation="curvature",
    ...                         frame=(0.1, 0.0, 0.8))
    >>> fixed.image(torch.zeros(fixed.size), fixed.pixels).shape
    torch.Size([32, 32])
    """

    sigma: float = 0.1
    pixels: int = 64
    flux: float | None = None
    smoothing: float = 0.0
    regularisation: str = "identity"
    frame: tuple | None = None

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
        if self.regularisation not in REGULARISATIONS:
            raise ValueError(f"source correction regularisation must be one of "
                             f"{sorted(REGULARISATIONS)}, got {self.regularisation!r}")
        if self.spectral and self.smoothing > 0:
            raise ValueError("source correction: give smoothing or a gradient/curvature "
                             "regularisation, not both (each sets the correlation)")
        if self.frame is not None:
            ok = (isinstance(self.frame, (tuple, list)) and len(self.frame) == 3
                  and all(isinstance(v, (int, float)) and math.isfinite(v) for v in self.frame))
            if not ok or self.frame[2] <= 0:
                raise ValueError(f"source correction frame must be (x0, y0, half_width) in "
                                 f"arcsec, finite, half_width > 0; got {self.frame!r}")
            object.__setattr__(self, "frame", tuple(float(v) for v in self.frame))

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

    @property
    def spectral(self) -> bool:
        """Whether the grid has a gradient or curvature prior (synthesised by a sine transform)."""
        return self.regularisation != "identity"

    def grid(self, w: torch.Tensor) -> torch.Tensor:
        """The grid values ``u = T w`` in units of ``sigma * flux``, ``(..., n, n)``, for
        whitened ``w`` of shape ``(..., n^2)``: ``w`` itself, smoothed (``smoothing``), or
        ``Q (mu^(-k/2) * w)`` for a gradient or curvature prior (module doc)."""
        if w.shape[-1] != self.size:
            raise ValueError(f"the source correction needs {self.size} values in its last axis "
                             f"({self.pixels} x {self.pixels}), got shape {tuple(w.shape)}")
        n = self.pixels
        grid = w.reshape(*w.shape[:-1], n, n)
        if self.spectral:
            S, amplitude = self.sine_basis(w)
            return S @ (amplitude * grid) @ S
        if self.smoothing > 0:
            flat = grid.reshape(-1, 1, n, n)
            kernel = self._kernel(flat)
            grid = F.conv2d(flat, kernel, padding=kernel.shape[-1] // 2).reshape(grid.shape)
        return grid

    def upsample(self, grid: torch.Tensor, size: int) -> torch.Tensor:
        """Grid values ``(..., n, n)`` (units of ``sigma * flux``) as surface brightness (image
        units) on a ``size x size`` stamp, bilinearly (``size = n``: the grid itself)."""
        if self.flux is None:
            raise ValueError("the source correction has no flux yet (image units): give "
                             "PixelCorrection(flux=...) or build it with "
                             "Priors.with_source_correction")
        if size != self.pixels:
            lead = grid.shape[:-2]
            grid = F.interpolate(grid.reshape(-1, 1, self.pixels, self.pixels),
                                 size=(size, size), mode="bilinear",
                                 align_corners=False).reshape(*lead, size, size)
        return (self.sigma * self.flux) * grid

    def image(self, w: torch.Tensor, size: int) -> torch.Tensor:
        """The correction ``sigma * flux * B[T w]`` on a ``size x size`` stamp (``T``:
        :meth:`grid`), for whitened ``w`` of shape ``(..., n^2)``: returns ``(..., size, size)``,
        surface brightness (image units)."""
        return self.upsample(self.grid(w), size)

    def sine_basis(self, like: torch.Tensor):
        """``(Q1, a)``: the orthonormal type-I sine transform ``Q1`` (n, n; symmetric, its own
        inverse; ``Q = Q1 x Q1`` on the grid) and the amplitudes ``a = mu^(-k/2)`` (n, n) of
        the gradient (``k = 1``) or curvature (``k = 2``) prior, dtype and device of ``like``."""
        n = self.pixels
        j = torch.arange(1, n + 1, dtype=like.dtype, device=like.device)
        S = math.sqrt(2.0 / (n + 1)) * torch.sin(math.pi * j[:, None] * j[None, :] / (n + 1))
        lam = 4.0 * torch.sin(0.5 * math.pi * j / (n + 1)) ** 2       # 1-d Dirichlet Laplacian
        mu = lam[:, None] + lam[None, :]
        power = 1 if self.regularisation == "gradient" else 2
        return S, mu ** (-0.5 * power)

    def _kernel(self, like: torch.Tensor) -> torch.Tensor:
        """The smoothing kernel ``(1, 1, k, k)``: a Gaussian of sd ``smoothing`` grid pixels out
        to 3 sd, with unit sum of squares (so white ``w`` stays unit-variance)."""
        half = max(1, math.ceil(3 * self.smoothing))
        x = torch.arange(-half, half + 1, dtype=like.dtype, device=like.device)
        g = torch.exp(-0.5 * (x / self.smoothing) ** 2)
        k = g[:, None] * g[None, :]
        return (k / k.square().sum().sqrt())[None, None]
