"""A pixelated image placed in the source plane (Chianese et al. 2019, eq. 17).

    I_src(beta) = amp * d((beta - c_src) / s),

where ``d`` is a stamp (e.g. the VAE decoder output) spanning [-s, s] arcsec about the centre
``c_src = (x0, y0)`` on both axes: its H x W pixels tile that square.  Brightness is the bilinear
interpolation between pixel centres, with zero-valued pixels assumed beyond the border, so it is
continuous and falls to exactly zero half a pixel outside [-s, s] (zero everywhere beyond).  Row i of the stamp runs along +y, column j along +x (``origin="lower"``),
the convention of every image in difflens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._params import as_column, as_coords, as_param, broadcast_params, check_range

IMAGE_PARAMS = ("x0", "y0", "s", "amp")


def sample_image(image, x, y, x0, y0, s, amp):
    """Bilinear sampling of stamps at source-plane positions (no validation).

    Parameters
    ----------
    image : Tensor (B, H, W)
        Stamps (B may be 1 and is broadcast).
    x, y : Tensor ``(B, *S)``
        Source-plane positions, arcsec.
    x0, y0, s, amp : Tensor (B,) or ()
        Stamp centre (arcsec), half-width (arcsec) and amplitude.

    Returns
    -------
    Tensor ``(B, *S)``
    """
    nb = max(image.shape[0], x.shape[0])
    spatial = x.shape[1:]
    nd = len(spatial)
    u = ((x - as_column(x0, nd)) / as_column(s, nd)).reshape(x.shape[0], 1, -1)
    v = ((y - as_column(y0, nd)) / as_column(s, nd)).reshape(y.shape[0], 1, -1)
    grid = torch.stack([u, v], dim=-1).expand(nb, -1, -1, -1)
    stamp = image.unsqueeze(1).expand(nb, -1, -1, -1)
    out = F.grid_sample(stamp, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return as_column(amp, nd) * out.reshape(nb, *spatial)


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
