"""Converters between difflens parameters and those of lenstronomy and caustics.

difflens (method.md): SPLE with major-axis Einstein radius ``r_ein`` (arcsec), axis ratio ``q``,
position angle ``phi`` (radians, counter-clockwise from +x), slope ``gamma``, centre ``x0, y0``;
shear ``g1, g2`` about the origin.  The relations are exact::

    lenstronomy EPL:   theta_E = sqrt(q) r_ein,  e1 + i e2 = (1 - q)/(1 + q) exp(2 i phi),
                       center_x = x0, center_y = y0, same gamma;
    lenstronomy SHEAR: gamma1 = g1, gamma2 = g2 (ra_0 = dec_0 = 0);
    caustics EPL:      Rein = sqrt(q) r_ein, t = gamma - 1, same q, phi, x0, y0.

Every function works on floats, numpy arrays and torch tensors (keeping gradients).
"""
from __future__ import annotations

import numpy as np
import torch


def _ops(*values):
    """The array namespace (torch or numpy) matching the inputs."""
    return torch if any(torch.is_tensor(v) for v in values) else np


def to_lenstronomy_epl(r_ein, q, phi, gamma, x0=0.0, y0=0.0) -> dict:
    """difflens SPLE -> lenstronomy ``EPL`` keyword arguments.

    Returns
    -------
    dict with keys ``theta_E`` (arcsec), ``e1``, ``e2``, ``gamma``, ``center_x``, ``center_y``.

    Examples
    --------
    >>> kw = to_lenstronomy_epl(1.0, 1.0, 0.0, 2.0)
    >>> float(kw["theta_E"]), float(kw["e1"])
    (1.0, 0.0)
    """
    xp = _ops(r_ein, q, phi)
    e = (1.0 - q) / (1.0 + q)
    return dict(theta_E=xp.sqrt(q) * r_ein, e1=e * xp.cos(2.0 * phi), e2=e * xp.sin(2.0 * phi),
                gamma=gamma, center_x=x0, center_y=y0)


def from_lenstronomy_epl(theta_E, e1, e2, gamma, center_x=0.0, center_y=0.0) -> dict:
    """lenstronomy ``EPL`` keyword arguments -> difflens SPLE parameters.

    ``phi`` is returned in (-pi/2, pi/2]; for a circular lens (e1 = e2 = 0) it is 0.

    Returns
    -------
    dict with keys ``r_ein`` (arcsec), ``q``, ``phi`` (radians), ``gamma``, ``x0``, ``y0``.

    Examples
    --------
    >>> p = from_lenstronomy_epl(0.9, 1 / 3, 0.0, 2.0)     # e1 = 1/3 means q = 1/2
    >>> round(float(p["q"]), 6), round(float(p["r_ein"]) * 0.5 ** 0.5, 6)
    (0.5, 0.9)
    """
    xp = _ops(theta_E, e1, e2)
    e = xp.sqrt(e1 * e1 + e2 * e2)
    q = (1.0 - e) / (1.0 + e)
    return dict(r_ein=theta_E / xp.sqrt(q), q=q, phi=0.5 * xp.arctan2(e2, e1), gamma=gamma,
                x0=center_x, y0=center_y)


def to_lenstronomy_shear(g1, g2) -> dict:
    """difflens shear -> lenstronomy ``SHEAR`` keyword arguments (``gamma1, gamma2``).

    Examples
    --------
    >>> to_lenstronomy_shear(0.01, -0.02)
    {'gamma1': 0.01, 'gamma2': -0.02, 'ra_0': 0.0, 'dec_0': 0.0}
    """
    return dict(gamma1=g1, gamma2=g2, ra_0=0.0, dec_0=0.0)


def from_lenstronomy_shear(gamma1, gamma2, ra_0=0.0, dec_0=0.0) -> dict:
    """lenstronomy ``SHEAR`` keyword arguments -> difflens ``g1, g2``.

    Only shear about the origin is represented; a non-zero ``ra_0``/``dec_0`` raises.

    Examples
    --------
    >>> from_lenstronomy_shear(0.01, -0.02)
    {'g1': 0.01, 'g2': -0.02}
    """
    if ra_0 != 0.0 or dec_0 != 0.0:
        raise ValueError("difflens shear is defined about the origin; ra_0 and dec_0 must be 0")
    return dict(g1=gamma1, g2=gamma2)


def to_caustics_epl(r_ein, q, phi, gamma, x0=0.0, y0=0.0) -> dict:
    """difflens SPLE -> caustics ``EPL`` parameters (``Rein, q, phi, t, x0, y0``).

    Examples
    --------
    >>> kw = to_caustics_epl(1.0, 0.64, 0.3, 2.1)         # Rein = sqrt(0.64) * 1.0, t = gamma - 1
    >>> round(float(kw["Rein"]), 6), round(kw["t"], 6)
    (0.8, 1.1)
    """
    xp = _ops(r_ein, q)
    return dict(Rein=xp.sqrt(q) * r_ein, q=q, phi=phi, t=gamma - 1.0, x0=x0, y0=y0)


def from_caustics_epl(Rein, q, phi, t, x0=0.0, y0=0.0) -> dict:
    """caustics ``EPL`` parameters -> difflens SPLE parameters.

    Examples
    --------
    >>> p = from_caustics_epl(0.8, 0.64, 0.3, 1.1)
    >>> round(float(p["r_ein"]), 6), round(p["gamma"], 6)
    (1.0, 2.1)
    """
    xp = _ops(Rein, q)
    return dict(r_ein=Rein / xp.sqrt(q), q=q, phi=phi, gamma=t + 1.0, x0=x0, y0=y0)
