"""A pixelated image placed in the source plane (Chianese et al. 2019, eq. 17).

    I_src(beta) = amp * d((beta - c_src) / s),

where ``d`` is a stamp (e.g. the VAE decoder output) spanning [-s, s] arcsec about the centre
``c_src = (x0, y0)`` on both axes: its H x W pixels tile that square.  Brightness is the bilinear
interpolation between pixel centres, with zero-valued pixels assumed beyond the border, so it is
continuous and falls to exactly zero half a pixel outside [-s, s] (zero everywhere beyond); or,
on request, the interpolating cubic B-spline, whose gradient is continuous too.  Row i of the
stamp runs along +y, column j along +x (``origin="lower"``), the convention of every image in
difflens.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from .._params import as_column, as_coords, as_param, broadcast_params, check_range

IMAGE_PARAMS = ("x0", "y0", "s", "amp")


INTERPOLATIONS = ("bilinear", "cubic")
_CUBIC_PAD = 3          # zero pixels added around a stamp before its spline is fitted


def sample_image(image, x, y, x0, y0, s, amp, interpolation="bilinear"):
    """Sampling of stamps at source-plane positions (no validation).

    Parameters
    ----------
    image : Tensor (B, H, W)
        Stamps (B may be 1 and is broadcast).
    x, y : Tensor ``(B, *S)``
        Source-plane positions, arcsec.
    x0, y0, s, amp : Tensor (B,) or ()
        Stamp centre (arcsec), half-width (arcsec) and amplitude.
    interpolation : "bilinear" or "cubic"
        Between pixel centres.  Bilinear (the paper's) is continuous, but its gradient jumps
        at every pixel edge, so a likelihood summed over many image pixels has a gradient that
        is rough on scales far below the posterior width, and HMC's leapfrog needs tiny steps
        on bright, high-S/N arcs (docs/fitting.md).  "cubic" is the interpolating cubic
        B-spline (Unser 1999): it passes through every pixel value, is twice continuously
        differentiable, and is exact for polynomials up to cubic away from the border.  The
        stamp is taken to be zero beyond its border (as for bilinear), so the spline rings
        slightly there and reaches ``_CUBIC_PAD + 1`` pixels outside it.

    Returns
    -------
    Tensor ``(B, *S)``
    """
    nb = max(image.shape[0], x.shape[0])
    spatial = x.shape[1:]
    nd = len(spatial)
    u = ((x - as_column(x0, nd)) / as_column(s, nd)).reshape(x.shape[0], -1)
    v = ((y - as_column(y0, nd)) / as_column(s, nd)).reshape(y.shape[0], -1)
    if interpolation == "cubic":
        out = _cubic_spline_sample(image, u.expand(nb, -1), v.expand(nb, -1))
    else:
        grid = torch.stack([u, v], dim=-1)[:, None].expand(nb, -1, -1, -1)
        stamp = image.unsqueeze(1).expand(nb, -1, -1, -1)
        out = F.grid_sample(stamp, grid, mode="bilinear", padding_mode="zeros",
                            align_corners=False)
    return as_column(amp, nd) * out.reshape(nb, *spatial)


@functools.lru_cache(maxsize=8)
def _stamp_prefilter(n):
    """The B-spline prefilter of ``n`` padded stamp nodes, computed once per size (a matrix
    inverse, not to be redone in every likelihood call); read-only."""
    from ..lensing.spl import _bspline_prefilter

    matrix = _bspline_prefilter(n, "mirror")
    matrix.setflags(write=False)
    return matrix


def _cubic_spline_sample(image, u, v):
    """The interpolating cubic B-spline of zero-padded stamps at stamp coordinates ``u, v`` in
    [-1, 1] (the ``grid_sample`` convention: pixel j's centre at ``-1 + (2j + 1) / W``).

    image (B', H, W), u and v (B, P) with B' in (1, B) -> (B, P).  Coefficients
    ``c = M_y d M_x^T`` with M the B-spline prefilter of the padded node values
    (:func:`difflens.lensing.spl._bspline_prefilter`).  The 4 x 4 taps are summed as four
    bilinear lookups (Sigg & Hadwiger 2005): along each axis the weights ``w0..w3`` are
    positive, so ``w0 c_i + w1 c_{i+1} = (w0 + w1) lerp(c_i, c_{i+1}, w1 / (w0 + w1))``, and
    likewise for ``c_{i+2}, c_{i+3}``; ``grid_sample`` then does the gathers and their
    gradients natively.
    """
    from ..lensing.spl import _bspline_weights

    nb, h, w = u.shape[0], image.shape[-2], image.shape[-1]
    pad = _CUBIC_PAD
    like = dict(dtype=image.dtype, device=image.device)
    my = torch.tensor(_stamp_prefilter(h + 2 * pad), **like)          # a copy: cache stays
    mx = my if w == h else torch.tensor(_stamp_prefilter(w + 2 * pad), **like)
    coef = my @ F.pad(image, (pad, pad, pad, pad)) @ mx.T          # (B', H + 2p + 2, W + 2p + 2)
    hc, wc = coef.shape[-2:]
    tx = ((u + 1) * w - 1) / 2 + pad                                # padded node coordinates
    ty = ((v + 1) * h - 1) / 2 + pad
    inside = (tx >= 0) & (tx <= w + 2 * pad - 1) & (ty >= 0) & (ty <= h + 2 * pad - 1)
    ix, wx = _bspline_weights(tx.clamp(0, w + 2 * pad - 1), w + 2 * pad)
    iy, wy = _bspline_weights(ty.clamp(0, h + 2 * pad - 1), h + 2 * pad)
    gx = (wx[..., 0] + wx[..., 1], wx[..., 2] + wx[..., 3])        # pair weights, x then y
    gy = (wy[..., 0] + wy[..., 1], wy[..., 2] + wy[..., 3])
    px = (ix + wx[..., 1] / gx[0], ix + 2 + wx[..., 3] / gx[1])    # coefficient index space
    py = (iy + wy[..., 1] / gy[0], iy + 2 + wy[..., 3] / gy[1])
    stamp = coef.unsqueeze(1).expand(nb, -1, -1, -1)
    out = 0.0
    for a in range(2):
        for b in range(2):
            grid = torch.stack([2 * px[b] / (wc - 1) - 1, 2 * py[a] / (hc - 1) - 1], -1)
            val = F.grid_sample(stamp, grid[:, None], mode="bilinear", align_corners=True)
            out = out + gx[b] * gy[a] * val.reshape(nb, -1)
    return torch.where(inside, out, torch.zeros_like(out))


def image_source(x, y, image, *, x0, y0, s, amp):
    """Surface brightness of a pixel stamp placed at ``(x0, y0)`` with half-width ``s``.

    Parameters
    ----------
    x, y : Tensor or array_like, shape S
        Source-plane positions, arcsec.
    image : Tensor (H, W) or (B, H, W)
        The stamp(s), dimensionless (e.g. normalised to a maximum of 1).
    x0, y0 : float or Tensor () or (B,)
        Stamp centre, arcsec.
    s : float or Tensor () or (B,)
        Half-width of the stamp, arcsec, > 0.
    amp : float or Tensor () or (B,)
        Amplitude ``iota`` multiplying the stamp.

    Returns
    -------
    Tensor, shape S or ``(B, *S)``

    Examples
    --------
    >>> import torch
    >>> stamp = torch.ones(4, 4)
    >>> float(image_source(0.0, 0.0, stamp, x0=0.0, y0=0.0, s=1.0, amp=2.0))
    2.0
    """
    x, y = as_coords(x, y)
    if not torch.is_tensor(image) or image.ndim not in (2, 3):
        raise ValueError("image must be a tensor of shape (H, W) or (B, H, W)")
    if not torch.isfinite(image).all():
        raise ValueError("image contains non-finite values")
    p = {k: as_param(k, v, x) for k, v in dict(x0=x0, y0=y0, s=s, amp=amp).items()}
    check_range("s", p["s"], 0.0, math.inf)
    _, batch = broadcast_params(p, 0)
    if image.ndim == 3 and image.shape[0] != 1:
        if batch not in (None, 1, image.shape[0]):
            raise ValueError(f"image batch {image.shape[0]} does not match parameter batch {batch}")
        batch = image.shape[0]
    stamps = image.to(x.dtype) if image.ndim == 3 else image.to(x.dtype)[None]
    nb = 1 if batch is None else batch
    out = sample_image(stamps, x.expand(nb, *x.shape), y.expand(nb, *y.shape), **p)
    return out if batch is not None else out[0]
