"""Lens-equation Jacobian, magnification, critical curves and caustics.

For the lens mapping ``beta = theta - alpha(theta)`` the Jacobian is
``A = I - d alpha / d theta`` and the magnification ``mu = 1 / det A`` (Schneider et al. 1992).
Critical curves are the image-plane zero set of ``det A``; caustics are their images in the source
plane.  Derivatives come from autograd on the deflection itself, so they are exact for any model.
"""
from __future__ import annotations

import numpy as np
import torch


def deflection_jacobian(deflection, x, y):
    """Pixel-wise derivatives of a deflection field by automatic differentiation.

    Parameters
    ----------
    deflection : callable
        ``deflection(x, y) -> (alpha_x, alpha_y)`` with outputs of the same shape as ``x``
        (one lens, no batch dimension), arcsec.
    x, y : Tensor, shape S
        Image-plane positions, arcsec.

    Returns
    -------
    dxx, dxy, dyx, dyy : Tensor, shape S
        ``d alpha_x/dx, d alpha_x/dy, d alpha_y/dx, d alpha_y/dy`` (dimensionless).

    Examples
    --------
    >>> import torch
    >>> from difflens.lensing import shear_deflection
    >>> shear = lambda x, y: shear_deflection(x, y, g1=0.1, g2=0.0)
    >>> x = torch.tensor([0.5], dtype=torch.float64)
    >>> [round(float(v[0]), 6) for v in deflection_jacobian(shear, x, x)]   # d(alpha)/d(theta)
    [0.1, 0.0, 0.0, -0.1]
    """
    x = x.detach().clone().requires_grad_(True)
    y = y.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        ax, ay = deflection(x, y)
        if ax.shape != x.shape:
            raise ValueError("deflection must return one lens (shape S); loop over a batch")
        dxx, dxy = torch.autograd.grad(ax.sum(), (x, y), retain_graph=True)
        dyx, dyy = torch.autograd.grad(ay.sum(), (x, y))
    return dxx, dxy, dyx, dyy


def magnification(deflection, x, y):
    """Signed magnification ``mu = 1 / det(I - d alpha/d theta)`` at each position.

    Parameters and returns as in :func:`deflection_jacobian`; ``mu`` is infinite on critical
    curves.

    Examples
    --------
    >>> import torch
    >>> from difflens.lensing import spl_deflection
    >>> sis = lambda x, y: spl_deflection(x, y, r_ein=1.0, q=1.0, phi=0.0, gamma=2.0)
    >>> mu = magnification(sis, torch.tensor([0.5]), torch.tensor([0.0]))
    >>> round(float(mu), 6)   # SIS inside the ring: mu = 1 / (1 - r_ein / r)
    -1.0
    """
    dxx, dxy, dyx, dyy = deflection_jacobian(deflection, x, y)
    det = (1.0 - dxx) * (1.0 - dyy) - dxy * dyx
    return 1.0 / det


def critical_curves_and_caustics(deflection, extent=2.5, n=400, dtype=torch.float64):
    """Critical curves and caustics of one lens, traced on an ``n x n`` grid.

    Parameters
    ----------
    deflection : callable
        ``deflection(x, y) -> (alpha_x, alpha_y)`` for one lens, arcsec.
    extent : float
        Half-width of the square searched, arcsec.
    n : int
        Grid points per side.

    Returns
    -------
    critical, caustic : list of ndarray (M, 2)
        Closed curves in the image plane and their images in the source plane, arcsec.

    Examples
    --------
    >>> from difflens.lensing import spl_deflection
    >>> sis = lambda x, y: spl_deflection(x, y, r_ein=1.0, q=1.0, phi=0.0, gamma=2.0)
    >>> crit, caus = critical_curves_and_caustics(sis, extent=2.0, n=200)
    >>> import numpy as np                                  # the SIS critical curve: r = r_ein
    >>> bool(abs(np.hypot(*crit[0].T).mean() - 1.0) < 0.01)
    True
    """
    import contourpy

    axis = torch.linspace(-extent, extent, n, dtype=dtype)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    dxx, dxy, dyx, dyy = deflection_jacobian(deflection, xx, yy)
    det = ((1.0 - dxx) * (1.0 - dyy) - dxy * dyx).detach().numpy()
    gen = contourpy.contour_generator(axis.numpy(), axis.numpy(), det)
    critical, caustic = [], []
    for line in gen.lines(0.0):
        if len(line) < 3:
            continue
        tx = torch.as_tensor(line[:, 0], dtype=dtype)
        ty = torch.as_tensor(line[:, 1], dtype=dtype)
        with torch.no_grad():
            ax, ay = deflection(tx, ty)
        critical.append(np.asarray(line))
        caustic.append(np.stack([(tx - ax).numpy(), (ty - ay).numpy()], axis=1))
    return critical, caustic
