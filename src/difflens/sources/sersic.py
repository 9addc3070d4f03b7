"""Elliptical Sersic profile (source light; later also lens light).

    I(x, y) = amp exp(-b_n [(rho / r_e)^(1/n) - 1]),   rho^2 = x'^2 + y'^2 / q^2,

with (x', y') the frame centred on (x0, y0) and rotated by phi (major axis along x'), so ``r_e``
is the major-axis half-light radius and ``amp`` the surface brightness at ``r_e``.  ``b_n`` is the
asymptotic expansion of Ciotti & Bertin (1999, eq. 18); the light it encloses within ``r_e`` is
0.5 to within 1.3e-4 at n = 0.5, 1.3e-5 at n = 1 and 1e-6 for n >= 4 (tested).
"""
from __future__ import annotations

import math

import torch

from .._params import as_coords, as_param, broadcast_params, check_range

SERSIC_PARAMS = ("amp", "r_e", "n", "q", "phi", "x0", "y0")


def sersic_b(n):
    """Ciotti & Bertin (1999) ``b_n`` such that ``r_e`` encloses half the light.

    Examples
    --------
    >>> from scipy.special import gammaincinv
    >>> bool(abs(float(sersic_b(4.0)) - gammaincinv(8.0, 0.5)) < 1e-4)   # P(2n, b_n) = 1/2
    True
    """
    return (2.0 * n - 1.0 / 3.0 + 4.0 / (405.0 * n) + 46.0 / (25515.0 * n ** 2)
            + 131.0 / (1148175.0 * n ** 3) - 2194697.0 / (30690717750.0 * n ** 4))


def sersic_profile(x, y, amp, r_e, n, q, phi, x0, y0):
    """Sersic surface brightness with already-broadcastable tensors (no validation).

    The building block shared by :func:`sersic` and the simulator; see the module docstring for
    the formula.  Finite with finite gradients everywhere, including the exact centre.
    """
    dx, dy = x - x0, y - y0
    c, s = torch.cos(phi), torch.sin(phi)
    xp = c * dx + s * dy
    yp = (-s * dx + c * dy) / q
    rho2 = xp * xp + yp * yp
    centre = rho2 == 0
    rho2s = torch.where(centre, torch.ones_like(rho2), rho2)
    # (rho / r_e)^(1/n), written through log so the centre stays differentiable
    power = torch.exp(0.5 / n * (torch.log(rho2s) - 2.0 * torch.log(r_e)))
    power = torch.where(centre, torch.zeros_like(power), power)
    return amp * torch.exp(-sersic_b(n) * (power - 1.0))


def validate_sersic(params: dict, like: torch.Tensor, prefix: str = "") -> dict:
    """Convert and check Sersic parameters; error messages carry ``prefix`` + name."""
    p = {k: as_param(prefix + k, params[k], like) for k in SERSIC_PARAMS}
    check_range(prefix + "r_e", p["r_e"], 0.0, math.inf)
    check_range(prefix + "n", p["n"], 0.2, 10.0, low_inclusive=True, high_inclusive=True)
    check_range(prefix + "q", p["q"], 0.0, 1.0, high_inclusive=True)
    return p


def sersic(x, y, *, amp, r_e, n, q=1.0, phi=0.0, x0=0.0, y0=0.0):
    """Elliptical Sersic surface brightness.

    Parameters
    ----------
    x, y : Tensor or array_like, shape S
        Positions, arcsec.
    amp : float or Tensor () or (B,)
        Surface brightness at the half-light radius (image units, e.g. counts/s/pixel).
    r_e : float or Tensor () or (B,)
        Major-axis half-light radius, arcsec, > 0.
    n : float or Tensor () or (B,)
        Sersic index, in [0.2, 10].
    q : float or Tensor () or (B,)
        Axis ratio in (0, 1].
    phi : float or Tensor () or (B,)
        Position angle of the major axis, radians counter-clockwise from +x.
    x0, y0 : float or Tensor () or (B,)
        Centre, arcsec.

    Returns
    -------
    Tensor, shape S or ``(B, *S)``

    Examples
    --------
    >>> round(float(sersic(1.0, 0.0, amp=2.0, r_e=1.0, n=4.0)), 6)
    2.0
    """
    x, y = as_coords(x, y)
    p = validate_sersic(dict(amp=amp, r_e=r_e, n=n, q=q, phi=phi, x0=x0, y0=y0), x)
    b, _ = broadcast_params(p, x.ndim)
    return sersic_profile(x, y, **b)
