"""Lens + source + instrument -> predicted image: the only place the three meet.

The lens equation (Chianese et al. 2019, eqs. 6, 8, 10):

    beta = theta - alpha_SPLE(theta) - alpha_shear(theta),
    I_lens(theta) = I_src(beta),       I_pred = PSF * (I_lens + I_light),

with ``I_light`` the (optional) light of the lens galaxy itself, evaluated unlensed in the image plane

evaluated on (optionally supersampled) pixel centres.  The grid is extended by the PSF half-width on
every side and the convolution keeps only the "valid" part, so light from just outside the field
is scattered in exactly as on a real detector.
"""
from __future__ import annotations

import torch

from .instrument import (bin_pixels, convolve, convolve_separable, gaussian_psf, pixel_grid,
                         pixel_psf, separable_factors)
from ._params import as_param
from .lensing import default_spl_table, shear_deflection, spl_deflection
from .lensing.spl import validate_spl

#: Lens parameters, in method.md order and units (arcsec, radians).
LENS_PARAMS = ("r_ein", "q", "phi", "gamma", "x0", "y0", "g1", "g2")


def _require_lens_params(lens: dict) -> None:
    """Raise ``KeyError`` naming every parameter of :data:`LENS_PARAMS` that ``lens`` lacks."""
    missing = [k for k in LENS_PARAMS if k not in lens]
    if missing:
        raise KeyError(f"lens parameters missing: {missing}")


def deflection(x, y, lens: dict, *, method="table", table=None):
    """Total deflection of the SPLE + external shear lens.

    Parameters
    ----------
    x, y : Tensor, shape S
        Image-plane positions, arcsec.
    lens : dict
        ``r_ein, q, phi, gamma, x0, y0, g1, g2`` (see :func:`difflens.lensing.spl_deflection`
        and :func:`difflens.lensing.shear_deflection`), each a float, () or (B,) tensor.
    method : {"table", "series"}
        SPLE deflection method.
    table : SplTable, optional
        Deflection table for ``method="table"`` (default: the shipped one).

    Returns
    -------
    alpha_x, alpha_y : Tensor, shape S or ``(B, *S)``, arcsec.

    Examples
    --------
    >>> import torch
    >>> lens = dict(r_ein=1.0, q=1.0, phi=0.0, gamma=2.0, x0=0.0, y0=0.0, g1=0.0, g2=0.0)
    >>> ax, ay = deflection(torch.tensor([3.0]), torch.tensor([0.0]), lens)
    >>> round(float(ax[0]), 5)                                 # SIS: |alpha| = r_ein
    1.0
    """
    _require_lens_params(lens)
    ax, ay = spl_deflection(x, y, r_ein=lens["r_ein"], q=lens["q"], phi=lens["phi"],
                            gamma=lens["gamma"], x0=lens["x0"], y0=lens["y0"], method=method,
                            table=table)
    sx, sy = shear_deflection(x, y, g1=lens["g1"], g2=lens["g2"])
    return ax + sx, ay + sy


def ray_trace(x, y, lens: dict, *, method="table", table=None):
    """Source-plane positions ``beta = theta - alpha(theta)`` (eq. 6), arcsec.

    Examples
    --------
    >>> import torch
    >>> lens = dict(r_ein=1.0, q=1.0, phi=0.0, gamma=2.0, x0=0.0, y0=0.0, g1=0.0, g2=0.0)
    >>> bx, by = ray_trace(torch.tensor([1.0]), torch.tensor([0.0]), lens)
    >>> abs(round(float(bx[0]), 5))                            # the Einstein ring maps to the centre
    0.0
    """
    ax, ay = deflection(x, y, lens, method=method, table=table)
    return x - ax, y - ay


class Simulator:
    """Predicts lensed images on a fixed pixel grid with a fixed PSF.

    State is real here: the (padded, supersampled) grid and the PSF kernel are built once.

    Parameters
    ----------
    npix : int or (int, int)
        Image size (ny, nx); default 256 (paper Sec. 3.1).
    pixel_scale : float
        arcsec per pixel; default 0.04.
    psf : Tensor (kh, kw), optional
        Pixel PSF kernel (odd sides; normalised here).  If omitted, a Gaussian of ``psf_sigma``.
    psf_sigma : float or None
        Gaussian PSF sigma in arcsec (default 0.05); None with no ``psf`` means no PSF.
    supersample : int
        Sub-pixels per pixel along each axis for ray tracing (>= 1).
    deflection_method : {"table", "series"}
        SPLE deflection method.
    dtype, device : torch dtype and device of the grid (and so of every prediction).
    compile : bool
        Run ray tracing, source, lens light and PSF as one ``torch.compile``-d graph (fused
        elementwise kernels; needs a C/C++ compiler on CPU).  About 2x faster for value +
        gradient on a 256^2 image (``benchmarks/RESULTS.md``), after a one-off compilation of
        20-60 s per new batch size, dtype or source type.  The parameters are still checked
        (finite, in range) eagerly, on a one-pixel probe grid, before each call.

    Examples
    --------
    >>> from difflens.sources import Sersic
    >>> sim = Simulator(npix=64, pixel_scale=0.08)
    >>> lens = dict(r_ein=1.2, q=0.8, phi=0.3, gamma=2.0, x0=0.0, y0=0.0, g1=0.01, g2=0.0)
    >>> sim.image(lens, Sersic(amp=1.0, r_e=0.2, n=1.0)).shape
    torch.Size([64, 64])
    """

    def __init__(self, npix=256, pixel_scale=0.04, *, psf=None, psf_sigma=0.05, supersample=1,
                 deflection_method="table", dtype=None, device=None, compile=False):
        dtype = dtype or torch.get_default_dtype()
        if psf is not None:
            kernel = pixel_psf(psf).to(dtype=dtype, device=device)
        elif psf_sigma is not None:
            kernel = gaussian_psf(psf_sigma, pixel_scale, dtype=dtype, device=device)
        else:
            kernel = torch.ones(1, 1, dtype=dtype, device=device)
        self.npix = (npix, npix) if isinstance(npix, int) else tuple(npix)
        self.pixel_scale = float(pixel_scale)
        self.supersample = int(supersample)
        self.psf = kernel
        # a rank-1 kernel (a Gaussian) convolves as two 1-d passes of shifted slices, which the
        # compiled graph fuses with the ray tracing; eager, the FFT is as fast
        self._psf_factors = separable_factors(kernel) if compile else None
        self.pad = max(kernel.shape) // 2
        self.deflection_method = deflection_method
        self.table = default_spl_table() if deflection_method == "table" else None
        self.x, self.y = pixel_grid(self.npix, pixel_scale, supersample=supersample, pad=self.pad,
                                    dtype=dtype, device=device)
        self._compiled = torch.compile(self._render) if compile else None

    @property
    def extent(self):
        """(left, right, bottom, top) of the field in arcsec, for ``imshow(extent=...)``."""
        hy, hx = (n * self.pixel_scale / 2.0 for n in self.npix)
        return (-hx, hx, -hy, hy)

    def ray_trace(self, lens: dict):
        """Source-plane positions of the padded, supersampled grid, ``(B, *S)`` or S."""
        return ray_trace(self.x, self.y, lens, method=self.deflection_method, table=self.table)

    def observe(self, surface_brightness):
        """Bin sub-pixels, convolve with the PSF and crop the border: (..., ny, nx)."""
        binned = bin_pixels(surface_brightness, self.supersample)
        if self._psf_factors is not None:
            return convolve_separable(binned, *self._psf_factors, mode="valid")
        return convolve(binned, self.psf, mode="valid")

    def image(self, lens: dict, source, lens_light=()):
        """Predicted image of ``source`` lensed by ``lens``, plus the lens galaxy's own light.

        Parameters
        ----------
        lens : dict
            The eight parameters of :data:`LENS_PARAMS`, floats or () / (B,) tensors.
        source : callable or None
            ``source(bx, by) -> brightness`` on ``(B, *S)`` positions, e.g.
            :class:`difflens.sources.Sersic` or :class:`difflens.sources.PixelSource`;
            None for no lensed source (lens light only).
        lens_light : sequence of callables
            Light profiles of the lens galaxy (e.g. :class:`difflens.sources.Sersic` with an
            image-plane centre, arcsec), evaluated on the unlensed grid and added before the PSF.

        Returns
        -------
        Tensor (ny, nx), or (B, ny, nx) when the lens, the source or the light is batched.
        """
        if source is None and not lens_light:
            raise ValueError("nothing to image: give a source or lens light")
        if self._compiled is None:
            return self._render(lens, source, lens_light)
        with torch.no_grad():        # value checks cannot run inside a compiled graph: here
            self._check_parameters(lens, source, lens_light)
        # one graph per dtype, batch size, grad mode and source type: more than dynamo's
        # default of 8 per function, after which it would silently fall back to eager
        with torch._dynamo.config.patch(recompile_limit=64):
            return self._compiled(lens, source, lens_light)

    def _check_parameters(self, lens, source, lens_light):
        """The eager value checks of every parameter (finite, in range), without the physics;
        a source or light profile without a ``validate`` method is evaluated on one pixel.  The
        lens is checked only with a source (the lens light alone is imaged with ``lens=None``)."""
        if source is not None:
            _require_lens_params(lens)
            validate_spl(lens, self.x, method=self.deflection_method, table=self.table)
            for k in ("g1", "g2"):
                as_param(k, lens[k], self.x)
        for profile in ([] if source is None else [source]) + list(lens_light):
            if hasattr(profile, "validate"):
                profile.validate(self.x)
            else:
                profile(self.x[None, ..., :1, :1], self.y[None, ..., :1, :1])

    def _brightness(self, x, y, lens, source, lens_light):
        """Unconvolved surface brightness on the grid ``x, y``: (B, *S), and whether batched."""
        brightness = 0.0
        batched = False
        if source is not None:
            bx, by = ray_trace(x, y, lens, method=self.deflection_method, table=self.table)
            batched = bx.ndim == x.ndim + 1
            if not batched:
                bx, by = bx[None], by[None]
            brightness = source(bx, by)
        for light in lens_light:
            term = light(x[None], y[None])
            batched = batched or term.shape[0] > 1
            brightness = brightness + term
        return brightness, batched

    def _render(self, lens, source, lens_light):
        brightness, batched = self._brightness(self.x, self.y, lens, source, lens_light)
        img = self.observe(brightness)
        return img if batched or img.shape[0] > 1 else img[0]
