"""Converters between difflens parameters and those of lenstronomy and caustics.

difflens (method.md): SPLE with major-axis Einstein radius ``r_ein`` (arcsec), axis ratio ``q``,
position angle ``phi`` (radians, counter-clockwise from +x), slope ``gamma``, centre ``x0, y0``;
shear ``g1, g2`` about the origin.  The relations are exact::

    lenstronomy EPL:   theta_E = sqrt(q) r_ein,  e1 + i e2 = (1 - q)/(1 + q) exp(2 i phi),
                       center_x = x0, center_y = y0, same gamma;
    lenstronomy SHEAR: gamma1 = g1, gamma2 = g2 (ra_0 = dec_0 = 0);
    caustics EPL:      Rein = sqrt(q) r_ein, t = gamma - 1, same q, phi, x0, y0;
    COOLEST PEMD:      theta_E = sqrt(q) r_ein, phi_C = phi - 90 deg (in [-90, 90) deg),
                       center_x = x0, center_y = y0, same q, gamma;
    COOLEST shear:     gamma_ext = |g1 + i g2|, phi_ext = arg(g1 + i g2)/2 - 90 deg.

COOLEST (Galan et al. 2023) puts x to the right and y up on the image, as difflens does, and
measures position angles in degrees East of North, i.e. counter-clockwise from +y: a major axis
along +y (difflens ``phi = pi/2``) has COOLEST ``phi = 0``.  (lenstronomy's own frame has x along
RA, to the left, which is why its COOLEST reader flips ``center_x`` and uses ``90 - phi``.)

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


def coolest_angle(phi):
    """difflens position angle (radians, counter-clockwise from +x) -> COOLEST angle (degrees
    East of North, counter-clockwise from +y), wrapped into [-90, 90).

    Examples
    --------
    >>> [round(float(coolest_angle(a)), 9) for a in (np.pi / 2, 0.0, np.pi / 3, -np.pi / 3)]
    [0.0, -90.0, -30.0, 30.0]
    """
    xp = _ops(phi)
    return xp.remainder(phi * (180.0 / np.pi), 180.0) - 90.0


def _from_coolest_angle(phi_deg):
    """Inverse of :func:`coolest_angle` up to its period: degrees East of North -> radians
    counter-clockwise from +x (not wrapped)."""
    return (phi_deg + 90.0) * (np.pi / 180.0)


def to_coolest_pemd(r_ein, q, phi, gamma, x0=0.0, y0=0.0) -> dict:
    """difflens SPLE -> COOLEST ``PEMD`` parameters.

    Returns
    -------
    dict with keys ``theta_E`` (arcsec, sqrt(q) r_ein), ``q``, ``phi`` (degrees East of North,
    [-90, 90)), ``gamma``, ``center_x``, ``center_y`` (arcsec).

    Examples
    --------
    >>> kw = to_coolest_pemd(1.25, 0.64, np.pi / 2, 2.1, 0.1, -0.2)
    >>> float(kw["theta_E"]), float(kw["phi"]), kw["center_x"]
    (1.0, 0.0, 0.1)
    """
    xp = _ops(r_ein, q, phi)
    return dict(theta_E=xp.sqrt(q) * r_ein, q=q, phi=coolest_angle(phi), gamma=gamma,
                center_x=x0, center_y=y0)


def from_coolest_pemd(theta_E, q, phi, gamma, center_x=0.0, center_y=0.0) -> dict:
    """COOLEST ``PEMD`` parameters (``phi`` in degrees East of North) -> difflens SPLE.

    ``phi`` is returned in radians in [0, pi).

    Examples
    --------
    >>> p = from_coolest_pemd(1.0, 0.64, 0.0, 2.1)
    >>> float(p["r_ein"]), float(p["phi"]) == float(np.pi / 2)
    (1.25, True)
    """
    xp = _ops(theta_E, q, phi)
    return dict(r_ein=theta_E / xp.sqrt(q), q=q, phi=xp.remainder(_from_coolest_angle(phi), np.pi),
                gamma=gamma, x0=center_x, y0=center_y)


def to_coolest_shear(g1, g2) -> dict:
    """difflens shear ``g1, g2`` -> COOLEST ``ExternalShear`` (``gamma_ext``, ``phi_ext`` in
    degrees East of North, [-90, 90)).

    Examples
    --------
    >>> kw = to_coolest_shear(0.0, 0.05)       # shear axis at 45 deg from +x
    >>> round(float(kw["gamma_ext"]), 6), round(float(kw["phi_ext"]), 6)
    (0.05, -45.0)
    """
    xp = _ops(g1, g2)
    return dict(gamma_ext=xp.sqrt(g1 * g1 + g2 * g2),
                phi_ext=coolest_angle(0.5 * xp.arctan2(g2, g1)))


def from_coolest_shear(gamma_ext, phi_ext) -> dict:
    """COOLEST ``ExternalShear`` -> difflens ``g1, g2``.

    Examples
    --------
    >>> p = from_coolest_shear(0.05, -45.0)
    >>> round(float(p["g1"]), 6), round(float(p["g2"]), 6)
    (0.0, 0.05)
    """
    xp = _ops(gamma_ext, phi_ext)
    angle = _from_coolest_angle(phi_ext)
    return dict(g1=gamma_ext * xp.cos(2.0 * angle), g2=gamma_ext * xp.sin(2.0 * angle))
