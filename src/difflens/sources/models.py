"""Source descriptions handed to :class:`difflens.simulate.Simulator`.

A source is a callable ``source(bx, by) -> brightness`` on ray-traced source-plane positions of
shape ``(B, *S)`` (B = 1 for a single lens), returning ``(B', *S)`` with B' the common batch size.  The two
built-ins below validate their parameters once, at construction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._params import as_column, as_param, check_range
from .image import IMAGE_PARAMS, INTERPOLATIONS, sample_image
from .sersic import SERSIC_PARAMS, sersic_profile, validate_sersic


@dataclass
class Sersic:
    """Elliptical Sersic source (see :func:`difflens.sources.sersic` for units).

    ``label`` names the profile in error messages ("source", or e.g. "lens light 0" where the
    same profile draws the lens galaxy).

    Examples
    --------
    >>> src = Sersic(amp=1.0, r_e=0.25, n=1.5, q=0.8, phi=1.0, x0=0.1, y0=0.05)
    """

    amp: object
    r_e: object
    n: object
    q: object = 1.0
    phi: object = 0.0
    x0: object = 0.0
    y0: object = 0.0
    label: str = "source"

    def validate(self, like: torch.Tensor) -> dict:
        """The parameters as tensors like ``like``, checked (errors name ``<label> <param>``)."""
        return validate_sersic({k: getattr(self, k) for k in SERSIC_PARAMS}, like,
                               prefix=f"{self.label} ")

    def __call__(self, bx: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
        p = self.validate(bx)
        nd = bx.ndim - 1
        return sersic_profile(bx, by, **{k: as_column(v, nd) for k, v in p.items()})


def check_interpolation(interpolation):
    """Refuse a stamp interpolation other than "bilinear" or "cubic", naming it."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"source interpolation must be one of {INTERPOLATIONS}, got "
                         f"{interpolation!r}")


@dataclass
class PixelSource:
    """A pixel stamp (e.g. a VAE decoder output) placed by centre, half-width and amplitude.

    Parameters
    ----------
    image : Tensor (H, W) or (B, H, W)
        The stamp, dimensionless; row i along +y, column j along +x.
    x0, y0 : centre, arcsec.  s : half-width of the stamp, arcsec.  amp : amplitude (iota).
    interpolation : "bilinear" (default) or "cubic", between pixel centres
        (:func:`difflens.sources.image.sample_image`).

    Examples
    --------
    >>> import torch
    >>> src = PixelSource(torch.ones(64, 64), x0=0.1, y0=0.0, s=0.5, amp=2.0)
    >>> src(torch.tensor([0.1, 5.0]), torch.tensor([0.0, 0.0]))      # inside / outside the stamp
    tensor([2., 0.])
    """

    image: torch.Tensor
    x0: object = 0.0
    y0: object = 0.0
    s: object = 1.0
    amp: object = 1.0
    interpolation: str = "bilinear"

    def validate(self, like: torch.Tensor) -> dict:
        """The placement parameters as tensors like ``like``, checked (s > 0, finite)."""
        check_interpolation(self.interpolation)
        p = {k: as_param("source " + k, getattr(self, k), like) for k in IMAGE_PARAMS}
        check_range("source s", p["s"], 0.0, math.inf)
        return p

    def __call__(self, bx: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
        p = self.validate(bx)
        img = self.image if self.image.ndim == 3 else self.image[None]
        return sample_image(img.to(bx.dtype), bx, by, **p, interpolation=self.interpolation)


@dataclass
class SourceSum:
    """The sum of several sources' surface brightness (e.g. a VAE stamp and a pixel correction
    fixed on the source plane, :class:`difflens.sources.correction.PixelCorrection`).

    Examples
    --------
    >>> import torch
    >>> both = SourceSum((PixelSource(torch.ones(8, 8), s=1.0), PixelSource(torch.ones(4, 4), s=2.0)))
    >>> both(torch.tensor([0.5, 1.5]), torch.tensor([0.0, 0.0]))     # in both / in the wider one
    tensor([2., 1.])
    """

    parts: tuple

    def __call__(self, bx: torch.Tensor, by: torch.Tensor) -> torch.Tensor:
        total = self.parts[0](bx, by)
        for part in self.parts[1:]:
            total = total + part(bx, by)
        return total
