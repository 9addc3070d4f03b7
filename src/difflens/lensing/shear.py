"""External shear (Chianese et al. 2019, eq. 13)."""
from __future__ import annotations

from .._params import as_coords, as_param, broadcast_params


def shear_deflection(x, y, *, g1, g2):
    """Deflection of an external shear about the image origin.

    Implements ``alpha = [[g1, g2], [g2, -g1]] @ (x, y)`` (eq. 13), i.e. the lensing potential
    ``psi = g1 (x^2 - y^2)/2 + g2 x y``.

    Parameters
    ----------
    x, y : Tensor or array_like, shape S
        Image-plane positions, arcsec.
    g1, g2 : float or Tensor () or (B,)
        Shear components (dimensionless).  Same convention as lenstronomy's SHEAR
        ``gamma1, gamma2``; the shear strength is ``sqrt(g1^2 + g2^2)`` and its angle
        ``atan2(g2, g1) / 2`` (radians).

    Returns
    -------
    alpha_x, alpha_y : Tensor, shape S or ``(B, *S)``
        Deflection, arcsec.

    Examples
    --------
    >>> ax, ay = shear_deflection(1.0, 0.0, g1=0.1, g2=0.0)
    >>> round(float(ax), 6), float(ay)
    (0.1, 0.0)
    """
    x, y = as_coords(x, y)
    p = {name: as_param(name, value, x) for name, value in dict(g1=g1, g2=g2).items()}
    b, _ = broadcast_params(p, x.ndim)
    return b["g1"] * x + b["g2"] * y, b["g2"] * x - b["g1"] * y
