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

import contextlib
import functools
import logging

import torch

from .instrument import (bin_pixels, convolve, convolve_separable, _unchecked_log_likelihood,
                         gaussian_psf, pixel_grid, pixel_psf, separable_factors)
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
        elementwise kernels; needs a C/C++ compiler on CPU).  About 3x faster for value +
        gradient on a 256^2 image (``benchmarks/RESULTS.md``), after a one-off compilation of
        20-60 s per new batch size, dtype or source type.  The parameters are still checked
        (finite, in range) eagerly before each call.  :meth:`log_likelihood` puts the
        likelihood into the same graph.

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
        if self.table is not None:     # its coefficients in this dtype: made here, not in a graph
            self.table.coefficients(self.x.dtype, self.x.device)
        self._compiled = torch.compile(_saving_activations(self._render)) if compile else None
        self._compiled_loglik = (torch.compile(_saving_activations(self._log_likelihood))
                                 if compile else None)

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
        return self._run(self._render, self._compiled, lens, source, lens_light)

    def log_likelihood(self, data, noise_sigma, lens: dict, source, lens_light=(), mask=None):
        """Gaussian log-likelihood of ``data`` given the predicted image (eq. 9), in one step.

        The same value as ``gaussian_log_likelihood(self.image(lens, source, lens_light), data,
        noise_sigma, mask)``; with ``compile=True`` the likelihood is fused into the compiled
        graph of the image (and of its gradient), which saves the eager passes over the pixels.

        Parameters
        ----------
        data : Tensor (ny, nx) or (B, ny, nx)
            Observed image(s) on this simulator's grid, image units.
        noise_sigma : float or Tensor, () / (ny, nx) / like ``data``
            Pixel noise standard deviation, image units, > 0.
        lens, source, lens_light
            As for :meth:`image`.
        mask : Tensor of bool, (ny, nx) or like ``data``, optional
            True for pixels that enter the likelihood.

        Returns
        -------
        Tensor () or (B,)
            log L, one value per lens of a batch.

        Examples
        --------
        >>> import torch
        >>> from difflens.sources import Sersic
        >>> sim = Simulator(npix=32, pixel_scale=0.1, dtype=torch.float64)
        >>> lens = dict(r_ein=1.0, q=0.8, phi=0.3, gamma=2.0, x0=0.0, y0=0.0, g1=0.0, g2=0.0)
        >>> src = Sersic(amp=1.0, r_e=0.2, n=1.0)
        >>> data = sim.image(lens, src)
        >>> ll = sim.log_likelihood(data, 0.1, lens, src)       # a perfect model: chi^2 = 0
        >>> bool(torch.isclose(ll, -0.5 * 32 * 32 * torch.log(torch.tensor(2 * torch.pi * 0.01,
        ...                                                   dtype=torch.float64))))
        True
        """
        data, sigma, mask = self.check_observation(data, noise_sigma, mask)
        return self._run(self._log_likelihood, self._compiled_loglik, lens, source, lens_light,
                         data, sigma, mask)

    def _run(self, eager, compiled, lens, source, lens_light, *observation):
        """``eager(lens, source, lens_light, *observation)``, or its compiled twin after the
        parameter checks that cannot run inside a compiled graph."""
        if source is None and not lens_light:
            raise ValueError("nothing to image: give a source or lens light")
        if compiled is None:
            return eager(lens, source, lens_light, *observation)
        with torch.no_grad():
            self._check_parameters(lens, source, lens_light)
        with _compiling():
            return compiled(lens, source, lens_light, *observation)

    def check_observation(self, data, noise_sigma, mask=None):
        """Validate an observation against this grid and return it as tensors of the grid's dtype
        and device: ``data`` (ny, nx) or (B, ny, nx), finite; ``noise_sigma`` a scalar, (ny, nx)
        or data-shaped, finite and > 0; ``mask`` None or bool, (ny, nx) or data-shaped.  Errors
        name the problem."""
        dtype, device = self.x.dtype, self.x.device
        data = torch.as_tensor(data, dtype=dtype, device=device)
        sigma = torch.as_tensor(noise_sigma, dtype=dtype, device=device)
        if data.ndim not in (2, 3) or tuple(data.shape[-2:]) != self.npix:
            raise ValueError(f"data shape {tuple(data.shape)} does not match the simulator grid "
                             f"{self.npix}")
        if not torch.isfinite(data).all():
            raise ValueError("data contain non-finite pixels; mask them or replace them")
        if sigma.ndim != 0 and sigma.shape not in (data.shape, data.shape[-2:]):
            raise ValueError(f"noise map shape {tuple(sigma.shape)} does not match the data "
                             f"{tuple(data.shape)}")
        if not torch.isfinite(sigma).all() or (sigma <= 0).any():
            raise ValueError("noise_sigma must be finite and positive")
        if mask is not None:
            mask = torch.as_tensor(mask, dtype=torch.bool, device=device)
            if mask.shape not in (data.shape, data.shape[-2:]):
                raise ValueError(f"mask shape {tuple(mask.shape)} does not match the data "
                                 f"{tuple(data.shape)}")
        return data, sigma, mask

    def _log_likelihood(self, lens, source, lens_light, data, sigma, mask):
        # the observation was checked by check_observation: the unchecked sum
        return _unchecked_log_likelihood(self._render(lens, source, lens_light), data, sigma, mask)

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

    def component_images(self, lens: dict, source, lens_light=()):
        """The PSF-convolved image of each profile separately: the lensed source first, then
        each lens-light component (the terms :meth:`image` adds up).

        Used where amplitudes are solved for or marginalised (:mod:`difflens.model`): the
        image is linear in each profile's amplitude.

        Returns
        -------
        Tensor (K, ny, nx), or (B, K, ny, nx) when the lens, the source or the light is
        batched; K = (1 if source else 0) + len(lens_light).

        Examples
        --------
        >>> import torch
        >>> from difflens.sources import Sersic
        >>> sim = Simulator(npix=16, pixel_scale=0.2, dtype=torch.float64)
        >>> lens = dict(r_ein=1.0, q=0.8, phi=0.3, gamma=2.0, x0=0.0, y0=0.0, g1=0.0, g2=0.0)
        >>> src, light = Sersic(amp=1.0, r_e=0.2, n=1.0), Sersic(amp=2.0, r_e=0.5, n=4.0)
        >>> parts = sim.component_images(lens, src, [light])
        >>> parts.shape, bool(torch.allclose(parts.sum(0), sim.image(lens, src, [light])))
        (torch.Size([2, 16, 16]), True)
        """
        if source is None and not lens_light:
            raise ValueError("nothing to image: give a source or lens light")
        terms, batched = self._terms(self.x, self.y, lens, source, lens_light)
        batch = max(t.shape[0] for t in terms)
        stacked = torch.stack([t.expand(batch, *t.shape[1:]) for t in terms], dim=1)
        img = self.observe(stacked)
        return img if batched or batch > 1 else img[0]

    def _terms(self, x, y, lens, source, lens_light):
        """Unconvolved surface brightness of each profile on the grid ``x, y``: a list of
        (1 or B, *S) tensors, the lensed source first, and whether any input was batched."""
        terms, batched = [], False
        if source is not None:
            bx, by = ray_trace(x, y, lens, method=self.deflection_method, table=self.table)
            batched = bx.ndim == x.ndim + 1
            if not batched:
                bx, by = bx[None], by[None]
            terms.append(source(bx, by))
        for light in lens_light:
            terms.append(light(x[None], y[None]))
            batched = batched or terms[-1].shape[0] > 1
        return terms, batched

    def _brightness(self, x, y, lens, source, lens_light):
        """Unconvolved surface brightness on the grid ``x, y``: (B, *S), and whether batched."""
        terms, batched = self._terms(x, y, lens, source, lens_light)
        return sum(terms[1:], terms[0]), batched

    def _render(self, lens, source, lens_light):
        brightness, batched = self._brightness(self.x, self.y, lens, source, lens_light)
        img = self.observe(brightness)
        return img if batched or img.shape[0] > 1 else img[0]


# ----------------------------------------------------------------------------------------------
# torch.compile helpers
# ----------------------------------------------------------------------------------------------
_SAC_LOGGER = logging.getLogger("torch._higher_order_ops.wrap")


class _DropSacNotice(logging.Filter):
    """Drops torch's one-off notice that a checkpoint policy is used under torch.compile (our
    policy only chooses what to keep for the backward; the region has no in-place ops)."""

    def filter(self, record):
        return "context_fn is passed to torch.utils.checkpoint" not in record.getMessage()


@contextlib.contextmanager
def _compiling():
    """Settings around a call of a compiled simulator function: one graph per dtype, batch size,
    grad mode and source type is more than dynamo's default of 8 per function (after which it
    would silently fall back to eager), and torch's checkpoint-policy notice is dropped."""
    notice = _DropSacNotice()
    _SAC_LOGGER.addFilter(notice)
    try:
        with torch._dynamo.config.patch(recompile_limit=64):
            yield
    finally:
        _SAC_LOGGER.removeFilter(notice)


def _saving_activations(fn):
    """``fn`` with a selective-checkpoint policy that makes its compiled backward reuse the
    forward's results instead of recomputing them.

    Left alone, the compiler's partitioner recomputes cheap-looking pointwise ops in the
    backward to save memory traffic -- right for a GPU, but on a CPU it repeats the atan2, exp,
    log and pow of every pixel.  Marking them must-save (and everything else prefer-save) made
    value + gradient of a 256^2 image ~25% faster on our 2-core CPU (``benchmarks/RESULTS.md``).
    Needs torch >= 2.4; with older torch ``fn`` is returned unchanged.
    """
    try:
        from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                            create_selective_checkpoint_contexts)
    except ImportError:                                            # pragma: no cover
        return fn
    aten = torch.ops.aten
    expensive = {aten.atan2.default, aten.exp.default, aten.log.default, aten.sqrt.default,
                 aten.pow.Tensor_Scalar, aten.pow.Tensor_Tensor, aten.sin.default,
                 aten.cos.default}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in expensive else CheckpointPolicy.PREFER_SAVE

    context = functools.partial(create_selective_checkpoint_contexts, policy)

    @functools.wraps(fn)
    def saving(*args):
        return checkpoint(fn, *args, use_reentrant=False, context_fn=context)

    return saving
